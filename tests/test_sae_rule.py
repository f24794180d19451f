"""The SAE stage's sizing rule and report: --n-latents auto / --k 0 / --epochs 0 resolve through models.sae_size,
the checkpoint's metrics count dead latents and functions as a direct top-k count does, and on a world's pool
factor recovery is reported (world.factor_recovery's numbers), elsewhere not. Short runs (1 epoch, ~1 s each)."""
import os
import shutil

import numpy as np
import pytest
import torch

import data
import kernels
import train
from models import load_sae, sae_size
from world import factor_recovery

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--no-progress", "--log-every", "100000"]


def test_sae_size_rule():
    """The documented formula at the sizes the README quotes, its clips, and a k given from outside."""
    assert sae_size(20_000, 768) == dict(n_latents=1344, k=32, epochs=40, batch=256)  # 20000*32/480 -> 1344
    assert sae_size(3000, 64, 40) == dict(n_latents=192, k=8, epochs=200, batch=256)  # 3000*8/160 = 150 -> 192
    assert sae_size(100, 64)["n_latents"] == 64 and sae_size(10 ** 7, 64)["n_latents"] == 1024  # clip to d..16 d
    assert sae_size(10 ** 6, 4000)["k"] == 128 and sae_size(10 ** 6, 4000)["epochs"] == 1
    assert sae_size(3000, 64, 40, k=16) == dict(n_latents=320, k=16, epochs=200, batch=256)  # 3000*16/160 = 300
    with pytest.raises(ValueError, match="positive n_rows"):
        sae_size(3000, 64, 0)


def test_auto_resolves_through_the_rule_and_explicit_values_stay():
    cfg = train.parse(["--stage", "sae"])
    assert (cfg["n_latents"], cfg["k"], cfg["epochs"], cfg["min_nonzero"]) == ("auto", 0, 0, 120)  # the defaults
    r = train.resolve_sae_size(dict(cfg, min_nonzero=40), 3000, 64)
    rule = sae_size(3000, 64, 40)
    assert (int(r["n_latents"]), r["k"], r["epochs"]) == (rule["n_latents"], rule["k"], rule["epochs"])
    assert r["sizing"]["from_rule"] == ["n_latents", "k", "epochs"] and r["sizing"]["given"]["n_latents"] == "auto"
    r = train.resolve_sae_size(dict(cfg, n_latents="4x", k=16, epochs=30), 3000, 64)
    assert (r["n_latents"], r["k"], r["epochs"], r["sizing"]["from_rule"]) == ("256", 16, 30, [])
    r = train.resolve_sae_size(dict(cfg, k=16, min_nonzero=40), 3000, 64)  # auto width follows the k given
    assert (r["n_latents"], r["k"], r["sizing"]["from_rule"]) == ("320", 16, ["n_latents", "epochs"])
    r = train.resolve_sae_size(dict(cfg, n_latents="32"), 3000, 64)  # the rule's k (8) fits in an explicit width
    assert (r["n_latents"], r["k"]) == ("32", 8)


def _direct_usage(ckpt, features, min_nonzero):
    """Dead latents and functions by definition: relu(pre) top-k (kernels.topk_encode_ref) on every row,
    positives counted per latent."""
    sae, _ = load_sae(ckpt)
    X = torch.from_numpy(data.read_features(features)[0])
    v, i = kernels.topk_encode_ref(sae.normalize_in(X)[0], sae.W_enc.detach(), sae.b_enc.detach(), sae.k,
                                   sae.b_dec.detach())
    counts = np.bincount(i[v > 0].numpy(), minlength=sae.n_latents)
    fn = counts[counts >= min_nonzero]
    return int((counts == 0).sum()), int(len(fn)), float(np.median(fn))


def test_auto_run_reports_sizes_usage_and_factor_recovery(world, tmp_path, capsys):
    out = str(tmp_path / "auto.pt")
    m = train.main(["--stage", "sae", "--features", world["features/coco"], "--out", out, "--min-nonzero", "40",
                    "--epochs", "1"] + QUIET)
    rule = sae_size(3000, 64, 40)
    _, info = load_sae(out)
    c = info["config"]
    assert (c["n_latents"], c["k"], c["epochs"]) == (str(rule["n_latents"]), rule["k"], 1)
    assert c["sizing"]["from_rule"] == ["n_latents", "k"] and c["sizing"]["n_rows"] == 3000
    assert "n_latents=192 k=8" in capsys.readouterr().out
    assert torch.load(out, weights_only=False)["metrics"]["n_functions"] == m["n_functions"]  # stored as returned
    assert (m["n_dead"], m["n_functions"], m["function_positives_median"]) == _direct_usage(out, world["features/coco"],
                                                                                            40)
    ref = factor_recovery(out, world["dir"], min_nonzero=40)  # the world's own measure of the saved checkpoint
    fr = m["factor_recovery"]
    assert fr["world"] == os.path.abspath(world["dir"])
    for key in ("h_recovered", "g_recovered", "h_best_cosine_median", "g_best_cosine_median"):
        assert fr[key] == pytest.approx(ref[key], abs=1e-6), key
    assert (ref["n_functions"], ref["dead_fraction"]) == (m["n_functions"], pytest.approx(m["dead_fraction"]))
    assert len(fr["h_best_cosine"]) == 24 and 0 < fr["h_best_cosine_median"] <= 1


def test_dead_latents_and_functions_on_a_wide_sae(world, tmp_path):
    """A dictionary far too wide for its k and without AuxK leaves latents dead: the counts are not trivially 0."""
    out = str(tmp_path / "wide.pt")
    m = train.main(["--stage", "sae", "--features", world["features/coco"], "--out", out, "--n-latents", "1024",
                    "--k", "2", "--epochs", "1", "--aux-coef", "0", "--min-nonzero", "12"] + QUIET)
    n_dead, n_fn, med = _direct_usage(out, world["features/coco"], 12)
    assert 0 < n_dead < 1024 and 0 < n_fn < 1024 - n_dead, (n_dead, n_fn)
    assert (m["n_dead"], m["n_functions"], m["function_positives_median"]) == (n_dead, n_fn, med)
    assert m["dead_fraction"] == pytest.approx(n_dead / 1024)


def test_factor_recovery_only_on_a_world(world, tmp_path):
    """No report on a features file without the synthetic attr (even beside a world_truth.h5), nor on a synthetic
    pool that is not in a world's layout (no world_truth.h5 two folders up)."""
    X, ids = data.read_features(world["features/coco"])
    os.makedirs(tmp_path / "real" / "features")
    shutil.copyfile(world["truth"], tmp_path / "real" / "world_truth.h5")
    data.write_features(tmp_path / "real" / "features" / "coco.h5", X, ids, attrs=dict(backbone="clip"))
    data.write_features(tmp_path / "pool.h5", X, ids, attrs=dict(synthetic=True))
    flags = ["--n-latents", "64", "--k", "4", "--epochs", "1"] + QUIET
    for i, feats in enumerate((tmp_path / "real" / "features" / "coco.h5", tmp_path / "pool.h5")):
        m = train.main(["--stage", "sae", "--features", str(feats), "--out", str(tmp_path / f"s{i}.pt")] + flags)
        assert "factor_recovery" not in m and "n_functions" in m


def test_k_beyond_the_auto_width_is_one_line(world, tmp_path, capsys):
    """--k 2000 makes the auto width 16 d = 1024 (the clip), narrower than k: a usage error naming both."""
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "sae", "--features", world["features/coco"], "--out", str(tmp_path / "x.pt"),
                    "--n-latents", "auto", "--k", "2000"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "train.py: error: --k 2000 must be in 1..n_latents = 1024"
    assert not os.path.exists(tmp_path / "x.pt")
