"""Encoder warping (eval_warp.py, models.SubspaceWrapper, train.py --stage warp): the Fastfood projection against its
explicit matrix, the wrapper at d = D with an identity projection against ordinary SGD, d_warp on a synthetic target
that is a known warp of the features, the train.py --stage warp / evaluate.py --task dwarp round trip on the
embedded world (resume included), and bad input."""
import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import data
import eval_warp as warp
import kernels
import models
import train


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops (conftest.py)


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


@pytest.mark.parametrize("d,D", [(1, 1), (3, 10), (17, 64), (40, 300)])
def test_fastfood_matches_explicit_matrix(d, D):
    proj = models.FastfoodProjection(d, D, seed=3)
    L = proj.L
    H = torch.from_numpy(scipy.linalg.hadamard(L)).float()
    Pi = torch.zeros(L, L)
    Pi[torch.arange(L), proj.Pi] = 1  # (Pi v)[i] = v[Pi[i]]
    V = H @ torch.diag(proj.G) @ Pi @ H @ torch.diag(proj.B)  # (L, L)
    P = V[:D, :d] / proj.norm
    theta = torch.randn(d)
    torch.testing.assert_close(proj(theta), P @ theta, rtol=1e-4, atol=1e-5)
    # columns have unit norm in expectation: the mean squared column norm over a wide draw is near 1
    cols = torch.stack([models.FastfoodProjection(d, D, seed=s)(torch.eye(d)[0]) for s in range(50)])
    assert abs(float((cols ** 2).sum(1).mean()) - 1) < 0.15


def test_projection_gradient_is_transpose():
    d, D = 6, 100
    for proj in (models.FastfoodProjection(d, D, seed=1), models.DenseProjection(d, D, seed=1)):
        P = torch.stack([proj(e) for e in torch.eye(d)], 1)  # (D, d) by columns
        theta = torch.randn(d, requires_grad=True)
        w = torch.randn(D)
        (proj(theta) * w).sum().backward()
        torch.testing.assert_close(theta.grad, P.T @ w, rtol=1e-4, atol=1e-5)
        if isinstance(proj, models.DenseProjection):
            torch.testing.assert_close(P.norm(dim=0), torch.ones(d))


def test_identity_wrapper_reproduces_ordinary_training():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(40, 3, generator=g, dtype=torch.float64)
    ref = _mlp()
    wrapped = models.SubspaceWrapper(_mlp(), d=sum(p.numel() for p in ref.parameters()), projection="identity")
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_w = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    assert [p for p in wrapped.parameters() if p.requires_grad] == [wrapped.theta]
    for step in range(30):
        l_ref = ((ref(x) - y) ** 2).mean()
        opt_ref.zero_grad(); l_ref.backward(); opt_ref.step()  # noqa: E702
        l_w = ((wrapped(x) - y) ** 2).mean()
        opt_w.zero_grad(); l_w.backward(); opt_w.step()  # noqa: E702
        assert abs(l_ref.item() - l_w.item()) < 1e-12 * max(1.0, l_ref.item()), step
    params = wrapped.params()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params[name], p, rtol=1e-12, atol=1e-12)
    assert l_ref.item() < 0.9 * ((_mlp()(x) - y) ** 2).mean().item()  # it did train


def test_groups_scale_their_parameters_and_free_parameters_train_directly():
    m = _mlp(dtype=torch.float32)
    w = models.SubspaceWrapper(m, d=4, projection="dense", groups=["^0\\.", "bias"], free=["2.weight"])
    assert w.names == ["0.weight", "0.bias", "2.bias"] and w.group_of == [0, 0, 1] and w.D == 35 + 7 + 3
    with torch.no_grad():
        w.theta.copy_(torch.randn(4))
        w.scales.copy_(torch.tensor([2.0, -0.5]))
    delta = w.projection(w.theta)
    p = w.params()
    torch.testing.assert_close(p["0.weight"] - m[0].weight, 2.0 * delta[:35].view(7, 5))
    torch.testing.assert_close(p["2.bias"] - m[2].bias, -0.5 * delta[42:45])
    trainable = {n for n, q in w.named_parameters() if q.requires_grad}
    assert trainable == {"theta", "scales", "module.2.weight"}


def test_bad_input_d_and_groups():
    with pytest.raises(ValueError, match=r"d = 100 must be in 1\.\.D = 66"):
        models.SubspaceWrapper(_mlp(), d=100)
    with pytest.raises(ValueError, match=r"d = 0 must be in 1\.\.D"):
        models.SubspaceWrapper(_mlp(), d=0)
    with pytest.raises(ValueError, match=r"group\(s\) \['attn', 'head'\] match no warped parameter"):
        models.SubspaceWrapper(_mlp(), d=3, groups=["0\\.", "attn", "head"])
    with pytest.raises(ValueError, match="identity projection needs d = D"):
        models.SubspaceWrapper(_mlp(), d=3, projection="identity")
    with pytest.raises(ValueError, match="projection 'sparse'"):
        models.SubspaceWrapper(_mlp(), d=3, projection="sparse")
    with pytest.raises(ValueError, match="free parameters \\['readout'\\]"):
        models.SubspaceWrapper(_mlp(), d=3, free=["readout"])
    with pytest.raises(ValueError, match="'x' is not an integer"):
        train.parse_ds("1,x")


def test_d_warp_definition():
    curve = [(1, 0.1), (10, 0.4), (100, 0.85), (1000, 0.95)]
    d, interp = warp.d_warp(curve, full=1.0, frac=0.9)
    assert d == 1000
    assert interp == pytest.approx(10 ** (2 + 0.5))  # halfway between 0.85 and 0.95 in log10 d
    assert warp.d_warp(curve, 1.0, 0.99) == (None, None)
    assert warp.d_warp(curve, -0.2, 0.9) == (None, None)
    assert warp.d_warp(curve, 1.0, 0.05) == (1, 1.0)


def _synthetic(seed=0, n=600, p=4, t=8):
    """Targets Y = tanh(2 Z) W + noise (a known warp of the latent Z); model A sees Z rotated (only the tanh
    to learn), model B sees (Z + 0.3 Z^3) rotated (a cubic warp to undo on top): A is the more similar model."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, p))
    Y = np.tanh(2 * Z) @ rng.normal(size=(p, t)) + 0.1 * rng.normal(size=(n, t))
    R = np.linalg.qr(rng.normal(size=(p, p)))[0]
    return Z @ R, (Z + 0.3 * Z ** 3) @ R, Y


def test_synthetic_warp_curves_rise_with_d_and_the_closer_model_warps_less():
    XA, XB, Y = _synthetic()
    cfg = dict(train.defaults_warp, hidden=32, lr=0.2, full_lr=1e-2, steps=400, batch=10_000,
               eval_every=20, patience=10)
    # D = 332 (MLP 4 -> 32 -> 4 plus the 4 -> 8 read-out); d stays below D: a square random projection is
    # ill-conditioned, which slows training down at d = D
    ds = [1, 8, 32, 64, 96, 128, 192, 256]
    out, norm = {}, {}
    for name, X in (("A", XA), ("B", XB)):
        split = warp.make_split(X, Y, np.arange(480, 600), 0.2, seed=0)
        res = warp.warp_curve(split, ds, cfg)
        out[name] = warp.summarise(dict(results=res, name=name), frac=0.9)
        perf = [res[str(d)]["test"] for d in [0] + ds]
        assert all(b >= a - 0.01 for a, b in zip(perf, perf[1:])), (name, perf)    # rises with d (held-out noise 0.01)
        assert perf[-1] > perf[0] + 0.05, (name, perf)                              # and by a real margin
        assert res["full"]["test"] > 0.97, (name, res["full"]["test"])              # the full fit undoes the warp
        norm[name] = np.array(perf) / res["full"]["test"]
    a, b = out["A"], out["B"]
    assert a["linear"] < 0.9 * a["full"]            # A too needs warping: its d_warp is not the trivial d = 1
    # closer at every d from 8 to 128 (at the largest d both approach their full fit)
    assert (norm["A"][2:7] > norm["B"][2:7] + 0.03).all(), (norm["A"], norm["B"])
    assert a["d_warp"] is not None and b["d_warp"] is not None, (a["curve"], b["curve"])
    # the more similar model reaches 90% of its full fit at a smaller d
    assert b["d_warp"] > a["d_warp"] and b["d_warp_interp"] > 1.3 * a["d_warp_interp"], (a["curve"], b["curve"])


@pytest.fixture(scope="module")
def warp_runs(world, tmp_path_factory):
    """Two warp runs on the world's fMRI (base features and the extra backbone b3), few steps."""
    out = tmp_path_factory.mktemp("warp")
    common = ["--stage", "warp", "--targets", "brain", "--data", world["data"], "--rois", "LOC", "--steps", "60",
              "--eval-every", "20", "--no-progress"]
    paths = {}
    for name, feats in (("base", world["features/things"]), ("b3", world["features/things_b3"])):
        paths[name] = str(out / f"{name}.json")
        train.main(common + ["--features", feats, "--d", "1,8", "--name", name, "--out", paths[name]])
    return paths, common, out


def test_stage_warp_writes_curve_and_resumes(warp_runs, world):
    paths, common, _ = warp_runs
    doc = json.load(open(paths["base"]))
    assert set(doc["results"]) == {"0", "full", "1", "8"} and doc["config"]["d"] == "1,8" and "versions" in doc
    assert doc["metric"] == "r2" and doc["target_info"]["roi"] == "LOC" and doc["n_test"] == 20  # repeated images
    before = {k: v["seconds"] for k, v in doc["results"].items()}
    train.main(common + ["--features", world["features/things"], "--d", "1,8,32", "--name", "base", "--out",
                         paths["base"]])
    doc2 = json.load(open(paths["base"]))
    assert set(doc2["results"]) == {"0", "full", "1", "8", "32"}
    assert all(doc2["results"][k]["seconds"] == s for k, s in before.items())  # resumed: old fits kept, not redone
    with pytest.raises(SystemExit, match="different settings \\(lr\\)"):
        train.main(common + ["--features", world["features/things"], "--d", "1", "--lr", "0.5", "--out", paths["base"]])


def test_linear_baseline_is_the_ridge_fit(world):
    X, ids = data.read_features(world["features/things"])
    cfg = dict(train.defaults_warp, data=world["data"], features=world["features/things"], seed=0)
    Xtr, Ytr, Xte, Yte, info = warp.brain_target(cfg, X, ids)
    split = warp.make_split(Xtr, Ytr, None, 0.15, 0, "cpu", Xte, Yte)
    r = warp.fit_one(split, 0, cfg)
    fit = kernels.ridge_cv(split["Xtr"], split["Ytr"], warp.ALPHAS, cv=5, scoring="r2")
    assert r["test"] == pytest.approx(warp.r2_score(fit.predict(split["Xte"]), split["Yte"]), abs=1e-5)


def test_task_dwarp_curves_and_figure(warp_runs, tmp_path):
    import evaluate
    paths, _, folder = warp_runs
    out = str(tmp_path / "dwarp.json")
    evaluate.main(["--task", "dwarp", "--warp-runs", str(folder / "*.json"), "--warp-frac", "0.9", "--out", out])
    r = json.load(open(out))
    assert set(r["models"]) == {"base", "b3"} and os.path.getsize(r["figure"]) > 1000
    for name, path in paths.items():
        doc = json.load(open(path))
        m = r["models"][name]
        full = doc["results"]["full"]["test"]
        assert m["full"] == full and m["linear"] == doc["results"]["0"]["test"]
        assert m["curve"] == sorted([int(k), v["test"]] for k, v in doc["results"].items() if k not in ("0", "full"))
        ok = [d for d, v in m["curve"] if v >= 0.9 * full]
        assert m["d_warp"] == (min(ok) if ok and full > 0 else None)
    assert r["config"]["task"] == "dwarp" and "versions" in r


def test_stage_warp_bad_input(world, tmp_path):
    base = ["--stage", "warp", "--features", world["features/things"], "--data", world["data"], "--no-progress",
            "--out", str(tmp_path / "w.json")]
    with pytest.raises(SystemExit, match="--d 100000 is larger than D = "):
        train.main(base + ["--d", "100000"])
    with pytest.raises(SystemExit, match="ROI column 'XYZ' missing"):
        train.main(base + ["--rois", "XYZ"])
    with pytest.raises(SystemExit, match="--targets 'eeg': expected brain or spose"):
        train.main(base + ["--targets", "eeg"])
    with pytest.raises(SystemExit, match="group\\(s\\) \\['attn'\\] match no warped parameter"):
        train.main(base + ["--d", "2", "--groups", "fc1,attn"])
    assert not os.path.exists(tmp_path / "w.json")
    import evaluate
    with pytest.raises(SystemExit, match="no warp result file matches"):
        evaluate.main(["--task", "dwarp", "--warp-runs", str(tmp_path / "none*.json"), "--out",
                       str(tmp_path / "r.json")])


def test_rsa_score_matches_scipy():
    from scipy.spatial.distance import pdist
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(31, 7)), rng.normal(size=(31, 4))
    B[:, 0] += A[:, 0]
    want = np.corrcoef(pdist(A, "correlation"), pdist(B, "correlation"))[0, 1]
    assert float(warp.rsa_score(torch.tensor(A), torch.tensor(B))) == pytest.approx(want, abs=1e-10)


def test_rsa_objective_and_joint_readout():
    XA, _, Y = _synthetic()
    split = warp.make_split(XA, Y, np.arange(480, 600), 0.2, seed=0)
    cfg = dict(train.defaults_warp, hidden=16, lr=0.2, full_lr=1e-2, steps=200, batch=128,
               eval_every=20, patience=5, objective="rsa")
    res = warp.warp_curve(split, [8, 64], cfg)
    assert res["8"]["D"] == 4 * 16 + 16 + 16 * 4 + 4  # no read-out under the RSA objective
    assert res["full"]["test"] > res["0"]["test"] + 0.02  # training the body towards the target RDM helps
    assert res["0"]["test"] == pytest.approx(float(warp.rsa_score(split["Xte"], split["Yte"])), abs=1e-6)
    joint = warp.fit_one(dict(split), 4, dict(cfg, objective="ridge", readout="joint"))
    assert joint["D"] == 4 * 16 + 16 + 16 * 4 + 4 and joint["test"] > 0.5  # the read-out is free, not warped


def test_stage_warp_spose(world, tmp_path):
    out = str(tmp_path / "spose.json")
    train.main(["--stage", "warp", "--targets", "spose", "--features", world["features/things"], "--data",
                world["data"],
                "--d", "2", "--steps", "40", "--eval-every", "20", "--no-progress", "--out", out])
    doc = json.load(open(out))
    assert doc["target"] == "spose" and doc["n_test"] == 30 and doc["n_train"] + doc["n_val"] == 120  # 150 concepts
    assert set(doc["results"]) == {"0", "full", "2"}
