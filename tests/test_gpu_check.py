"""gpu_check.py without a GPU: it stops at once with its message; --dry-run prints the plan and runs every
benchmark's code on the CPU at tiny sizes, with the values checked; the report and the wheel selection."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None):
    return subprocess.run([sys.executable, "gpu_check.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, **(env or {})))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: gpu_check would run")
def test_without_a_gpu_it_stops_at_once(tmp_path):
    r = _run("--out", str(tmp_path / "gpu"))
    assert r.returncode == 3
    assert "gpu-check: no CUDA GPU is visible to torch" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "gpu").exists()  # nothing built, nothing written


def test_dry_run_prints_the_plan_and_runs_the_benchmark_code(tmp_path):
    out = tmp_path / "dry"
    r = _run("--dry-run", "--out", str(out), env=dict(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    plan = {line.split()[0]: line for line in r.stdout.splitlines() if line[:7].strip() in
            ("build", "report", "tests", "bench", "demo")}
    assert "FORCE_CUDA=1" in plan["build"] and "TORCH_CUDA_ARCH_LIST=" in plan["build"] and "setup.py" in plan["build"]
    assert "-k cuda" in plan["tests"] and "KERNELS_REQUIRE=1" in plan["tests"]
    assert "make demo" in plan["demo"] and "DEVICE=cuda" in plan["demo"]
    bench = json.loads((out / "bench.json").read_text())
    assert bench["info"]["tiny"] and bench["info"]["device"] == "cpu"
    rows = {row["op"]: row for row in bench["rows"]}
    assert set(rows) == {"episodes", "topk_encode", "cka_linear", "cka_rbf", "ridge_cv k-fold", "fwht"}
    for op, row in rows.items():
        assert row["value_check"] is True and row["ours_ms"] > 0 and row["baseline_ms"] > 0, (op, row)
    assert "dry run ok" in r.stdout


def test_report_and_its_files(tmp_path):
    rows = [gpu_check.table_row("topk_encode", "n=1", 1.1, "x @ W", 1.0, True),
            dict(op="ridge_cv", skipped="no device= yet")]
    (tmp_path / "bench.json").write_text(json.dumps(dict(info={}, rows=rows)))
    (tmp_path / "tests.log").write_text("....\n12 passed, 3 skipped in 4.0s\n")
    steps = [dict(step="build", status="ok", seconds=100.0, log="build.log"),
             dict(step="demo", status="skipped: train.py has no --device yet", seconds=0, log="-")]
    gpu_check.write_report(tmp_path, steps, "H200 (sm_90)")
    text = (tmp_path / "report.md").read_text()
    assert "| build | ok | 100.0 | build.log |" in text and "Tests: 12 passed, 3 skipped in 4.0s" in text
    assert "| topk_encode | n=1 | 1.1 | x @ W | 1.0 | 1.1 | 1.15 | True | True |" in text
    assert "no device= yet" in text and len(list(tmp_path.iterdir())) <= 8
    big = tmp_path / "big.log"
    big.write_text("x" * 300_000 + "END")
    gpu_check.tail_file(big, 1000)
    assert big.stat().st_size < 1100 and big.read_text().endswith("END")


def test_only_missing_wheels_are_installed(tmp_path, monkeypatch):
    (tmp_path / "numpy-1.0-py3-none-any.whl").write_bytes(b"")             # installed here: skipped
    (tmp_path / "no_such_dist_xyz-1.0-py3-none-any.whl").write_bytes(b"")  # missing: installed
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    assert gpu_check.install_wheels(tmp_path) == ["no_such_dist_xyz-1.0-py3-none-any.whl"]
    assert calls and "--no-index" in calls[0] and "--no-deps" in calls[0] and "--target" in calls[0]
    assert not any("numpy-1.0" in c for c in calls[0])
