"""The controls beside every --ckpt evaluation, the paired gains and the report's control table, the in-context
reference learners (online ridge, Bayes identifier) and the original study's learners (--learner paper), each
against an independent computation (sklearn, explicit per-episode loops, explicit leave-one-out)."""
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import BayesianRidge, LogisticRegression, LogisticRegressionCV, Ridge
from sklearn.preprocessing import StandardScaler

import choice
import data
import eval_report
import evaluate
import geometry
import kernels
import models
import representations
import train
from eval_behaviour import odd_one_out
from representations import cosine_similarity_matrix

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops on shared cores
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
rng = np.random.default_rng(0)


def run(world, task, out, **kw):
    argv = ["--task", task, "--features", world["dir"] + "/features/things.h5", "--data", str(world["data"]),
            "--out", str(out)]
    for k, v in kw.items():
        flag = k.replace("_", "-")
        argv += [f"--{flag}" if v is True else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    evaluate.main(argv)
    with open(out) as fh:
        return json.load(fh)


# --------------------------------------------------------------------------------------------- transforms

def _pool_data(n_pool=500, n=37, d=11):
    A = rng.normal(size=(d, d)) * rng.uniform(0.1, 3, size=d)  # anisotropic: every principal component distinct
    pool = rng.normal(size=(n_pool, d)) @ A + rng.normal(size=d) * 4
    return rng.normal(size=(n, d)) @ A + 1.0, pool


def test_pool_transforms_match_sklearn():
    X, pool = _pool_data()
    pool[:, 3] = 2.5  # constant on the pool: z-scores to 0, never inf
    z = geometry.zscore(X, pool)
    np.testing.assert_allclose(np.delete(z, 3, 1), np.delete(StandardScaler().fit(pool).transform(X), 3, 1),
                               atol=1e-10)
    assert (z[:, 3] == 0).all()
    assert not np.allclose(z, geometry.zscore(X, X))  # the pool's statistics, not the evaluated rows'
    _, pool = _pool_data()
    for rank in (None, 4):
        got = geometry.pca_whiten(X, pool, rank=rank, shrinkage=0.0)
        ref = PCA(n_components=rank or X.shape[1], whiten=True, svd_solver="full").fit(pool).transform(X)
        np.testing.assert_allclose(got * np.sign((got * ref).sum(0)), ref, atol=1e-8)  # eigenvectors up to sign
    for k in (0, 1, 3):
        Xc = X - pool.mean(0)
        comp = PCA(n_components=max(k, 1), svd_solver="full").fit(pool).components_[:k]
        np.testing.assert_allclose(geometry.remove_top_pcs(X, pool, k=k), Xc - Xc @ comp.T @ comp, atol=1e-8)
    assert [geometry.top_pcs_rule(d) for d in (3, 64, 149, 151, 768, 1024)] == [1, 1, 1, 2, 8, 10]
    big = rng.normal(size=(70001, 3)) * [1, 2, 3] + 1e4  # more rows than one chunk, a large mean
    mu, lam, V = geometry.pool_pca(big)
    np.testing.assert_allclose(lam, np.sort(np.linalg.eigvalsh(np.cov(big, rowvar=False)))[::-1], rtol=1e-9)
    np.testing.assert_allclose(mu, big.mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match="same width"):
        geometry.zscore(X[:, :5], pool)
    with pytest.raises(ValueError, match="k = 11"):
        geometry.remove_top_pcs(X, pool, k=11)


def test_paired_gains_against_explicit_formulas():
    a, b = rng.normal(size=50), rng.normal(size=50)
    g = representations.paired_gain(a - b, ci=0.9, unit="u")
    d = a - b
    assert g["delta"] == pytest.approx(d.mean()) and g["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(50))
    from scipy.stats import t
    assert g["ci"][1] - g["delta"] == pytest.approx(t.ppf(0.95, 49) * g["se"])
    w = rng.integers(1, 9, size=50).astype(float)  # ratio of sums: the pooled R^2 difference over participants
    g = representations.paired_gain(d * w, w)
    assert g["delta"] == pytest.approx((d * w).sum() / w.sum())
    loo = rng.normal(size=20)
    j = representations.jackknife_gain(0.3, loo)
    assert j["se"] == pytest.approx(math.sqrt(19 / 20 * ((loo - loo.mean()) ** 2).sum()))


# ------------------------------------------------------------------------------------------- on the world

@pytest.fixture(scope="module")
def ckpts(world, tmp_path_factory):
    """A real SAE on the world's pool (2 epochs) and its codes, an untrained meta checkpoint that names that pool
    and those codes (as train.py writes them), and an untrained static_linear control checkpoint."""
    tmp = tmp_path_factory.mktemp("controls")
    sae = str(tmp / "sae.pt")
    train.main(["--stage", "sae", "--config", os.path.join(ROOT, "configs", "demo.toml"), "--features",
                world["features/coco"], "--out", sae, "--epochs", "2", "--log-every", "100000"])
    train.main(["--stage", "sae", "--encode", "--ckpt", sae, "--features", world["features/coco"],
                "--codes-out", str(tmp / "coco_codes.h5")])
    X, _ = data.read_features(world["features/coco"])
    torch.manual_seed(0)
    out = {"sae": sae}
    for name, args in (("meta", dict(d=X.shape[1], d_model=16, n_layers=1, n_heads=2)),
                       ("static", dict(d=X.shape[1], d_model=16, n_layers=1, n_heads=2, model="static_linear",
                                       n_functions=3))):
        model = models.MetaLearner(**args)
        model.embedding.set_input_stats(torch.from_numpy(X.mean(0)), torch.from_numpy(X.std(0)))
        cfg = dict(features=world["features/coco"], codes=str(tmp / "coco_codes.h5"), functions="sae")
        torch.save(dict(model=model.state_dict(), model_args=args, config=cfg, versions={}), tmp / f"{name}.pt")
        out[name] = str(tmp / f"{name}.pt")
    return out


def test_controls_in_things_ooo_and_cka(world, ckpts, tmp_path):
    r = run(world, "things-ooo", tmp_path / "things-ooo.json", ckpt=ckpts["meta"], controls_ckpt=ckpts["static"],
            behav_fit=False)
    concepts = data.load_concepts(world["data"])
    t = data.load_triplets(world["data"], len(concepts))
    X, ids = data.read_features(world["features/things"])
    Xc = X[data.concept_rows(ids, concepts)]
    P, _ = data.read_features(world["features/coco"])
    sae, _ = models.load_sae(ckpts["sae"])
    v, i = sae.encode(torch.from_numpy(Xc))
    dense = np.zeros((len(Xc), sae.n_latents))
    for row in range(len(Xc)):  # the SAE's activations, densified by hand
        dense[row, i[row].numpy()] = v[row].numpy()
    comp = PCA(n_components=1, svd_solver="full").fit(P).components_  # k = max(1, round(64 / 100)) = 1
    static, _ = models.load_meta(ckpts["static"])
    want = {"base_z": StandardScaler().fit(P).transform(Xc),
            "base_white": PCA(whiten=True, svd_solver="full").fit(P).transform(Xc),
            "base_minus_pcs": (Xc - P.mean(0)) - (Xc - P.mean(0)) @ comp.T @ comp, "sae_codes": dense,
            "static_linear": static.encode(torch.from_numpy(Xc)).detach().numpy()}
    hits = {}
    for name, R in want.items():
        hits[name] = odd_one_out(cosine_similarity_matrix(R), t["triplets"]) == t["choice"]
        assert r[name]["accuracy"] == pytest.approx(hits[name].mean(), abs=1e-12), name
    assert r["controls"]["pool"]["remove_pcs"] == 1 and r["controls"]["sae"]["path"] == ckpts["sae"]
    assert r["controls"]["static_linear"]["path"] == ckpts["static"]
    model, _ = models.load_meta(ckpts["meta"])
    ha = odd_one_out(cosine_similarity_matrix(model.encode(torch.from_numpy(Xc)).detach().numpy()),
                     t["triplets"]) == t["choice"]
    for name in want:  # paired over triplets: the mean difference and its standard error
        g, d = r["aligned"]["vs"]["accuracy"][name], ha.astype(float) - hits[name]
        assert g["delta"] == pytest.approx(d.mean(), abs=1e-12)
        assert g["se"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), rel=1e-9)
        assert g["ci"][0] < g["delta"] < g["ci"][1] and g["unit"] == "triplets"
    c = run(world, "cka", tmp_path / "cka.json", ckpt=ckpts["meta"], controls="base_z")
    E = data.load_spose(world["data"])
    assert set(c) >= {"base_z"} and "sae_codes" not in c
    A, Z = model.encode(torch.from_numpy(Xc)).detach().numpy(), want["base_z"].astype(np.float32)  # as stored
    loo = [kernels.cka_ref(np.delete(A, k, 0), np.delete(E, k, 0)).item()
           - kernels.cka_ref(np.delete(Z, k, 0), np.delete(E, k, 0)).item() for k in range(len(Xc))]
    g = c["aligned"]["vs"]["cka"]["base_z"]  # jackknife over concepts of the paired difference, explicit oracle
    assert g["delta"] == pytest.approx(kernels.cka_ref(A, E).item() - kernels.cka_ref(Z, E).item(), abs=1e-6)
    n = len(loo)
    assert g["se"] == pytest.approx(math.sqrt((n - 1) / n * ((np.array(loo) - np.mean(loo)) ** 2).sum()), rel=1e-4)
    # the report: aligned, base, the best control and the gain over it with its CI; the demo summary lists losses
    text = eval_report.task_report(dict(evaluate.defaults, results=str(tmp_path)), evaluate.defaults)
    best = max(want, key=lambda n: r[n]["accuracy"])
    gain = r["aligned"]["vs"]["accuracy"][best]
    row = (f"| things-ooo | accuracy | {r['aligned']['accuracy']:.3f} | {r['base']['accuracy']:.3f} | {best} "
           f"{r[best]['accuracy']:.3f} | {gain['delta']:.3f} | [{gain['ci'][0]:.3f}, {gain['ci'][1]:.3f}] |")
    assert row in text, text
    summary = text.split("## What the demo shows\n\n")[1].split("\n\n")[0]
    lost = [rw for rw in eval_report.control_rows({"t.json": r}) if rw["gain"] < 0]
    assert f"it loses on {len(lost) + (c['aligned']['cka'] < c['base_z']['cka'])} of 2 measures" in summary
    if lost:
        assert f"against {best}" in summary


def test_controls_bad_input(world, ckpts, tmp_path):
    with pytest.raises(SystemExit, match="--controls: unknown"):
        run(world, "cka", tmp_path / "a.json", ckpt=ckpts["meta"], controls="base_z,nope")
    ck = torch.load(ckpts["meta"], weights_only=False)
    ck["config"]["features"] = str(tmp_path / "gone.h5")
    torch.save(ck, tmp_path / "m.pt")
    with pytest.raises(SystemExit, match="gone.h5 .config 'features'. not found.*--pool"):
        run(world, "cka", tmp_path / "b.json", ckpt=tmp_path / "m.pt", controls="base_z")
    r = run(world, "cka", tmp_path / "c.json", ckpt=tmp_path / "m.pt", controls="base_z",
            pool=world["features/coco"])  # --pool names it instead
    assert "base_z" in r
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: torch sees no CUDA device"):
            run(world, "cka", tmp_path / "d.json", device="cuda")


# ---------------------------------------------------------------------------------------------------- icl

def _icl_ckpt(world, tmp_path, eval_latents, L=12):
    X, _ = data.read_features(world["features/coco"])
    torch.manual_seed(0)
    args = dict(d=X.shape[1], d_model=16, n_layers=1, n_heads=2)
    model = models.MetaLearner(**args)
    model.embedding.set_input_stats(torch.from_numpy(X.mean(0)), torch.from_numpy(X.std(0)))
    cfg = dict(functions="neurons", features=world["features/coco"], eval_features=world["features/things"],
               length=L)
    path = tmp_path / "icl.pt"
    torch.save(dict(model=model.state_dict(), model_args=args, config=cfg, latents=torch.arange(6),
                    eval_latents=torch.tensor(eval_latents)), path)
    return model, path


def test_icl_bounds_against_per_episode_fits(world, tmp_path):
    """Online ridge: sklearn Ridge refitted per episode and position, with the penalty the task chose on the training
    pool. Identifier: the posterior over the 6 training functions computed per episode in plain Python."""
    L, n_ep, noise = 12, 10, 0.01
    model, ck = _icl_ckpt(world, tmp_path, [1, 3], L)
    r = run(world, "icl", tmp_path / "icl.json", ckpt=ck, icl_episodes=n_ep)["model"]
    X, _ = data.read_features(world["features/things"])
    shift, scale = model.embedding.in_shift[1:].double().numpy(), model.embedding.in_scale[1:].double().numpy()
    _, y, _, _, rows = models.make_episodes(torch.from_numpy(X), models.functions_from_neurons(X, latents=[1, 3]),
                                            n_ep, L, 12345)
    y, rows = y.numpy(), rows.numpy()
    Z = (X - shift) * scale
    members = [set(np.nonzero(X[:, j] > np.median(X[:, j]))[0].tolist()) for j in range(6)]
    ridge_hits, id_hits = np.zeros(L), np.zeros(L)
    for e in range(n_ep):
        for t in range(L):
            if t == 0:
                ridge_pos = False  # no context: negative, like a zero logit
            else:
                fit = Ridge(alpha=r["ridge_bound"]["alpha"], solver="svd").fit(Z[rows[e, :t]], y[e, :t])
                ridge_pos = fit.predict(Z[rows[e, t:t + 1]])[0] > 0.5
            ridge_hits[t] += ridge_pos == y[e, t]
            logw = [sum(math.log(1 - noise) if (rows[e, i] in m) == y[e, i] else math.log(noise) for i in range(t))
                    for m in members]
            top = max(logw)
            w = [math.exp(v - top) for v in logw]
            p1 = sum(wf for wf, m in zip(w, members) if rows[e, t] in m) / sum(w)
            id_hits[t] += ((1 - noise) * p1 + noise * (1 - p1) > 0.5 + 1e-9) == y[e, t]  # ties: negative
    np.testing.assert_allclose(r["ridge_bound"]["accuracy_by_position"], ridge_hits / n_ep, atol=1e-12)
    np.testing.assert_allclose(r["identifier"]["accuracy_by_position"], id_hits / n_ep, atol=1e-12)
    assert r["trained_functions"] and "training pool" in r["ridge_bound"]["alpha_selected_on"]
    assert np.mean(r["identifier"]["accuracy_by_position"][6:]) > 0.9  # 6 distinct functions: identified quickly
    P, _ = data.read_features(world["features/coco"])  # the penalty was chosen on training episodes of the pool
    sel = models.ridge_icl_curve(torch.from_numpy(P), models.functions_from_neurons(P, latents=np.arange(6)), L, n_ep,
                                 12345 + 1_000_003, shift=shift, scale=scale)
    assert r["ridge_bound"]["alpha"] == sel["alphas"][sel["best"]]
    held = run(world, "icl", tmp_path / "held.json", ckpt=_icl_ckpt(world, tmp_path, [7, 9], L)[1],
               icl_episodes=4)["model"]  # unseen functions: the bounds also on episodes of the trained ones
    assert not held["trained_functions"] and held["on_training_functions"]["n_functions"] == 6
    assert os.path.getsize(tmp_path / "icl.curves.png") > 1000


# -------------------------------------------------------------------------------------- the paper learners

def test_paper_learners_against_sklearn():
    X = rng.normal(size=(30, 4))
    y = (X[:, 0] + 0.5 * rng.normal(size=30) > 0).astype(int)
    y[:3] = [1, 1, 0]
    p1, C = choice.paper_category_learner(X, y)
    assert C == LogisticRegressionCV(Cs=10, cv=5, max_iter=200, scoring="accuracy").fit(X, y).C_[0]
    assert p1[0] == p1[1] == p1[2] == 0.5  # until both classes were seen
    for t in (3, 11, 29):  # warm-started lbfgs stops within its tolerance at a slightly different point
        ref = LogisticRegression(C=C, max_iter=200).fit(X[:t], y[:t]).predict_proba(X[t:t + 1])[0, 1]
        assert p1[t] == pytest.approx(ref, abs=2e-3)
    XL, XR, RL, RR = rng.normal(size=(20, 3)), rng.normal(size=(20, 3)), rng.normal(size=20), rng.normal(size=20)
    v = choice.paper_reward_learner(XL, XR, RL, RR)
    assert (v[0] == 0).all()
    for t in (1, 9, 19):
        ref = BayesianRidge().fit(np.r_[XL[:t], XR[:t]], np.r_[RL[:t], RR[:t]]).predict(np.stack([XL[t], XR[t]]))
        np.testing.assert_allclose(v[t], ref, rtol=1e-10)
    values, ch = rng.normal(size=(40, 2)) * 2, rng.integers(0, 2, 40)
    T, nll, ok = choice.fit_temperature(values, ch)
    grid = np.exp(np.linspace(-4.6, 4.6, 2001))  # in-sample temperature: no grid point fits the choices better
    lp = lambda tt: (values / tt)[np.arange(40), ch] - np.logaddexp(*(values / tt).T)  # noqa: E731
    assert ok and -lp(T).mean() <= min(-lp(tt).mean() for tt in grid) + 1e-7
    np.testing.assert_allclose(nll, -lp(T), rtol=1e-9)


def test_learner_paper_task(world, tmp_path):
    d = tmp_path / "data"
    os.makedirs(d)
    for f in os.listdir(world["data"]):
        if f.endswith((".txt", ".csv", ".tsv")) and f != "THINGS_triplets.csv":
            df_or = os.path.join(world["data"], f)
            os.symlink(df_or, d / f)
    os.remove(d / "category_learning.csv")
    df = pd.read_csv(os.path.join(world["data"], "category_learning.csv"))
    df = df[df["participant"] <= 2]
    df.to_csv(d / "category_learning.csv", index=False)
    r = run(dict(world, data=d), "category-learning", tmp_path / "cat.json", learner="paper")
    assert r["learner"].startswith("--learner paper")
    X, ids = data.read_features(world["features/things"])
    index = {s: i for i, s in enumerate(ids)}
    total, n = 0.0, 0
    for _, g in df.groupby("participant"):  # the oracle: the original's recipe in plain sklearn, per participant
        Xp, yp, ch = X[[index[s] for s in g["image"]]].astype(np.float64), g["true_category_binary"].to_numpy(), \
            g["choice"].to_numpy()
        C = LogisticRegressionCV(Cs=10, cv=5, max_iter=200, scoring="accuracy").fit(Xp, yp).C_[0]
        p = np.full(len(yp), 0.5)
        for t in range(1, len(yp)):
            if len(set(yp[:t])) == 2:
                p[t] = LogisticRegression(C=C, max_iter=200).fit(Xp[:t], yp[:t]).predict_proba(Xp[t:t + 1])[0, 1]
        vals = np.log(np.clip(np.stack([1 - p, p], 1), 1e-15, 1))
        from scipy.optimize import minimize_scalar
        f = lambda lt: -((vals / np.exp(lt))[np.arange(len(ch)), ch]  # noqa: E731
                         - np.logaddexp(*(vals / np.exp(lt)).T)).mean()
        total += minimize_scalar(f, bounds=(-4.6, 4.6), method="bounded").fun * len(ch)
        n += len(ch)
    assert r["base"]["mcfadden_r2"] == pytest.approx(1 - total / n / math.log(2), abs=2e-3)


# ------------------------------------------------------------------------------------------------- --device

def test_device_plumbing(world, device, monkeypatch):
    """--device: the fMRI encoding hands kernels.ridge_cv tensors on that device and brings CPU numbers back, equal
    to the CPU run; CKA and the similarity matrices take tensors on the device. Skipped on cuda without a GPU."""
    import eval_fmri
    import eval_geometry
    sub = eval_fmri.load_subject(world["data"], "sub-01", 5.0, "LOC")
    X, ids = data.read_features(world["features/things"])
    rows, _ = eval_fmri.trial_rows(sub["stimuli"], ids, data.load_concepts(world["data"]), "stimuli")
    sessions = sub["stimuli"]["session"].to_numpy()
    alphas = np.logspace(-2, 4, 7)
    ref = eval_fmri.encode({"base": X[rows]}, sub["Y"], sessions, alphas, "gcv", "cpu")
    seen, real = [], kernels.ridge_cv
    monkeypatch.setattr(eval_fmri.kernels, "ridge_cv", lambda X, Y, *a, **k: seen.append((X.device, Y.device))
                        or real(X, Y, *a, **k))
    got = eval_fmri.encode({"base": X[rows]}, sub["Y"], sessions, alphas, "gcv", device)
    assert seen and all(a.type == b.type == torch.device(device).type for a, b in seen)
    np.testing.assert_allclose(got["base"]["r2"], ref["base"]["r2"], atol=1e-4)
    assert isinstance(got["base"]["r2"], np.ndarray)
    E = data.load_spose(world["data"])
    Xc = X[data.concept_rows(ids, data.load_concepts(world["data"]))]
    A, B = torch.as_tensor(Xc).to(device), torch.as_tensor(E).to(device)
    np.testing.assert_allclose(eval_geometry.jackknife_cka(A, B), eval_geometry.jackknife_cka(Xc, E), atol=1e-6)
    np.testing.assert_allclose(geometry.similarity_matrices([A, A * 2 + 1], ("cka_linear",))["cka_linear"],
                               np.ones((2, 2)), atol=1e-6)
    assert representations.device({"device": "auto"}).type == ("cuda" if torch.cuda.is_available() else "cpu")
