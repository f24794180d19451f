"""The original study's recipe: configs/paper/*.toml against the README's table; a reduced paper preset on the
world; leak-free selection (a held-out split of the training pool; the human-evaluation image sets refused);
early stopping only after --min-steps; functions from another backbone's SAE matched by image id; TensorBoard
event files; the grid's results table."""
import json
import re
import shlex
import sys
import tomllib
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import data
import evaluate
import models
import train
from test_meta import write_truth_codes

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "configs" / "paper"
pytestmark = pytest.mark.usefixtures("one_thread")


def _toml_value(text):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word (an ablation's flag value, e.g. --model lstm)


def readme_tables():
    """The README's "The paper's recipe": {(table, key): (original, ours)} and {variant: {key: value}}."""
    text = (ROOT / "README.md").read_text()
    sec = text.split("### The paper's recipe", 1)[1].split("\n## ", 1)[0]
    options, ablations = {}, {}
    for line in sec.splitlines():
        m = re.match(r"\| `--([a-z0-9-]+)`( \(sae\))? \| `([^`]*)` \| `([^`]*)` \|", line)
        if m:
            options[("sae" if m.group(2) else "meta", m.group(1).replace("-", "_"))] = (
                _toml_value(m.group(3)), _toml_value(m.group(4)))
        m = re.match(r"\| `([a-z0-9_]+)` \| ([^|]*)\|", line)
        if m:  # an ablation: its flags, or none (midsae: only the functions' source changes)
            cell = m.group(2).strip()
            change, toks = {}, shlex.split(cell.strip("`")) if cell.startswith("`--") else []
            i = 0
            while i < len(toks):
                key = toks[i][2:].replace("-", "_")
                if key.startswith("no_") and key not in train.stage_defaults("meta"):  # --no-x; --no-embed is a flag
                    change[key[3:]], i = False, i + 1
                elif i + 1 == len(toks) or toks[i + 1].startswith("--"):
                    change[key], i = True, i + 1
                else:
                    change[key], i = _toml_value(toks[i + 1]), i + 2
            ablations[m.group(1)] = change
    return options, ablations


def load(name):
    with open(PRESETS / f"{name}.toml", "rb") as fh:
        return tomllib.load(fh)


def test_presets_hold_the_originals_values_as_the_readme_table_says():
    options, ablations = readme_tables()
    main = load("main")
    assert len(options) > 30 and set(main) == {"sae", "meta"}
    for (table, key), (original, ours) in options.items():
        assert main[table].get(key) == original, (table, key, main[table].get(key), original)
        assert train.stage_defaults(table)[key] == ours, (table, key)  # the table's "ours" is train.py's default
    untabled = [(t, k) for t in main for k in main[t] if (t, k) not in options]
    assert not untabled, f"preset keys without a README row: {untabled}"
    # the original's values, read from its configs (candemircan/metalign data/configs/main_clip.toml, train.py)
    m = main["meta"]
    assert (m["n_layers"], m["n_heads"], m["mlp"], m["dropout"], m["batch"], m["steps"], m["lr"], m["length"]) == \
        (1, 16, False, 0.1, 4096, 10000, 2.5e-4, 120)
    assert (m["optimizer"], m["warmup"], m["weight_decay"], m["select"], m["min_steps"], m["min_accuracy"]) == \
        ("schedulefree", 0, 0.0, "paper", 1000, 0.6)
    files = {p.stem for p in PRESETS.glob("*.toml")}
    assert files == {"main", "2layers", "8heads", "32heads", "lstm", "midsae", "mlp", "noemb", "raw",
                     "static_linear", "wd"} == {"main"} | set(ablations)
    assert ablations["wd"] == {"weight_decay": 1e-4} and ablations["lstm"] == {"model": "lstm", "compile": False}
    assert ablations["midsae"] == {}  # the same flags; the functions' source is a path (the grid passes it)
    for name, change in ablations.items():
        cfg = load(name)
        assert set(cfg) == {"meta"}, name  # the SAE is main's
        assert cfg["meta"] == {**main["meta"], **change}, name
    for name in sorted(files):  # every preset parses as train.py flags, with the file's values
        cfg = train.parse(["--stage", "meta", "--config", str(PRESETS / f"{name}.toml")])
        assert all(cfg[k] == v for k, v in load(name)["meta"].items()), name
    cfg = train.parse(["--stage", "sae", "--config", str(PRESETS / "main.toml")])
    assert (cfg["n_latents"], cfg["k"], cfg["normalize"]) == ("64x", 64, "none")


# ---------------------------------------------------------------------------------------- the world's pools

def write_codes(world, split, out):
    """The world's per-image h codes, top-4 per row, float32 (test_meta.write_truth_codes)."""
    return write_truth_codes(world, split, out, dtype=np.float32)


@pytest.fixture(scope="module")
def pools(world, coco_pools, tmp_path_factory):
    """conftest's coco_pools, plus the world's h codes of every COCO image (matched to either pool by image id)."""
    tmp = tmp_path_factory.mktemp("paper")
    return dict(coco_pools, dir=tmp, codes=write_codes(world, "coco", tmp / "coco_codes.h5"))


def meta_args(pools, out, **kw):
    cfg = dict(features=pools["train"], codes=pools["codes"], eval_features=pools["eval"], eval_codes=pools["codes"],
               out=str(out), length=32, batch=16, steps=20, eval_every=10, eval_episodes=64, lr=2e-3, warmup=5,
               d_model=32, n_layers=1, n_heads=2, min_nonzero=40, icl_bound=0, seed=0)
    cfg.update(kw)
    argv = ["--stage", "meta", "--no-progress"]
    for k, v in cfg.items():
        argv += [f"--{k.replace('_', '-')}={v}"] if not isinstance(v, bool) else [f"--{'' if v else 'no-'}"
                                                                                   f"{k.replace('_', '-')}"]
    return argv


def test_reduced_paper_preset_runs_on_the_world(pools, tmp_path):
    """configs/paper/wd.toml at the world's size (batch 8, 20 steps, no compile): the original's loop as flags.
    Checked against quantities computed here: the selection score is 0.5 accuracy + 0.5 R^2 and the checkpoint
    is the best of them; every magnitude shares one scale, 1 / std of the training functions' active values;
    the embedding is kept out of weight decay while biases are decayed (wd 1e-4: the wd ablation's file)."""
    out = tmp_path / "paper.pt"
    argv = ["--stage", "meta", "--config", str(PRESETS / "wd.toml"), "--features", pools["train"], "--codes",
            pools["codes"], "--eval-features", pools["eval"], "--eval-codes", pools["codes"], "--out", str(out),
            "--batch", "8", "--steps", "20", "--eval-every", "5", "--eval-per-function", "2", "--no-compile",
            "--icl-bound", "12", "--no-progress"]
    best = train.main(argv)
    ck = torch.load(out, weights_only=False)
    cfg = ck["config"]
    assert (cfg["n_layers"], cfg["n_heads"], cfg["length"], cfg["select"], cfg["optimizer"]) == \
        (1, 16, 120, "paper", "schedulefree")
    assert not cfg["standardize"] and cfg["embed_init"] == "default" and cfg["mag_target"] == "raw"
    log = pd.read_csv(tmp_path / "paper.csv")
    ev = log.dropna(subset=["eval_accuracy"])
    assert len(log) == 20 and len(ev) == 4
    np.testing.assert_allclose(ev["eval_score"], 0.5 * ev["eval_accuracy"] + 0.5 * ev["eval_magnitude_r2"])
    assert best["score"] == pytest.approx(ev["eval_score"].max()) and best["select"] == "paper"
    assert best["step"] == int(ev["step"][ev["eval_score"].idxmax()])
    # selection scores the planted functions with >= L = 120 positives and negatives among the selection images,
    # 2 episodes each
    _, ide = data.read_features(pools["eval"])
    idx, val = models.read_codes(pools["codes"], len(ide), ide)
    counts = np.bincount(idx[val > 0], minlength=12)
    scored = np.nonzero((counts >= 120) & (len(ide) - counts >= 120))[0]
    assert 0 < len(scored) and ck["eval_latents"].tolist() == scored.tolist()
    assert len(ck["metrics"]["accuracy_by_position"]) == 120
    _, idt = data.read_features(pools["train"])
    idx, val = models.read_codes(pools["codes"], len(idt), idt)
    g = 1 / np.asarray(val[val > 0], np.float64).std(ddof=1)  # every latent is a function: every active value
    assert ck["magnitudes"]["scale"] == "global" and ck["magnitudes"]["train_scale"][0] == pytest.approx(g, rel=1e-5)
    # the online-ridge bound on the same held-out episodes, in the CSV and the checkpoint
    bound = best["icl_ridge_bound"]
    assert bound["n_episodes"] == min(12, 2 * len(scored)) and 0.5 < bound["accuracy"] < 1
    assert ev["icl_ridge_bound"].nunique() == 1
    assert ev["icl_ridge_bound"].iloc[0] == pytest.approx(bound["accuracy"])
    # weight decay: every parameter but the embedding's (shapes of the optimizer's per-parameter state)
    opt = torch.load(tmp_path / "paper.last.pt", weights_only=False)["optimizer"]
    model, _ = models.load_meta(out)
    shapes = {g["weight_decay"]: sorted(tuple(opt["state"][i]["z"].shape) for i in g["params"])
              for g in opt["param_groups"]}
    emb = model.embedding
    assert shapes[0.0] == sorted([tuple(emb.weight.shape), tuple(emb.bias.shape)])
    rest = [p for n, p in model.named_parameters() if not n.startswith("embedding.")]
    assert shapes[1e-4] == sorted(tuple(p.shape) for p in rest) and (2,) in shapes[1e-4]  # log_vars decayed too


def test_selection_never_sees_the_human_evaluation_images(world, pools, tmp_path):
    """--eval-features that shares images with the THINGS (or Levels) features beside the training pool stops
    with both files and the count; a partial overlap is counted exactly; --forbid none lets it through."""
    things = world["features/things"]
    n_things = len(data.read_features(things)[1])
    with pytest.raises(SystemExit, match=rf"--eval-features {re.escape(things)} shares {n_things} image ids with "
                                         rf"{re.escape(things)}"):
        train.main(meta_args(pools, tmp_path / "a.pt", features=world["features/coco"], eval_features=things,
                             steps=1))
    Xe, ide = data.read_features(pools["eval"])
    Xt, idt = data.read_features(things)
    mixed = tmp_path / "mixed.h5"
    data.write_features(mixed, np.concatenate([Xe, Xt[:7]]), ide + idt[:7])
    with pytest.raises(SystemExit, match=rf"shares 7 image ids with {re.escape(things)}"):
        train.main(meta_args(pools, tmp_path / "b.pt", eval_features=str(mixed), forbid=things, steps=1))
    with pytest.raises(SystemExit, match="--forbid nope.h5: not found"):
        train.main(meta_args(pools, tmp_path / "c.pt", forbid="nope.h5", steps=1))
    ci, cv = models.read_codes(pools["codes"], len(ide), ide)
    ti, tv = models.read_codes(write_codes(world, "things", tmp_path / "things_codes.h5"))
    with h5py.File(tmp_path / "mixed_codes.h5", "w") as f:
        f["sae/indices"], f["sae/values"] = np.concatenate([ci, ti[:7]]), np.concatenate([cv, tv[:7]])
        f["image_ids"] = np.array(ide + idt[:7], dtype=object)
    train.main(meta_args(pools, tmp_path / "d.pt", eval_features=str(mixed), forbid="none", steps=2, eval_every=2,
                         eval_codes=str(tmp_path / "mixed_codes.h5")))
    assert (tmp_path / "d.pt").exists()


def test_early_stopping_counts_only_after_min_steps(pools, tmp_path):
    """lr 1e-30, below float32 resolution (--lr must be > 0): the weights never change, so the held-out score
    never changes after the first evaluation. Patience 1 then stops at the first evaluation that counts: step 10
    with --min-steps 0, step 30 with --min-steps 30, never with a --min-accuracy no evaluation reaches."""
    stops = {}
    for name, kw in (("a", dict(min_steps=0)), ("b", dict(min_steps=30)), ("c", dict(min_steps=0, min_accuracy=0.99))):
        train.main(meta_args(pools, tmp_path / f"{name}.pt", lr=1e-30, steps=40, eval_every=5, patience=1, **kw))
        stops[name] = len(pd.read_csv(tmp_path / f"{name}.csv"))
    assert stops == dict(a=10, b=30, c=40)


def test_functions_from_another_backbone_are_matched_by_image_id(pools, tmp_path):
    """The model reads the second backbone's features while its functions come from the first backbone's codes
    (the original: the CLIP SAE for every backbone). The codes file holds every COCO image in another order
    (rows shuffled): functions are matched by image id and equal those of row-aligned codes; an image the codes
    lack is an error naming both files and the count."""
    idx, val = models.read_codes(pools["codes"])
    with h5py.File(pools["codes"]) as f:
        ids = data.decode_strings(f["image_ids"][...])
    perm = np.random.default_rng(0).permutation(len(ids))
    shuffled = tmp_path / "shuffled_codes.h5"
    with h5py.File(shuffled, "w") as f:
        f["sae/indices"], f["sae/values"] = idx[perm], val[perm]
        f["image_ids"] = np.array([ids[i] for i in perm], dtype=object)
    _, tid = data.read_features(pools["train_b1"])
    rows = [ids.index(i) for i in tid]
    a = models.functions_from_codes(*models.read_codes(str(shuffled), len(tid), tid), 40)
    b = models.functions_from_codes(idx[rows], val[rows], 40)
    for k in ("pos_ptr", "pos_idx", "pos_val", "latents"):
        assert torch.equal(a[k], b[k]), k
    best = train.main(meta_args(pools, tmp_path / "b1.pt", features=pools["train_b1"], eval_features=pools["eval_b1"],
                                codes=str(shuffled), eval_codes=str(shuffled), steps=10, eval_every=10))
    assert 0 <= best["accuracy"] <= 1
    ck = torch.load(tmp_path / "b1.pt", weights_only=False)
    assert torch.equal(ck["latents"], b["latents"])
    short = tmp_path / "short_codes.h5"
    with h5py.File(short, "w") as f:
        f["sae/indices"], f["sae/values"] = idx[5:], val[5:]
        f["image_ids"] = np.array(ids[5:], dtype=object)
    n_missing = len(set(ids[:5]) & set(tid))
    with pytest.raises(SystemExit, match=rf"{re.escape(str(short))}: {n_missing} of the {len(tid)} images of "
                                             rf"{re.escape(pools['train_b1'])} are missing"):
        train.main(meta_args(pools, tmp_path / "c.pt", features=pools["train_b1"], eval_features=pools["eval_b1"],
                             codes=str(short), steps=1))
    # neuron functions from another file's /features (the raw ablation: CLIP's dims for every backbone)
    X0, id0 = data.read_features(pools["train"])
    Xn = models.functions_from_neurons(X0)
    train.main(meta_args(pools, tmp_path / "n.pt", functions="neurons", codes=pools["train"],
                         eval_codes=pools["eval"], features=pools["train"], steps=2, eval_every=2))
    assert torch.equal(torch.load(tmp_path / "n.pt", weights_only=False)["latents"], Xn["latents"])


def test_tensorboard_event_files_beside_the_csv(pools, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = tmp_path / "tb"
    train.main(meta_args(pools, tmp_path / "m.pt", steps=12, eval_every=6, tensorboard=str(tb)))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    log = pd.read_csv(tmp_path / "m.csv")
    loss = [e.value for e in acc.Scalars("train/loss")]
    np.testing.assert_allclose(loss, log["loss"], rtol=1e-6)
    assert [e.step for e in acc.Scalars("eval/eval_accuracy")] == [6, 12]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(SystemExit, match="--tensorboard .*need the 'tensorboard' package"):
        train.main(meta_args(pools, tmp_path / "n.pt", steps=1, tensorboard=str(tb)))


def test_paper_table_sets_ours_beside_the_published_numbers(tmp_path):
    """make paper-table on a grid with two finished cells: their values, the published ones beside main, '-' for
    the cells not run."""
    root = tmp_path / "paper"
    vals = {"things-ooo": ("accuracy", 0.41, 0.47), "levels-ooo": ("accuracy", 0.55, 0.58),
            "category-learning": ("mcfadden_r2", 0.2, 0.25), "reward-learning": ("mcfadden_r2", 0.1, 0.12),
            "fmri": ("r2_high", 0.5, 0.52)}
    for cell in ("clip/main", "mae/wd"):
        (root / cell).mkdir(parents=True)
        for task, (key, b, a) in vals.items():
            (root / cell / f"{task}.json").write_text(json.dumps(dict(header="x", base={key: b}, aligned={key: a})))
    out = evaluate.main(["--task", "paper-table", "--results", str(root), "--out", str(root / "table.json")])
    text = (root / "table.md").read_text()
    row = next(x for x in text.splitlines() if x.startswith("| clip | main |"))
    assert row == ("| clip | main | 0.410 -> 0.470 | 0.495 -> 0.540 | 0.550 -> 0.580 | 0.602 -> 0.626 | "
                   "0.200 -> 0.250 | 0.100 -> 0.120 | 0.500 -> 0.520 |")
    assert "\n| mae | main | - | 0.377 -> 0.481 | - | - | - | - | - |\n" in text
    assert "(2 of 44 cells with results)" in text
    assert "\n| dinov3 | wd | - |  | - |  | - | - | - |\n" in text  # published numbers: the main run only
    assert json.load(open(out))["cells"]["mae/wd"]["fmri"] == dict(base=0.5, aligned=0.52)
    with pytest.raises(SystemExit, match="no cell of the grid has results yet"):
        evaluate.main(["--task", "paper-table", "--results", str(tmp_path), "--out", str(tmp_path / "t.json")])
