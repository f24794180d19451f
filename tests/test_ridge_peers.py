"""The peers' own ridge test cases, ported onto kernels.ridge_cv: scikit-learn's linear_model/tests/test_ridge.py
(regularisation limits, GCV/LOO on tall and wide X, integer arrays, per-target penalties, the constructed
OLS/ridge data set with its constant and duplicated columns, RidgeCV(cv=K)'s R^2 rule) and himalaya's ridge tests
(RidgeCV against scikit-learn, its default MSE rule, group splits, the random-search test with one feature space).
The inputs and expected values are the peers'; the code is ours. Each case runs on every path: the op
(`ridge_cv`) on every device of the `device` fixture and the float64 oracle (`ridge_cv_ref`).

Tolerances are the peers' own for float64. sklearn computes float32 input in float64 inside RidgeCV; ridge_cv
computes it in float32, so float32 cases use the documented float32 contract instead: the same alphas, and
coefficients / intercepts within 1e-4 of the largest expected magnitude (F32)."""
import functools
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_diabetes, make_low_rank_matrix, make_regression
from sklearn.linear_model import LinearRegression, Ridge, RidgeCV
from sklearn.model_selection import KFold, PredefinedSplit

import kernels

F32 = 1e-4  # float32 contract: relative to the largest expected magnitude


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext(), "extension failed to build (run with KERNELS_REQUIRE=1 to see why)"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small problems: one thread (spin-waits on shared cores cost more than they save)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["op", "ref"])
def ridge(request, device):
    """ridge_cv (the op path) or ridge_cv_ref (the float64 oracle) on `device`; numpy in, CPU tensors out."""
    fn = kernels.ridge_cv if request.param == "op" else kernels.ridge_cv_ref

    def run(X, Y, alphas, **kw):
        Y = np.asarray(Y)
        r = fn(torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(Y.reshape(len(Y), -1)), alphas,
               device=device, **kw)
        assert r.coef.device.type == device
        return kernels.RidgeCVResult(*(x.cpu() for x in r))
    return run


def _close(got, want, dtype, atol64, rtol64=0.0):
    """The peer's tolerance in float64, the float32 contract otherwise."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if dtype == np.float64:
        np.testing.assert_allclose(got, want, rtol=rtol64, atol=atol64)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=F32 * max(1.0, np.abs(want).max()))


# ---------------------------------------------------------------------------------------------- scikit-learn

@pytest.mark.parametrize("alpha", [1e-16, 1e16], ids=["zero_alpha", "inf_alpha"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("shape", [(100, 50), (50, 50), (50, 100)], ids=["tall", "square", "wide"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_regularization_limits(ridge, alpha, fit_intercept, shape, dtype):
    """sklearn test_regularization_limits_ridge(_gcv): alpha -> 0 recovers LinearRegression (the minimum-norm
    least-squares solution when n <= p), alpha -> inf zero coefficients and the mean as intercept; atol 1e-10.
    The one alpha is chosen by every CV mode, so each refit is checked."""
    X, y = make_regression(n_samples=shape[0], n_features=shape[1], noise=0, bias=10, random_state=42)
    if alpha < 1:
        lr = LinearRegression(fit_intercept=fit_intercept).fit(X, y)
        coef, intercept = lr.coef_, lr.intercept_
    else:
        coef, intercept = np.zeros(shape[1]), np.mean(y) if fit_intercept else 0.0
    for cv in ("loo", "gcv", 5):
        r = ridge(X.astype(dtype), y.astype(dtype), [alpha], cv=cv, fit_intercept=fit_intercept)
        _close(r.coef[:, 0], coef, dtype, atol64=1e-10)
        _close(r.intercept, [intercept], dtype, atol64=1e-10)


def _sparse_offset_regression(n_samples, n_features, n_targets, noise, n_informative, seed):
    """sklearn's _make_sparse_offset_regression(shuffle=False): make_regression data shifted by 30, about half
    of the entries zeroed, y corrected for what the zeroed entries contributed (bias 13)."""
    X, y, c = make_regression(n_samples=n_samples, n_features=n_features, n_informative=n_informative,
                              n_targets=n_targets, bias=13.0, noise=noise, shuffle=False, coef=True,
                              random_state=seed)
    X += 30.0
    keep = np.random.RandomState(seed).binomial(1, 0.5, X.shape) > 0
    y -= np.where(keep, 0.0, X) @ c
    return np.where(keep, X, 0.0), y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(11, 8), (11, 20)], ids=["tall", "wide"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("y_shape,noise", [((11,), 1.0), ((11, 1), 30.0), ((11, 3), 150.0)])
def test_loo_matches_explicit_leave_one_out(ridge, dtype, shape, fit_intercept, y_shape, noise):
    """sklearn test_ridge_gcv_vs_ridge_loo_cv: the efficient LOO (cv="loo", one alpha for all targets) picks the
    alpha of an explicit leave-one-out loop (RidgeCV(cv=n_samples) with the MSE scorer) and gives its
    coefficients: atol 1e-10 in float64."""
    n, p = shape
    X, y = _sparse_offset_regression(n, p, y_shape[-1] if len(y_shape) == 2 else 1, noise, 5, seed=0)
    y = y.reshape(y_shape)
    alphas = [1e-3, 0.1, 1.0, 10.0, 1e3]
    loo = RidgeCV(cv=n, fit_intercept=fit_intercept, alphas=alphas, scoring="neg_mean_squared_error").fit(X, y)
    r = ridge(X.astype(dtype), y.astype(dtype), alphas, cv="loo", fit_intercept=fit_intercept, local_alpha=False)
    assert float(r.best_alphas[0]) == pytest.approx(loo.alpha_)
    _close(r.coef.T.reshape(np.shape(loo.coef_)), loo.coef_, dtype, atol64=1e-10)
    _close(r.intercept, np.broadcast_to(loo.intercept_, r.intercept.shape), dtype, atol64=1e-10)


def test_integer_arrays(ridge):
    """sklearn test_ridge_gcv_integer_arrays: integer X and y give the float64 answer (computed in float64,
    not float32): coefficients and the LOO score at rtol 1e-7, float64 results."""
    rng = np.random.RandomState(0)
    X, y = rng.randint(0, 5, size=(20, 10)), rng.randint(0, 5, size=(20,))
    alphas = [0.1, 1.0, 10.0]
    r = ridge(X, y, alphas, cv="loo")
    rf = ridge(X.astype(np.float64), y.astype(np.float64), alphas, cv="loo")
    assert r.coef.dtype == torch.float64 and r.cv_scores.dtype == torch.float64
    np.testing.assert_allclose(r.coef.numpy(), rf.coef.numpy(), rtol=1e-7)
    np.testing.assert_allclose(r.cv_scores.numpy(), rf.cv_scores.numpy(), rtol=1e-7)
    sk = RidgeCV(alphas=alphas, scoring="neg_mean_squared_error").fit(X, y)
    np.testing.assert_allclose(r.coef[:, 0].numpy(), sk.coef_, rtol=1e-7)
    np.testing.assert_allclose(r.cv_scores.numpy(), [-sk.best_score_], rtol=1e-7)


def test_individual_penalties(ridge):
    """sklearn test_ridge_cv_individual_penalties: per-target alphas equal RidgeCV fitted on each target alone,
    and the coefficients Ridge(alpha=those alphas) (decimal 6)."""
    rng = np.random.RandomState(42)
    y = rng.randn(20, 3)
    X = (y[:, [0]] @ np.ones((1, 5)) + y[:, [1]] @ (0.05 * np.ones((1, 5))) + y[:, [2]] @ (0.001 * np.ones((1, 5)))
         + rng.randn(20, 5))
    alphas = (1, 100, 1000)
    optimal = [RidgeCV(alphas=alphas).fit(X, target).alpha_ for target in y.T]
    r = ridge(X, y, alphas, cv="loo")
    np.testing.assert_array_equal(r.best_alphas.numpy(), optimal)
    np.testing.assert_array_almost_equal(Ridge(alpha=np.asarray(optimal)).fit(X, y).coef_, r.coef.T.numpy(), decimal=6)


def _ols_ridge_dataset(kind, seed):
    """sklearn's ols_ridge_dataset fixture: well-conditioned X (last column 1, the intercept) built from its
    SVD, y with a known minimum-norm OLS solution and the ridge solution at alpha = 1 (intercept unpenalised)."""
    n, p = (12, 4) if kind == "long" else (4, 12)
    k = min(n, p)
    rng = np.random.RandomState(seed)
    X = make_low_rank_matrix(n_samples=n, n_features=p, effective_rank=k, random_state=rng)
    X[:, -1] = 1
    U, s, Vt = np.linalg.svd(X)
    assert np.all(s > 1e-3)
    if kind == "long":
        coef_ols = rng.uniform(low=-10, high=10, size=p)
        y = X @ coef_ols + U[:, k:] @ rng.normal(size=n - p) ** 2  # the added part vanishes in X'y
    else:
        y = rng.uniform(low=-10, high=10, size=n)
        coef_ols = Vt[:k].T @ np.diag(1 / s) @ U[:, :k].T @ y
    penalty = np.identity(p)
    penalty[-1, -1] = 0
    coef_ridge = np.linalg.solve(X.T @ X + penalty, X.T @ y)
    return X, y, coef_ols, coef_ridge


@pytest.mark.parametrize("kind", ["long", "wide"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("seed", [0, 42])
def test_ols_ridge_dataset(ridge, kind, fit_intercept, seed):
    """sklearn test_ridge_regression, test_ridge_regression_hstacked_X and test_ridge_regression_unpenalized on
    their constructed data: the known ridge solution (rtol 1e-7); the same with every column duplicated and
    halved, X'X singular, at half the alpha (atol 1e-8); OLS as alpha -> 0, the minimum-norm solution for wide
    X (sklearn's own Ridge misses it with an intercept on wide X and xfails there; ridge_cv centres and solves
    the minimum-norm problem of the centred data, which is what LinearRegression returns, so that case checks
    against LinearRegression)."""
    X, y, coef_ols, coef_ridge = _ols_ridge_dataset(kind, seed)
    Xf, yf, intercept = X[:, :-1], y, coef_ridge[-1]  # the constant column is the intercept
    if not fit_intercept:
        Xf, yf, intercept = Xf - Xf.mean(0), y - y.mean(), 0.0
    r = ridge(Xf, yf, [1.0], cv="loo", fit_intercept=fit_intercept)
    assert float(r.intercept[0]) == pytest.approx(intercept)
    np.testing.assert_allclose(r.coef[:, 0].numpy(), coef_ridge[:-1], rtol=1e-7)
    r = ridge(0.5 * np.c_[Xf, Xf], yf, [0.5], cv="gcv", fit_intercept=fit_intercept)
    assert float(r.intercept[0]) == pytest.approx(intercept)
    np.testing.assert_allclose(r.coef[:, 0].numpy(), np.r_[coef_ridge[:-1], coef_ridge[:-1]], atol=1e-8)
    # unpenalised: with an intercept the constant column goes, without it stays a feature like any other
    Xu, coef, intercept = (X[:, :-1], coef_ols[:-1], coef_ols[-1]) if fit_intercept else (X, coef_ols, 0.0)
    if kind == "wide" and fit_intercept:
        lr = LinearRegression().fit(Xu, y)
        coef, intercept = lr.coef_, lr.intercept_
        np.testing.assert_allclose(Xu @ coef + intercept, y)  # still an interpolant
    r = ridge(Xu, y, [1e-16], cv=3 if kind == "long" else 2, fit_intercept=fit_intercept)
    assert float(r.intercept[0]) == pytest.approx(intercept)
    np.testing.assert_allclose(r.coef[:, 0].numpy(), coef, rtol=1e-7)


def test_constant_column(ridge):
    """A constant feature is centred away with an intercept: its coefficient is 0 and the rest equal sklearn
    Ridge on the data without it (rtol 1e-10)."""
    rng = np.random.RandomState(3)
    X = rng.normal(size=(40, 6))
    y = X @ rng.normal(size=6) + rng.normal(size=40) + 5
    r = ridge(np.c_[X, np.full(40, 7.0)], y, [0.3], cv=4)
    sk = Ridge(alpha=0.3).fit(X, y)
    assert abs(float(r.coef[-1, 0])) < 1e-12
    np.testing.assert_allclose(r.coef[:-1, 0].numpy(), sk.coef_, rtol=1e-10)
    np.testing.assert_allclose(float(r.intercept[0]), sk.intercept_, rtol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kfold_r2_matches_sklearn_ridgecv(ridge, dtype):
    """sklearn RidgeCV(cv=5) picks the alpha of the best mean R^2 over KFold(5) (the estimator's score; several
    targets: their average, one alpha): ridge_cv(cv=5, local_alpha=False), scoring "r2" the default, gives its
    alpha, best_score_ and coefficients (sklearn's diabetes subset of 200 rows)."""
    X, y = load_diabetes(return_X_y=True)
    order = np.random.RandomState(0).permutation(len(y))[:200]
    X, y = X[order], y[order]
    Y = np.c_[y, 0.5 * y + np.random.RandomState(1).normal(size=200) * 40]
    alphas = np.logspace(-4, 2, 25)
    for target in (y, Y):
        sk = RidgeCV(alphas=alphas, cv=5).fit(X, target)
        r = ridge(X.astype(dtype), target.astype(dtype), alphas, cv=5, local_alpha=False)
        assert float(r.best_alphas[0]) == pytest.approx(sk.alpha_, rel=1e-12)
        _close(r.cv_scores.mean(), sk.best_score_, dtype, atol64=1e-10)
        _close(r.coef.T.reshape(np.shape(sk.coef_)), sk.coef_, dtype, atol64=1e-8, rtol64=1e-8)


# -------------------------------------------------------------------------------------------------- himalaya

def _himalaya_dataset(seed):
    """himalaya's ridge test data: 30 x 10 Gaussian X, Y = X w + noise, 3 targets (seeded here)."""
    rng = np.random.RandomState(seed)
    X = rng.randn(30, 10)
    return X, X @ rng.randn(10, 3) + rng.randn(30, 3)


def _himalaya_fit(X, Y, alphas, cv, fit_intercept=True, r2=False):
    pytest.importorskip("himalaya")
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV
    from himalaya.scoring import r2_score
    set_backend("numpy", on_error="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HimalayaRidgeCV(alphas=alphas, cv=cv, fit_intercept=fit_intercept,
                               solver_params=dict(score_func=r2_score) if r2 else None).fit(X, Y)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_himalaya_ridge_cv_vs_scikit_learn(ridge, fit_intercept):
    """himalaya test_ridge_cv_vs_scikit_learn: with R^2 scoring, RidgeCV(cv=5) on one target agrees with
    sklearn RidgeCV(cv=5): alpha (decimal 5), coefficients and predictions (decimal 6); himalaya with its
    r2_score picks the same."""
    X, Y = _himalaya_dataset(0)
    y = Y[:, 0]
    if fit_intercept:
        y, X = y + 10, X + 1
    alphas = np.logspace(-2, 3, 21)
    sk = RidgeCV(alphas=alphas, fit_intercept=fit_intercept, cv=5).fit(X, y)
    r = ridge(X, y, alphas, cv=5, fit_intercept=fit_intercept, scoring="r2")
    np.testing.assert_array_almost_equal(float(r.best_alphas[0]), sk.alpha_, decimal=5)
    np.testing.assert_array_almost_equal(r.coef[:, 0].numpy(), sk.coef_, decimal=6)
    np.testing.assert_array_almost_equal((X @ r.coef.numpy() + r.intercept.numpy())[:, 0], sk.predict(X), decimal=6)
    hm = _himalaya_fit(X, y, alphas, 5, fit_intercept, r2=True)
    np.testing.assert_array_almost_equal(float(r.best_alphas[0]), hm.best_alphas_[0], decimal=5)
    np.testing.assert_array_almost_equal(float(r.cv_scores[0]), hm.cv_scores_[0], decimal=6)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_himalaya_default_mse(ridge, fit_intercept):
    """himalaya RidgeCV's default rule (mean over folds of the validation MSE, l2_neg_loss), alpha per target on
    its test data (test_banded_ridge_cv_vs_ridge_cv's: 3 targets, Y + 10): scoring="mse" gives its alphas,
    coefficients, intercepts (decimal 6) and CV scores (decimal 6, ours as positive MSE)."""
    X, Y = _himalaya_dataset(1)
    Y = Y + 10 if fit_intercept else Y - Y.mean(0)
    if not fit_intercept:
        X = X - X.mean(0)
    alphas = np.logspace(-2, 3, 21)
    hm = _himalaya_fit(X, Y, alphas, 5, fit_intercept)
    r = ridge(X, Y, alphas, cv=5, fit_intercept=fit_intercept, scoring="mse")
    np.testing.assert_array_almost_equal(r.best_alphas.numpy(), hm.best_alphas_, decimal=5)
    np.testing.assert_array_almost_equal(r.coef.numpy(), hm.coef_, decimal=6)
    if fit_intercept:
        np.testing.assert_array_almost_equal(r.intercept.numpy(), hm.intercept_, decimal=6)
    np.testing.assert_array_almost_equal(r.cv_scores.numpy(), -hm.cv_scores_, decimal=6)


@pytest.mark.parametrize("scoring", ["r2", "mse"])
def test_himalaya_group_splits(ridge, scoring):
    """Leave-one-group-out (a group vector as cv) is himalaya RidgeCV with PredefinedSplit(groups): the same
    alphas (decimal 5), coefficients (decimal 6) and CV scores, with uneven group sizes."""
    rng = np.random.RandomState(2)
    X = rng.randn(57, 8)
    Y = X @ (rng.randn(8, 12) * rng.uniform(0, 1, 12)) + rng.randn(57, 12) * rng.uniform(0.5, 3, 12)
    groups = rng.randint(0, 5, 57)
    alphas = np.logspace(-2, 4, 19)
    hm = _himalaya_fit(X, Y, alphas, PredefinedSplit(groups), r2=scoring == "r2")
    r = ridge(X, Y, alphas, cv=groups, scoring=scoring)
    np.testing.assert_array_almost_equal(r.best_alphas.numpy(), hm.best_alphas_, decimal=5)
    np.testing.assert_array_almost_equal(r.coef.numpy(), hm.coef_, decimal=6)
    np.testing.assert_array_almost_equal(r.cv_scores.numpy(), hm.cv_scores_ * (1 if scoring == "r2" else -1),
                                         decimal=6)


def test_himalaya_random_search_one_space(ridge):
    """himalaya test_solve_group_ridge_random_search with one feature space (the group weight is 1: plain
    ridge): cv=10, R^2 scoring, no intercept. The CV scores equal the best over alphas of the mean over folds
    of sklearn Ridge's validation R^2 (decimal 5), and the refit weights Ridge(alpha=best) (decimal 5)."""
    rng = np.random.RandomState(3)
    X = np.c_[rng.randn(80, 10), rng.randn(80, 20)]
    Y = X @ rng.randn(30, 4) + rng.randn(80, 4)
    alphas = np.logspace(-3, 5, 9)
    r = ridge(X, Y, alphas, cv=10, fit_intercept=False, scoring="r2")
    scores = np.zeros((10, len(alphas), 4))
    for f, (tr, te) in enumerate(KFold(10).split(X)):
        for k, a in enumerate(alphas):
            pred = Ridge(alpha=a, fit_intercept=False).fit(X[tr], Y[tr]).predict(X[te])
            scores[f, k] = 1 - ((Y[te] - pred) ** 2).sum(0) / ((Y[te] - Y[te].mean(0)) ** 2).sum(0)
    np.testing.assert_array_almost_equal(r.cv_scores.numpy(), scores.mean(0).max(0), decimal=5)
    for t in range(4):
        w = Ridge(alpha=float(r.best_alphas[t]), fit_intercept=False).fit(X, Y[:, t]).coef_
        np.testing.assert_array_almost_equal(r.coef[:, t].numpy(), w, decimal=5)


# ------------------------------------------------------------------------------------------ GCV with p >= n

@functools.lru_cache(maxsize=None)
def _exact_wide(fit_intercept):
    """30 x 80 data, 5 targets, alphas 1e-6 .. 1e6, and their GCV and LOO scores in 50-digit arithmetic (mpmath)
    from the n x n hat matrix H = K (K + a I)^-1 (+ 11'/n with an intercept, K from the exactly centred X)."""
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.RandomState(4)
    n, p, t = 30, 80, 5
    X = rng.randn(n, p) + 3
    Y = X @ (rng.randn(p, t) * np.array([0.3, 0.1, 0.03, 0.01, 0.0])) + rng.randn(n, t) * np.array([0.1, 1, 1, 3, 1])
    alphas = np.logspace(-6, 6, 13)
    with mpmath.workdps(50):
        Xm, Ym = mpmath.matrix(X.tolist()), mpmath.matrix(Y.tolist())
        ones = mpmath.matrix([[mpmath.mpf(1)] * n]).T
        if fit_intercept:
            Xm, Ym = Xm - ones * (ones.T * Xm) / n, Ym - ones * (ones.T * Ym) / n
        K = Xm * Xm.T
        gcv, loo = np.zeros((len(alphas), t)), np.zeros((len(alphas), t))
        for k, a in enumerate(alphas):
            H = K * mpmath.inverse(K + mpmath.mpf(float(a)) * mpmath.eye(n))
            if fit_intercept:
                H = H + ones * ones.T / n
            E = Ym - H * Ym
            den = (1 - sum(H[i, i] for i in range(n)) / n) ** 2
            for j in range(t):
                gcv[k, j] = float(sum(E[i, j] ** 2 for i in range(n)) / n / den)
                loo[k, j] = float(sum((E[i, j] / (1 - H[i, i])) ** 2 for i in range(n)) / n)
    return X, Y, alphas, {"gcv": gcv, "loo": loo}


@pytest.mark.parametrize("cv", ["gcv", "loo"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_wide_matches_exact_arithmetic(ridge, cv, fit_intercept):
    """GCV and LOO on 30 x 80 data (p >= n: the fit interpolates at small alpha, where |y|^2 - fit, y - X w,
    n - tr(H) and 1 - h_ii all cancel to nothing in float64): the alphas and scores of the same criteria in
    50-digit arithmetic (scores to 1e-6 relative). Float32 picks, on every target, an alpha whose exact score is
    within 1e-4 of the best (alphas whose exact scores differ by less cannot be told apart in float32)."""
    X, Y, alphas, exact = _exact_wide(fit_intercept)
    exact = exact[cv]
    best = exact.argmin(0)
    assert len(set(best.tolist())) > 2  # several alphas win, not only the smallest (what cancellation gave)
    r = ridge(X, Y, alphas, cv=cv, fit_intercept=fit_intercept)
    np.testing.assert_array_equal(r.best_alphas.numpy(), alphas[best])
    np.testing.assert_allclose(r.cv_scores.numpy(), exact[best, np.arange(Y.shape[1])], rtol=1e-6)
    r32 = ridge(X.astype(np.float32), Y.astype(np.float32), alphas, cv=cv, fit_intercept=fit_intercept)
    picked = exact[np.searchsorted(alphas, r32.best_alphas.numpy() * (1 - 1e-6)), np.arange(Y.shape[1])]
    assert np.all(picked <= exact.min(0) * (1 + 1e-4))
