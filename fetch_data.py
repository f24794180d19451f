"""Download the public data sets into data/external, and registry backbone weights into data/weights (make data).

    python fetch_data.py                          # groups human + images (THINGS, COCO train/val/test: ~31 GB)
    python fetch_data.py --only human             # human | images | weights, comma-separated; or --name spose,levels
    python fetch_data.py --only weights --name dinov2
    python fetch_data.py --list                   # the manifest: name, group, target, checksum
    python fetch_data.py --verify                 # check downloaded files against their sha256
    python fetch_data.py --manifest my.json       # another manifest: a JSON list of entries like MANIFEST's

Each entry: name, group, url, target (relative to --root), kind file | zip, member (zip: the folder or file
inside the archive that becomes `target`; '' = the whole archive), sha256 (when the publisher gives one;
a hex prefix such as torch hub's 8 characters is checked as a prefix), password (zip), manual (a page to
get it from by hand: ImageNet needs an account). Downloads go to TARGET.part (resumed with an HTTP Range
request after an interruption), are checked, then unpacked or renamed; an entry whose target exists is
skipped. A file without a published checksum gets its sha256 recorded in data/SHA256SUMS when first
downloaded, and --verify checks files against that record.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import urllib.request
import zipfile

import backbones  # registry weights: one entry per backbone with a published file

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    root=".",                    # targets are relative to this folder
    only="human,images",         # groups to fetch: human | images | weights (comma-separated)
    name="",                     # only these entries (comma-separated names), any group
    manifest="",                 # JSON manifest instead of the built-in MANIFEST
    list=False,                  # print the manifest and exit
    verify=False,                # check existing targets' sha256 (published, else recorded) and exit
    force=False,                 # fetch even if the target exists
    timeout=60.0,                # seconds without data before a download fails
)
SUMS = "data/SHA256SUMS"
E = "data/external"
MANIFEST = [
    dict(name="spose", group="human", url="https://osf.io/nfbp3/download", target=f"{E}/spose_embedding_66d_sorted.txt",
         note="SPoSE 66-d embedding of the 1,854 THINGS concepts (Hebart et al. 2020), OSF"),
    dict(name="unique_id", group="human", url="https://osf.io/7zuah/download", target=f"{E}/unique_id.txt",
         note="concept names in SPoSE row order"),
    dict(name="triplets", group="human", url="https://osf.io/n9u4a/download", target=f"{E}/THINGS_triplets.csv",
         kind="zip", member="triplet_dataset/triplets_large_final_correctednc_correctedorder.csv",
         note="THINGS odd-one-out triplets (4.7M), OSF"),
    dict(name="things_metadata", group="human", url="https://osf.io/pc98z/download", target=f"{E}/THINGS_metadata.tsv",
         note="THINGS concept metadata (categories, words), OSF"),
    dict(name="category_learning", group="human", url="https://osf.io/rsd46/download",
         target=f"{E}/category_learning.csv", note="category learning trials, OSF"),
    dict(name="reward_learning", group="human", url="https://osf.io/6exjm/download",
         target=f"{E}/reward_learning.csv", note="reward learning trials, OSF"),
    dict(name="levels", group="human",
         url="https://gin.g-node.org/fborn/Dataset_Levels/raw/master/processed_data/pruned_dataset.pkl",
         target=f"{E}/levels.pkl", note="Levels odd-one-out trials (Muttenthaler et al.), G-Node GIN"),
    dict(name="brain_data", group="human", url="https://plus.figshare.com/ndownloader/files/43635873",
         target=f"{E}/brain_data", kind="zip", member="betas_csv/",
         note="THINGS-fMRI single-trial responses, table format (sub-0X_*), figshare+"),
    dict(name="things_images", group="images", url="https://things-initiative.org/uploads/THINGS/images.zip",
         target=f"{E}/THINGS", kind="zip", member="images/", password="things4all",
         note="THINGS images, 1,854 concept folders, 26,107 images (~5 GB)"),
    dict(name="coco_train2017", group="images", url="http://images.cocodataset.org/zips/train2017.zip",
         target=f"{E}/coco/train2017", kind="zip", member="train2017/", note="COCO train2017, 118k images (18 GB)"),
    dict(name="coco_val2017", group="images", url="http://images.cocodataset.org/zips/val2017.zip",
         target=f"{E}/coco/val2017", kind="zip", member="val2017/", note="COCO val2017, 5k images (1 GB)"),
    dict(name="coco_test2017", group="images", url="http://images.cocodataset.org/zips/test2017.zip",
         target=f"{E}/coco/test2017", kind="zip", member="test2017/", note="COCO test2017, 41k images (6 GB)"),
    dict(name="imagenet_train", group="images", url="https://image-net.org/download-images.php",
         target=f"{E}/imagenet/train", manual=True,
         note="ImageNet-1k train (Levels images) needs an account: put ILSVRC2012_img_train as "
              "imagenet/train/<wnid>/<wnid>_<n>.JPEG"),
]
for _n, _s in backbones.REGISTRY.items():  # registry weights: the file backbones.py looks for first
    if _s.get("hub") or _s["library"] == "timm":
        _hub = _s.get("hub") or f"timm/{_s['arch']}"
        _f = (_s.get("files") or backbones.TIMM_FILES)[0]
        _url = f"https://huggingface.co/{_hub}/resolve/main/{_f}"
    elif _s["library"] == "torchvision":
        _f = _s["files"][0]
        _url = f"https://download.pytorch.org/models/{_f}"
    else:
        continue
    MANIFEST.append(dict(name=_n, group="weights", url=_url, target=f"data/weights/{_n}{os.path.splitext(_f)[1]}",
                         sha256=_f.rsplit("-", 1)[1].split(".")[0] if _s["library"] == "torchvision" else "",
                         note=f"{_s['library']} {_s['arch']} weights"))

FIELDS = dict(name="", group="", url="", target="", kind="file", member="", sha256="", password="", manual=False,
              note="")


class FetchError(RuntimeError):
    """A download, checksum or archive problem; the message names the entry and the file."""


def check_manifest(entries, source="MANIFEST"):
    """Validate and complete the entries (defaults for missing fields) -> list of dicts."""
    out, names = [], set()
    for i, e in enumerate(entries):
        unknown = set(e) - set(FIELDS)
        missing = [k for k in ("name", "group", "url", "target") if not e.get(k)]
        if unknown or missing:
            raise FetchError(f"{source}: entry {i} ({e.get('name', '?')}): missing {missing}, "
                             f"unknown {sorted(unknown)}")
        e = dict(FIELDS, **e)
        if e["name"] in names:
            raise FetchError(f"{source}: entry name {e['name']!r} appears twice")
        if e["kind"] not in ("file", "zip"):
            raise FetchError(f"{source}: entry {e['name']}: kind {e['kind']!r}; expected file | zip")
        if os.path.isabs(e["target"]) or ".." in e["target"].replace("\\", "/").split("/"):
            raise FetchError(f"{source}: entry {e['name']}: target {e['target']!r} must be relative, inside --root")
        if e["sha256"] and not all(c in "0123456789abcdef" for c in e["sha256"].lower()):
            raise FetchError(f"{source}: entry {e['name']}: sha256 {e['sha256']!r} is not hex")
        names.add(e["name"])
        out.append(e)
    return out


def load_manifest(path=""):
    if not path:
        return check_manifest(MANIFEST)
    with open(path, encoding="utf-8") as fh:
        return check_manifest(json.load(fh), path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(root):
    path = os.path.join(root, SUMS)
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return {line.split(None, 1)[1].strip(): line.split(None, 1)[0] for line in fh if line.strip()}


def record_sum(root, name, digest):
    sums = read_sums(root)
    sums[name] = digest
    path = os.path.join(root, SUMS)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        fh.writelines(f"{d}  {n}\n" for n, d in sorted(sums.items()))
    os.replace(path + ".tmp", path)


def download(url, part, timeout, opener=urllib.request.urlopen):
    """url -> part, resuming a partial download with a Range request when the server honours it (206)."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "metalign-fetch/1 (python urllib)"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        with opener(req, timeout=timeout) as r:
            status = getattr(r, "status", None) or r.getcode() or 200
            mode = "ab" if have and status == 206 else "wb"
            total = r.headers.get("Content-Length") if getattr(r, "headers", None) else None
            done = have if mode == "ab" else 0
            with open(part, mode) as fh:
                while True:
                    block = r.read(1 << 20)
                    if not block:
                        break
                    fh.write(block)
                    done += len(block)
            if total is not None and done - (have if mode == "ab" else 0) != int(total):
                expected = int(total) + (have if mode == "ab" else 0)
                raise FetchError(f"{url}: connection closed after {done} bytes of {expected}; "
                                 f"rerun to resume")
    except OSError as e:  # URLError, HTTPError, timeouts: keep the .part for a resumed rerun
        raise FetchError(f"{url}: download failed ({e}); rerun to resume {part}") from None
    return part


def verify_digest(e, path, root, key):
    """Published sha256 (or its prefix), else the recorded one; returns the digest. A mismatch deletes path."""
    digest = sha256_file(path)
    want = e["sha256"].lower() or read_sums(root).get(key, "")
    if want and not digest.startswith(want):
        os.remove(path)
        raise FetchError(f"{e['name']}: sha256 of {e['url']} is {digest}, expected {want}"
                         f"{'' if e['sha256'] else ' (recorded in ' + SUMS + ')'}; the download was removed")
    return digest


def unpack(e, archive, target):
    """Extract the entry's member (a folder 'x/' or one file) from the zip into target, safely."""
    member = e["member"]
    with zipfile.ZipFile(archive) as z:
        if e["password"]:
            z.setpassword(e["password"].encode())
        names = [n for n in z.namelist() if not n.startswith("__MACOSX/") and not n.endswith("/")]
        if member and not member.endswith("/"):  # one file -> target (a file)
            if member not in names:
                raise FetchError(f"{e['name']}: {member!r} not in {e['url']} (has e.g. {names[:5]})")
            tmp = target + ".part"
            with z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, target)
            return target
        chosen = [n for n in names if n.startswith(member)]
        if not chosen:
            raise FetchError(f"{e['name']}: no files under {member!r} in {e['url']} (has e.g. {names[:5]})")
        tmp_dir = target + ".part.d"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        base = os.path.realpath(tmp_dir)
        for n in chosen:
            dest = os.path.realpath(os.path.join(tmp_dir, n[len(member):]))
            if not dest.startswith(base + os.sep):
                raise FetchError(f"{e['name']}: archive member {n!r} would land outside {target}; refused")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(n) as src, open(dest, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp_dir, target)
    return target


def fetch(e, root=".", force=False, timeout=60.0, opener=urllib.request.urlopen):
    """One entry -> its target under root; returns 'skipped' | 'manual' | 'fetched'."""
    target = os.path.join(root, e["target"])
    if os.path.exists(target) and not force:
        return "skipped"
    if e["manual"]:
        return "manual"
    if force and os.path.exists(target):
        shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    part = target + (".zip" if e["kind"] == "zip" else "") + ".part"
    key = e["target"] + (".zip" if e["kind"] == "zip" else "")
    print(f"fetch_data.py: {e['name']}: {e['url']} -> {e['target']}", flush=True)
    download(e["url"], part, timeout, opener)
    digest = verify_digest(e, part, root, key)
    if not e["sha256"]:
        record_sum(root, key, digest)
    if e["kind"] == "zip":
        unpack(e, part, target)
        os.remove(part)
    else:
        os.replace(part, target)
    return "fetched"


def verify(entries, root="."):
    """-> list of (name, 'ok' | 'missing' | 'unchecked (...)' | 'MISMATCH ...') for every entry."""
    sums, out = read_sums(root), []
    for e in entries:
        target = os.path.join(root, e["target"])
        if not os.path.exists(target):
            out.append((e["name"], "missing"))
        elif e["kind"] == "zip" or os.path.isdir(target):
            out.append((e["name"], "unchecked (unpacked archive; checked when downloaded)"))
        else:
            want = e["sha256"].lower() or sums.get(e["target"], "")
            digest = sha256_file(target)
            out.append((e["name"], "unchecked (no checksum published or recorded)" if not want else
                        "ok" if digest.startswith(want) else f"MISMATCH: sha256 {digest}, expected {want}"))
    return out


def select(entries, only, names):
    if names:
        wanted = [n for n in names.split(",") if n]
        unknown = [n for n in wanted if n not in {e["name"] for e in entries}]
        if unknown:
            raise FetchError(f"--name {','.join(unknown)}: not in the manifest ({[e['name'] for e in entries]})")
        return [e for e in entries if e["name"] in wanted]
    groups = [g for g in only.split(",") if g]
    return [e for e in entries if e["group"] in groups]


def main(argv=None, opener=urllib.request.urlopen):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for k, v in defaults.items():
        if isinstance(v, bool):
            p.add_argument("--" + k, action=argparse.BooleanOptionalAction, default=v)
        else:
            p.add_argument("--" + k, type=type(v), default=v)
    cfg = vars(p.parse_args(argv))
    try:
        entries = select(load_manifest(cfg["manifest"]), cfg["only"], cfg["name"])
        if cfg["list"]:
            for e in entries:
                print(f"{e['name']:18s} {e['group']:8s} {e['target']:45s} "
                      f"{'manual: ' + e['url'] if e['manual'] else e['sha256'] or '(no published sha256)'}"
                      f"  {e['note']}")
            return entries
        if cfg["verify"]:
            res = verify(entries, cfg["root"])
            for n, r in res:
                print(f"{n:18s} {r}")
            if any(r.startswith("MISMATCH") for _, r in res):
                sys.exit(1)
            return res
        res = {e["name"]: fetch(e, cfg["root"], cfg["force"], cfg["timeout"], opener) for e in entries}
    except FetchError as err:
        sys.exit(f"fetch_data.py: error: {err}")
    for e in entries:
        if res[e["name"]] == "manual":
            print(f"fetch_data.py: {e['name']}: get it by hand from {e['url']}: {e['note']} (target {e['target']})")
    print(f"fetch_data.py: {sum(r == 'fetched' for r in res.values())} fetched, "
          f"{sum(r == 'skipped' for r in res.values())} already there, "
          f"{sum(r == 'manual' for r in res.values())} by hand")
    return res


if __name__ == "__main__":
    main()
