"""Bad input and faults, as a careless or unlucky user meets them: outputs that are inputs, duplicate ids, two writers,
a full disk, killed runs and their resume, read-only outputs, bad flags and bad CSV cells. Every case asserts the
exit status, the message (file and field named), that no input changed and that no partial output remains; the
embedded world every case reads is checked byte for byte after the whole module."""
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

import data
import evaluate
import extract
import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def digest(paths):
    """{path: sha1 of its bytes} for files (folders: every file under them)."""
    out = {}
    for p in map(str, paths):
        files = [p] if os.path.isfile(p) else sorted(glob.glob(os.path.join(p, "**", "*"), recursive=True))
        for f in files:
            if os.path.isfile(f):
                with open(f, "rb") as fh:
                    out[f] = hashlib.sha1(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module", autouse=True)
def world_untouched(world):
    """Every case below reads the world; after all of them its files are byte-identical."""
    before = digest([world["dir"]])
    yield
    assert digest([world["dir"]]) == before


def leftovers(folder):
    """What a failed run must not leave: temporary files, lock files, partial outputs."""
    return sorted(os.path.relpath(p, folder) for p in glob.glob(os.path.join(str(folder), "**", "*"), recursive=True)
                  if ".tmp-" in p or p.endswith(".lock") or p.endswith(".partial"))


def refused(main, argv, capsys, *needles):
    """main(argv) must exit with status 2 and a message holding every needle; returns the message."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    msg = str(e.value) + capsys.readouterr().err
    assert e.value.code == 2, msg
    for s in needles:
        assert str(s) in msg, f"{s!r} not in {msg!r}"
    return msg


def holder(code, *args):
    """A separate live process running `code` (with data imported); returns it once it printed 'ready'."""
    p = subprocess.Popen([sys.executable, "-c", "import sys, time, data\n" + textwrap.dedent(code)
                          + "\nprint('ready', flush=True)\ntime.sleep(120)", *map(str, args)],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def stop(p):
    p.kill()
    p.wait()


def meta_argv(features, eval_features, out, **kw):
    """A tiny meta run on neuron functions (no codes needed): a few seconds. These runs test the plumbing, so they
    select on whatever pool they are given (--forbid none)."""
    cfg = dict(functions="neurons", features=features, eval_features=eval_features, out=out, length=8, batch=8,
               steps=20, eval_every=10, eval_episodes=8, warmup=2, d_model=16, n_layers=1, n_heads=2, lr=1e-3,
               forbid="none")
    cfg.update(kw)
    return ["--stage", "meta", "--no-progress"] + [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


@pytest.fixture(scope="module")
def meta_run(world, tmp_path_factory):
    """A finished tiny meta run, trained from its own folder with relative paths (as a user would)."""
    run = tmp_path_factory.mktemp("meta_run")
    os.symlink(world["features/coco"], run / "coco.h5")
    os.symlink(world["features/things"], run / "things.h5")
    cwd = os.getcwd()
    os.chdir(run)
    try:
        train.main(meta_argv("coco.h5", "things.h5", "meta.pt"))
    finally:
        os.chdir(cwd)
    return run


@pytest.fixture(scope="module")
def sae_run(world, tmp_path_factory):
    """A finished tiny SAE run on the world's pool."""
    run = tmp_path_factory.mktemp("sae_run")
    train.main([str(a) for a in ["--stage", "sae", "--features", world["features/coco"], "--out", run / "sae.pt",
                                 "--n-latents", "2x", "--k", "4", "--epochs", "1", "--batch", "512", "--no-progress"]])
    return run


# ------------------------------------------------------------------------------------- inputs are never outputs

def test_output_equal_to_an_input_is_refused_before_any_work(world, sae_run, tmp_path, capsys, monkeypatch):
    feats = tmp_path / "things.h5"
    shutil.copy(world["features/things"], feats)
    codes = tmp_path / "codes.h5"
    shutil.copy(world["features/coco"], codes)
    ckpt = tmp_path / "sae.pt"
    shutil.copy(sae_run / "sae.pt", ckpt)
    before = digest([feats, codes, ckpt])
    for task in ("things-ooo", "fmri"):  # never reached: each run is refused first
        monkeypatch.setitem(evaluate.TASKS, task, lambda cfg: pytest.fail("the task ran"))
    monkeypatch.setitem(train.STAGES, "sae", lambda cfg: pytest.fail("the stage ran"))
    monkeypatch.setitem(train.STAGES, "meta", lambda cfg: pytest.fail("the stage ran"))
    ev = ["--features", feats, "--data", world["data"]]
    refused(evaluate.main, ["--task", "things-ooo", "--out", feats] + ev, capsys,
            f"{feats}: --out is the input --features ({feats})", "Choose another --out")
    # fmri writes its per-voxel file beside --out: things.json would overwrite things.h5
    refused(evaluate.main, ["--task", "fmri", "--out", tmp_path / "things.json"] + ev, capsys,
            f"{feats}: --out (things.h5 beside it) is the input --features")
    refused(train.main, ["--stage", "sae", "--features", feats, "--out", feats], capsys,
            f"{feats}: --out is the input --features")
    refused(train.main, ["--stage", "meta", "--features", world["features/coco"], "--codes", codes,
                         "--eval-features", feats, "--out", codes], capsys, f"{codes}: --out is the input --codes")
    refused(train.main, ["--stage", "sae", "--encode", "--ckpt", ckpt, "--features", feats, "--codes-out", ckpt],
            capsys, f"{ckpt}: --codes-out is the input --ckpt")
    assert digest([feats, codes, ckpt]) == before and leftovers(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["codes.h5", "sae.pt", "things.h5"]


# ------------------------------------------------------------------------------------------- duplicate image ids

@pytest.fixture(scope="module")
def duplicated(world, tmp_path_factory):
    """things.h5 with 15 ids repeated (rows 40..54 carry the ids of rows 0..14)."""
    p = tmp_path_factory.mktemp("dup") / "things_dup.h5"
    shutil.copy(world["features/things"], p)
    with h5py.File(p, "a") as f:
        ids = f["image_ids"][...]
        ids[40:55] = ids[:15]
        f["image_ids"][...] = ids
        first = ids[0].decode()
    return p, first


@pytest.mark.parametrize("task", ["things-ooo", "category-learning", "cka"])
def test_duplicate_image_ids_are_refused_by_every_reader(world, duplicated, task, tmp_path, capsys):
    """Duplicates were resolved differently per task (first row here, last row there): now each reader stops."""
    path, first = duplicated
    before = digest([path])
    refused(evaluate.main, ["--task", task, "--features", path, "--data", world["data"], "--out", tmp_path / "r.json"],
            capsys, f"{path}: /image_ids has 15 duplicate entries, first {first!r} at rows 0 and 40")
    assert digest([path]) == before and os.listdir(tmp_path) == []


def test_duplicate_image_ids_are_refused_by_train(duplicated, tmp_path, capsys):
    path, first = duplicated
    refused(train.main, ["--stage", "sae", "--features", path, "--out", tmp_path / "s.pt"], capsys,
            f"{path}: /image_ids has 15 duplicate entries, first {first!r}")
    refused(train.main, meta_argv(path, path, tmp_path / "m.pt"), capsys, f"{path}: /image_ids has 15 duplicate")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ one writer at a time

def fake_world(kind="ok", marker="new"):
    """A stand-in for world.make_world (fast, and independent of the world's contents)."""
    def make_world(out_dir, size="small", seed=0, verbose=True, **overrides):
        os.makedirs(os.path.join(out_dir, "features"), exist_ok=True)
        truth = os.path.join(out_dir, "world_truth.h5")
        with open(truth, "w") as fh:
            fh.write(f"{marker} {seed}")
        if kind == "error":
            raise data.DataError(f"{os.path.join(out_dir, 'features', 'coco.h5')}: writing failed: no space left")
        if kind == "crash":  # HDF5's way of failing a refused write: a segfault inside the library
            open(os.path.join(out_dir, "features", f"coco.h5.tmp-{os.getpid()}"), "w").close()
            import faulthandler
            faulthandler.disable()  # pytest's dump of the (intended) crash would only be noise here
            os.kill(os.getpid(), signal.SIGSEGV)
        return dict(truth=truth)
    return make_world


def test_world_one_writer_and_no_overwrite_without_asking(tmp_path, capsys, monkeypatch):
    import world
    out = tmp_path / "world"
    argv = ["--dataset", "synthetic", "--out", out]
    p = holder("l = data.OutputLock(sys.argv[1]).acquire()", out)
    try:
        refused(extract.main, argv, capsys, f"{out}: being written by another run (pid {p.pid} on",
                f"lock {out}.lock")
    finally:
        stop(p)
    assert not out.exists()
    monkeypatch.setattr(world, "make_world", fake_world(marker="old"))
    extract.main([str(a) for a in argv + ["--seed", "1"]])  # the stale lock of the killed holder is taken over
    assert (out / "world_truth.h5").read_text() == "old 1" and leftovers(tmp_path) == []
    (out / "extra.txt").write_text("a file of the old world")
    before = digest([out])
    monkeypatch.setattr(world, "make_world", fake_world(marker="new"))
    refused(extract.main, argv + ["--seed", "2"], capsys, f"{out}: a world exists there; pass --overwrite")
    for kind, needle in (("error", f"{out}/features/coco.h5: writing failed: no space left"),
                         ("crash", f"{out}/features/coco.h5: the writer died (signal SIGSEGV)")):
        monkeypatch.setattr(world, "make_world", fake_world(kind))
        refused(extract.main, argv + ["--overwrite"], capsys, f"{out}: the world could not be written", needle,
                f"{out} is unchanged")
        assert digest([out]) == before and leftovers(tmp_path) == []
    monkeypatch.setattr(world, "make_world", fake_world(marker="new"))
    extract.main([str(a) for a in argv + ["--seed", "2", "--overwrite"]])  # replaced whole: nothing old is left
    assert sorted(os.listdir(out)) == ["features", "world_truth.h5"] and (out / "world_truth.h5").read_text() == \
        "new 2" and leftovers(tmp_path) == []
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a world")
    refused(extract.main, ["--dataset", "synthetic", "--out", mine, "--overwrite"], capsys,
            f"{mine}: exists and holds no world")
    assert os.listdir(mine) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- real extraction

TIMM = "timm:test_vit.r160_in1k"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"img_{i:02d}.png")
    return root


def extract_argv(photos, out, *more):
    return ["--dataset", "folder", "--images", photos, "--backbone", TIMM, "--weights", "random", "--batch", "4",
            "--threads", "1", "--no-progress", "--out", out, *more]


def test_extract_killed_with_workers_resumes_at_once(photos, tmp_path, capsys):
    """kill -9 of extract.py: its loader workers die with it (they held the partial file's HDF5 lock for ~8 s, and
    the rerun threw the finished rows away as 'unreadable'); the rerun at once resumes at the committed rows."""
    out, pids = tmp_path / "f.h5", tmp_path / "workers.txt"
    argv = [str(a) for a in extract_argv(photos, out, "--workers", "2")]
    code = textwrap.dedent(f"""
        import multiprocessing, os, signal, extract
        def on_batch(k):
            if k == 2:  # batches 0 and 1 committed
                with open({str(pids)!r}, "w") as fh:
                    fh.write(" ".join(str(c.pid) for c in multiprocessing.active_children()))
                os.kill(os.getpid(), signal.SIGKILL)
        extract.main({argv!r}, on_batch=on_batch)""")
    with open(tmp_path / "killed.log", "w") as log:  # not a pipe: the workers would hold it open, and wait() with it
        p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=log)
        assert p.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    workers = [int(x) for x in pids.read_text().split()]
    assert len(workers) == 2
    t = time.time()
    while any(data.pid_alive(w) for w in workers) and time.time() - t < 2:  # torch's own watchdog takes ~5 s
        time.sleep(0.02)
    assert not any(data.pid_alive(w) for w in workers), "orphaned loader workers outlived their parent"
    extract.main([str(a) for a in extract_argv(photos, out, "--workers", "0")])  # at once, as a user would
    log = capsys.readouterr()
    assert "resuming at 8" in log.out and "unreadable" not in log.err and "took over the lock" in log.out
    X, ids = data.read_features(out)
    assert X.shape[0] == 12 and leftovers(tmp_path) == []


def test_extract_second_writer_and_a_held_partial(photos, tmp_path, capsys, monkeypatch):
    """A second extraction to the same --out stops at the lock; a partial file held open by another process is
    waited for and named, never removed as corrupt."""
    out = tmp_path / "f.h5"
    p = holder("l = data.OutputLock(sys.argv[1]).acquire()", out)
    try:
        refused(extract.main, extract_argv(photos, out, "--workers", "0"), capsys,
                f"{out}: being written by another run (pid {p.pid}", f"lock {out}.lock")
    finally:
        stop(p)
    assert not out.exists()
    res = extract.main([str(a) for a in extract_argv(photos, out, "--workers", "0", "--max-batches", "1")])
    assert res["stopped"] and res["done"] == 4
    partial = Path(res["out"])
    before = digest([partial])
    orig = extract.open_partial
    monkeypatch.setattr(extract, "open_partial", lambda path: orig(path, wait=0.5))
    p = holder("import h5py; f = h5py.File(sys.argv[1], 'r')", partial)
    try:
        refused(extract.main, extract_argv(photos, out, "--workers", "0"), capsys,
                f"{partial}: open in another process", "rows done so far resume")
    finally:
        stop(p)
    assert partial.exists() and digest([partial]) == before and not out.exists()


# ------------------------------------------------------------------------------------------------ full disk

FULL_DISK = """
import os, resource, sys
import evaluate, extract, train
for name, limit, main, argv in CASES:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    print(f"CASE {name} {code}", file=sys.stderr, flush=True)
"""


def test_full_disk_is_one_message_naming_the_file_in_every_script(world, tmp_path):
    """A file-size limit (ulimit -f, lowered further per script) while the world's files (extract), a checkpoint
    (train) and a result (evaluate) are written: exit 2, one message naming the file, nothing partial left. In the
    world HDF5 files are written; HDF5 crashed (segfault) when such a write failed."""
    world_out, sae, res = tmp_path / "world", tmp_path / "sae.pt", tmp_path / "cka.json"
    cases = [("extract", 700 * 1024, "extract.main", ["--dataset", "synthetic", "--out", world_out]),
             ("train", 48 * 1024, "train.main", ["--stage", "sae", "--features", world["features/coco"], "--out", sae,
                                                 "--n-latents", "2x", "--k", "4", "--epochs", "1", "--batch", "512",
                                                 "--no-progress"]),
             ("evaluate", 1024, "evaluate.main", ["--task", "cka", "--features", world["features/things"], "--data",
                                                  world["data"], "--out", res])]
    code = FULL_DISK.replace("CASES", "[" + ", ".join(f"({n!r}, {lim}, {fn}, {[str(a) for a in argv]!r})"
                                                      for n, lim, fn, argv in cases) + "]")
    r = subprocess.run(["bash", "-c", 'ulimit -f 700 && exec "$PY" -c "$CODE"'], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PY=sys.executable, CODE=code))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith(("CASE", "extract.py", "train.py", "evaluate"))]
    assert lines[1::2] == ["CASE extract 2", "CASE train 2", "CASE evaluate 2"], r.stderr
    limit = "writing failed: file too large (a file-size limit, ulimit -f, or the file system's maximum)"
    assert lines[0].startswith(f"extract.py: error: {world_out}: the world could not be written ({world_out}/")
    assert limit in lines[0] or "the writer died" in lines[0], lines[0]
    assert lines[2].startswith(f"train.py: error: {sae}.last.pt: {limit}"), lines[2]
    assert lines[4].startswith(f"evaluate.py: error: {res}: {limit}"), lines[4]
    assert "file-size limit (ulimit -f) 48.0 KiB" in lines[2] and os.listdir(tmp_path) == []


# -------------------------------------------------------------------------------------------- resume is visible

def test_rerun_without_resume_is_refused_and_overwrite_starts_over(sae_run, meta_run, tmp_path, capsys):
    sae = tmp_path / "sae"
    shutil.copytree(sae_run, sae)
    before = digest([sae, meta_run])
    refused(train.main, ["--stage", "sae", "--features", meta_run / "coco.h5", "--out", sae / "sae.pt", "--n-latents",
                         "2x", "--k", "4", "--epochs", "1"], capsys,
            f"{sae}/sae.pt.last.pt holds the resume state of an earlier run to {sae}/sae.pt (step ",
            "pass --resume to continue it, or --overwrite to start over")
    refused(train.main, meta_argv(meta_run / "coco.h5", meta_run / "things.h5", meta_run / "meta.pt"), capsys,
            f"{meta_run}/meta.last.pt holds the resume state of an earlier run to {meta_run}/meta.pt (step 20)")
    assert digest([sae, meta_run]) == before
    train.main([str(a) for a in ["--stage", "sae", "--features", meta_run / "coco.h5", "--out", sae / "sae.pt",
                                 "--n-latents", "2x", "--k", "4", "--epochs", "1", "--batch", "512", "--overwrite",
                                 "--no-progress", "--seed", "1"]])
    assert digest([sae / "sae.pt"]) != {k: v for k, v in before.items() if k.endswith("sae.pt")}
    assert "--overwrite: removed" in capsys.readouterr().out


def test_truncated_resume_state_and_other_settings_are_named(meta_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(meta_run, run, symlinks=True)
    before = digest([run])
    argv = meta_argv(run / "coco.h5", run / "things.h5", run / "meta.pt", steps=30, resume=True)
    refused(train.main, argv[:-1] + ["--resume", "--d-model=32"], capsys,
            f"{run}/meta.last.pt: --resume with other settings than its run: d_model 16 (checkpoint) vs 32 "
            "(these flags)", "--overwrite to start over")
    raw = (run / "meta.last.pt").read_bytes()
    (run / "meta.last.pt").write_bytes(raw[:len(raw) // 2])
    refused(train.main, argv[:-1] + ["--resume"], capsys, f"{run}/meta.last.pt: not a readable meta resume state",
            "cut short")
    before[str(run / "meta.last.pt")] = hashlib.sha1(raw[:len(raw) // 2]).hexdigest()
    assert digest([run]) == before and leftovers(run) == []


def test_meta_resume_cuts_the_log_back_and_its_clock_continues(meta_run, tmp_path, capsys):
    """A kill after step 25 of a run checkpointed at step 20 leaves log rows 21..25 and a checkpoint's temporary
    file: the resume removes the temporary file, redoes steps 21..30 once each, and its seconds go on."""
    run = tmp_path / "run"
    shutil.copytree(meta_run, run, symlinks=True)
    log = pd.read_csv(run / "meta.csv")
    assert list(log["step"]) == list(range(1, 21))
    killed = pd.concat([log, log.tail(5).assign(step=range(21, 26), seconds=log["seconds"].max() + 1)])
    killed.to_csv(run / "meta.csv", index=False)
    (run / "meta.last.pt.tmp-999999").write_bytes(b"half a checkpoint")
    train.main(meta_argv(run / "coco.h5", run / "things.h5", run / "meta.pt", steps=30) + ["--resume"])
    assert "meta.last.pt.tmp-999999, a temporary file of a run that was killed" in capsys.readouterr().out
    new = pd.read_csv(run / "meta.csv")
    assert list(new["step"]) == list(range(1, 31))
    assert (new["seconds"].diff().dropna() >= 0).all() and new["seconds"][20] >= log["seconds"].max()
    assert new["eval_accuracy"].notna().sum() == 3 and leftovers(run) == []


# -------------------------------------------------------------------------------------- train.py data errors

@pytest.fixture(scope="module")
def bad_files(world, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.h5").write_text("not an HDF5 file")
    X, ids = data.read_features(world["features/coco"])
    Xn = X.copy()
    Xn[5, 3] = np.nan
    data.write_features(str(d / "nan.h5"), Xn, ids)
    data.write_features(str(d / "empty.h5"), np.zeros((0, 64), np.float32), [])
    data.write_features(str(d / "narrow.h5"), X[:, :10], ids)
    rng = np.random.default_rng(0)
    with h5py.File(d / "codes.h5", "w") as f:  # every latent active on ~3 rows: no function
        f["sae/indices"] = rng.integers(0, 10 ** 6, (len(ids), 4)).astype(np.int32)
        f["sae/values"] = np.ones((len(ids), 4), np.float16)
        f["image_ids"] = np.array(ids, dtype=object)
    with h5py.File(d / "short_codes.h5", "w") as f:
        f["sae/indices"] = np.zeros((10, 4), np.int32)
        f["sae/values"] = np.ones((10, 4), np.float16)
    return d


@pytest.mark.parametrize("case", ["missing", "not_hdf5", "nan", "zero_rows", "codes_misaligned", "narrow_encode",
                                  "no_function"])
def test_train_data_errors_are_one_line_exit_2(world, sae_run, bad_files, case, tmp_path, capsys):
    b, coco = bad_files, world["features/coco"]
    out = tmp_path / "x.pt"
    sae = ["--stage", "sae", "--out", out, "--n-latents", "2x", "--k", "4", "--epochs", "1", "--features"]
    argv, needles = {
        "missing": (sae + [b / "nope.h5"], [f"{b}/nope.h5 not found; expected"]),
        "not_hdf5": (sae + [b / "notes.h5"], [f"{b}/notes.h5: not a readable HDF5 file"]),
        "nan": (sae + [b / "nan.h5"], [f"{b}/nan.h5: /features has NaN/inf values"]),
        "zero_rows": (sae + [b / "empty.h5"], [f"{b}/empty.h5: /features has 0 rows"]),
        "codes_misaligned": (meta_argv(coco, world["features/things"], out, functions="sae", codes=b / "short_codes.h5",
                                       min_nonzero=8), [f"{b}/short_codes.h5: /sae/indices has 10 rows but"]),
        "narrow_encode": (["--stage", "sae", "--encode", "--ckpt", sae_run / "sae.pt", "--features", b / "narrow.h5",
                           "--codes-out", tmp_path / "c.h5"], [f"{sae_run}/sae.pt: checkpoint of another shape",
                                                               f"{b}/narrow.h5 /features has d = 10"]),
        "no_function": (meta_argv(coco, world["features/things"], out, functions="sae", codes=b / "codes.h5",
                                  min_nonzero=8), [f"{b}/codes.h5: /sae/values: no function: no latent is active on "
                                                   ">= 8 of 3000 images"]),
    }[case]
    before = digest([b])
    msg = refused(train.main, argv, capsys, "train.py: error: ", *needles)
    assert msg.count("train.py: error:") == 2  # the exception's text and the one line on stderr, nothing else
    assert digest([b]) == before and os.listdir(tmp_path) == []


def test_an_error_on_the_command_line_is_one_line(tmp_path):
    """The exit the scripts share (data.script_errors), seen from a shell: status 2, one line, no traceback."""
    (tmp_path / "f.txt").write_text("a file where a folder should be")
    r = subprocess.run([sys.executable, "extract.py", "--dataset", "synthetic", "--out", str(tmp_path / "f.txt" / "w")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"extract.py: error: {tmp_path}/f.txt/w: {tmp_path}/f.txt is a file, not a folder; choose another --out"], \
        r.stderr
    assert os.listdir(tmp_path) == ["f.txt"]


@pytest.mark.parametrize("main, argv, needle", [
    (train.main, ["--stage", "meta", "--batch", "0"], "--batch 0: expected an integer >= 1"),
    (train.main, ["--stage", "meta", "--steps", "-3"], "--steps -3: expected an integer >= 1"),
    (train.main, ["--stage", "sae", "--batch", "0"], "--batch 0: expected an integer >= 1"),  # rows per step
    (train.main, ["--stage", "sae", "--n-latents", "0"], "--n-latents 0: expected a count >= 1"),
    (train.main, ["--stage", "sae", "--n-latents", "auto", "--k", "-1"], "--k -1: expected an integer >= 0"),  # 0: rule
    (train.main, ["--stage", "sae", "--epochs", "-2"], "--epochs -2: expected an integer >= 0"),
    (train.main, ["--stage", "sae", "--min-nonzero", "0"], "--min-nonzero 0: expected an integer >= 1"),
    (train.main, ["--stage", "sae", "--n-latents", "automatic"], "--n-latents automatic: expected a count >= 1"),
    (train.main, ["--stage", "warp", "--val-frac", "1.5"], "--val-frac 1.5: expected a value in (0, 1)"),
    (evaluate.main, ["--task", "probe", "--shots", "1,-1"], "--shots '1,-1': expected integers >= 1"),
    (evaluate.main, ["--task", "cka", "--ci-method", "bootstrap", "--n-boot", "-5"], "--n-boot -5: expected an "
                                                                                     "integer >= 1"),
    (evaluate.main, ["--task", "things-ooo", "--ci", "95"], "--ci 95.0: expected a value in (0, 1)"),
    (extract.main, ["--dataset", "things", "--batch", "0"], "--batch 0: expected an integer >= 1"),
])
def test_numeric_flags_are_checked_at_parse_time(main, argv, needle, capsys):
    refused(main, argv, capsys, needle)


# --------------------------------------------------------------------------------------------- human data cells

def linked_data(world, folder):
    """A data folder of symlinks to the world's files; the one a case corrupts is replaced by a real file."""
    folder.mkdir()
    for name in os.listdir(world["data"]):
        os.symlink(os.path.join(world["data"], name), folder / name)
    return folder


@pytest.mark.parametrize("case", ["category_cell", "reward_cell", "category_empty_cell", "triplets_empty",
                                  "triplets_header_only", "triplets_cell", "spose_missing_value"])
def test_human_data_errors_point_at_the_cell(world, case, tmp_path, capsys):
    d = linked_data(world, tmp_path / "data")

    def rewrite(name, fn):
        text = (Path(world["data"]) / name).read_text()
        os.remove(d / name)
        (d / name).write_text(fn(text))

    def cell(name, row, col, value, sep=","):  # row counted from 1 after the header
        def fn(text):
            lines = text.splitlines()
            cells = lines[row].split(sep)
            cells[lines[0].split(sep).index(col)] = value
            lines[row] = sep.join(cells)
            return "\n".join(lines) + "\n"
        rewrite(name, fn)

    task, needles = {
        "category_cell": ("category-learning", ["category_learning.csv: column 'choice', row 5: 'x'; expected 0 or 1"
                                                " (1 bad cell in the column)"]),
        "reward_cell": ("reward-learning", ["reward_learning.csv: column 'left_reward', row 7: 'n/a?'; expected a "
                                            "finite number"]),
        "category_empty_cell": ("category-learning", ["category_learning.csv: column 'true_category_binary', row 9: "
                                                      "an empty cell; expected 0 or 1"]),
        "triplets_empty": ("things-ooo", ["THINGS_triplets.csv: empty file; expected a header line, then triplets"]),
        "triplets_header_only": ("things-ooo", ["THINGS_triplets.csv: a header line and no rows; expected triplets"]),
        "triplets_cell": ("things-ooo", ["THINGS_triplets.csv: column 'image2', row 3: '4.5'; expected an integer"]),
        "spose_missing_value": ("cka", ["spose_embedding_66d_sorted.txt: row 6 has 23 values, expected 24 (as row 1)"]),
    }[case]
    if case == "category_cell":
        cell("category_learning.csv", 5, "choice", "x")
    elif case == "reward_cell":
        cell("reward_learning.csv", 7, "left_reward", "n/a?")
    elif case == "category_empty_cell":
        cell("category_learning.csv", 9, "true_category_binary", "")
    elif case == "triplets_empty":
        rewrite("THINGS_triplets.csv", lambda t: "")
    elif case == "triplets_header_only":
        rewrite("THINGS_triplets.csv", lambda t: t.splitlines()[0] + "\n")
    elif case == "triplets_cell":
        cell("THINGS_triplets.csv", 3, "image2", "4.5", sep="\t")
    else:
        rewrite("spose_embedding_66d_sorted.txt", lambda t: "\n".join(
            " ".join(line.split()[:-1]) if i == 5 else line for i, line in enumerate(t.splitlines())) + "\n")
    out = tmp_path / "r.json"
    refused(evaluate.main, ["--task", task, "--features", world["features/things"], "--data", d, "--out", out], capsys,
            "evaluate.py: error: ", str(d) + "/", *needles)
    assert not out.exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- read-only --out

@pytest.mark.skipif(os.access("/sys", os.W_OK) and not os.path.ismount("/sys"), reason="needs a read-only /sys")
def test_read_only_out_fails_before_any_work(world, capsys, monkeypatch):
    import world as world_module
    monkeypatch.setitem(evaluate.TASKS, "things-ooo", lambda cfg: pytest.fail("the task ran"))
    monkeypatch.setitem(train.STAGES, "sae", lambda cfg: pytest.fail("the stage ran"))
    monkeypatch.setattr(world_module, "make_world", lambda *a, **k: pytest.fail("the world was generated"))
    for main, argv in [(evaluate.main, ["--task", "things-ooo", "--features", world["features/things"], "--data",
                                        world["data"], "--out", "/sys/metalign/r.json"]),
                       (train.main, ["--stage", "sae", "--features", world["features/coco"], "--out",
                                     "/sys/metalign/s.pt"]),
                       (extract.main, ["--dataset", "synthetic", "--out", "/sys/metalign/world"])]:
        refused(main, argv, capsys, "/sys/metalign/", "cannot be written: /sys does not take new files",
                "choose another --out")
    assert not os.path.exists("/sys/metalign")


# ------------------------------------------------------------------------------------------------ --task all, icl

def test_task_all_runs_the_rest_and_exits_nonzero(world, tmp_path, capsys):
    out = tmp_path / "all.json"
    refused(evaluate.main, ["--task", "all", "--tasks", "cka,levels-ooo", "--features", world["features/things"],
                            "--levels-features", world["features/things"], "--data", world["data"], "--out", out],
            capsys, "--task all: 1 of 2 tasks failed (levels-ooo: ", "levels.pkl: ", "image(s) not in",
            f"the other tasks' results and the summary are in {out}")
    assert (tmp_path / "cka.json").exists() and (tmp_path / "all.md").exists() and out.exists()
    assert "levels-ooo | (error)" in (tmp_path / "all.md").read_text() and leftovers(tmp_path) == []


def test_per_dataset_feature_paths_follow_features(world, tmp_path, capsys):
    """--levels-features (and meta's --eval-features) default to the file beside --features, never to another
    backbone's: --task all on things_b3.h5 in a folder without levels.h5 skips levels-ooo, naming that file."""
    b3 = tmp_path / "feats" / "things_b3.h5"
    b3.parent.mkdir()
    os.symlink(world["features/things"], b3)
    assert evaluate.parse(["--task", "all", "--features", str(b3)])["levels_features"] == str(b3.parent / "levels.h5")
    assert train.parse(["--stage", "meta", "--features", "x/coco.h5"])["eval_features"] == "x/coco_eval.h5"
    evaluate.main(["--task", "all", "--tasks", "levels-ooo", "--features", str(b3), "--data", world["data"], "--out",
                   str(tmp_path / "all.json")])
    assert f"missing ['{b3.parent}/levels.h5']" in (tmp_path / "all.md").read_text()


def test_icl_from_another_folder_names_the_checkpoint_and_icl_features(world, meta_run, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "icl.json"
    refused(evaluate.main, ["--task", "icl", "--ckpt", meta_run / "meta.pt", "--data", world["data"], "--out", out],
            capsys, "things.h5 not found: it is the --eval-features recorded in", f"{meta_run}/meta.pt",
            f"this run is in {tmp_path}", "--icl-features")
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    target = tmp_path / "x.json"
    p = holder("l = data.OutputLock(sys.argv[1]).acquire()", target)
    with pytest.raises(data.DataError, match=f"being written by another run \\(pid {p.pid} on"):
        data.OutputLock(target).acquire()
    stop(p)  # kill -9: the lock file stays, its lock goes with the process
    assert (tmp_path / "x.json.lock").exists()
    lock = data.OutputLock(target).acquire()
    assert f"pid {p.pid} on" in lock.stale
    lock.release()
    assert os.listdir(tmp_path) == []
