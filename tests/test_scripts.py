"""The scripts' command lines: flags, clear refusals, exit codes."""
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", ["sae", "meta"])
def test_train_stage_not_implemented_yet(stage, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", stage])
    assert e.value.code == 2 and "not implemented yet" in capsys.readouterr().err


def test_train_rejects_unknown_stage_and_flags():
    with pytest.raises(SystemExit, match="expected one of"):
        train.main(["--stage", "warp9"])
    with pytest.raises(SystemExit):
        train.parse(["--stag", "sae"])


def test_extract_real_dataset_refused_and_unknown_flag():
    r = subprocess.run([sys.executable, "extract.py", "--dataset", "things"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--dataset synthetic" in r.stderr
    r = subprocess.run([sys.executable, "extract.py", "--no-such-flag", "1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
