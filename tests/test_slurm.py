"""The SLURM scripts, run for real with stand-in sbatch / srun / torchrun / python that record their arguments:
what they submit, what each array task runs, and that they read and write the Makefile's paths (make -n)."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def fake(tmp_path):
    """A bin folder of recorders (each appends 'name args' to the log; sbatch prints a job id, srun then runs
    its command) on PATH; PY and TORCHRUN point at recorders too; jobs run in tmp_path (SLURM_SUBMIT_DIR)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "log"
    for name, tail in (("sbatch", 'echo 4242\n'), ("srun", '"$@"\n'), ("torchrun", ""), ("python", ""), ("make", "")):
        (bin_ / name).write_text(f'#!/bin/bash\necho "{name} $*" >> "{log}"\n{tail}')
        (bin_ / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", PY=str(bin_ / "python"), SLURM_SUBMIT_DIR=str(tmp_path))
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "MERGE", "MODELS", "BACKBONE", "FEAT", "TRAIN", "TORCHRUN",
              "FUNCTIONS", "FN_RUN", "CONFIG", "VARIANTS", "BACKBONES", "DRY", "OUT"):
        env.pop(k, None)

    def run(script, *args, **extra):
        open(log, "w").close()
        r = subprocess.run(["bash", str(ROOT / "slurm" / script), *args], cwd=tmp_path, env=dict(env, **extra),
                           capture_output=True, text=True)
        return r, [shlex.split(line) for line in log.read_text().splitlines()]
    return run


def make_n(*args):
    """The commands `make -n` would run (one argv per line, recipe echo lines dropped)."""
    r = subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True)
    return [shlex.split(x) for x in r.stdout.splitlines() if ".py " in x and not x.lstrip().startswith("echo")]


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_train_meta_reads_and_writes_the_makefile_paths(fake, tmp_path):
    meta = next(c for c in make_n("train", "BACKBONE=dinov2") if "--stage" in c and flag(c, "--stage") == "meta")
    r, calls = fake("train_meta.sbatch", "--steps", "5", BACKBONE="dinov2")
    assert r.returncode == 2 and "missing data/features/dinov2/coco.h5" in r.stderr and not calls  # nothing queued
    for f in ("data/features/dinov2/coco.h5", "data/features/dinov2/coco_eval.h5", "runs/dinov2/coco_codes.h5",
              "runs/dinov2/coco_eval_codes.h5"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    r, calls = fake("train_meta.sbatch", "--steps", "5", BACKBONE="dinov2")  # the login node submits the script
    assert r.returncode == 0 and calls == [["sbatch", "--export=ALL", str(ROOT / "slurm" / "train_meta.sbatch"),
                                            "--steps", "5"]]
    r, calls = fake("train_meta.sbatch", "--steps", "5", BACKBONE="dinov2", SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="2")
    assert r.returncode == 0, r.stderr
    assert calls[0][:2] == ["make", "build"]  # ahead-of-time build before the ranks start
    assert calls[1][0] == "srun" and calls[2][0] == "torchrun" and calls[1][1].endswith("torchrun")
    tr = calls[2]
    assert "--standalone" in tr and "--nproc_per_node=2" in tr and tr[tr.index("train.py") + 1:][:2] == ["--stage",
                                                                                                         "meta"]
    for name in ("--features", "--codes", "--eval-features", "--eval-codes", "--out"):
        assert flag(tr, name) == flag(meta, name), name  # the Makefile's paths, both ways
    assert tr[-2:] == ["--steps", "5"]
    # the original's recipe: DINOv3 features, functions from the CLIP SAE's codes, the paper preset
    meta = next(c for c in make_n("train", "BACKBONE=dinov3", "FUNCTIONS=clip", "CONFIG=paper/main")
                if "--stage" in c and flag(c, "--stage") == "meta")
    env = dict(BACKBONE="dinov3", FUNCTIONS="clip", CONFIG="paper/main")
    r, calls = fake("train_meta.sbatch", **env)
    assert r.returncode == 2 and "missing data/features/dinov3/coco.h5" in r.stderr and not calls
    for f in ("data/features/dinov3/coco.h5", "data/features/dinov3/coco_eval.h5", "runs/clip/coco_codes.h5",
              "runs/clip/coco_eval_codes.h5"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    r, calls = fake("train_meta.sbatch", SLURM_JOB_ID="7", **env)
    tr = calls[2]
    for name in ("--config", "--features", "--codes", "--eval-features", "--eval-codes", "--out"):
        assert flag(tr, name) == flag(meta, name), name
    assert flag(meta, "--config") == "configs/paper/main.toml" and flag(meta, "--codes") == "runs/clip/coco_codes.h5"
    assert flag(meta, "--out") == "runs/dinov3/meta_clip-functions.pt"


def test_extract_array_submits_shards_then_a_merge_into_the_makefile_path(fake):
    meta = next(c for c in make_n("train", "BACKBONE=dinov2") if "--stage" in c and flag(c, "--stage") == "meta")
    coco = flag(meta, "--features")  # what make train reads; THINGS features beside it (evaluate.py's input)
    things = str(Path(coco).parent / "things.h5")
    r, calls = fake("extract_array.sbatch", "things", "dinov2", "8")
    assert r.returncode == 0, r.stderr
    assert [c[0] for c in calls] == ["sbatch", "sbatch"]
    a, m = calls
    assert a[1:3] == ["--parsable", "--array=0-7"] and a[-4:] == ["things", "dinov2", "8", things]
    assert "--dependency=afterok:4242" in m and "--export=ALL,MERGE=1" in m and m[-4:] == a[-4:]
    r, calls = fake("extract_array.sbatch", "coco", "dinov2", "8", SLURM_JOB_ID="1", SLURM_ARRAY_TASK_ID="5")
    (py,) = calls
    assert py[1] == "extract.py" and flag(py, "--out") == coco and flag(py, "--shard") == "5/8"
    assert (flag(py, "--dataset"), flag(py, "--backbone")) == ("coco", "dinov2")
    r, calls = fake("extract_array.sbatch", "coco", "dinov2", "8", SLURM_JOB_ID="1", MERGE="1")
    assert calls[0][-1] == "--merge" and flag(calls[0], "--out") == coco
    r, calls = fake("extract_array.sbatch", "things", "dinov2", "4", "F.h5", "--pca", "64", SLURM_JOB_ID="1",
                    SLURM_ARRAY_TASK_ID="3")
    assert flag(calls[0], "--out") == "F.h5" and calls[0][-2:] == ["--pca", "64"]  # extra flags pass through


def test_evaluate_array_maps_every_model_subject_roi_once(fake):
    env = dict(MODELS="data/features/clip/things.h5 data/features/dinov2/things.h5", SUBJECTS="1 2",
               ROIS="V1 FFA PPA")
    r, calls = fake("evaluate_array.sbatch", "--n-perm", "100", **env)
    assert r.returncode == 0 and calls[0][:2] == ["sbatch", "--array=0-11"]
    seen = set()
    for i in range(12):
        r, (py,) = fake("evaluate_array.sbatch", "--n-perm", "100", SLURM_JOB_ID="1", SLURM_ARRAY_TASK_ID=str(i), **env)
        assert py[1:4] == ["evaluate.py", "--task", "fmri"] and flag(py, "--data") == "data/external"
        seen.add((flag(py, "--features"), flag(py, "--subjects"), flag(py, "--rois")))
        model = Path(flag(py, "--features")).parent.name
        assert flag(py, "--out") == f"runs/eval/fmri/{model}/sub-0{flag(py, '--subjects')}_{flag(py, '--rois')}.json"
        assert py[-2:] == ["--n-perm", "100"]
    assert len(seen) == 12  # every (model, subject, ROI) once
    r, (py,) = fake("evaluate_array.sbatch", SLURM_JOB_ID="1", SLURM_ARRAY_TASK_ID="0", BACKBONE="dinov2")
    make_meta = next(c for c in make_n("train", "BACKBONE=dinov2") if "--eval-features" in c)
    assert flag(py, "--features") == str(Path(flag(make_meta, "--features")).parent / "things.h5")  # Makefile's FEAT


def test_paper_array_runs_every_cell_once_and_resumes(fake, tmp_path):
    """The paper grid: DRY prints every cell; the login node refuses missing inputs, then submits one task per cell;
    task i trains cell i with its preset, the CLIP functions and coco_eval selection, then evaluates it; a rerun
    skips what is done."""
    variants = [p.stem for p in sorted((ROOT / "configs" / "paper").glob("*.toml"))]
    r, calls = fake("paper_array.sbatch", DRY="1")
    assert r.returncode == 0 and not calls  # nothing run
    lines = [shlex.split(x) for x in r.stdout.splitlines() if x and not x.startswith("#")]
    trains = [c for c in lines if "train.py" in c]
    assert len(trains) == len(variants) * 4 == 44 and r.stdout.count("# cell ") == 44
    cells = {(Path(flag(c, "--config")).stem, Path(flag(c, "--features")).parent.name) for c in trains}
    assert cells == {(v, b) for v in variants for b in ("clip", "dinov3", "mae", "siglip2")}
    for c in trains:
        v, b = Path(flag(c, "--config")).stem, Path(flag(c, "--features")).parent.name
        fn = {"midsae": "runs/clip_l6/coco", "raw": "data/features/clip/coco"}.get(v, "runs/clip/coco")
        suffix = ".h5" if v == "raw" else "_codes.h5"
        assert flag(c, "--codes") == fn + suffix and flag(c, "--eval-codes") == fn + "_eval" + suffix
        assert flag(c, "--eval-features") == f"data/features/{b}/coco_eval.h5" and "--resume" in c
        assert flag(c, "--out") == f"runs/paper/{b}/{v}/meta.pt"
    evals = [c for c in lines if "evaluate.py" in c]
    assert len(evals) == 44 * 5 and {flag(c, "--task") for c in evals} == {
        "things-ooo", "levels-ooo", "category-learning", "reward-learning", "fmri"}
    assert make_n("paper", "DRY=1") == [] and "DRY=1" in subprocess.run(
        ["make", "-n", "paper", "DRY=1"], cwd=ROOT, capture_output=True, text=True).stdout
    env = dict(VARIANTS="main raw", BACKBONES="clip mae")
    r, calls = fake("paper_array.sbatch", **env)
    assert r.returncode == 2 and not calls and "data/features/mae/levels.h5" in r.stderr
    for f in ("runs/clip/coco_codes.h5", "runs/clip/coco_eval_codes.h5"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"")
    for b in ("clip", "mae"):
        for s in ("coco", "coco_eval", "things", "levels"):
            (tmp_path / f"data/features/{b}").mkdir(parents=True, exist_ok=True)
            (tmp_path / f"data/features/{b}/{s}.h5").write_bytes(b"")
    r, calls = fake("paper_array.sbatch", "--steps", "5", **env)
    assert r.returncode == 0 and calls == [["sbatch", "--array=0-3", "--export=ALL",
                                            str(ROOT / "slurm" / "paper_array.sbatch"), "--steps", "5"]]
    r, calls = fake("paper_array.sbatch", "--steps", "5", SLURM_JOB_ID="9", SLURM_ARRAY_TASK_ID="3", **env)
    assert r.returncode == 0, r.stderr
    assert calls[0][:2] == ["make", "build"] and calls[1][0] == "torchrun"
    assert flag(calls[1], "--config") == "configs/paper/raw.toml"
    assert flag(calls[1], "--features") == "data/features/mae/coco.h5"
    assert calls[1][-2:] == ["--steps", "5"] and [flag(c, "--task") for c in calls[2:]] == [
        "things-ooo", "levels-ooo", "category-learning", "reward-learning", "fmri"]
    cell = tmp_path / "runs/paper/mae/raw"
    assert (cell / "meta.done").exists()  # training finished: a rerun does not train again
    (cell / "fmri.json").unlink(missing_ok=True)
    (cell / "things-ooo.json").write_text("{}")
    r, calls = fake("paper_array.sbatch", SLURM_JOB_ID="9", SLURM_ARRAY_TASK_ID="3", **env)
    assert [c[0] for c in calls[1:]] == ["python"] * 4 and "things-ooo" not in " ".join(sum(calls, []))
