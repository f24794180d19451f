"""HDF5 contract between stages and loaders for the real human-data formats.

Flat shared module (see DESIGN.md "HDF5 between stages" and "Real human data formats"). Every loader
raises DataError (a ValueError) whose message names the file, the field or column, and what was expected,
so a user with a half-downloaded data folder learns what to fix without reading a traceback.

    from data import read_features, load_triplets
    X, ids = read_features("out/features/things.h5")         # (n_images, d) float32, list[str]
    t = load_triplets("data/external", n_concepts=1854)       # dict of (N, 3) / (N,) int64, 0-based
"""
import argparse
import contextlib
import datetime
import errno
import functools
import glob
import json
import os
import pickle
import platform
import shutil
import socket
import sys
import tempfile

import h5py
import numpy as np
import pandas as pd


class DataError(ValueError):
    """Bad or missing input data; the message names the file, the field and what was expected."""


def flag_parser(doc, *defaults, nargs=(), prog=None):
    """The flat scripts' argparse (STYLE.md): one --flag-with-dashes per key of the defaults dicts, type taken
    from the default, booleans as --x / --no-x (a key no_x gives --no-x for True and --x for False), list defaults
    and the keys in `nargs` take one or more values; unknown and abbreviated flags are errors. Returns the parser,
    for scripts that add flags or checks."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for d in defaults:
        for k, v in d.items():
            flag = "--" + k.replace("_", "-")
            if isinstance(v, bool) and k.startswith("no_"):  # BooleanOptionalAction would read --no-x as x = False
                g = p.add_mutually_exclusive_group()
                g.add_argument(flag, dest=k, action="store_true", default=v)
                g.add_argument("--" + k[3:].replace("_", "-"), dest=k, action="store_false")
            elif isinstance(v, bool):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
            elif isinstance(v, list) or k in nargs:
                p.add_argument(flag, nargs="+", default=v if isinstance(v, list) else [v])
            else:
                p.add_argument(flag, type=type(v), default=v)
    return p


def versions():
    """Versions of the interpreter and the libraries that shape numerical results (skips missing ones): a module's
    __version__ where it is imported, else its installed distribution's version, read without importing it
    (importing scikit-learn and tables only for this cost 1-3 s per output written). torch is imported: its
    __version__ names the CUDA build (2.x.y+cu130), its distribution's metadata may not."""
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name, dist in [("numpy", "numpy"), ("scipy", "scipy"), ("torch", "torch"), ("h5py", "h5py"),
                       ("pandas", "pandas"), ("tables", "tables"), ("sklearn", "scikit-learn")]:
        try:
            mod = sys.modules.get(name) or (__import__(name) if name == "torch" else None)
            out[name] = getattr(mod, "__version__", "unknown") if mod is not None else metadata.version(dist)
        except Exception:
            pass
    return out


CONFIG_TABLES = ("sae", "meta", "warp", "evaluate")  # the tables a preset file may hold: train.py stages, evaluate.py


def load_config(path, tables):
    """A preset file (TOML, read with the standard library's tomllib) -> {table: {key: value}} for the tables this
    script reads. `tables` maps each such table to the flags it may set (their defaults); keys are flag names
    with dashes or underscores. An unknown key, a top-level key outside every table, or a table that no script
    reads (see CONFIG_TABLES) is a DataError naming the file and the key."""
    import tomllib
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise DataError(f"{path} not found; expected a TOML config file (--config)") from None
    except tomllib.TOMLDecodeError as e:
        raise DataError(f"{path}: not valid TOML ({e})") from None
    out = {}
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise DataError(f"{path}: key {name!r} outside a table; put it under one of "
                            f"{', '.join(f'[{t}]' for t in CONFIG_TABLES)}")
        if name not in CONFIG_TABLES:
            raise DataError(f"{path}: unknown table [{name}]; expected some of {list(CONFIG_TABLES)}")
        if name not in tables:
            continue  # another script's table (evaluate.py's in a file train.py reads, and so on)
        known = tables[name]
        out[name] = {}
        for k, v in table.items():
            key = k.replace("-", "_")
            if key not in known or key in ("config", "stage"):
                raise DataError(f"{path}: unknown key {k!r} in [{name}]; expected some of "
                                f"{sorted(x for x in known if x not in ('config', 'stage'))}")
            out[name][key] = v
    return out


def _config_value(path, key, v, want, listed):
    """A config file's value checked against the flag's default: bool for bool, int for int, a number for
    float, a string for str, a string or a list of strings where the flag takes several values."""
    if isinstance(want, bool):
        ok = isinstance(v, bool)
    elif isinstance(v, bool):
        ok = False
    elif listed:
        ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
    elif isinstance(want, float):
        ok = isinstance(v, (int, float))
    else:
        ok = isinstance(v, type(want))
    if not ok:
        raise DataError(f"{path}: key {key!r} = {v!r}; expected {'a list of strings or ' if listed else ''}"
                        f"a value of type {type(want).__name__} (the default is {want!r})")
    if listed:
        return v if isinstance(v, list) else [v]
    return float(v) if isinstance(want, float) else v


def parse_flags(p, argv, defaults, table, tables, nargs=()):
    """Parse argv with --config FILE.toml applied first: the file's [table] values replace the defaults and flags
    given on the command line override them. `tables` ({table: defaults}) are the tables this script checks,
    so a typo in the file fails whichever stage runs. An unknown key or a value of the wrong type is a usage
    error naming the file and the key. Returns the resolved config dict (`config`: the file's path or '')."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            file_cfg = load_config(known.config, tables)
            for name, values in file_cfg.items():  # every table type-checked, this script's one applied
                checked = {k: _config_value(known.config, f"[{name}] {k}", v, tables[name][k],
                                            isinstance(tables[name][k], list) or k in nargs)
                           for k, v in values.items()}
                if name == table:
                    p.set_defaults(**checked)
        except DataError as e:
            p.error(str(e))
    return vars(p.parse_args(argv))


def subject_tag(s):
    """A THINGS-fMRI subject as its file-name tag: 1, "1", "01" or "sub-01" -> "sub-01"."""
    s = str(s).strip()
    return s if s.startswith("sub-") else f"sub-{int(s):02d}"


def split_list(text):
    """A comma-separated flag value -> its non-empty, stripped items ('' -> [])."""
    return [t.strip() for t in str(text).split(",") if t.strip()]


def parse_floats(text, flag):
    """A comma-separated list of positive numbers (a grid of C or lambda values) -> list[float]."""
    try:
        vals = [float(x) for x in split_list(text)]
    except ValueError:
        raise DataError(f"--{flag} {text!r}: expected comma-separated numbers") from None
    if not vals or any(v <= 0 for v in vals):
        raise DataError(f"--{flag} {text!r}: expected positive comma-separated numbers")
    return vals


def parse_ints(text, flag, low):
    """A comma-separated list of integers >= low -> list[int]."""
    try:
        vals = [int(t) for t in split_list(text)]
    except ValueError:
        raise DataError(f"--{flag} {text!r}: expected comma-separated integers") from None
    bad = [v for v in vals if v < low]
    if bad or not vals:
        raise DataError(f"--{flag} {text!r}: expected integers >= {low}")
    return vals


def r2_per_target(pred, Y):
    """Coefficient of determination of each column of Y (n, t) -> (t,): 1 - SSE / SST (SST floored at 1e-12).
    Works on numpy arrays and torch tensors alike."""
    sse = ((Y - pred) ** 2).sum(0)
    sst = ((Y - Y.mean(0)) ** 2).sum(0)
    return 1 - sse / sst.clip(min=1e-12)


@contextlib.contextmanager
def torch_threads(n):
    """Temporarily run torch with n threads (n <= 0: leave as is). Small ops and the behavioural fits are long
    chains of elementwise ops; on the shared 2-core machines one thread is fastest (measured 327 s with 2
    contended threads vs ~60 s with one for the 4.7M-triplet fit), on a free many-core node more help: --threads."""
    import torch
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def with_threads(fn):
    """Decorator: run fn(cfg, ...) with cfg["threads"] torch threads (see torch_threads)."""
    @functools.wraps(fn)
    def wrapped(cfg, *args, **kwargs):
        with torch_threads(cfg.get("threads", 1)):
            return fn(cfg, *args, **kwargs)
    return wrapped


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on cluster nodes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi=120, tight=False, **kwargs):
    """Write a figure as PNG atomically (see atomic_path) and close it -> path."""
    plt = pyplot()
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **kwargs)
    plt.close(fig)
    return path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` on success, delete it on error.

    os.replace is atomic within one file system, which is why the temp file lives in the same folder:
    a killed job leaves either the old file, the new file, or a stray .tmp-<pid>, never a half-written path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{os.path.basename(path)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        yield tmp
    except BaseException as e:
        reason = write_failure(e) or (out_of_room(tmp) if isinstance(e, Exception) else None)
        if os.path.exists(tmp):
            os.remove(tmp)
        if reason:  # a full disk or a file-size limit: one message naming the file, the old file left as it was
            raise DataError(f"{path}: writing failed: {reason} ({room(folder)}); {path} is unchanged") from None
        raise
    if not os.path.exists(tmp):
        raise DataError(f"{path}: nothing was written to the temporary file {tmp}")
    os.replace(tmp, path)


def _attr_value(v):
    # HDF5 attrs hold scalars, strings and arrays; nested containers go in as JSON so they round-trip.
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    if isinstance(v, (np.generic, np.ndarray, str, bytes, int, float, bool)):
        return v
    return str(v)


def write_h5_attrs(f, attrs=None):
    """Set attrs on an open h5py File/Group: JSON for containers, `config` always JSON, plus created/versions."""
    for k, v in (attrs or {}).items():
        if v is None:
            continue
        f.attrs[k] = json.dumps(v, default=str) if k == "config" else _attr_value(v)
    f.attrs["created"] = datetime.datetime.now().isoformat(timespec="seconds")
    f.attrs["versions"] = json.dumps(versions())


def write_features(path, features, image_ids, attrs=None, layers=None, chunk_rows=1024):
    """Write /features (n, d), /image_ids (n,) utf-8 and optional /layers/<name> atomically.

    features: (n_images, d) float16 kept as is, anything else stored float32; rows chunked by chunk_rows
    so later stages can stream row blocks.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise DataError(f"{path}: /features must be 2-d (n_images, d), got shape {features.shape}")
    if features.dtype != np.float16:
        features = features.astype(np.float32, copy=False)
    image_ids = [str(s) for s in image_ids]
    if len(image_ids) != features.shape[0]:
        raise DataError(f"{path}: {len(image_ids)} image_ids for {features.shape[0]} feature rows")
    n = features.shape[0]

    def chunks(a):
        return (max(1, min(chunk_rows, n)),) + a.shape[1:] if n > 0 else None

    size = features.nbytes + sum(np.asarray(a).nbytes for a in (layers or {}).values()) + 64 * n
    with h5_create(path, size) as f:
        f.create_dataset("features", data=features, chunks=chunks(features))
        f.create_dataset("image_ids", data=np.array(image_ids, dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
        for name, arr in (layers or {}).items():
            arr = np.asarray(arr)
            if arr.shape[0] != n:
                raise DataError(f"{path}: /layers/{name} has {arr.shape[0]} rows, expected {n}")
            f.create_dataset(f"layers/{name}", data=arr, chunks=chunks(arr))
        write_h5_attrs(f, attrs)
    return path


def decode_strings(a):
    return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in a]


def open_h5(path, expected):
    """h5py.File(path, "r"), or a DataError saying the file is missing (and what was `expected` there) or
    unreadable."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path} not found; expected {expected}")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None


def is_synthetic(path):
    """True for a file of the embedded world: world.py marks every HDF5 file it writes with the attr
    `synthetic`. Missing or unreadable files are not synthetic (their readers report them)."""
    try:
        with h5py.File(os.fspath(path), "r") as f:
            return bool(f.attrs.get("synthetic", False))
    except (OSError, TypeError, ValueError):
        return False


SYNTHETIC = "synthetic world"  # how every result and report built from the world's files begins its header


def result_header(paths, what):
    """The header line of a result: 'synthetic world: ...' when any input file is the world's, else the inputs."""
    paths = [str(p) for p in paths if p]
    synth = [p for p in paths if is_synthetic(p)]
    if synth:
        return f"{SYNTHETIC}: {what} on the embedded world (world.py), not human data; from {', '.join(synth)}"
    return f"{what} on {', '.join(paths) or 'the inputs in config'}"


def read_features(path, field="features", check_finite=True):
    """Read (features (n, d) float32, image_ids list[str]) from a features HDF5 file."""
    path = os.fspath(path)
    with open_h5(path, "an HDF5 file with /features and /image_ids, see README") as f:
        present = []
        f.visit(lambda name: present.append(name) if isinstance(f[name], h5py.Dataset) else None)
        if field not in f or not isinstance(f[field], h5py.Dataset):
            raise DataError(f"{path}: field '/{field}' missing; datasets present: {present}")
        if "image_ids" not in f:
            raise DataError(f"{path}: field '/image_ids' missing (needed to match rows to images); "
                            f"datasets present: {present}")
        X = np.asarray(f[field][...], dtype=np.float32)
        ids = decode_strings(f["image_ids"][...])
    if X.ndim != 2:
        raise DataError(f"{path}: /{field} must be 2-d (n_images, d), got shape {X.shape}")
    if X.shape[0] != len(ids):
        raise DataError(f"{path}: /{field} has {X.shape[0]} rows but /image_ids has {len(ids)} entries")
    check_unique(path, "/image_ids", ids)
    if check_finite:
        bad = ~np.isfinite(X)
        if bad.any():
            rows = np.nonzero(bad.any(1))[0]
            raise DataError(f"{path}: /{field} has {int(bad.sum())} non-finite values, first at row {rows[0]}")
    return X, ids


def _need(path, what="file"):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path} not found; expected the {what} (see README, 'Real human data formats')")
    return path


def _check_columns(path, df, required):
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected {list(required)}, "
                        f"found {list(df.columns)}")


def load_concepts(data_dir):
    """Concept names from unique_id.txt, in SPoSE row order -> list[str] (n_concepts,)."""
    path = _need(os.path.join(data_dir, "unique_id.txt"), "list of THINGS concepts, one per line")
    with open(path, encoding="utf-8") as fh:
        names = [line.strip() for line in fh if line.strip()]
    if not names:
        raise DataError(f"{path}: no concept names found")
    if len(set(names)) != len(names):
        raise DataError(f"{path}: concept names are not unique")
    return names


def load_spose(data_dir, n_concepts=None):
    """SPoSE embedding (n_concepts, n_dims) float32; the 66-d file, else the 49-d variant. Rows are counted from 1
    in messages (blank lines are skipped)."""
    path = os.path.join(data_dir, "spose_embedding_66d_sorted.txt")
    alt = os.path.join(data_dir, "spose_embedding_49d_sorted.txt")
    if not os.path.exists(path) and os.path.exists(alt):
        path = alt
    _need(path, "SPoSE embedding (whitespace-separated, one concept per row)")
    with open(path, encoding="utf-8", errors="replace") as fh:
        rows = [line.split() for line in fh]
    rows = [r for r in rows if r]
    if not rows:
        raise DataError(f"{path}: empty file; expected one row of whitespace-separated numbers per concept")
    width = len(rows[0])
    for r, toks in enumerate(rows):
        if len(toks) != width:  # a missing value shifts nothing silently: the row is named, not read as NaN
            raise DataError(f"{path}: row {r + 1} has {len(toks)} values, expected {width} (as row 1)")
    try:
        E = np.array(rows, dtype=np.float64).astype(np.float32)
    except ValueError:
        r, c = next((r, c) for r, toks in enumerate(rows) for c, v in enumerate(toks) if not _is_number(v))
        raise DataError(f"{path}: row {r + 1}, column {c + 1}: {rows[r][c]!r} is not a number") from None
    if n_concepts is not None and E.shape[0] != n_concepts:
        raise DataError(f"{path}: {E.shape[0]} rows, expected {n_concepts} (one per concept in unique_id.txt)")
    bad = ~np.isfinite(E)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{path}: {int(bad.sum())} non-finite values, first at row {r + 1}, column {c + 1} "
                        f"({rows[r][c]!r})")
    return E


def _is_number(v):
    try:
        float(v)
        return True
    except ValueError:
        return False


def concept_rows(image_ids, concepts, path="features"):
    """Row of the first sorted image "<concept>/..." of each concept -> (n_concepts,) int64.

    DESIGN: a backbone's concept representation is the features of the first sorted image per concept.
    """
    first = {}
    for i, iid in enumerate(image_ids):
        c = iid.split("/", 1)[0]
        if c not in first or iid < image_ids[first[c]]:
            first[c] = i
    missing = [c for c in concepts if c not in first]
    if missing:
        raise DataError(f"{path}: /image_ids has no image for {len(missing)} of {len(concepts)} concepts, "
                        f"first missing: {missing[:5]} (expected ids like '{missing[0]}/<image>.jpg')")
    return np.array([first[c] for c in concepts], dtype=np.int64)


def load_triplets(data_dir, n_concepts):
    """THINGS odd-one-out triplets -> dict(triplets (N, 3), choice (N,), subject (N,)), int64, 0-based.

    choice is the 0-based position (0..2) of the odd one out within the row's triplet.
    """
    path = _need(os.path.join(data_dir, "THINGS_triplets.csv"), "tab-separated THINGS triplet file")
    cols = ["image1", "image2", "image3", "choice", "subject_id"]
    header = read_csv(path, "triplets", sep="\t", nrows=0)
    _check_columns(path, header, cols)
    try:
        # explicit int64 dtypes keep the C parser on its fast path (4.7M rows in a few seconds)
        df = read_csv(path, "triplets", sep="\t", usecols=cols, engine="c", dtype={c: np.int64 for c in cols[:4]})
    except ValueError as e:  # a non-integer or empty cell: read as text to name it
        raw = read_csv(path, "triplets", sep="\t", usecols=cols, dtype=str)
        for c in cols[:4]:
            check_cells(path, raw, c, "an integer", integer=True)
        raise DataError(f"{path}: columns {cols[:4]} must be integers ({e})") from None
    for c in cols[:3]:
        v = df[c].to_numpy()
        bad = np.nonzero((v < 1) | (v > n_concepts))[0]
        if len(bad):
            r = bad[0]
            raise DataError(f"{path}: column '{c}' has index {v[r]} out of range 1..{n_concepts} "
                            f"(row {r + 1}, {len(bad)} bad rows)")
    ch = df["choice"].to_numpy()
    bad = np.nonzero((ch < 1) | (ch > 3))[0]
    if len(bad):
        raise DataError(f"{path}: column 'choice' has value {ch[bad[0]]} not in 1..3 (row {bad[0] + 1})")
    subj = df["subject_id"]
    if pd.api.types.is_integer_dtype(subj):
        subject = subj.to_numpy(np.int64)
    else:  # hashed / string subject ids: stable integer codes in order of appearance
        subject = pd.factorize(subj)[0].astype(np.int64)
    return dict(triplets=df[cols[:3]].to_numpy(np.int64) - 1, choice=ch.astype(np.int64) - 1,
                subject=subject)


def load_levels(data_dir):
    """Levels triplets -> (trials DataFrame, image_keys sorted list[str]).

    trials: participant, image1, image2, image3 (image keys = file base names), selected (0-based position
    0..2 of the chosen odd one out), triplet_type; only exp_trial_type == "exp_trial" rows.
    """
    path = _need(os.path.join(data_dir, "levels.pkl"), "Levels pickle (dict participant -> list of trials)")
    try:
        with open(path, "rb") as fh:
            raw = pickle.load(fh)
    except Exception as e:
        raise DataError(f"{path}: could not unpickle ({e})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a dict participant_id -> list of trial dicts, got {type(raw).__name__}")
    rows = [dict(t, participant=p) for p, trials in raw.items() for t in trials]
    df = pd.DataFrame(rows)
    need = ["image1Path", "image2Path", "image3Path", "selected_image", "triplet_type", "exp_trial_type"]
    _check_columns(path, df, need)
    df = df[df["exp_trial_type"] == "exp_trial"].reset_index(drop=True)
    for c in need:  # a field absent from some trial dicts shows up as NaN after the DataFrame union
        gap = np.nonzero(df[c].isna().to_numpy())[0]
        if len(gap):
            raise DataError(f"{path}: field '{c}' missing in {len(gap)} exp trials, first of participant "
                            f"{df['participant'][gap[0]]!r}")
    def key(s):
        return s.astype(str).map(lambda p: p.replace("\\", "/").rsplit("/", 1)[-1])
    imgs = np.stack([key(df[f"image{j}Path"]).to_numpy() for j in (1, 2, 3)], 1)  # (n_trials, 3)
    sel = key(df["selected_image"]).to_numpy()
    hit = imgs == sel[:, None]
    bad = np.nonzero(hit.sum(1) != 1)[0]
    if len(bad):
        r = bad[0]
        raise DataError(f"{path}: field 'selected_image' = {sel[r]!r} is not one of the trial's three images "
                        f"(exp trial {r}, participant {df['participant'][r]!r})")
    trials = pd.DataFrame(dict(participant=df["participant"].to_numpy(), image1=imgs[:, 0], image2=imgs[:, 1],
                               image3=imgs[:, 2], selected=hit.argmax(1).astype(np.int64),
                               triplet_type=df["triplet_type"].to_numpy()))
    return trials, sorted(set(imgs.ravel().tolist()))


def load_category_learning(data_dir):
    """category_learning.csv -> DataFrame (participant, image, choice, true_category_binary[, trial, dimension,
    correct]); choice and true_category_binary checked to be 0 or 1 (int64)."""
    path = _need(os.path.join(data_dir, "category_learning.csv"), "category learning CSV")
    df = read_csv(path, "trials (one per row)")
    req = ["participant", "image", "choice", "true_category_binary"]
    _check_columns(path, df, req)
    df = df[req + [c for c in ["trial", "dimension", "correct"] if c in df.columns]].copy()
    for c in ("participant", "image"):
        check_cells(path, df, c, "a value")
    for c in ("choice", "true_category_binary"):
        df[c] = check_cells(path, df, c, "0 or 1", allowed=(0, 1))
    return df


def load_reward_learning(data_dir):
    """reward_learning.csv -> DataFrame (participant, left_image, right_image, left_reward, right_reward, choice).

    choice: 0 = left, 1 = right (the embedded world's coding; a `trial` column is kept when present); rewards
    checked to be finite numbers (float64), choice 0 or 1 (int64).
    """
    path = _need(os.path.join(data_dir, "reward_learning.csv"), "reward learning CSV")
    df = read_csv(path, "trials (one per row)")
    req = ["participant", "left_image", "right_image", "left_reward", "right_reward", "choice"]
    _check_columns(path, df, req)
    df = df[req + (["trial"] if "trial" in df.columns else [])].copy()
    for c in ("participant", "left_image", "right_image"):
        check_cells(path, df, c, "a value")
    for c in ("left_reward", "right_reward"):
        df[c] = check_cells(path, df, c, "a finite number")
    df["choice"] = check_cells(path, df, "choice", "0 (left) or 1 (right)", allowed=(0, 1))
    return df


def load_fmri(data_dir, subject):
    """THINGS-fMRI single-trial responses of one subject (1, "01" or "sub-01").

    Returns dict(responses (n_voxels, n_trials) float32, voxel_ids (n_voxels,) int64,
    voxels = VoxelMetadata rows in response order, stimuli = StimulusMetadata, one row per trial).
    """
    sub = subject_tag(subject)
    folder = os.path.join(data_dir, "brain_data")
    rpath = _need(os.path.join(folder, f"{sub}_ResponseData.h5"), "pandas HDF file of single-trial responses")
    vpath = _need(os.path.join(folder, f"{sub}_VoxelMetadata.csv"), "voxel metadata CSV")
    spath = _need(os.path.join(folder, f"{sub}_StimulusMetadata.csv"), "stimulus metadata CSV")
    try:
        rd = pd.read_hdf(rpath)
    except Exception as e:
        raise DataError(f"{rpath}: could not read as a pandas HDF table ({e})") from None
    _check_columns(rpath, rd, ["voxel_id"])
    voxel_ids = rd["voxel_id"].to_numpy(np.int64)
    responses = rd.drop(columns=["voxel_id"]).to_numpy(np.float32)  # (n_voxels, n_trials)
    voxels = read_csv(vpath, "voxels (one per row)")
    _check_columns(vpath, voxels, ["voxel_id", "nc_singletrial"])
    idx = pd.Index(voxels["voxel_id"].to_numpy(np.int64))
    pos = idx.get_indexer(voxel_ids)
    if (pos < 0).any():
        raise DataError(f"{vpath}: column 'voxel_id' lacks {int((pos < 0).sum())} voxels of {rpath}, "
                        f"first {voxel_ids[pos < 0][0]}")
    voxels = voxels.iloc[pos].reset_index(drop=True)
    stimuli = read_csv(spath, "trials (one per row)")
    _check_columns(spath, stimuli, ["session", "concept", "stimulus"])
    if len(stimuli) != responses.shape[1]:
        raise DataError(f"{spath}: {len(stimuli)} rows (trials) but {rpath} has {responses.shape[1]} trial columns")
    return dict(responses=responses, voxel_ids=voxel_ids, voxels=voxels, stimuli=stimuli)


# ====================================================================================================== faults
# What every script shares when input or the machine is bad: one error exit, inputs that are never outputs,
# outputs checked writable and locked before any work, temporary files of killed runs removed, full disks
# and file-size limits reported by file name, CSV cells named by column, row and value.

class ScriptExit(SystemExit):
    """A script's error exit: status 2 (argparse's usage-error status), str() is the message."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def fail(script, message):
    """Print '<script>: error: <message>' to stderr and exit with status 2 (raises ScriptExit)."""
    text = f"{script}: error: {message}"
    print(text, file=sys.stderr, flush=True)
    raise ScriptExit(text)


WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EFBIG: "file too large (a file-size limit, "
                "ulimit -f, or the file system's maximum)", errno.EDQUOT: "disk quota exceeded"}
WRITE_MARKERS = {"No space left on device": errno.ENOSPC, "File too large": errno.EFBIG,
                 "file too large": errno.EFBIG, "Disk quota exceeded": errno.EDQUOT}


def write_failure(e):
    """The reason a write failed for lack of room (full disk, file-size limit, quota), or None for any other
    error. Covers OSError's errno and the libraries that wrap it in their own messages (torch.save, HDF5)."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return WRITE_ERRNOS[e.errno]
    if isinstance(e, (OSError, RuntimeError)):
        text = str(e)
        for marker, code in WRITE_MARKERS.items():
            if marker in text:
                return WRITE_ERRNOS[code]
        if "PytorchStreamWriter failed writing" in text or "file write failed" in text:
            return "the file system refused the write (full disk or file-size limit?)"
    return None


def out_of_room(path):
    """After an error whose text names no cause (torch.save says 'unexpected pos'): whether the file system ran out
    of room for `path`, i.e. the file reached the file-size limit or the disk is (nearly) full -> reason or None."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    with contextlib.suppress(OSError):
        if soft != resource.RLIM_INFINITY and os.path.getsize(path) >= soft:
            return WRITE_ERRNOS[errno.EFBIG]
    st = os.statvfs(_existing_folder(path))
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return WRITE_ERRNOS[errno.ENOSPC] if free < 2 ** 20 else None


def _existing_folder(path):
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def _size(n):
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


def room(folder):
    """'<free> free in <folder>[, file-size limit <limit>]': what a failed write had to work with."""
    import resource
    folder = folder if os.path.isdir(folder) else _existing_folder(folder)
    st = os.statvfs(folder)
    text = f"{_size(st.f_bavail * st.f_frsize)} free in {folder}"
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return text + (f", file-size limit (ulimit -f) {_size(soft)}" if soft != resource.RLIM_INFINITY else "")


def check_space(path, nbytes):
    """Refuse, before writing, a file of about `nbytes` that the disk or the file-size limit cannot hold. HDF5
    cannot be trusted to fail cleanly when a write is refused mid-file (it may crash in close), so big HDF5
    outputs are checked first; the estimate is a lower bound, so this catches the plain cases."""
    import resource
    path = os.fspath(path)
    folder = _existing_folder(path)
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft != resource.RLIM_INFINITY and nbytes > soft:
        raise DataError(f"{path}: needs about {_size(nbytes)} but the file-size limit (ulimit -f) is {_size(soft)}; "
                        "nothing was written")
    st = os.statvfs(folder)
    if nbytes > st.f_bavail * st.f_frsize:
        raise DataError(f"{path}: needs about {_size(nbytes)} but only {_size(st.f_bavail * st.f_frsize)} are free "
                        f"in {folder}; nothing was written")


H5_IN_MEMORY = 2 ** 31  # HDF5 outputs up to this size are built in memory and written in one piece


@contextlib.contextmanager
def h5_create(path, nbytes=0):
    """A new HDF5 file at `path`, atomically (atomic_path). Files up to H5_IN_MEMORY bytes (nbytes: an estimate)
    are built in memory (HDF5's core driver) and written by plain Python I/O, so a full disk or a file-size limit
    is an ordinary error naming the file; HDF5 itself may crash when a write fails inside the library. Larger
    files are checked against the free space first (check_space) and written directly."""
    import h5py
    with atomic_path(path) as tmp:
        if nbytes > H5_IN_MEMORY:
            check_space(path, nbytes)
            with h5py.File(tmp, "w") as f:
                yield f
            return
        f = h5py.File(tmp + ".mem", "w", driver="core", backing_store=False)  # the name is never created
        try:
            yield f
            f.flush()
            image = f.id.get_file_image()
        finally:
            f.close()
        with open(tmp, "wb") as fh:
            fh.write(image)


def read_csv(path, what, **kwargs):
    """pandas.read_csv, with an empty file and a header without rows as errors naming the file."""
    try:
        df = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file; expected a header line, then {what}") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: not a readable table ({e})") from None
    if kwargs.get("nrows") != 0 and len(df) == 0:
        raise DataError(f"{path}: a header line and no rows; expected {what}")
    return df


def check_cells(path, df, column, expected, allowed=None, integer=False):
    """Check every cell of a CSV column: present ('a value'), or a finite number, optionally an integer or one of
    `allowed`. The first bad cell is named by file, column, row (data rows counted from 1, the header is not a
    row) and its value. Returns the column as numbers (int64 for integers / allowed values) or as it is."""
    raw = df[column]
    missing = raw.isna().to_numpy() | (raw.astype(str).str.strip() == "").to_numpy()
    if expected == "a value":
        bad = missing
        values = raw
    else:
        num = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64)
        bad = missing | ~np.isfinite(num)
        if integer or allowed is not None:
            bad |= np.isfinite(num) & (num != np.round(num))
        if allowed is not None:
            bad |= np.isfinite(num) & ~np.isin(num, allowed)
        values = np.where(bad, 0, num).astype(np.int64) if integer or allowed is not None else num
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        v = raw.iloc[r]
        cell = "an empty cell" if missing[r] else repr(v.item() if isinstance(v, np.generic) else v)
        raise DataError(f"{path}: column '{column}', row {r + 1}: {cell}; expected {expected} "
                        f"({int(bad.sum())} bad cell{'s' if bad.sum() > 1 else ''} in the column)")
    return values


def check_unique(path, field, ids):
    """Duplicate ids are an error naming the file, the field and the first duplicate with both its rows: every
    reader matches rows by id, and readers that keep the first or the last match would disagree silently."""
    seen = {}
    for i, v in enumerate(ids):
        j = seen.setdefault(v, i)
        if j != i:
            n = len(ids) - len(set(ids))
            raise DataError(f"{path}: {field} has {n} duplicate entr{'ies' if n > 1 else 'y'}, first {v!r} at rows "
                            f"{j} and {i} (0-based); every id must name one row")


def check_flags(p, cfg, rules):
    """Numeric flags checked at parse time: rules {key: '>= 1' | '> 0' | 'in (0, 1)' | 'in [0, 1)' | ...}; a
    value outside is a usage error (exit 2) naming the flag, the value and what is expected."""
    for key, rule in rules.items():
        v = cfg.get(key)
        if v is None:
            continue
        if rule.startswith("in "):
            lo, hi = (float(x) for x in rule[4:-1].split(","))
            ok = (v >= lo if rule[3] == "[" else v > lo) and (v <= hi if rule[-1] == "]" else v < hi)
            want = f"a value {rule}"
        else:
            op, bound = rule.split()
            ok = v >= float(bound) if op == ">=" else v > float(bound)
            want = f"{'an integer' if isinstance(v, int) else 'a value'} {rule}"
        if not ok:
            p.error(f"--{key.replace('_', '-')} {v}: expected {want}")


def check_writable(path, flag="--out", folder=False):
    """An output's folder (or its nearest existing parent) must take a new file: checked by creating and
    removing a probe file, so a read-only place fails before any work (permission bits alone do not tell,
    e.g. for root or read-only mounts). folder=True: the output is a folder, written beside it and renamed."""
    path = os.fspath(path)
    if os.path.isdir(path) and not folder:
        raise DataError(f"{path}: {flag} is a folder; expected a file path")
    folder = _existing_folder(path)
    if not os.path.isdir(folder):
        raise DataError(f"{path}: {folder} is a file, not a folder; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise DataError(f"{path}: {flag} cannot be written: {folder} does not take new files ({e.strerror}); "
                        f"choose another {flag}") from None


def refuse_inputs(outputs, inputs):
    """outputs, inputs: {label: path} (labels such as '--out', '--features'). An output that resolves to one of
    the inputs (same path after symlinks, or the same file) is an error naming both, so an input is never
    overwritten by the results computed from it."""
    ins = [(label, os.fspath(p)) for label, p in inputs.items() if p]
    for olabel, o in outputs.items():
        if not o:
            continue
        o = os.fspath(o)
        for ilabel, i in ins:
            same = os.path.realpath(o) == os.path.realpath(i)
            if not same and os.path.exists(o) and os.path.exists(i):
                same = os.path.samefile(o, i)
            if same:
                raise DataError(f"{o}: {olabel} is the input {ilabel} ({i}); writing it would destroy that "
                                f"input. Choose another {olabel.split()[0] if olabel.startswith('--') else '--out'}")


def pid_alive(pid):
    """Whether process `pid` runs on this host (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except OSError:
        return True


class OutputLock:
    """One writer at a time: a POSIX advisory lock (fcntl.lockf) on <path>.lock, which holds the owner's pid,
    host, start time and command. The kernel drops the lock when its process dies (kill -9 included), and
    forked children (data-loader workers) do not inherit it, so a lock file that nobody holds is stale and is
    taken over; a held one stops a second writer with a message naming the owner and the lock."""

    def __init__(self, path):
        self.path = os.fspath(path).rstrip("/")
        self.lock_path = self.path + ".lock"
        self.fd, self.stale = None, ""

    def acquire(self):
        import fcntl
        os.makedirs(os.path.dirname(os.path.abspath(self.lock_path)), exist_ok=True)
        for _ in range(10):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "an unknown process"
                os.close(fd)
                if e.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise DataError(f"{self.path}: being written by another run ({owner}); lock {self.lock_path}. "
                                "Wait for it to finish or stop it: two writers would mix their outputs") from None
            try:  # its previous owner may have removed the file between our open and our lock: lock a fresh one
                current = os.path.samestat(os.fstat(fd), os.stat(self.lock_path))
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            self.stale = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{datetime.datetime.now().isoformat(timespec='seconds')}: "
                           f"{' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:1000]}\n").encode(), 0)
            self.fd = fd
            return self
        raise DataError(f"{self.path}: could not take the lock {self.lock_path} (it keeps changing)")

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock_path)
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_temporaries(paths, say=print):
    """Remove the temporary files (<path>.tmp-<pid>, atomic_path's) that killed runs left beside `paths`. Call it
    holding the lock of the first output; a file whose pid still runs on this host is kept (another run may write
    a file beside its own output that is one of ours, e.g. evaluate.py --task all and --task cka in one folder)."""
    for path in paths:
        if not path:
            continue
        for tmp in glob.glob(glob.escape(os.fspath(path).rstrip("/")) + ".tmp-*"):
            pid = tmp.rsplit(".tmp-", 1)[1].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
            say(f"removed {tmp}, a temporary file of a run that was killed")


@contextlib.contextmanager
def claim_outputs(outputs, inputs=None, say=print, folders=False):
    """Before any work: refuse outputs that are inputs (refuse_inputs), check every output writable
    (check_writable; folders=True: the outputs are folders), lock the first output (OutputLock; the other ranks
    of a multi-process job give no outputs), and remove what killed runs left (remove_temporaries).
    outputs, inputs: {label: path}."""
    outputs = {k: os.fspath(v) for k, v in outputs.items() if v}
    refuse_inputs(outputs, inputs or {})
    for label, path in outputs.items():
        check_writable(path, label.split()[0] if label.startswith("--") else "--out", folders)
    lock = OutputLock(next(iter(outputs.values()))).acquire() if outputs else None
    try:
        if lock is not None and lock.stale:
            say(f"took over the lock {lock.lock_path} of a run that is gone ({lock.stale})")
        remove_temporaries(outputs.values(), say)
        yield lock
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def script_errors(script):
    """main()'s error boundary: a DataError, a string sys.exit from inside a stage, or a write refused for lack of
    room ends in one line '<script>: error: ...' on stderr and exit status 2, never a traceback."""
    try:
        yield
    except ScriptExit:
        raise
    except DataError as e:
        fail(script, str(e))
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        fail(script, e.code.split(f"{script}: error: ", 1)[-1])
    except (OSError, RuntimeError) as e:
        reason = write_failure(e)
        if not reason:
            raise
        name = getattr(e, "filename", None) or "an output file"
        fail(script, f"{name}: writing failed: {reason}")


def load_checkpoint(path, what="checkpoint", map_location="cpu"):
    """torch.load of a checkpoint this project wrote; an unreadable one (truncated by a kill during a save that
    bypassed the atomic rename, or another file) is a DataError naming it."""
    import torch
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise DataError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e)[:200]}); a file cut "
                        "short by a kill or a full disk reads like this. Remove it, or pass --overwrite to start "
                        "over") from None


class CsvLog:
    """A training log, one CSV row per step. A fresh run writes the header (atomically); a resumed run cuts the
    log back to the checkpoint's step (rows after it are redone) and its `seconds` continue from there: `offset`
    is the last kept row's seconds. A write refused for lack of room is a DataError naming the file."""

    def __init__(self, path, fields, resume_step=None):
        import csv
        self.path, self.fields, self.offset = path, fields, 0.0
        rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("step", "").isdigit()
                        and int(r["step"]) <= resume_step]
            if rows and rows[-1].get("seconds"):
                self.offset = float(rows[-1]["seconds"])
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(fields)
            for r in rows:
                w.writerow([r.get(k, "") for k in fields])

    def append(self, row):
        import csv
        try:
            with open(self.path, "a", newline="") as fh:
                csv.writer(fh).writerow([row.get(k, "") for k in self.fields])
        except OSError as e:
            reason = write_failure(e)
            if reason:
                raise DataError(f"{self.path}: writing failed: {reason} ({room(self.path)})") from None
            raise


def die_with_parent(worker_id=None, parent=None):
    """A DataLoader worker_init_fn (functools.partial(die_with_parent, parent=os.getpid()) in the parent): the
    worker gets SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG), so a killed run leaves no orphaned worker
    holding its files open. Exits at once if the parent is already gone."""
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: torch's own watchdog ends orphaned workers within seconds
        return
    if parent is not None and os.getppid() != parent:  # the parent died before the line above
        os._exit(0)
