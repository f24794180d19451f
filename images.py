"""Image sets for extract.py: ordered (image_id, source) lists per dataset, and robust decoding to RGB.

    import images
    items, root = images.index("things", "data/external/THINGS")        # sorted "<concept>/<image>.jpg"
    img = images.load_rgb(items[0])                                      # PIL RGB, or ImageError(reason)

Readers (DESIGN.md, "Real human data formats"); every id is what the evaluation stages match on:
    things   ROOT/<concept>/<image>.jpg              id "<concept>/<image>.jpg", sorted (the THINGS order)
    coco     ROOT/{train2017,val2017,...}/<n>.jpg     id "train2017/000000000009.jpg", sorted; --split picks folders
    levels   keys of DATA/levels.pkl -> ROOT/<wnid>/<key> in an ImageNet train tree; id = the key (file name)
    folder   every image under ROOT                   id = path relative to ROOT, sorted
    list     a text file, one path per line          id = the line as written, in file order (paths relative to ROOT)
    wds      webdataset tar shards (a glob or a {000..009} brace range); one image per sample key;
             id = "<shard>/<key>.<ext>", shards sorted, members in tar order

Nothing here imports torch, so command-line errors (a missing folder) come back in a fraction of a second.
"""
import collections
import glob
import io
import os
import re
import tarfile
from typing import NamedTuple

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif")
DATASETS = ("things", "coco", "levels", "folder", "list", "wds")


class ImageError(ValueError):
    """An image set that cannot be listed, or one image that cannot be decoded (the message says why)."""


class Item(NamedTuple):
    """One image: its id in the output file and where its bytes are (a file, or a member of a tar shard)."""
    id: str
    path: str
    offset: int = -1   # tar members: byte offset of the data in the shard
    size: int = -1     # tar members: byte count


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTS) and not os.path.basename(name).startswith(".")


def _need_dir(root, what):
    if not root or not os.path.isdir(root):
        raise ImageError(f"{root or '(empty --images)'}: folder not found; expected {what} (see README, Extraction)")
    return root


def _walk(root):
    """Relative posix paths of every image under root, sorted (byte order, like sorted() on the ids)."""
    out = []
    for d, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__MACOSX"]
        rel = os.path.relpath(d, root)
        out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if _is_image(f)]
    return sorted(out)


def things_items(root):
    """THINGS: ROOT/<concept>/<image>.jpg, sorted; files directly in ROOT are not images of a concept."""
    _need_dir(root, "the THINGS images, ROOT/<concept>/<image>.jpg (1,854 concept folders)")
    rel = [p for p in _walk(root) if p.count("/") == 1]
    if not rel:
        raise ImageError(f"{root}: no images in concept folders; expected ROOT/<concept>/<image>.jpg")
    return [Item(p, os.path.join(root, p)) for p in rel]


def coco_items(root, split="train2017"):
    """COCO: the images of ROOT/<split>/ for each comma-separated split, ids '<split>/<file>', sorted."""
    _need_dir(root, "the COCO folder with train2017/ (and val2017/, ...) from the official zips")
    items = []
    for s in [s for s in split.split(",") if s]:
        d = os.path.join(root, s)
        if not os.path.isdir(d):
            have = sorted(x for x in os.listdir(root) if os.path.isdir(os.path.join(root, x)))
            raise ImageError(f"{d}: COCO split folder not found (--split {split}); folders in {root}: {have}")
        items += [Item(f"{s}/{p}", os.path.join(d, p)) for p in _walk(d)]
    if not items:
        raise ImageError(f"{root}: no images in {split}")
    return sorted(items)


def levels_items(root, data_dir):
    """Levels: the sorted unique image keys of DATA/levels.pkl (data.load_levels), each found in an ImageNet
    train tree ROOT/<wnid>/<key> (wnid = the key's prefix before '_'), or directly as ROOT/<key>."""
    import data
    _need_dir(root, "an ImageNet train tree, ROOT/<wnid>/<wnid>_<n>.JPEG")
    _, keys = data.load_levels(data_dir)
    items = []
    for k in keys:
        nested, flat = os.path.join(root, k.split("_", 1)[0], k), os.path.join(root, k)
        items.append(Item(k, flat if os.path.exists(flat) and not os.path.exists(nested) else nested))
    if not any(os.path.exists(it.path) for it in items[:1000]):
        raise ImageError(f"{root}: none of the first {min(len(items), 1000)} Levels images found, e.g. "
                         f"{items[0].path}; expected an ImageNet train tree ROOT/<wnid>/<wnid>_<n>.JPEG")
    return items


def folder_items(root):
    _need_dir(root, "a folder of images")
    rel = _walk(root)
    if not rel:
        raise ImageError(f"{root}: no image files ({', '.join(IMAGE_EXTS)})")
    return [Item(p, os.path.join(root, p)) for p in rel]


def list_items(list_file, root=""):
    """One path per line (blank lines and '#' comments skipped), relative to root unless absolute; file order."""
    if not list_file or not os.path.isfile(list_file):
        raise ImageError(f"{list_file or '(empty --list)'}: list file not found; expected one image path per line")
    with open(list_file, encoding="utf-8") as fh:
        lines = [s.strip() for s in fh]
    ids = [s for s in lines if s and not s.startswith("#")]
    dup = [s for s, n in collections.Counter(ids).items() if n > 1]
    if dup:
        raise ImageError(f"{list_file}: {len(dup)} path(s) listed twice, e.g. {sorted(dup)[0]!r}; ids must be unique")
    if not ids:
        raise ImageError(f"{list_file}: no paths")
    return [Item(s, s if os.path.isabs(s) else os.path.join(root, s)) for s in ids]


def expand_shards(pattern):
    """'shards-{000..009}.tar' (webdataset brace range), a glob, or comma-separated paths -> sorted list."""
    out = []
    for part in pattern.split(","):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m:
            a, b = m.group(1), m.group(2)
            names = [part[:m.start()] + str(i).zfill(len(a)) + part[m.end():] for i in range(int(a), int(b) + 1)]
        else:
            names = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
        out += names
    missing = [p for p in out if not os.path.isfile(p)]
    if not out or missing:
        raise ImageError(f"{pattern}: tar shard(s) not found: {missing[:3] or out}")
    return out


def wds_items(pattern):
    """Webdataset shards read with the stdlib: each member <key>.<ext> with an image extension is one image.
    A sample with two image members (e.g. jpg and png) is an error: the id would be ambiguous."""
    items = []
    for shard in expand_shards(pattern):
        seen = set()
        name = os.path.basename(shard)
        try:
            with tarfile.open(shard, "r:") as tf:  # uncompressed tar: data offsets are seekable
                for m in tf:
                    if not m.isfile() or not _is_image(m.name):
                        continue
                    folder, base = os.path.split(m.name)
                    # webdataset's __key__
                    key = f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0]
                    if key in seen:
                        raise ImageError(f"{shard}: sample {key!r} has more than one image member")
                    seen.add(key)
                    items.append(Item(f"{name}/{m.name}", shard, m.offset_data, m.size))
        except tarfile.TarError as e:
            raise ImageError(f"{shard}: not a readable (uncompressed) tar shard ({e})") from None
    if not items:
        raise ImageError(f"{pattern}: no image members in the shards")
    return items


def index(dataset, images, data_dir="data/external", list_file="", split="train2017"):
    """The ordered Items of one image set (module docstring) and the root folder they were read from."""
    if dataset == "things":
        return things_items(images), images
    if dataset == "coco":
        return coco_items(images, split), images
    if dataset == "levels":
        return levels_items(images, data_dir), images
    if dataset == "folder":
        return folder_items(images), images
    if dataset == "list":
        return list_items(list_file, images), images
    if dataset == "wds":
        return wds_items(images), images
    raise ImageError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def default_root(dataset, data_dir):
    """Where each dataset's images live by default (fetch_data.py puts them there)."""
    return {"things": os.path.join(data_dir, "THINGS"), "coco": os.path.join(data_dir, "coco"),
            "levels": os.path.join(data_dir, "imagenet", "train")}.get(dataset, "")


# ------------------------------------------------------------------------------------------------ decoding

def read_bytes(item):
    with open(item.path, "rb") as fh:
        if item.offset < 0:
            return fh.read()
        fh.seek(item.offset)
        return fh.read(item.size)


def to_rgb(img):
    """Any PIL mode -> RGB. 16-bit and 32-bit grey are scaled to 8 bits (PIL's convert would clip them);
    palette images with transparency and LA/RGBA drop alpha (as timm/open_clip's .convert('RGB') does)."""
    from PIL import Image
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(np.round(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(item):
    """Decode one image fully (so a truncated file fails here, not later) -> PIL RGB; ImageError(reason)."""
    from PIL import Image
    try:
        raw = read_bytes(item)
    except OSError as e:
        raise ImageError(f"unreadable: {e.strerror or e}") from None
    if not raw:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP/TIFF: the first frame
            return to_rgb(img).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"not a decodable image ({type(e).__name__}: {e})") from None


class ImageDataset:
    """Map-style dataset for torch's DataLoader (any object with __len__/__getitem__ works there):
    position j -> (tensor (3, H, W), j, error). A bad image yields `blank` and its error message, so a batch
    keeps its composition (and its numerics) whether or not a file in it decodes."""

    def __init__(self, items, transform, blank):
        self.items, self.transform, self.blank = items, transform, blank

    def __len__(self):
        return len(self.items)

    def __getitem__(self, j):
        try:
            return self.transform(load_rgb(self.items[j])), j, ""
        except ImageError as e:
            return self.blank, j, str(e)
        except Exception as e:  # a transform that fails on an odd image (e.g. 1-pixel wide) is a bad file too
            return self.blank, j, f"preprocessing failed ({type(e).__name__}: {e})"
