"""choice.py and eval_behaviour.py: every fit against an independent computation (scipy / sklearn), group BMS against
hand-checkable cases and Monte Carlo, the world's ordering (h above base), bad input."""
import json
import math
import os
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import integrate, optimize
from scipy.special import logsumexp

import data
import eval_behaviour as behaviour
import evaluate
from choice import (span_project, entropy_ceiling, exceedance_probability, fit_conditional_logit, fit_odd_one_out,
                    group_bms, online_blr, online_logistic, ooo_option_features, stratified_folds, wilcoxon_pair)
from representations import cosine_similarity_matrix


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops (conftest.py)


def run(world, task, out, data_dir=None, **kw):
    argv = ["--task", task, "--features", world["dir"] + "/features/things.h5", "--data",
            str(data_dir or world["data"]),
            "--levels-features", world["dir"] + "/features/levels.h5", "--out", str(out)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    evaluate.main(argv)
    with open(out) as fh:
        return json.load(fh)


def _scipy_logit(X, y, l2):
    """Independent per-group fit: BFGS on the penalised NLL (numpy, analytic gradient)."""
    def f(th):
        z = X @ th
        lse = logsumexp(z, 1)
        p = np.exp(z - lse[:, None])
        g = np.einsum("nk,nkp->p", p, X) - X[np.arange(len(y)), y].sum(0) + l2 * th
        return (lse - z[np.arange(len(y)), y]).sum() + 0.5 * l2 * th @ th, g
    return optimize.minimize(f, np.zeros(X.shape[2]), jac=True, method="BFGS", options=dict(gtol=1e-10)).x


def test_conditional_logit_matches_scipy():
    rng = np.random.default_rng(0)
    G, N, K, p = 7, 700, 3, 3
    X = rng.normal(size=(N, K, p))
    group = rng.integers(0, G, N)
    true = rng.normal(size=(G, p)) * 2
    z = np.einsum("nkp,np->nk", X, true[group])
    y = (rng.random((N, 1)) > np.cumsum(np.exp(z - logsumexp(z, 1, keepdims=True)), 1)).sum(1).clip(0, K - 1)
    rows = np.nonzero(rng.random(N) < 0.8)[0]
    r = fit_conditional_logit(torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(group), G + 1,
                                        rows=torch.from_numpy(rows), l2=0.3)
    assert r["converged"].all()
    for g in range(G):
        m = rows[group[rows] == g]
        np.testing.assert_allclose(r["theta"][g].numpy(), _scipy_logit(X[m], y[m], 0.3), atol=1e-5)
    assert (r["theta"][G] == 0).all() and r["n_trials"][G] == 0  # a group without trials


def test_stratified_folds_balanced():
    rng = np.random.default_rng(1)
    group, strata = rng.integers(0, 13, 3000), rng.integers(0, 3, 3000)
    fold = stratified_folds(group, strata, 5, seed=0)
    for g in range(13):
        for s in range(3):
            c = np.bincount(fold[(group == g) & (strata == s)], minlength=5)
            assert c.max() - c.min() <= 2
        c = np.bincount(fold[group == g], minlength=5)
        assert c.max() - c.min() <= 1


def test_odd_one_out_fit_matches_per_participant_scipy():
    rng = np.random.default_rng(2)
    n, P, T = 25, 6, 40
    E = np.abs(rng.normal(size=(n, 4)))
    S = cosine_similarity_matrix(E)
    trip = np.stack([rng.choice(n, 3, replace=False) for _ in range(P * T)])
    choice = rng.integers(0, 3, P * T)
    part = np.repeat(np.arange(P) * 10 + 3, T)  # arbitrary labels
    fit = fit_odd_one_out(S, trip, choice, part, n_folds=5, l2=0.1, seed=4)
    X = ooo_option_features(S, trip).double().numpy()
    for p in range(P):
        for f in range(5):
            tr = np.nonzero((part == p * 10 + 3) & (fit["fold"] != f))[0]
            te = np.nonzero((part == p * 10 + 3) & (fit["fold"] == f))[0]
            th = _scipy_logit(X[tr], choice[tr], 0.1)
            z = X[te] @ th
            want = logsumexp(z, 1) - z[np.arange(len(te)), choice[te]]
            np.testing.assert_allclose(fit["nll"][te], want, atol=1e-6)
            np.testing.assert_array_equal(fit["correct"][te], z.argmax(1) == choice[te])


def test_online_logistic_matches_sklearn():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(3)
    P, T, d = 2, 24, 40  # d > T: the span projection is exercised
    X = rng.normal(size=(P, T, d))
    y = (X[:, :, 0] + 0.5 * rng.normal(size=(P, T)) > 0).astype(np.int64)
    y[:, 0] = 1  # class 0 first appears later: 0.5 until both classes were seen
    Cs = [0.1, 3.0]
    Z = span_project(torch.from_numpy(X), T)
    assert Z.shape[2] <= T
    out = online_logistic(Z, torch.from_numpy(y), torch.ones(P, T, dtype=torch.bool), Cs).numpy()
    for c, C in enumerate(Cs):
        for p in range(P):
            for t in range(0, T, 3):
                seen = y[p, :t]
                if len(set(seen.tolist())) < 2:
                    assert out[c, p, t] == 0
                    continue
                lr = LogisticRegression(C=C, solver="newton-cg", tol=1e-10, max_iter=1000).fit(X[p, :t], seen)
                assert out[c, p, t] == pytest.approx(lr.decision_function(X[p, t:t + 1])[0], abs=2e-4)


def test_online_blr_matches_ridge():
    from sklearn.linear_model import Ridge
    rng = np.random.default_rng(4)
    P, T, d = 2, 15, 50
    XL, XR = rng.normal(size=(P, T, d)), rng.normal(size=(P, T, d))
    RL, RR = rng.normal(size=(P, T)), rng.normal(size=(P, T))
    Zb = span_project(torch.from_numpy(np.concatenate([XL, XR], 1)), 2 * T)
    lams = [0.5, 20.0]
    v = online_blr(Zb[:, :T], Zb[:, T:], torch.from_numpy(RL), torch.from_numpy(RR),
                             torch.ones(P, T, dtype=torch.bool), lams).numpy()
    one = np.ones((T, 1))
    for li, lam in enumerate(lams):
        for p in range(P):
            A, B = np.c_[XL[p], one], np.c_[XR[p], one]
            for t in range(T):
                if t == 0:
                    assert (v[li, p, 0] == 0).all()
                    continue
                m = Ridge(alpha=lam, fit_intercept=False, solver="cholesky").fit(np.r_[A[:t], B[:t]], np.r_[RL[p, :t],
                                                                                                            RR[p, :t]])
                np.testing.assert_allclose(v[li, p, t], m.predict(np.r_[A[t:t + 1], B[t:t + 1]]), atol=1e-8)


def test_group_bms_hand_cases():
    N = 9
    # one model always far better: g = 1 for it, alpha = (1 + N, 1), xp = P(Beta(N+1, 1) > 1/2) = 1 - 2^-(N+1)
    r = group_bms(np.c_[np.zeros(N), np.full(N, -200.0)])
    np.testing.assert_allclose(r["alpha"], [1 + N, 1], atol=1e-8)
    assert r["xp"][0] == pytest.approx(1 - 0.5 ** (N + 1), abs=1e-9)
    # here q(r) = Beta(N+1, 1) is the exact posterior, so F1 = log int r^N dr = -log(N+1); the null has
    # F0 = N log(1/2), hence BOR = 1 / (1 + 2^N / (N+1)) (= 10/522 for N = 9)
    assert r["F1"] == pytest.approx(-math.log(N + 1), abs=1e-9) and r["F0"] == pytest.approx(-N * math.log(2))
    assert r["bor"] == pytest.approx(1 / (1 + 2 ** N / (N + 1)), rel=1e-9)
    assert r["pxp"][0] == pytest.approx((1 - r["bor"]) * r["xp"][0] + r["bor"] / 2)
    # identical evidence: nothing to choose, every probability 1/K and the omnibus risk favours the null
    r = group_bms(np.full((N, 3), -5.0))
    np.testing.assert_allclose(r["xp"], [1 / 3] * 3, atol=1e-6)
    np.testing.assert_allclose(r["pxp"], [1 / 3] * 3, atol=1e-6)
    assert r["bor"] > 0.5


def test_group_bms_free_energy_and_xp_monte_carlo():
    rng = np.random.default_rng(5)
    L = rng.normal(size=(8, 2)) * 2
    r = group_bms(L)
    # exact log evidence of the random-effects model for K = 2 (uniform prior on r): 1-d quadrature
    f = lambda q: math.exp(np.log(q * np.exp(L[:, 0]) + (1 - q) * np.exp(L[:, 1])).sum() - L.max(1).sum())  # noqa: E731
    exact = math.log(integrate.quad(f, 0, 1, epsabs=1e-14)[0]) + L.max(1).sum()
    assert r["F1"] <= exact + 1e-9 and r["F1"] > exact - 0.5  # VB lower bound, and close to it
    assert r["F0"] == pytest.approx((logsumexp(L, 1) - math.log(2)).sum())
    # exceedance probabilities by quadrature vs Dirichlet sampling
    alpha = np.array([3.2, 5.1, 4.0])
    draws = np.random.default_rng(6).dirichlet(alpha, 400000)
    mc = np.bincount(draws.argmax(1), minlength=3) / len(draws)
    np.testing.assert_allclose(exceedance_probability(alpha), mc, atol=4e-3)


@pytest.mark.parametrize("K", [2, 3, 4])
def test_group_bms_matches_groupbmc(K):
    """group_bms against groupBMC (an independent Python port of VBA_groupBMC, Rigoux et al. 2014) with its default
    prior (Dirichlet counts 1/K): posterior counts, F1, F0, BOR, xp and pxp agree to 1e-6 (the two VB loops stop
    at slightly different points near the same fixed point; F0 is closed-form in both)."""
    from groupBMC.groupBMC import GroupBMC
    rng = np.random.default_rng(K)
    L = -60 + rng.normal(0, 3, (25, K)) + np.linspace(0, 2, K)  # (participants, models), a graded model effect
    ours = group_bms(L, alpha0=1.0 / K)
    ref = GroupBMC(L.T, max_iter=100000, tolerance=1e-13)  # groupBMC takes (K, N)
    res = ref.get_result()
    np.testing.assert_allclose(ours["alpha"], ref.α.ravel(), rtol=1e-6)  # both stop near the VB fixed point
    assert ours["F1"] == pytest.approx(ref.F1(), abs=1e-6) and ours["F0"] == pytest.approx(ref.F0(), abs=1e-9)
    assert ours["bor"] == pytest.approx(1 / (1 + math.exp(ref.F1() - ref.F0())), rel=1e-6)
    np.testing.assert_allclose(ours["xp"], res.exceedance_probability, atol=1e-6)
    np.testing.assert_allclose(ours["pxp"], res.protected_exceedance_probability, atol=1e-6)


def test_wilcoxon_pair_matches_scipy():
    from scipy.stats import wilcoxon
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=30), rng.normal(size=30) + 0.3
    w = wilcoxon_pair(a, b)
    assert w["p"] == pytest.approx(wilcoxon(a, b).pvalue) and w["better_a"] + w["better_b"] == 30


def test_entropy_ceiling_by_hand():
    trip = np.array([[0, 1, 2]] * 4 + [[3, 4, 5]] * 2 + [[6, 7, 8]])
    choice = np.array([0, 0, 0, 1, 2, 2, 0])  # set 1: odd items 0,0,0,1 ; set 2: 5,5 ; set 3 unrepeated
    h1 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + 1 / 8  # Miller-Madow: (2 - 1) / (2 * 4)
    want = 1 - (4 * h1 + 2 * 0.0) / 6 / math.log(3)
    assert entropy_ceiling(trip, choice) == pytest.approx(want)


# ------------------------------------------------------------------------------------------- the world

def test_things_ooo_fit_on_world(world, tmp_path):
    r = run(world, "things-ooo", tmp_path / "ooo.json")
    base, h = r["base"]["fit"], r["spose"]["fit"]
    # humans choose from h by a softmax over dot products: h explains far more than the nuisance-dominated
    # backbone (measured: h 0.313, base 0.068, ceiling 0.351)
    assert h["mcfadden_r2"] > base["mcfadden_r2"] + 0.15 and base["mcfadden_r2"] > 0.02
    assert 0.75 < h["r2_over_ceiling"] < 1.1
    assert r["spose"]["accuracy"] > 0.6 and "ci" in r["base"]  # zero-shot keys kept
    assert base["skipped"]["skipped"] == 0 and base["n_participants"] == 200 and base["not_converged"] == 0
    g = r["group_stats"]["base_vs_spose"]
    assert g["wilcoxon_nll"]["p"] < 1e-6 and g["bms"]["pxp"][1] > 0.99
    with h5py.File(r["files"]["trials"]) as f:
        assert json.loads(f.attrs["config"])["task"] == "things-ooo" and "versions" in f.attrs
        nll = f["spose/nll"][...]
        assert nll.shape == (20000,) and 1 - nll.mean() / math.log(3) == pytest.approx(h["mcfadden_r2"], abs=1e-6)
    assert all(os.path.exists(p) for p in r["files"].values())


def test_levels_ordering_on_world(world, tmp_path):
    r = run(world, "levels-ooo", tmp_path / "lv.json")
    assert set(r["base"]["by_triplet_type"]) == {"within_class", "between_class", "class_border"}
    trials, keys = data.load_levels(world["data"])
    with h5py.File(os.path.join(world["dir"], "world_truth.h5")) as f:  # h for each Levels image
        codes = f["levels/codes"][...]
    X, ids = data.read_features(world["dir"] + "/features/levels.h5")
    assert ids == keys
    h = behaviour.task_levels_ooo(dict(evaluate.defaults, data=world["data"], task="levels-ooo",
                                       out=str(tmp_path / "h.json")),
                                  reps={"base": X, "h": codes})
    assert h["h"]["mcfadden_r2"] > h["base"]["mcfadden_r2"] + 0.10  # measured 0.306 vs 0.167
    assert h["base"]["mcfadden_r2"] == pytest.approx(r["base"]["mcfadden_r2"])


def _trimmed(world, tmp_path, n_participants):
    d = tmp_path / "data"
    shutil.copytree(world["data"], d, ignore=shutil.ignore_patterns("brain_data", "THINGS_triplets.csv"))
    for name in ("category_learning.csv", "reward_learning.csv"):
        df = pd.read_csv(d / name)
        df[df["participant"] <= n_participants].to_csv(d / name, index=False)
    return d


def test_learning_tasks_ordering_on_world(world, tmp_path):
    d = _trimmed(world, tmp_path, 8)
    cat = run(world, "category-learning", tmp_path / "cat.json", data_dir=d, cat_c="0.1,1,10")
    rew = run(world, "reward-learning", tmp_path / "rew.json", data_dir=d, reward_lambda="0.1,1,10")
    # the simulated learners run on image codes (h): h explains their choices better than the backbone
    # (measured on 8 participants: category 0.45 vs 0.37, reward 0.51 vs 0.39)
    for r in (cat, rew):
        assert r["spose"]["mcfadden_r2"] > r["base"]["mcfadden_r2"] + 0.03 > 0.03
        assert r["base"]["fit"]["n_participants"] == 8
    assert len(cat["human_learning_curve"]) == 120 and len(rew["human_learning_curve"]) == 80  # trials per participant
    df = pd.read_csv(d / "category_learning.csv")
    human = (df["choice"] == df["true_category_binary"]).groupby(df["trial"]).mean().to_numpy()
    np.testing.assert_allclose(cat["human_learning_curve"], human)
    assert cat["human_learning_curve"][-20:] > cat["human_learning_curve"][:20]  # the simulated humans learn
    assert os.path.exists(cat["files"]["curves_figure"])


@pytest.mark.parametrize("case", ["unknown_image", "bad_choice", "single_trial", "bad_reward_choice"])
def test_bad_input(world, tmp_path, case):
    d = _trimmed(world, tmp_path, 6)
    cat = pd.read_csv(d / "category_learning.csv")
    task, expect = "category-learning", "category_learning.csv"
    if case == "unknown_image":
        cat.loc[5, "image"] = "nosuch/nosuch_01b.jpg"
        expect = "column 'image' names 1 image(s) not in"
    elif case == "bad_choice":
        cat.loc[7, "choice"] = 3
        expect = "category_learning.csv: column 'choice', row 8: 3; expected 0 or 1"
    elif case == "single_trial":
        cat = pd.concat([cat, cat.iloc[:1].assign(participant=999)])
    else:
        rew = pd.read_csv(d / "reward_learning.csv")
        rew.loc[2, "choice"] = 2
        rew.to_csv(d / "reward_learning.csv", index=False)
        task, expect = "reward-learning", "reward_learning.csv: column 'choice'"
    cat.to_csv(d / "category_learning.csv", index=False)
    out = tmp_path / "r.json"
    if case == "single_trial":  # a documented skip with counts, not an error
        r = run(world, task, out, data_dir=d, cat_c="1")
        sk = r["base"]["fit"]["skipped"]
        assert sk["skipped"] == 1 and sk["skipped_single_trial"] == 1 and sk["skipped_trials"] == 1
        assert r["base"]["fit"]["n_participants"] == 6
        return
    with pytest.raises(SystemExit) as e:
        run(world, task, out, data_dir=d, cat_c="1", reward_lambda="1")
    assert expect in str(e.value)
    assert not out.exists()


def test_icl_matches_evaluate_meta(world, tmp_path):
    from models import MetaLearner, evaluate_meta, functions_from_neurons
    X, _ = data.read_features(world["dir"] + "/features/things.h5")
    torch.manual_seed(0)
    model = MetaLearner(d=X.shape[1], d_model=32, n_layers=1, n_heads=2).eval()
    held = np.array([3, 7, 11])
    ck = dict(model=model.state_dict(), model_args=dict(d=X.shape[1], d_model=32, n_layers=1, n_heads=2),
              config=dict(functions="neurons", eval_features=world["dir"] + "/features/things.h5", length=24),
              eval_latents=torch.from_numpy(held), latents=torch.arange(5))
    torch.save(ck, tmp_path / "meta.pt")
    r = run(world, "icl", tmp_path / "icl.json", ckpt=tmp_path / "meta.pt", icl_episodes=64)
    want = evaluate_meta(model, torch.from_numpy(X), functions_from_neurons(X, latents=held), 24, n_episodes=64)
    np.testing.assert_allclose(r["model"]["accuracy_by_position"], want["accuracy_by_position"])
    assert len(r["human"]["learning_curve"]) == 120 and os.path.exists(r["files"]["curves_figure"])
    # the aligned representation (encode of the features) drops into every behavioural task with --ckpt
    d = _trimmed(world, tmp_path, 4)
    rew = run(world, "reward-learning", tmp_path / "rew.json", data_dir=d, reward_lambda="1", ckpt=tmp_path / "meta.pt")
    lv = run(world, "levels-ooo", tmp_path / "lv.json", ckpt=tmp_path / "meta.pt")
    assert {"base", "spose", "aligned"} <= set(rew) and rew["aligned"]["fit"]["n_participants"] == 4
    assert "bms_all" in rew["group_stats"] and len(rew["group_stats"]["bms_all"]["pxp"]) == 3
    assert {"base", "aligned"} <= set(lv) and "base_vs_aligned" in lv["group_stats"]


def test_all_runs_present_tasks(world, tmp_path):
    d = _trimmed(world, tmp_path, 5)
    r = run(world, "all", tmp_path / "all.json", data_dir=d, tasks="reward-learning,icl,things-ooo", reward_lambda="1")
    t = r["tasks"]
    assert t["reward-learning"]["status"] == "done" and os.path.exists(tmp_path / "reward-learning.json")
    assert t["icl"]["status"] == "skipped" and t["things-ooo"]["status"] == "skipped"  # no --ckpt, no triplet file
    assert "| reward-learning | spose | mcfadden_r2 |" in (tmp_path / "all.md").read_text()
