"""Benchmarks of kernels.ridge_cv (`make bench`): beside himalaya RidgeCV (numpy backend, k-fold, with the same
scoring rule: its r2_score for our default scoring="r2", its default MSE for scoring="mse") and sklearn
RidgeCV(alpha_per_target=True) (exact LOO), same data, same alphas, float32, in one session so
`pytest --benchmark-only --benchmark-group-by=group` prints the ratios. The GEMM floor of each config is
measured in the same run (extra_info). Timing never fails a test; assertions check the chosen alphas agree
(k-fold: on >= 99.9% of targets).

Sizes are the issue's with the targets cut 10x (the ratios do not depend on n_targets; the baselines would
take many minutes per round at full size on 2 cores); RIDGE_BENCH=full runs the issue's full sizes (one round
of each op, about 25 minutes on 2 cores).
"""
import os
import time
import warnings

import numpy as np
import pytest
import torch

import kernels

SCALE = 1 if os.environ.get("RIDGE_BENCH") == "full" else 10
ROUNDS = 1 if SCALE == 1 else 2           # rounds of our op (the baselines run once); full size: one round each
FMRI = (8000, 768, 10_000 // SCALE)       # fMRI-like: samples x features x targets
HIMALAYA = (3000, 1000, 30_000 // SCALE)  # himalaya's own benchmark config (cv=3: n_val = p)
RESULTS = {}                              # baseline results, compared by the op's test of the same group


def _data(n, p, t, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)).astype(np.float32)
    W = rng.normal(size=(p, t)).astype(np.float32) * (rng.random((p, t)) < 0.05)
    Y = (X @ W * rng.uniform(0.01, 0.2, t).astype(np.float32) + rng.normal(size=(n, t)).astype(np.float32))
    return X, Y


@pytest.fixture(scope="module")
def fmri_data():
    assert kernels._ext()
    return _data(*FMRI)


@pytest.fixture(scope="module")
def himalaya_data():
    return _data(*HIMALAYA, seed=1)


def _gemm_seconds(m, p, t, reps=3):
    """Seconds of one (m, p) x (p, t) float32 GEMM through ATen: the per-alpha unit of the floor."""
    A, B = torch.randn(m, p), torch.randn(p, t)
    A @ B
    t0 = time.perf_counter()
    for _ in range(reps):
        A @ B
    return (time.perf_counter() - t0) / reps


def _himalaya(X, Y, alphas, cv, scoring="r2"):
    pytest.importorskip("himalaya")
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import r2_score
    set_backend("numpy", on_error="warn")
    params = dict(score_func=r2_score) if scoring == "r2" else None  # else its default, l2_neg_loss (MSE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return RidgeCV(alphas=alphas, cv=cv, fit_intercept=True, solver_params=params).fit(X, Y)


def _agree(a, b):
    return float(np.mean(np.isclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5)))


KF = np.logspace(-2, 5, 15)
G_FMRI = f"ridge k-fold fMRI-like {FMRI[0]}x{FMRI[1]}x{FMRI[2]} 15 alphas cv=5 float32 scoring=r2"
G_FMRI_MSE = f"ridge k-fold fMRI-like {FMRI[0]}x{FMRI[1]}x{FMRI[2]} 15 alphas cv=5 float32 scoring=mse"
G_HIM = f"ridge k-fold himalaya config {HIMALAYA[0]}x{HIMALAYA[1]}x{HIMALAYA[2]} 20 alphas cv=3 float32 scoring=r2"
G_LOO = f"ridge LOO/GCV {FMRI[0]}x{FMRI[1]}x{FMRI[2]} logspace(-6,3,100) float32"
G_LOO15 = f"ridge LOO {FMRI[0]}x{FMRI[1]}x{FMRI[2]} 15 alphas float32"


@pytest.mark.benchmark(group=G_FMRI)
def test_bench_ridge_kfold_fmri_himalaya(benchmark, fmri_data):
    X, Y = fmri_data
    RESULTS["fmri"] = benchmark.pedantic(_himalaya, args=(X, Y, KF, 5), rounds=1, warmup_rounds=0).best_alphas_


def _kfold_fmri(benchmark, fmri_data, scoring, key):
    X, Y = fmri_data
    n, p, t = FMRI
    r = benchmark.pedantic(kernels.ridge_cv, args=(torch.from_numpy(X), torch.from_numpy(Y), KF),
                           kwargs=dict(cv=5, scoring=scoring), rounds=ROUNDS, warmup_rounds=0)
    floor = 15 * 5 * _gemm_seconds(p, p, t)  # n_val = 1600 > p: the rotated-Gram quadratic form, p x p x t per alpha
    benchmark.extra_info.update(gemm_floor_s=floor, times_floor=benchmark.stats.stats.min / floor)
    if key in RESULTS:
        benchmark.extra_info["same_alphas_as_himalaya"] = _agree(r.best_alphas, RESULTS[key])
        assert benchmark.extra_info["same_alphas_as_himalaya"] >= 0.999


@pytest.mark.benchmark(group=G_FMRI)
def test_bench_ridge_kfold_fmri(benchmark, fmri_data):
    _kfold_fmri(benchmark, fmri_data, "r2", "fmri")


@pytest.mark.benchmark(group=G_FMRI_MSE)
def test_bench_ridge_kfold_fmri_mse_himalaya(benchmark, fmri_data):
    X, Y = fmri_data
    RESULTS["fmri_mse"] = benchmark.pedantic(_himalaya, args=(X, Y, KF, 5, "mse"), rounds=1,
                                             warmup_rounds=0).best_alphas_


@pytest.mark.benchmark(group=G_FMRI_MSE)
def test_bench_ridge_kfold_fmri_mse(benchmark, fmri_data):
    _kfold_fmri(benchmark, fmri_data, "mse", "fmri_mse")


@pytest.mark.benchmark(group=G_HIM)
def test_bench_ridge_kfold_himalaya_config_himalaya(benchmark, himalaya_data):
    X, Y = himalaya_data
    RESULTS["him"] = benchmark.pedantic(_himalaya, args=(X, Y, np.logspace(-2, 5, 20), 3), rounds=1,
                                        warmup_rounds=0).best_alphas_


@pytest.mark.benchmark(group=G_HIM)
def test_bench_ridge_kfold_himalaya_config(benchmark, himalaya_data):
    X, Y = himalaya_data
    n, p, t = HIMALAYA
    r = benchmark.pedantic(kernels.ridge_cv, args=(torch.from_numpy(X), torch.from_numpy(Y), np.logspace(-2, 5, 20)),
                           kwargs=dict(cv=3), rounds=ROUNDS, warmup_rounds=0)
    floor = 20 * 3 * _gemm_seconds(p, p, t)  # n_val = p = 1000: either quadratic form costs p x p x t per alpha
    benchmark.extra_info.update(gemm_floor_s=floor, times_floor=benchmark.stats.stats.min / floor)
    if "him" in RESULTS:
        benchmark.extra_info["same_alphas_as_himalaya"] = _agree(r.best_alphas, RESULTS["him"])
        assert benchmark.extra_info["same_alphas_as_himalaya"] >= 0.999


def _sklearn_loo(X, Y, alphas):
    from sklearn.linear_model import RidgeCV
    return RidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y).alpha_


LOO = np.logspace(-6, 3, 100)


@pytest.mark.benchmark(group=G_LOO)
def test_bench_ridge_loo_sklearn(benchmark, fmri_data):
    X, Y = fmri_data
    RESULTS["loo"] = benchmark.pedantic(_sklearn_loo, args=(X, Y, LOO), rounds=1, warmup_rounds=0)


@pytest.mark.benchmark(group=G_LOO)
def test_bench_ridge_loo(benchmark, fmri_data):
    X, Y = fmri_data
    n, p, t = FMRI
    r = benchmark.pedantic(kernels.ridge_cv, args=(torch.from_numpy(X), torch.from_numpy(Y), LOO),
                           kwargs=dict(cv="loo"), rounds=ROUNDS, warmup_rounds=0)
    floor = 100 * _gemm_seconds(n, p, t)  # one n x p x t prediction GEMM per alpha (what sklearn does)
    benchmark.extra_info.update(per_alpha_gemm_floor_s=floor, times_per_alpha_floor=benchmark.stats.stats.min / floor)
    if "loo" in RESULTS:
        benchmark.extra_info["same_alphas_as_sklearn"] = float(np.mean(r.best_alphas.numpy() == RESULTS["loo"]))
        assert benchmark.extra_info["same_alphas_as_sklearn"] >= 0.999


@pytest.mark.benchmark(group=G_LOO)
def test_bench_ridge_gcv(benchmark, fmri_data):
    X, Y = fmri_data
    r = benchmark.pedantic(kernels.ridge_cv, args=(torch.from_numpy(X), torch.from_numpy(Y), LOO),
                           kwargs=dict(cv="gcv"), rounds=ROUNDS + 1, warmup_rounds=0)
    if "loo" in RESULTS:  # GCV is a different criterion: recorded, loosely checked
        benchmark.extra_info["same_alphas_as_sklearn_loo"] = float(np.mean(r.best_alphas.numpy() == RESULTS["loo"]))
        assert benchmark.extra_info["same_alphas_as_sklearn_loo"] >= 0.5


@pytest.mark.benchmark(group=G_LOO15)
def test_bench_ridge_loo15_sklearn(benchmark, fmri_data):
    X, Y = fmri_data
    RESULTS["loo15"] = benchmark.pedantic(_sklearn_loo, args=(X, Y, np.logspace(-2, 5, 15)), rounds=1, warmup_rounds=0)


@pytest.mark.benchmark(group=G_LOO15)
def test_bench_ridge_loo15(benchmark, fmri_data):
    X, Y = fmri_data
    r = benchmark.pedantic(kernels.ridge_cv, args=(torch.from_numpy(X), torch.from_numpy(Y), np.logspace(-2, 5, 15)),
                           kwargs=dict(cv="loo"), rounds=ROUNDS, warmup_rounds=0)
    if "loo15" in RESULTS:
        benchmark.extra_info["same_alphas_as_sklearn"] = float(np.mean(r.best_alphas.numpy() == RESULTS["loo15"]))
        assert benchmark.extra_info["same_alphas_as_sklearn"] >= 0.999
