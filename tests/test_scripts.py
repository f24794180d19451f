"""The scripts' command lines: flags, clear refusals, exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]


def test_train_meta_names_missing_features(tmp_path):  # sae and meta landed (tests/test_sae.py, tests/test_meta.py)
    import data
    with pytest.raises(data.DataError, match="nope.h5 not found"):
        train.main(["--stage", "meta", "--features", str(tmp_path / "nope.h5")])


def test_train_rejects_unknown_stage_and_flags():
    with pytest.raises(SystemExit, match="expected one of"):
        train.main(["--stage", "warp9"])
    with pytest.raises(SystemExit):
        train.parse(["--stag", "sae"])


def test_extract_names_missing_images_and_unknown_flag(tmp_path):
    """Real datasets (tests/test_extract.py) need their images: a missing folder is named, fast, with no output."""
    r = subprocess.run([sys.executable, "extract.py", "--dataset", "things", "--data", str(tmp_path), "--weights",
                        "random", "--out", str(tmp_path / "f.h5")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and f"{tmp_path}/THINGS: folder not found" in r.stderr
    assert not (tmp_path / "f.h5").exists()
    r = subprocess.run([sys.executable, "extract.py", "--no-such-flag", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_make_train_names_missing_features(tmp_path):
    """make train BACKBONE=x on a machine without x's features says which file to put where (exit 2)."""
    r = subprocess.run(["make", "-s", "train", "BACKBONE=nosuchnet", f"TRAIN={tmp_path}/runs"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "missing data/features/nosuchnet/coco.h5" in r.stdout and "extract.py --dataset coco" in r.stdout
