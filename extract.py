"""Images -> features/*.h5 (a vision backbone over an image set), and the embedded synthetic world.

Real images (backbones.py: models and weights; images.py: image sets; README "Extraction"):
    python extract.py --dataset things --backbone dinov2 --out data/features/dinov2/things.h5
    python extract.py --dataset coco   --backbone clip   --split train2017,val2017      # -> data/features/clip/coco.h5
    python extract.py --dataset levels --backbone clip   --images data/external/imagenet/train
    python extract.py --dataset folder --images DIR --backbone timm:resnet18.a1_in1k --out F.h5 --layers layer3,layer4
    python extract.py --dataset list --list paths.txt --images ROOT ...
    python extract.py --dataset wds --images 'shards/{000..099}.tar'
    python extract.py ... --pca 256                 # also /pca/features/scores (IncrementalPCA) and the basis
    python extract.py ... --sae runs/sae/clip.pt    # also /sae/indices, /sae/values (models.sae_encode)
    python extract.py ... --shard 3/16              # one of 16 contiguous shards -> F.shard-00003-of-00016.h5
    python extract.py ... --merge                   # all shards -> F.h5 (--pca / --sae applied here, over all rows)
    python extract.py --backbone dinov2 --list-layers
    bash slurm/extract_array.sbatch things dinov2 16     # SLURM: a job array over shards, then the merge
A run writes F.h5.partial and renames it to F.h5 when complete; a killed run leaves F.h5.partial and the same
command resumes it, giving the same rows byte for byte. Weights are never downloaded (backbones.py).

The embedded synthetic world (features + every human-data file; make demo and the tests):
    python extract.py --dataset synthetic --out data/world                    # small world, < 10 s
    python extract.py --dataset synthetic --out data/world --size full        # 1,854 concepts, < 2 min
    python extract.py --dataset synthetic --out data/world --n-triplets 4700000 --size full
World sizes default per --size (see world.SIZES); any of them can be set as a flag, e.g. --n-concepts 300.
"""
import functools
import glob
import hashlib
import json
import os
import shutil
import sys
import time

import backbones  # sets the Hugging Face offline variables before any library that reads them is imported
import data
import images

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    dataset="synthetic",         # synthetic | things | coco | levels | folder | list | wds
    out="",                      # real: features HDF5 ('' -> data/features/<backbone>/<dataset>.h5); synthetic: folder
                                 # ('' -> data/world)
    size="small",                # synthetic: small | full world
    seed=0,                      # synthetic: world seed (same seed -> identical files); real: init seed of --weights
                                 # random
    backbone="clip",             # a backbones.REGISTRY name, or timm:ARCH | open_clip:ARCH[@TAG] | torchvision:ARCH
    weights="",                  # '' = local file (data/weights, Hugging Face / torch cache) | PATH | random
    weights_dir="data/weights",  # where <backbone>.safetensors|.pt|.pth|.bin are looked for first
    images="",                   # image root ('' -> the dataset's folder under --data); wds: shard glob / {a..b} range
    data="data/external",        # data folder (levels.pkl for --dataset levels; default image roots)
    list="",                     # --dataset list: text file, one image path per line
    split="train2017",           # coco: comma-separated split folders
    layer="",                    # /features: 'output' (the library's pooled embedding) or a module name ('' = backbone
                                 # default)
    layers="",                   # extra layers -> /layers/<name>, comma-separated module names
    pooling="",                  # head (the model's own) | cls | mean | max | flatten | auto ('' = backbone default)
    batch=64,                    # images per forward pass
    workers=-1,                  # image-decoding processes (-1 = min(8, cores - 1); 0 = in the main process)
    threads=0,                   # torch threads for the forward pass (0 = torch's default; 1 is fastest on a busy
                                 # 2-core machine)
    device="auto",               # auto (cuda if available) | cpu | cuda | cuda:1
    precision="fp32",            # fp32 | bf16 | fp16 (autocast for the forward pass)
    dtype="float32",             # stored features: float32 | float16
    shard="",                    # i/N: extract the i-th of N contiguous shards (0-based) into F.shard-0000i-of-0000N.h5
    merge=False,                 # concatenate every F.shard-*-of-N.h5 into F.h5
    pca=0,                       # > 0: also store this many principal components, /pca/<name>/scores (IncrementalPCA)
    pca_batch=4096,              # rows per IncrementalPCA partial_fit
    sae="",                      # SAE checkpoint: also write its top-k codes (train.py --stage sae --encode)
    on_bad="skip",               # skip (report undecodable images in /bad) | error (stop at the first)
    max_batches=0,               # stop after this many batches of this run (0 = all); the same command resumes
    overwrite=False,             # replace an output (or partial) file made with another backbone or config, or a
                                 # world (synthetic)
    list_layers=False,           # print the backbone's layer names and exit
    progress=True,               # tqdm progress bar with images/s
)
# the settings that make an output file what it is: a file at --out made with others is refused (--overwrite)
IDENTITY = ("dataset", "backbone", "weights", "images", "list", "split", "layer", "layers", "pooling", "dtype",
            "precision", "pca", "sae", "seed")
REAL = list(images.DATASETS)


WORLD_ONLY = ("size",)  # flags of the synthetic world besides its knobs (world.SIZES, world.COMMON)


def truth_value(text):
    """A boolean world flag's value: true/false, yes/no, 1/0 (any case); anything else is a usage error (argparse's
    type=bool would read 'False' as True)."""
    import argparse
    word = str(text).strip().lower()
    if word in ("true", "yes", "1"):
        return True
    if word in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def parse(argv=None):
    """Flags; the world's (--size and every knob of world.py) only with --dataset synthetic: with a real
    dataset each is an error naming it, never silently ignored."""
    import world
    p = data.flag_parser(__doc__, defaults)
    p.set_defaults(size=None)  # None = not given: 'small' for the world, an error for a real dataset
    # world knobs: default None = the value of the chosen --size; type taken from the small world's value
    knobs = dict(world.SIZES["small"], **world.COMMON)
    for k, v in knobs.items():
        full = world.SIZES["full"].get(k, v)
        p.add_argument("--" + k.replace("_", "-"), type=truth_value if isinstance(v, bool) else type(v), default=None,
                       help=f"world setting (small: {v}, full: {full}; --dataset synthetic only)")
    args = p.parse_args(argv)  # unknown flags are an error
    data.check_flags(p, vars(args), dict(batch=">= 1", workers=">= -1", threads=">= 0", pca=">= 0", pca_batch=">= 1",
                                         max_batches=">= 0"))
    given = [k for k in list(knobs) + list(WORLD_ONLY) if getattr(args, k) is not None]
    if args.dataset != "synthetic" and given:
        flags = ["--" + k.replace("_", "-") for k in given]
        p.error(f"{flags[0]} is a setting of the synthetic world; it takes --dataset synthetic (got --dataset "
                f"{args.dataset})" + (f"; also given: {', '.join(flags[1:])}" if len(flags) > 1 else ""))
    if args.size is None:
        args.size = defaults["size"]
    return args


# ------------------------------------------------------------------------------------------- output naming

def default_out(cfg):
    return os.path.join("data", "features", backbones.safe_name(cfg["backbone"]), f"{cfg['dataset']}.h5")


def parse_shard(shard):
    try:
        i, n = (int(x) for x in shard.split("/"))
        assert 0 <= i < n
        return i, n
    except (ValueError, AssertionError):
        raise data.DataError(f"--shard {shard!r}: expected i/N with 0 <= i < N, e.g. 0/16") from None


def shard_path(out, i, n):
    stem, ext = os.path.splitext(out)
    return f"{stem}.shard-{i:05d}-of-{n:05d}{ext or '.h5'}"


def shard_range(n_items, batch_size, i, n):
    """Item range of shard i of n, cut at batch boundaries so every batch is the one an unsharded run forms
    (the same rows in a batch give the same numerics: the merged file equals the unsharded one)."""
    n_batches = -(-n_items // batch_size)
    b0, b1 = n_batches * i // n, n_batches * (i + 1) // n
    return min(n_items, b0 * batch_size), min(n_items, b1 * batch_size)


# --------------------------------------------------------------------------------- resumable partial file

class Partial:
    """F.h5.partial: every dataset is allocated at creation (contiguous, early allocation), so a batch only
    overwrites raw rows and then the one `done` counter. A kill at any moment leaves the committed rows and
    counter readable; the next run with the same settings continues at `done`.

    /features, /layers/<name> (n, d); /status (n,) uint8: 0 pending, 1 ok, 2 bad; /errors (n,) S200;
    /image_ids (n,) utf-8; attrs: done, fingerprint (JSON of everything that decides the rows)."""

    def __init__(self, path, ids, dims, dtype, fingerprint, overwrite=False):
        import h5py
        import numpy as np
        self.path, self.n = path, len(ids)
        fp = json.dumps(fingerprint, sort_keys=True)
        if os.path.exists(path):
            try:
                self.f = open_partial(path)
            except OSError as e:  # a kill inside HDF5's own metadata write: nothing to resume
                print(f"extract.py: {path} is unreadable ({e}); starting over", file=sys.stderr)
                os.remove(path)
            else:
                old = self.f.attrs.get("fingerprint", "")
                if old != fp and overwrite:  # another run's rows: start over (a matching one resumes)
                    self.f.close()
                    os.remove(path)
                elif old != fp:
                    a, b = json.loads(old or "{}"), json.loads(fp)
                    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    self.f.close()
                    raise data.DataError(f"{path}: a partial run with other settings ({', '.join(diff)} differ); "
                                         f"rerun with its settings to resume, or --overwrite to start over")
                else:
                    self.done = int(self.f.attrs["done"])
                    return
        item = np.dtype(dtype).itemsize
        data.check_space(path, self.n * (sum(dims.values()) * item + 1 + 200 + 64))  # HDF5 may crash on a full disk
        with data.atomic_path(path) as tmp:  # the partial file appears complete or not at all
            with h5py.File(tmp, "w") as f:
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                for name, d in dims.items():
                    f.create_dataset(name, shape=(self.n, d), dtype=dtype, dcpl=dcpl)
                f.create_dataset("status", shape=(self.n,), dtype="u1", dcpl=dcpl)
                f.create_dataset("errors", shape=(self.n,), dtype="S200", dcpl=dcpl)
                f.create_dataset("image_ids", data=ids, dtype=h5py.string_dtype("utf-8"))
                f.attrs["done"] = 0
                f.attrs["fingerprint"] = fp
        self.f = h5py.File(path, "r+")
        self.done = 0

    def write(self, lo, rows, status, errors):
        hi = lo + len(status)
        for name, arr in rows.items():
            self.f[name][lo:hi] = arr
        self.f["status"][lo:hi] = status
        self.f["errors"][lo:hi] = [e.encode("utf-8")[:200] for e in errors]
        self.f.flush()

    def commit(self, hi):
        self.f.attrs["done"] = hi
        self.f.flush()
        self.done = hi

    def close(self):
        self.f.close()


def open_partial(path, wait=10.0):
    """h5py.File(path, "r+"). HDF5 locks a file it opens; a run killed with -9 may leave data-loader workers that
    hold it for a moment (they die with their parent, data.die_with_parent). A locked file is waited for, then
    named as held by another process, and never mistaken for a corrupt one (an OSError of any other kind)."""
    import h5py
    t = time.time()
    while True:
        try:
            return h5py.File(path, "r+")
        except OSError as e:
            if "unable to lock file" not in str(e):
                raise
            if time.time() - t > wait:
                raise data.DataError(f"{path}: open in another process for {wait:.0f} s ({e}); another extract.py "
                                     "(or a worker it left behind) still holds it. Stop it, then rerun: the rows "
                                     "done so far resume") from None
            time.sleep(0.25)


# ------------------------------------------------------------------------------ final file: merge, PCA, copy

class Rows:
    """The kept rows of one dataset across source files, in order: read(s, e) -> (e - s, d) array."""

    def __init__(self, files, masks, name):
        import numpy as np
        self.parts = [(f[name], np.flatnonzero(m)) for f, m in zip(files, masks)]
        self.offsets = np.cumsum([0] + [len(idx) for _, idx in self.parts])
        self.n, self.d = int(self.offsets[-1]), self.parts[0][0].shape[1]

    def read(self, s, e):
        import numpy as np
        out = []
        for (ds, idx), o in zip(self.parts, self.offsets):
            a, b = max(s, o), min(e, o + len(idx))
            if a < b:
                raw = idx[a - o:b - o]
                out.append(ds[raw[0]:raw[-1] + 1][raw - raw[0]])  # one contiguous read, then drop bad rows
        return np.concatenate(out) if out else np.zeros((0, self.d), np.float32)


def fit_pca(rows, k, batch):
    """IncrementalPCA over rows in batches of `batch` (the last one merged if it has fewer than k rows): the
    same batches, hence the same result, as IncrementalPCA(k, batch_size=batch).fit(all rows)."""
    from sklearn.decomposition import IncrementalPCA
    from sklearn.utils import gen_batches
    if not 0 < k <= min(rows.n, rows.d):
        raise data.DataError(f"--pca {k}: needs 0 < k <= min(n_images, d) = min({rows.n}, {rows.d})")
    ipca = IncrementalPCA(n_components=k)
    for sl in gen_batches(rows.n, max(batch, k), min_batch_size=k):
        ipca.partial_fit(rows.read(sl.start, sl.stop).astype("float64"))
    return ipca


def write_final(out, files, masks, bad, attrs, cfg):
    """Concatenate the kept rows of `files` (partial or shard files, same datasets) into `out`, atomically;
    with --pca each representation also gets /pca/<name>/scores (n, k) and its basis (components, mean, ...)."""
    import h5py
    import numpy as np
    names = ["features"] + [f"layers/{n}" for n in files[0].get("layers", {})]
    ids = np.concatenate([np.asarray(f["image_ids"][...], dtype=object)[m] for f, m in zip(files, masks)])
    block = max(1024, cfg["pca_batch"])
    n, item = int(sum(int(np.sum(m)) for m in masks)), np.dtype(cfg["dtype"]).itemsize
    data.check_space(out, n * (sum(files[0][name].shape[1] for name in names) * item  # HDF5 may crash on a full
                               + len(names) * cfg["pca"] * item + 128))            # disk: checked first
    chunks = lambda n, d: (max(1, min(1024, n)), d) if n else None  # noqa: E731  row blocks for streaming readers
    with data.atomic_path(out) as tmp, h5py.File(tmp, "w") as fo:
        for name in names:
            rows = Rows(files, masks, name)
            ipca = fit_pca(rows, cfg["pca"], cfg["pca_batch"]) if cfg["pca"] else None
            ds = fo.create_dataset(name, shape=(rows.n, rows.d), dtype=cfg["dtype"], chunks=chunks(rows.n, rows.d))
            if ipca:
                sc = fo.create_dataset(f"pca/{name}/scores", shape=(rows.n, cfg["pca"]), dtype=cfg["dtype"],
                                       chunks=chunks(rows.n, cfg["pca"]))
            for s in range(0, rows.n, block):
                x = rows.read(s, min(rows.n, s + block))
                ds[s:s + len(x)] = x
                if ipca:
                    sc[s:s + len(x)] = ipca.transform(x.astype("float64"))
            if ipca:
                g = fo[f"pca/{name}"]
                for key in ("components_", "mean_", "explained_variance_", "explained_variance_ratio_",
                            "singular_values_"):
                    g.create_dataset(key.rstrip("_"), data=getattr(ipca, key))
                g.attrs["n_samples_seen"] = int(ipca.n_samples_seen_)
        fo.create_dataset("image_ids", data=ids.astype(object), dtype=h5py.string_dtype("utf-8"))
        fo.create_dataset("bad/image_ids", data=np.array([b[0] for b in bad], dtype=object),
                          dtype=h5py.string_dtype("utf-8"))
        fo.create_dataset("bad/errors", data=np.array([b[1] for b in bad], dtype=object),
                          dtype=h5py.string_dtype("utf-8"))
        data.write_h5_attrs(fo, dict(attrs, n_bad=len(bad), pca=cfg["pca"] or None, config=cfg))
        fo.attrs["versions"] = json.dumps(all_versions())
    return out


def all_versions():
    out = data.versions()
    for name in ["timm", "open_clip", "torchvision", "PIL", "sklearn"]:
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "unknown")
    return out


def encode_sae(cfg, out):
    """--sae: the SAE stage's encoder (models.sae_encode, as train.py --stage sae --encode) writes /sae/* into
    `out`, atomically."""
    import models
    return models.sae_encode(out, cfg["sae"], config=cfg)


def finish(out, files, masks, bad, attrs, cfg):
    write_final(out, files, masks, bad, attrs, cfg)
    if cfg["sae"]:
        encode_sae(cfg, out)
    return out


# ------------------------------------------------------------------------------------------------ extract

def existing(path, cfg):
    """A finished file at the output path: made with these settings -> nothing to do; else refuse (--overwrite)."""
    with data.open_h5(path, "a features file written by extract.py") as f:
        old = json.loads(f.attrs.get("config", "{}"))
    diff = [k for k in IDENTITY if old.get(k) != cfg.get(k)]
    if diff:
        raise data.DataError(f"{path}: exists and was made with other settings ("
                             + ", ".join(f"{k} {old.get(k)!r} vs {cfg.get(k)!r}" for k in diff)
                             + "); pass --overwrite to replace it, or another --out")
    print(f"extract.py: {path} is complete with these settings; nothing to do (--overwrite extracts again)")
    return dict(out=path, skipped=True)


def fingerprint(cfg, bb, layers, ids, lo, hi):
    """Everything that decides a row's values (not the batch size, workers or device)."""
    return dict(backbone=cfg["backbone"], weights=bb.weights, layers=layers, pooling=cfg["pooling"],
                dtype=cfg["dtype"], precision=cfg["precision"], transform=repr(bb.transform), range=[lo, hi],
                image_ids=hashlib.sha1("\n".join(ids).encode()).hexdigest())


def extract(cfg, on_batch=None):
    """Extract cfg's image set (or one shard of it) into its output file; returns a summary dict.

    on_batch(k): called after batch k's rows are written and before they are committed (tests raise or kill
    the process there to simulate an interruption at the worst moment)."""
    spec = backbones.parse_spec(cfg["backbone"])
    out = cfg["out"] or default_out(cfg)
    if spec["name"] in backbones.REGISTRY:  # before any heavy import: a missing file is named in a second
        backbones.resolve_weights(spec, cfg["weights"], cfg["weights_dir"], deep=False)
    if cfg["merge"]:
        return merge(cfg, out)
    root = cfg["images"] or images.default_root(cfg["dataset"], cfg["data"])
    items, root = images.index(cfg["dataset"], root, cfg["data"], cfg["list"], cfg["split"])
    lo, hi, target = 0, len(items), out
    if cfg["shard"]:
        i, n = parse_shard(cfg["shard"])
        lo, hi = shard_range(len(items), cfg["batch"], i, n)
        target = shard_path(out, i, n)
    data.check_unique(cfg["list"] or root, "image ids", [it.id for it in items])
    with data.claim_outputs({"--out": target, "partial file": target + ".partial"}, inputs(cfg)):
        if os.path.exists(target) and not cfg["overwrite"]:
            return existing(target, dict(cfg, pca=0, sae="") if cfg["shard"] else cfg)
        import torch
        threads = torch.get_num_threads()
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        try:
            return _extract(cfg, spec, items, root, lo, hi, target, on_batch)
        finally:
            torch.set_num_threads(threads)


def inputs(cfg):
    """The input files of a real extraction ({flag: path}): an --out equal to one of them is refused."""
    weights = cfg["weights"] if cfg["weights"] not in ("", "random") else ""
    return {"--list": cfg["list"], "--sae": cfg["sae"], "--weights": weights,
            "--data (levels.pkl)": os.path.join(cfg["data"], "levels.pkl") if cfg["dataset"] == "levels" else ""}


def _extract(cfg, spec, items, root, lo, hi, target, on_batch):
    import numpy as np
    import torch
    device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    torch.manual_seed(cfg["seed"])  # --weights random: the same untrained network on every run and shard
    bb = backbones.build(cfg["backbone"], cfg["weights"], cfg["weights_dir"], device)
    layer = cfg["layer"] or spec["layer"]
    extra = [l for l in cfg["layers"].split(",") if l and l != layer]
    pooling = cfg["pooling"] or spec["pooling"]
    if pooling not in backbones.POOLINGS:
        raise data.DataError(f"--pooling {pooling!r}; expected one of {backbones.POOLINGS}")
    amp = dict(fp32=None, bf16=torch.bfloat16, fp16=torch.float16)
    if cfg["precision"] not in amp or cfg["dtype"] not in ("float32", "float16"):
        raise data.DataError(f"--precision {cfg['precision']!r} / --dtype {cfg['dtype']!r}: expected fp32|bf16|fp16 "
                             f"and float32|float16")

    from PIL import Image
    blank = bb.transform(Image.new("RGB", (256, 256)))  # (3, H, W): stands in for undecodable images

    def forward(x):
        with torch.autocast(torch.device(device).type, dtype=amp[cfg["precision"]] or torch.float32,
                            enabled=amp[cfg["precision"]] is not None):
            return bb.features(x.to(device, non_blocking=True), [layer] + extra, pooling)

    probe, used = forward(blank[None])  # layer sizes (and bad layer names) before any image is read
    names = {layer: "features", **{l: f"layers/{l}" for l in extra}}
    dims = {names[l]: int(v.shape[1]) for l, v in probe.items()}
    ids = [it.id for it in items[lo:hi]]
    part_path = target + ".partial"
    part = Partial(part_path, ids, dims, cfg["dtype"], fingerprint(cfg, bb, [layer] + extra, ids, lo, hi),
                   cfg["overwrite"])
    start = part.done
    workers = cfg["workers"] if cfg["workers"] >= 0 else min(8, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(
        images.ImageDataset(items, bb.transform, blank), batch_size=cfg["batch"],
        sampler=range(lo + start, hi), num_workers=workers, pin_memory=device.startswith("cuda"),
        worker_init_fn=functools.partial(data.die_with_parent, parent=os.getpid()) if workers else None)
    print(f"extract.py: {cfg['dataset']} ({hi - lo} images of {len(items)} under {root}"
          f"{', resuming at ' + str(start) if start else ''}) -> {target}; {bb.name} ({bb.weights}) on {device}, "
          f"{layer} [{used[layer]}] d={dims['features']}, {workers} workers", flush=True)
    from tqdm import tqdm
    bar = tqdm(total=hi - lo, initial=start, unit="img", desc=f"{bb.name} {cfg['dataset']}", smoothing=0.1,
               disable=not cfg["progress"], mininterval=1 if sys.stderr.isatty() else 30)
    k, n_done, t1 = 0, 0, time.time()
    try:
        for x, pos, errors in loader:
            feats, _ = forward(x)
            p0 = int(pos[0]) - lo
            bad = np.array([bool(e) for e in errors])
            if bad.any() and cfg["on_bad"] == "error":
                j = int(np.flatnonzero(bad)[0])
                raise images.ImageError(f"{items[int(pos[j])].path}: {errors[j]} (--on-bad error)")
            part.write(p0, {names[l]: v.cpu().numpy() for l, v in feats.items()},
                       np.where(bad, 2, 1).astype(np.uint8), list(errors))
            if on_batch is not None:
                on_batch(k)
            part.commit(p0 + len(pos))
            k, n_done = k + 1, n_done + len(pos)
            bar.update(len(pos))
            if cfg["max_batches"] and k >= cfg["max_batches"] and part.done < hi - lo:
                bar.close()
                part.close()
                print(f"extract.py: stopped after {k} batches (--max-batches) at {part.done}/{hi - lo}; "
                      f"the same command resumes {part_path}")
                return dict(out=part_path, done=part.done, stopped=True)
    except BaseException:
        bar.close()
        part.close()
        raise
    bar.close()
    rate = n_done / max(time.time() - t1, 1e-9)
    status = part.f["status"][...]
    errs = part.f["errors"][...]
    bad = [(ids[j], errs[j].decode("utf-8", "replace")) for j in np.flatnonzero(status == 2)]
    attrs = dict(backbone=bb.name, library=spec["library"], arch=spec["arch"], tag=spec["tag"] or None,
                 weights=bb.weights, layer=layer, layers=extra, pooling=used, dataset=cfg["dataset"],
                 image_root=os.path.abspath(root) if root else "", n_items=len(items),
                 item_range=[lo, hi], shard=cfg["shard"] or None, transform=repr(bb.transform))
    sub = dict(cfg, pca=0, sae="") if cfg["shard"] else cfg  # shards stay raw: PCA and codes come at the merge
    finish(target, [part.f], [status == 1], bad, attrs, sub)
    part.close()
    os.remove(part_path)
    for iid, err in bad[:20]:
        print(f"  bad image {iid}: {err}", file=sys.stderr)
    if bad:
        print(f"extract.py: {len(bad)} undecodable image(s) left out; listed in {target} /bad/image_ids, /bad/errors",
              file=sys.stderr)
    print(f"extract.py: {len(ids) - len(bad)} rows -> {target} ({rate:.1f} images/s this run, "
          f"{time.time() - t0:.1f} s in all)")
    return dict(out=target, n=len(ids) - len(bad), n_bad=len(bad), images_per_s=rate, seconds=time.time() - t0)


def merge(cfg, out):
    """Every F.shard-*-of-N.h5 -> F.h5 in shard order; checks that the shards are all there and alike."""
    with data.claim_outputs({"--out": out}, dict(inputs(cfg), **{
            f"shard ({p})": p for p in glob.glob(f"{glob.escape(os.path.splitext(out)[0])}.shard-*")})):
        return _merge(cfg, out)


def _merge(cfg, out):
    import h5py
    import numpy as np
    if os.path.exists(out) and not cfg["overwrite"]:
        return existing(out, cfg)
    stem, ext = os.path.splitext(out)
    found = sorted(glob.glob(f"{glob.escape(stem)}.shard-*-of-*{ext or '.h5'}"))
    found = [p for p in found if not p.endswith(".partial")]
    if not found:
        raise data.DataError(f"{out}: no shard files {stem}.shard-*-of-N{ext} to merge; run --shard i/N first")
    n = int(found[0].rsplit("-of-", 1)[1].split(".")[0])
    want = [shard_path(out, i, n) for i in range(n)]
    missing = [i for i, p in enumerate(want) if not os.path.exists(p)]
    if missing or len(found) != n:
        raise data.DataError(f"{out}: {len(missing)} of {n} shards missing (e.g. --shard {missing[0]}/{n} -> "
                             f"{want[missing[0]]}); finish them first" if missing else
                             f"{out}: shard files with different N beside each other: {found[:4]}")
    files = [h5py.File(p, "r") for p in want]
    try:
        keys = ("backbone", "weights", "layer", "dataset", "transform", "n_items")
        a0 = {k: files[0].attrs.get(k) for k in keys}
        for p, f in zip(want, files):
            diff = [k for k in keys if str(f.attrs.get(k)) != str(a0[k])]
            if diff:
                raise data.DataError(f"{p}: made with other settings than {want[0]} ({', '.join(diff)} differ)")
        ranges = [json.loads(f.attrs["item_range"]) for f in files]
        if ranges[0][0] != 0 or any(r[1] != s[0] for r, s in zip(ranges, ranges[1:])) or \
                ranges[-1][1] != int(a0["n_items"]):
            raise data.DataError(f"{out}: shard item ranges {ranges} do not tile 0..{a0['n_items']}")
        bad = [(i.decode() if isinstance(i, bytes) else i, e.decode() if isinstance(e, bytes) else e)
               for f in files for i, e in zip(f["bad/image_ids"][...], f["bad/errors"][...])]
        attrs = {k: (json.loads(v) if k in ("pooling", "layers", "item_range") else v)
                 for k, v in files[0].attrs.items() if k not in ("config", "created", "versions", "n_bad", "pca")}
        attrs.update(item_range=[0, int(a0["n_items"])], shard=None, merged_from=n)
        masks = [np.ones(f["features"].shape[0], bool) for f in files]
        finish(out, files, masks, bad, attrs, cfg)
    finally:
        for f in files:
            f.close()
    print(f"extract.py: {n} shards -> {out} ({sum(len(m) for m in masks)} rows); the shard files are kept")
    return dict(out=out, n=int(sum(len(m) for m in masks)), n_bad=len(bad), shards=n)


def list_layers(cfg):
    bb = backbones.build(cfg["backbone"], "random", cfg["weights_dir"])
    spec = bb.spec
    print(f"{bb.name}: {spec['library']} {spec['arch']}; default layer {spec['layer']!r}, pooling "
          f"{spec['pooling']!r}; preprocessing {bb.transform!r}")
    for name, mod in bb.model.named_modules():
        if name:
            print(f"  {name:50s} {type(mod).__name__}")


# ------------------------------------------------------------------------------------------------- world

def is_world(folder):
    """A folder holding a world (world.py's files: world_truth.h5, or features marked synthetic)."""
    return os.path.exists(os.path.join(folder, "world_truth.h5")) or \
        data.is_synthetic(os.path.join(folder, "features", "things.h5"))


def _world_child(conn, folder, size, seed, overrides):
    """The forked process that writes a world into `folder`; sends ('ok', paths) or ('error', message)."""
    import traceback
    import world
    try:
        conn.send(("ok", world.make_world(folder, size=size, seed=seed, **overrides)))
    except Exception as e:
        reason = data.write_failure(e)
        if not reason and not isinstance(e, data.DataError):
            traceback.print_exc()  # a bug, not bad input: its traceback helps
        conn.send(("error", str(e) if isinstance(e, data.DataError) or not reason else
                   f"{getattr(e, 'filename', None) or 'a file'}: writing failed: {reason}"))
    finally:
        conn.close()


def make_world(cfg, overrides):
    """--dataset synthetic: the embedded world into the folder --out, whole or not at all. One writer at a time
    (a lock beside the folder); an existing world is replaced only with --overwrite, and a folder holding anything
    else never. world.make_world runs in a forked process writing into <out>.tmp-<pid>, which replaces --out only
    when complete: a full disk, a file-size limit or a crash (HDF5 may crash when a write fails) leaves --out as it
    was and ends in one message naming the file."""
    import multiprocessing
    out = os.path.normpath(cfg["out"] or "data/world")
    with data.claim_outputs({"--out": out}, folders=True):
        if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
            if not is_world(out):
                raise data.DataError(f"{out}: exists and holds no world (no world_truth.h5); --dataset synthetic "
                                     "writes a new folder, or replaces a world with --overwrite")
            if not cfg["overwrite"]:
                raise data.DataError(f"{out}: a world exists there; pass --overwrite to replace it, or another --out")
        tmp = f"{out}.tmp-{os.getpid()}"
        ctx = multiprocessing.get_context("fork")
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_world_child, args=(send, tmp, cfg["size"], cfg["seed"], overrides))
        child.start()
        send.close()
        try:
            status, got = recv.recv()
        except EOFError:  # the child died without a word (a crash inside a library)
            status, got = "error", ""
        child.join()
        if status != "ok" or child.exitcode != 0:
            left = sorted(glob.glob(os.path.join(glob.escape(tmp), "**", f"*.tmp-{child.pid}"), recursive=True))
            if not got:
                import signal
                died = f"signal {signal.Signals(-child.exitcode).name}" if child.exitcode < 0 else \
                    f"exit status {child.exitcode}"
                got = (f"{left[0][:-len(f'.tmp-{child.pid}')] if left else 'a file'}: the writer died ({died}) "
                       "while writing it; a full disk or a file-size limit makes HDF5 crash like this")
            shutil.rmtree(tmp, ignore_errors=True)
            raise data.DataError(f"{out}: the world could not be written ({got.replace(tmp, out)}); {out} is "
                                 "unchanged")
        if os.path.exists(out):  # --overwrite: the old world goes only once the new one is complete
            old = f"{tmp}-old"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    return {k: out + v[len(tmp):] if v.startswith(tmp) else v for k, v in got.items()}


def main(argv=None, on_batch=None):
    with data.script_errors("extract.py"):
        args = parse(argv)
        cfg = vars(args)
        if args.dataset == "synthetic" and not args.list_layers:
            overrides = {k: v for k, v in cfg.items() if k not in defaults and v is not None}
            paths = make_world(cfg, overrides)
            for name, path in paths.items():
                print(f"  {name:28s} {path}")
            return paths
        if args.dataset not in REAL and args.dataset != "synthetic":
            sys.exit(f"extract.py: error: unknown --dataset {args.dataset!r}; expected synthetic or one of {REAL}")
        cfg = {k: v for k, v in cfg.items() if k in defaults}  # the world knobs play no part here
        try:
            if args.list_layers:
                return list_layers(cfg)
            return extract(cfg, on_batch=on_batch)
        except (data.DataError, images.ImageError, backbones.WeightsError) as e:
            sys.exit(f"extract.py: error: {e}")


if __name__ == "__main__":
    main()
