"""experiments/seeds_table.py: the table over seeds and world kinds, checked against an independent oracle.

The run folders hold result JSONs written by evaluate.write_result with the paired gains the odd-one-out task
computes (representations.paired_gain over triplets, put_gains), plus a task without unit-level CIs (t-SNE); the
oracle recomputes every gain, CI, best control, mean and count from the per-triplet hits with scipy's t test."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import evaluate  # noqa: E402
import seeds_table  # noqa: E402
from representations import paired_gain, put_gains  # noqa: E402

REPS = ("aligned", "base", "base_z", "sae_codes")
# P(hit) per representation, per (kind, seed): designed so the gains land above, across and below 0
P_HIT = {("positive", 0): (0.70, 0.50, 0.55, 0.60), ("positive", 1): (0.66, 0.52, 0.64, 0.58),
         ("control", 0): (0.50, 0.50, 0.51, 0.40), ("control", 1): (0.45, 0.52, 0.50, 0.60)}
N = 400  # triplets
TRUST = {("positive", 0): (0.90, 0.88, 0.91, 0.80), ("positive", 1): (0.93, 0.90, 0.85, 0.92),
         ("control", 0): (0.85, 0.86, 0.84, 0.83), ("control", 1): (0.87, 0.87, 0.88, 0.86)}


def hits_of(kind, seed):
    rng = np.random.default_rng([seed, len(kind)])
    return {r: (rng.random(N) < p).astype(float) for r, p in zip(REPS, P_HIT[kind, seed])}


def write_run(folder, kind, seed):
    """One finished run: things-ooo.json and tsne.json in the evaluations' format, and report.md."""
    hits = hits_of(kind, seed)
    res = {r: dict(accuracy=float(h.mean()), ci=[0.0, 1.0], n_triplets=N) for r, h in hits.items()}
    res["spose"] = dict(accuracy=0.9, ci=[0.88, 0.92])
    put_gains(res, "accuracy", {("aligned", b): paired_gain(hits["aligned"] - hits[b], unit="triplets")
                                for b in REPS[1:]})
    res["noise_ceiling"] = 0.95
    cfg = dict(evaluate.defaults, task="things-ooo", features=str(folder / "things.h5"), ckpt="meta.pt")
    evaluate.write_result(str(folder / "things-ooo.json"), res, cfg)
    tsne = {r: dict(trustworthiness=t) for r, t in zip(REPS, TRUST[kind, seed])}  # no unit-level CI
    evaluate.write_result(str(folder / "tsne.json"), tsne, dict(cfg, task="tsne"))
    evaluate.main(["--task", "report", "--results", str(folder), "--out", str(folder / "report.md")])


def oracle(kind, seed):
    """{(task, measure): (gain over base, its CI, best control, gain over it, its CI)} from the raw hits."""
    hits = hits_of(kind, seed)
    out = {}

    def t_ci(d):
        return tuple(stats.ttest_1samp(d, 0.0).confidence_interval(0.95))

    acc = {r: hits[r].mean() for r in REPS}
    best = max(REPS[2:], key=acc.get)
    out["things-ooo", "accuracy"] = (acc["aligned"] - acc["base"], t_ci(hits["aligned"] - hits["base"]), best,
                                     acc["aligned"] - acc[best], t_ci(hits["aligned"] - hits[best]))
    tr = dict(zip(REPS, TRUST[kind, seed]))
    best = max(REPS[2:], key=tr.get)
    out["tsne", "t-SNE trustworthiness"] = (tr["aligned"] - tr["base"], None, best, tr["aligned"] - tr[best], None)
    return out


def side(ci):
    return "no CI" if ci is None else "above" if ci[0] > 0 else "below" if ci[1] < 0 else "straddling"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    for kind in ("positive", "control"):
        for seed in (0, 1):
            folder = root / "runs" / f"{kind}-s{seed}"
            folder.mkdir(parents=True)
            write_run(folder, kind, seed)
    return root


def test_table_matches_the_oracle(root, capsys):
    out = root / "t.md"
    text = seeds_table.main(["table", "--seeds", "0", "1", "--root", str(root), "--out", str(out)])
    doc = json.loads((root / "t.json").read_text())
    assert out.read_text() == text and doc["config"]["seeds"] == [0, 1] and "versions" in doc["config"]
    assert text.startswith("<!-- seeds_table.py: seeds 0 1;") and doc["config"]["git_commit"] in text
    seen = set()
    for kind in ("positive", "control"):
        rows = {(e["task"], e["measure"]): e for e in doc["worlds"][kind]["rows"]}
        want = {seed: oracle(kind, seed) for seed in (0, 1)}
        assert set(rows) == set(want[0])
        for key, e in rows.items():
            for s in e["seeds"]:
                gb, cb, best, gc, cc = want[s["seed"]][key]
                assert s["gain_base"] == pytest.approx(gb, abs=1e-12)
                assert s["gain_control"] == pytest.approx(gc, abs=1e-12) and s["control"] == best
                for got, ref in ((s["ci_base"], cb), (s["ci_control"], cc)):
                    assert (got is None) == (ref is None)
                    if ref is not None:
                        assert got == pytest.approx(ref, abs=1e-9)
            for what, i, j in (("base", 0, 1), ("control", 3, 4)):
                assert e[f"mean_gain_{what}"] == pytest.approx(np.mean([want[s][key][i] for s in (0, 1)]), abs=1e-12)
                sides = [side(want[s][key][j]) for s in (0, 1)]
                seen.update(sides)
                assert e[f"counts_{what}"] == {c: sides.count(c) for c in ("above", "straddling", "below", "no CI")}
            # the markdown row carries the same numbers: seed 0's gain over base and the mean over the best control
            line = next(ln for ln in text.split(f"**{'positive world' if kind == 'positive' else 'negative'}", 1)[1]
                        .splitlines() if ln.startswith(f"| {key[0]} | {key[1]} |"))
            assert f"{want[0][key][0]:+.3f}" in line and f"{e['mean_gain_control']:+.3f}" in line
    assert seen == {"above", "straddling", "below", "no CI"}  # the fake runs exercise every count


def test_missing_or_unfinished_run_is_named(root, tmp_path, capsys):
    with pytest.raises(SystemExit):
        seeds_table.main(["table", "--seeds", "0", "1", "7", "--root", str(root), "--out", str(tmp_path / "t.md")])
    assert os.path.join(str(root), "runs", "positive-s7") in capsys.readouterr().err
    half = tmp_path / "runs" / "positive-s0"
    half.mkdir(parents=True)
    (half / "things-ooo.json").write_text((root / "runs" / "positive-s0" / "things-ooo.json").read_text())
    with pytest.raises(SystemExit):
        seeds_table.main(["table", "--seeds", "0", "--worlds", "positive", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert str(half) in err and "report.md" in err and not (tmp_path / "table.md").exists()


def test_run_calls_make_per_seed_and_world_and_names_a_failure(tmp_path, capsys):
    make = tmp_path / "fake_make"  # records its arguments; fails for seed 1
    make.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\ncase \"$*\" in *SEED=1*) exit 3;; esac\n")
    make.chmod(0o755)
    with pytest.raises(SystemExit):
        seeds_table.main(["run", "--seeds", "0", "1", "--root", str(tmp_path / "r"), "--make", str(make),
                          "--size", "full", "--config", "configs/icl_full_cpu.toml"])
    calls = (tmp_path / "calls").read_text().splitlines()
    r = tmp_path / "r"
    c = ROOT / "configs" / "icl_full_cpu.toml"
    assert calls == [f"demo WORLD={r}/worlds/positive-s0 RUN={r}/runs/positive-s0 SEED=0 SIZE=full CONTROL= CONFIG={c}",
                     f"demo WORLD={r}/worlds/control-s0 RUN={r}/runs/control-s0 SEED=0 SIZE=full CONTROL=1 CONFIG={c}",
                     f"demo WORLD={r}/worlds/positive-s1 RUN={r}/runs/positive-s1 SEED=1 SIZE=full CONTROL= CONFIG={c}"]
    cap = capsys.readouterr()
    assert cap.out.count("done in") == 2 and "[2/4] control-s0" in cap.out
    assert "run positive-s1 failed (make exited with 3" in cap.err and "positive-s1.log" in cap.err


def test_run_names_a_missing_config_before_running_anything(tmp_path, capsys):
    make = tmp_path / "calls_make"
    make.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n")
    make.chmod(0o755)
    with pytest.raises(SystemExit):
        seeds_table.main(["run", "--root", str(tmp_path), "--make", str(make), "--config", "configs/nope.toml"])
    err = capsys.readouterr().err
    assert "--config configs/nope.toml: file not found" in err and not (tmp_path / "calls").exists()


def test_run_refuses_a_world_written_with_other_settings(tmp_path, capsys):
    import h5py
    p = tmp_path / "worlds" / "control-s2" / "features" / "things.h5"
    p.parent.mkdir(parents=True)
    with h5py.File(p, "w") as f:
        f.attrs["config"] = json.dumps(dict(size="small", seed=2, control=True))
    make = tmp_path / "calls_make"
    make.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n")
    make.chmod(0o755)
    seeds_table.main(["run", "--seeds", "2", "--worlds", "control", "--root", str(tmp_path), "--make", str(make)])
    assert len((tmp_path / "calls").read_text().splitlines()) == 1  # the same settings: make resumes it
    with pytest.raises(SystemExit):
        seeds_table.main(["run", "--seeds", "2", "--worlds", "control", "--root", str(tmp_path), "--make", str(make),
                          "--size", "full"])
    assert f"{p}: config" in capsys.readouterr().err and len((tmp_path / "calls").read_text().splitlines()) == 1


def test_report_rewrites_its_own_report_but_never_a_result(root, capsys):
    """make demo over a finished run (what `run` does to resume) rewrites report.md in the results folder; a
    result JSON there is still an input that --out may not overwrite."""
    folder = root / "runs" / "control-s1"
    before = (folder / "report.md").read_text()
    evaluate.main(["--task", "report", "--results", str(folder), "--out", str(folder / "report.md")])
    assert (folder / "report.md").read_text().split("written")[0] == before.split("written")[0]
    with pytest.raises(SystemExit):
        evaluate.main(["--task", "report", "--results", str(folder), "--out", str(folder / "tsne.json")])
    assert "--out is the input --results (tsne.json)" in capsys.readouterr().err
