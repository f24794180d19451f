"""Benchmark (`make bench`): the full-size THINGS odd-one-out behavioural fit (4.7M triplets, 10,000 participants,
5-fold CV, 3 parameters per participant) vectorised in choice.py, beside the per-participant Python loop a user
would otherwise write (scipy BFGS per participant and fold). The loop is timed on a random subset of
participants and extrapolated by trial count (its cost is linear in trials); the extrapolated time and the
ratio are recorded in extra_info. Timing never fails a test; the assertions check both give the same NLL."""
import time

import numpy as np
import pytest
from scipy import optimize
from scipy.special import logsumexp

from choice import fit_odd_one_out, ooo_option_features, participant_codes, stratified_folds
from data import torch_threads

N_TRIPLETS, N_PARTICIPANTS, N_CONCEPTS, N_LOOP = 4_700_000, 10_000, 1_854, 100


@pytest.fixture(autouse=True)
def _threads():
    """evaluate.py's default --threads 1 (the fastest setting on the shared 2-core machines)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def ooo_data():
    rng = np.random.default_rng(0)
    E = np.abs(rng.normal(size=(N_CONCEPTS, 66))) * (rng.random((N_CONCEPTS, 66)) < 0.15)  # sparse, SPoSE-like
    S = E @ E.T
    S /= np.sqrt(np.outer(np.diag(S), np.diag(S))).clip(1e-12)
    trip = rng.integers(0, N_CONCEPTS, size=(N_TRIPLETS, 3))
    w = rng.gamma(1.0, 1.0, N_PARTICIPANTS)  # uneven trials per participant, like the real data
    part = rng.choice(N_PARTICIPANTS, N_TRIPLETS, p=w / w.sum())
    beta = rng.gamma(4.0, 2.0, N_PARTICIPANTS)
    s = np.stack([S[trip[:, 1], trip[:, 2]], S[trip[:, 0], trip[:, 2]], S[trip[:, 0], trip[:, 1]]], 1) * beta[part,
                                                                                                              None]
    p = np.exp(s - logsumexp(s, 1, keepdims=True))
    choice = (rng.random((N_TRIPLETS, 1)) > p.cumsum(1)).sum(1).clip(0, 2)
    return S, trip, choice, part


def loop_fit(S, trip, choice, part, participants, n_folds=5, l2=0.1, seed=0):
    """The per-participant baseline: for each participant and fold, scipy BFGS on the same penalised NLL."""
    X = ooo_option_features(S, trip).double().numpy()  # same features (global similarity scale)
    codes, _, _ = participant_codes(part, n_folds, "loop")  # the same folds as the vectorised fit
    fold = np.where(codes >= 0, stratified_folds(codes, choice, n_folds, seed), -1)
    nll = {}
    for q in participants:
        idx = np.nonzero(part == q)[0]
        for f in range(n_folds):
            tr, te = idx[fold[idx] != f], idx[fold[idx] == f]
            Xt, yt = X[tr], choice[tr]

            def fun(th):
                z = Xt @ th
                lse = logsumexp(z, 1)
                pr = np.exp(z - lse[:, None])
                g = np.einsum("nk,nkp->p", pr, Xt) - Xt[np.arange(len(yt)), yt].sum(0) + l2 * th
                return (lse - z[np.arange(len(yt)), yt]).sum() + 0.5 * l2 * th @ th, g
            th = optimize.minimize(fun, np.zeros(3), jac=True, method="BFGS", options=dict(gtol=1e-8)).x
            z = X[te] @ th
            nll.update(zip(te.tolist(), (logsumexp(z, 1) - z[np.arange(len(te)), choice[te]]).tolist()))
    return nll


@pytest.mark.benchmark(group="things-ooo behavioural fit, 4.7M triplets x 10,000 participants")
def test_bench_ooo_fit_vectorised(benchmark, ooo_data):
    S, trip, choice, part = ooo_data
    fit = benchmark.pedantic(fit_odd_one_out, args=(S, trip, choice, part), rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(n_triplets=N_TRIPLETS, n_participants=int(len(fit["labels"])),
                                newton_iterations=int(fit["n_iter"]), not_converged=int((~fit["converged"]).sum()),
                                mcfadden_r2=float(1 - np.nanmean(fit["nll"]) / np.log(3)))
    pytest.ooo_vectorised = (benchmark.stats.stats.min, fit)
    fitted = fit["codes"] >= 0  # participants with fewer trials than folds are skipped (counted) by design
    benchmark.extra_info["skipped_participants"] = fit["skipped"]["skipped"]
    assert fit["converged"].all() and np.isfinite(fit["nll"][fitted]).all() and np.isnan(fit["nll"][~fitted]).all()


@pytest.mark.benchmark(group="things-ooo behavioural fit, 4.7M triplets x 10,000 participants")
def test_bench_ooo_fit_loop_baseline(benchmark, ooo_data):
    S, trip, choice, part = ooo_data
    subset = np.random.default_rng(1).choice(N_PARTICIPANTS, N_LOOP, replace=False)
    t0 = time.perf_counter()
    nll = benchmark.pedantic(loop_fit, args=(S, trip, choice, part, subset), rounds=1, warmup_rounds=0)
    took = time.perf_counter() - t0
    n_sub = len(nll)
    full = took * N_TRIPLETS / n_sub  # linear in trials: extrapolate by the subset's share of all trials
    benchmark.extra_info.update(loop_participants=N_LOOP, loop_trials=n_sub, loop_seconds=took,
                                extrapolated_full_seconds=full)
    vec = getattr(pytest, "ooo_vectorised", None)
    if vec is not None:
        benchmark.extra_info["ratio_vs_vectorised"] = full / vec[0]
        rows = np.fromiter(nll.keys(), np.int64)
        got = vec[1]["nll"][rows]
        benchmark.extra_info["max_abs_nll_difference"] = float(np.abs(got - np.fromiter(nll.values(), float)).max())
        np.testing.assert_allclose(got, np.fromiter(nll.values(), float), atol=1e-5)
        print(f"\nloop: {n_sub} trials in {took:.1f} s -> {full:.0f} s for {N_TRIPLETS} (extrapolated); "
              f"vectorised {vec[0]:.1f} s; ratio {full / vec[0]:.0f}x")
