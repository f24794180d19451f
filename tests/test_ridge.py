"""Streaming ridge: the scoring ops against their *_ref oracles (and the CUDA grids run on the CPU), ridge_cv
against the float64 explicit-solve oracle, sklearn RidgeCV (exact LOO) and himalaya RidgeCV (k-fold)."""
import warnings

import h5py
import numpy as np
import pytest
import torch

import kernels

OPS = torch.ops.metalign_ops


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext(), "extension failed to build (run with KERNELS_REQUIRE=1 to see why)"
    # small problems: one thread; on shared, busy cores the thread pools' spin-waits cost 5x here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_ridge_ops_multithreaded():
    """The OpenMP paths (several target blocks per thread, parallel leverages) against the refs on 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s, z, b, yy, gram, rows, xr, y = _spectrum(300, 40, 517, 9, torch.float64)
        for quad, is_rows in [(gram, False), (rows, True)]:
            torch.testing.assert_close(OPS.ridge_score_kfold(s, z, b, yy, quad, ALPHAS, is_rows),
                                       kernels.ridge_score_kfold_ref(s, z, b, yy, quad, ALPHAS, is_rows))
        got, best = OPS.ridge_score_loo(xr, y, s + 1, z, ALPHAS, 1 / 300, 64)
        want, wbest = kernels.ridge_score_loo_ref(xr, y, s + 1, z, ALPHAS, 1 / 300, 64)
        torch.testing.assert_close(got, want)
        assert torch.equal(best, wbest)
        basis, coef, _ = kernels.ridge_alpha_basis(s + 1, ALPHAS)
        got, best = OPS.ridge_score_loo_basis(xr, y, s + 1, z, ALPHAS, 1 / 300, basis, coef, 64)
        torch.testing.assert_close(got, kernels.ridge_score_loo_basis_ref(xr, y, s + 1, z, ALPHAS, 1 / 300, basis,
                                                                          coef, 64)[0])
        yy2 = yy + (z ** 2).sum(0)
        got, best = OPS.ridge_score_gcv(s, z, yy2, ALPHAS, 500.0, 1.0)
        torch.testing.assert_close(got, kernels.ridge_score_gcv_ref(s, z, yy2, ALPHAS, 500.0, 1.0)[0])
    finally:
        torch.set_num_threads(threads)


def _problem(n, p, t, dtype=torch.float64, seed=0, noise=(0.5, 20.0)):
    """X with uneven column scales and an offset, Y = sparse linear read-out + heteroscedastic noise + offset."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p)) * rng.uniform(0.1, 3, p) + 2
    W = rng.normal(size=(p, t)) * (rng.random((p, t)) < 0.3)
    Y = X @ W + rng.normal(size=(n, t)) * rng.uniform(*noise, t) + 1
    return torch.from_numpy(X).to(dtype), torch.from_numpy(Y).to(dtype)


def _spectrum(n, p, t, m, dtype, seed=0):
    """Random inputs of the scoring ops: a PSD spectrum (with a clamped zero), z, b, yy, a Gram and rows."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(p, generator=g, dtype=torch.float64) * 50
    s[0] = 0.0
    z = torch.randn(p, t, generator=g, dtype=torch.float64) * 5
    b = torch.randn(p, t, generator=g, dtype=torch.float64) * 5
    rows = torch.randn(m, p, generator=g, dtype=torch.float64)
    yy = torch.rand(t, generator=g, dtype=torch.float64) * 100 + 1
    xr = torch.randn(n, p, generator=g, dtype=torch.float64) / np.sqrt(n)
    y = torch.randn(n, t, generator=g, dtype=torch.float64)
    cast = lambda a: a.to(dtype)  # noqa: E731
    return cast(s), cast(z), cast(b), yy, cast(rows.T @ rows), cast(rows), cast(xr), cast(y)


ALPHAS = torch.logspace(-3, 3, 7, dtype=torch.float64)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-8), torch.float32: dict(rtol=2e-4, atol=1e-2)}


@pytest.mark.parametrize("p,t,m", [(1, 1, 1), (7, 3, 5), (33, 129, 9), (65, 300, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_kfold(p, t, m, dtype):
    s, z, b, yy, gram, rows, _, _ = _spectrum(5, p, t, m, dtype)
    for quad, is_rows in [(gram, False), (rows, True)]:
        got = OPS.ridge_score_kfold(s, z, b, yy, quad, ALPHAS, is_rows)
        want = kernels.ridge_score_kfold_ref(s, z, b, yy, quad, ALPHAS, is_rows)
        assert got.dtype == torch.float64 and got.shape == (len(ALPHAS), t)
        torch.testing.assert_close(got, want, **TOL[dtype])
    # the two quadratic forms agree: (d z)' G (d z) with G = R'R equals |R (d z)|^2
    torch.testing.assert_close(OPS.ridge_score_kfold(s, z, b, yy, gram, ALPHAS, False),
                               OPS.ridge_score_kfold(s, z, b, yy, rows, ALPHAS, True), **TOL[dtype])


@pytest.mark.parametrize("n,p,t,chunk", [(2, 1, 1, 1), (7, 3, 5, 3), (129, 17, 300, 50), (300, 40, 33, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_loo(n, p, t, chunk, dtype):
    s, z, _, _, _, _, xr, y = _spectrum(n, p, t, 1, dtype)
    s = s + 1.0  # leverages below 1 for every alpha
    got, best = OPS.ridge_score_loo(xr, y, s, z, ALPHAS, 1.0 / n, chunk)
    want, wbest = kernels.ridge_score_loo_ref(xr, y, s, z, ALPHAS, 1.0 / n, chunk)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype == torch.float64:
        assert torch.equal(best, wbest)


@pytest.mark.parametrize("p,t", [(1, 1), (7, 3), (65, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_gcv(p, t, dtype):
    s, z, _, yy, _, _, _, _ = _spectrum(5, p, t, 1, dtype)
    yy = yy + (z.double() ** 2).sum(0)  # a consistent |y|^2 >= the fitted part
    got, best = OPS.ridge_score_gcv(s, z, yy, ALPHAS, 500.0, 1.0)
    want, wbest = kernels.ridge_score_gcv_ref(s, z, yy, ALPHAS, 500.0, 1.0)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype == torch.float64:
        assert torch.equal(best, wbest)


@pytest.mark.parametrize("n,p,t,chunk", [(2, 1, 1, 1), (7, 3, 5, 3), (129, 17, 300, 50), (300, 40, 517, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_loo_basis(n, p, t, chunk, dtype):
    """The alpha-basis LOO equals its ref for any basis, and with ridge_alpha_basis the exact LOO."""
    s, z, _, _, _, _, xr, y = _spectrum(n, p, t, 1, dtype)
    s = s + 1.0
    alphas = torch.logspace(-6, 3, 100, dtype=torch.float64)
    basis, coef, amp = kernels.ridge_alpha_basis(s, alphas, tol=1e-10)
    assert basis.shape[1] <= 20 and amp < 100  # a few basis functions stand for 100 alphas
    got, best = OPS.ridge_score_loo_basis(xr, y, s, z, alphas, 1.0 / n, basis, coef, chunk)
    want, _ = kernels.ridge_score_loo_basis_ref(xr, y, s, z, alphas, 1.0 / n, basis, coef, chunk)
    exact, ebest = kernels.ridge_score_loo_ref(xr, y, s, z, alphas, 1.0 / n, chunk)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got, exact, **TOL[dtype])
    assert torch.equal(best, got.argmin(0))
    if dtype == torch.float64:
        assert (best == ebest).float().mean() >= 0.999
    g = torch.Generator().manual_seed(1)  # any basis: the op is exact for the weights it is given
    b2, c2 = torch.randn(p, 3, generator=g, dtype=torch.float64), torch.randn(100, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(OPS.ridge_score_loo_basis(xr, y, s, z, alphas, 0.0, b2, c2, chunk)[0],
                               kernels.ridge_score_loo_basis_ref(xr, y, s, z, alphas, 0.0, b2, c2, chunk)[0],
                               **TOL[dtype])


@pytest.mark.parametrize("p,t,m", [(1, 1, 1), (7, 3, 5), (33, 129, 9), (65, 300, 100), (40, 1100, 60)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_kfold_basis(p, t, m, dtype):
    """The alpha-basis k-fold scores equal their ref for any basis, and with ridge_alpha_basis the exact scores;
    the Gram and rows forms of the quadratic give the same result (t = 1100 spans several target tiles)."""
    s, z, b, yy, gram, rows, _, _ = _spectrum(5, p, t, m, dtype)
    s = s + 1.0
    alphas = torch.logspace(-3, 3, 20, dtype=torch.float64)
    basis, coef, _ = kernels.ridge_alpha_basis(s, alphas, tol=1e-10)
    exact = kernels.ridge_score_kfold_ref(s, z, b, yy, gram, alphas, False)
    for quad, is_rows in [(gram, False), (rows, True)]:
        got = OPS.ridge_score_kfold_basis(s, z, b, yy, quad, alphas, is_rows, basis.to(dtype), coef)
        want = kernels.ridge_score_kfold_basis_ref(s, z, b, yy, quad, alphas, is_rows, basis.to(dtype), coef)
        assert got.dtype == torch.float64 and got.shape == (len(alphas), t)
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got, exact, **TOL[dtype])
    g = torch.Generator().manual_seed(2)  # any basis: the op is exact for the weights it is given
    b2, c2 = torch.randn(p, 3, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(OPS.ridge_score_kfold_basis(s, z, b, yy, rows, alphas, True, b2.to(dtype), c2),
                               kernels.ridge_score_kfold_basis_ref(s, z, b, yy, rows, alphas, True, b2,
                                                                   c2), **TOL[dtype])
    with pytest.raises(RuntimeError, match="coef must be \\(n_alphas, r\\) = \\(20, 3\\)"):
        OPS.ridge_score_kfold_basis(s, z, b, yy, gram, alphas, False, b2.to(dtype), c2[:, :2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ridge_cv_kfold_basis_matches_direct_and_himalaya(dtype, monkeypatch):
    """Sizes where ridge_cv takes the alpha-basis path (p large enough that r basis GEMMs beat one per alpha):
    the same alphas and predictions as one GEMM per alpha, as the float64 oracle and as himalaya."""
    rng = np.random.default_rng(7)  # evenly scaled features (a narrow spectrum, like himalaya's benchmark)
    X = torch.from_numpy(rng.normal(size=(600, 150)) + 2)
    Y = X @ torch.from_numpy(rng.normal(size=(150, 200)) * (rng.random((150, 200)) < 0.2)) \
        + torch.from_numpy(rng.normal(size=(600, 200)) * rng.uniform(1, 30, 200)) + 1
    al = np.logspace(-2, 5, 20)
    Xn, Yn = X.numpy().astype(dtype), Y.numpy().astype(dtype)
    Xt, Yt = torch.from_numpy(Xn), torch.from_numpy(Yn)
    calls = []
    op = kernels.ridge_score_kfold_basis
    monkeypatch.setattr(kernels, "ridge_score_kfold_basis", lambda *a: calls.append(a[-2].shape[1]) or op(*a))
    r = kernels.ridge_cv(Xt, Yt, al, cv=3)
    assert len(calls) == 3 and max(calls) < 15  # every fold scored through a basis of < 15 functions
    direct = kernels.ridge_cv(Xt, Yt, al, cv=3, kfold_basis=False)
    ref = kernels.ridge_cv_ref(X, Y, al, cv=3)
    assert (r.best_alphas == direct.best_alphas).float().mean() >= 0.99
    assert (r.best_alphas == ref.best_alphas).float().mean() >= 0.99
    torch.testing.assert_close(r.cv_scores, ref.cv_scores, rtol=1e-4 if dtype == np.float32 else 1e-9, atol=0)
    pred, want = r.predict(Xt).double(), ref.predict(X)
    assert ((pred - want).abs().max() / want.abs().max()).item() < 1e-4
    pytest.importorskip("himalaya")
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV
    set_backend("numpy", on_error="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hm = HimalayaRidgeCV(alphas=al, cv=3, fit_intercept=True).fit(Xn, Yn)
    assert np.mean(np.isclose(r.best_alphas.numpy(), hm.best_alphas_, rtol=1e-5)) >= 0.99


@pytest.mark.parametrize("threads", [1, 32, 256])
def test_ridge_score_grids(threads):
    """The CUDA launch grids (one thread per target), run on the CPU through the same functions."""
    s, z, b, yy, gram, rows, xr, y = _spectrum(41, 19, 300, 7, torch.float32)
    for quad, is_rows in [(gram, False), (rows, True)]:
        torch.testing.assert_close(OPS.ridge_score_kfold_grid(s, z, b, yy, quad, ALPHAS, is_rows, threads),
                                   kernels.ridge_score_kfold_ref(s, z, b, yy, quad, ALPHAS,
                                                                 is_rows), **TOL[torch.float32])
    basis, coef, _ = kernels.ridge_alpha_basis(s + 1, ALPHAS)
    got, best = OPS.ridge_score_loo_basis_grid(xr, y, s + 1, z, ALPHAS, 1 / 41, basis, coef, 16, threads)
    torch.testing.assert_close(got, kernels.ridge_score_loo_basis_ref(xr, y, s + 1, z, ALPHAS, 1 / 41, basis, coef,
                                                                      16)[0],
                               **TOL[torch.float32])
    assert torch.equal(best, got.argmin(0))
    got, best = OPS.ridge_score_loo_grid(xr, y, s + 1, z, ALPHAS, 1 / 41, 16, threads)
    want, _ = kernels.ridge_score_loo_ref(xr, y, s + 1, z, ALPHAS, 1 / 41, 16)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert torch.equal(best, got.argmin(0))
    yy2 = yy + (z.double() ** 2).sum(0)
    got, best = OPS.ridge_score_gcv_grid(s, z, yy2, ALPHAS, 500.0, 1.0, threads)
    torch.testing.assert_close(got, kernels.ridge_score_gcv_ref(s, z, yy2, ALPHAS, 500.0, 1.0)[0], **TOL[torch.float32])
    assert torch.equal(best, got.argmin(0))


def test_ridge_score_noncontiguous_and_bad_input():
    s, z, b, yy, gram, rows, xr, y = _spectrum(20, 9, 12, 4, torch.float64)
    zt = z.T.contiguous().T  # column-major
    torch.testing.assert_close(OPS.ridge_score_kfold(s, zt, b[:, :], yy, gram, ALPHAS, False),
                               kernels.ridge_score_kfold_ref(s, z, b, yy, gram, ALPHAS, False))
    with pytest.raises(RuntimeError, match="z must be 2-D \\(p, n_targets\\) with p = 9"):
        OPS.ridge_score_kfold(s, z[:5], b, yy, gram, ALPHAS, False)
    with pytest.raises(RuntimeError, match="alphas must be positive"):
        OPS.ridge_score_gcv(s, z, yy, -ALPHAS, 100.0, 1.0)
    with pytest.raises(RuntimeError, match="yy must be 1-D"):
        OPS.ridge_score_gcv(s, z, yy[:3], ALPHAS, 100.0, 1.0)
    with pytest.raises(RuntimeError, match="threads must be in 1..1024"):
        OPS.ridge_score_gcv_grid(s, z, yy, ALPHAS, 100.0, 1.0, 0)
    with pytest.raises(RuntimeError, match="xr \\(rotated centred rows X V\\) must be \\(n, p\\)"):
        OPS.ridge_score_loo(xr[:, :3], y, s, z, ALPHAS, 0.05, 8)


CVS = [5, 3, "loo", "gcv", "groups"]


def _cv(cv, n):
    return np.arange(n) % 4 if cv == "groups" else cv


@pytest.mark.parametrize("cv", CVS)
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_cv_matches_explicit_solve(cv, fit_intercept):
    X, Y = _problem(97, 13, 11)
    al = np.logspace(-3, 4, 15)
    r = kernels.ridge_cv(X, Y, al, cv=_cv(cv, 97), fit_intercept=fit_intercept)
    ref = kernels.ridge_cv_ref(X, Y, al, cv=_cv(cv, 97), fit_intercept=fit_intercept)
    assert torch.equal(r.best_alphas, ref.best_alphas)
    torch.testing.assert_close(r.coef, ref.coef, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(r.intercept, ref.intercept, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r.cv_scores, ref.cv_scores, rtol=1e-9, atol=1e-9)
    r32 = kernels.ridge_cv(X.float(), Y.float(), al, cv=_cv(cv, 97), fit_intercept=fit_intercept)
    assert r32.coef.dtype == torch.float32
    assert (r32.best_alphas == ref.best_alphas).float().mean() >= 0.9
    pred, want = r32.predict(X.float()).double(), ref.predict(X)
    assert ((pred - want).abs().max() / want.abs().max()).item() < 1e-4


def test_ridge_cv_shared_alpha():
    X, Y = _problem(80, 9, 7, seed=1)
    al = np.logspace(-2, 4, 13)
    for cv in (4, "loo"):
        r = kernels.ridge_cv(X, Y, al, cv=cv, local_alpha=False, target_batch=3)
        ref = kernels.ridge_cv_ref(X, Y, al, cv=cv, local_alpha=False)
        assert len(torch.unique(r.best_alphas)) == 1 and torch.equal(r.best_alphas, ref.best_alphas)
        torch.testing.assert_close(r.coef, ref.coef, rtol=1e-9, atol=1e-10)


def test_gcv_closed_form():
    """GCV(a) = (|y - H y|^2 / n) / (1 - tr(H)/n)^2 with the explicit hat matrix H (intercept included)."""
    X, Y = _problem(60, 8, 5, seed=2)
    al = np.logspace(-2, 3, 6)
    r = kernels.ridge_cv(X, Y, al, cv="gcv")
    n = X.shape[0]
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    gcv = []
    for a in al:
        H = Xc @ torch.linalg.solve(Xc.T @ Xc + a * torch.eye(8, dtype=torch.float64), Xc.T) + 1.0 / n
        gcv.append(((Yc - H @ Yc) ** 2).mean(0) / (1 - torch.trace(H) / n) ** 2)
    gcv = torch.stack(gcv)
    assert torch.equal(r.best_alphas, torch.as_tensor(al)[gcv.argmin(0)])
    torch.testing.assert_close(r.cv_scores, gcv.min(0).values, rtol=1e-10, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ridge_cv_loo_matches_sklearn(dtype):
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import RidgeCV
    X, Y = _problem(301, 37, 400)
    al = np.logspace(-3, 5, 30)
    Xd, yd = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(0)
    Yd = np.c_[yd, yd[:, None] * rng.uniform(0.5, 2, (1, 30)) + rng.normal(size=(len(yd), 30)) * 50]
    for Xn, Yn, grid in [(X.numpy(), Y.numpy(), al), (Xd, Yd, np.logspace(-6, 3, 100))]:
        Xn, Yn = Xn.astype(dtype), Yn.astype(dtype)
        sk = RidgeCV(alphas=grid, alpha_per_target=True).fit(Xn, Yn)
        for basis in (True, False):  # alpha-basis expansion (used for 100 alphas) and one GEMM per alpha
            r = kernels.ridge_cv(torch.from_numpy(Xn), torch.from_numpy(Yn), grid, cv="loo", loo_basis=basis)
            assert np.mean(np.isclose(r.best_alphas.numpy(), sk.alpha_, rtol=1e-12)) >= 0.99
            pred, want = r.predict(torch.from_numpy(Xn)).numpy().astype(np.float64), sk.predict(Xn)
            assert np.abs(pred - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ridge_cv_kfold_matches_himalaya(dtype):
    pytest.importorskip("himalaya")
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV
    from sklearn.datasets import load_diabetes
    set_backend("numpy", on_error="warn")
    X, Y = _problem(250, 23, 300, seed=3)
    Xd, yd = load_diabetes(return_X_y=True)
    for Xn, Yn, grid, cv in [(X.numpy(), Y.numpy(), np.logspace(-3, 5, 20), 5),
                             (Xd, np.c_[yd, yd * 0.5 + np.random.default_rng(1).normal(size=len(yd)) * 60],
                              np.logspace(-6, 3, 100), 3)]:
        Xn, Yn = Xn.astype(dtype), Yn.astype(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hm = HimalayaRidgeCV(alphas=grid, cv=cv, fit_intercept=True).fit(Xn, Yn)
        r = kernels.ridge_cv(torch.from_numpy(Xn), torch.from_numpy(Yn), grid, cv=cv)
        assert np.mean(np.isclose(r.best_alphas.numpy(), hm.best_alphas_, rtol=1e-5)) >= 0.99
        pred, want = r.predict(torch.from_numpy(Xn)).numpy().astype(np.float64), np.asarray(hm.predict(Xn), np.float64)
        assert np.abs(pred - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("cv", [4, "loo", "gcv", "groups", "kfold_basis"])
def test_ridge_cv_streams_from_hdf5(tmp_path, cv, monkeypatch):
    X, Y = _problem(120, 10, 37, dtype=torch.float32, seed=4)
    al = np.logspace(-2, 4, 9)
    calls = []
    if cv == "kfold_basis":  # evenly scaled features, p = 150: the alpha-basis k-fold path (see test above)
        rng = np.random.default_rng(4)
        X = torch.from_numpy(rng.normal(size=(400, 150)).astype(np.float32) + 2)
        Y = X @ torch.from_numpy(rng.normal(size=(150, 37)).astype(np.float32)) \
            + torch.from_numpy(rng.normal(size=(400, 37)).astype(np.float32) * 30)
        cv, al = 3, np.logspace(-2, 5, 20)
        op = kernels.ridge_score_kfold_basis
        monkeypatch.setattr(kernels, "ridge_score_kfold_basis", lambda *a: calls.append(1) or op(*a))
    cv = _cv(cv, X.shape[0])
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f.create_dataset("y", data=Y.numpy(), chunks=(X.shape[0], 8))
    mem = kernels.ridge_cv(X, Y, al, cv=cv)
    with h5py.File(tmp_path / "y.h5", "r") as f:
        disk = kernels.ridge_cv(X, f["y"], al, cv=cv, target_batch=10, chunk_rows=25)
    assert len(calls) == (3 + 3 * 4 if X.shape[1] == 150 else 0)  # in memory: 3 folds; from disk: x 4 batches
    assert torch.equal(disk.best_alphas, mem.best_alphas)
    # float32 GEMMs of other widths round differently: absolute tolerance relative to the largest coefficient
    torch.testing.assert_close(disk.coef, mem.coef, rtol=1e-5, atol=1e-6 * max(1.0, float(mem.coef.abs().max())))
    torch.testing.assert_close(disk.intercept, mem.intercept, rtol=1e-5, atol=1e-5)


def test_ridge_cv_float32_collinear_is_finite():
    """Duplicated and constant columns: a singular X'X whose float rounding gives tiny negative eigenvalues,
    clamped to 0; the chosen model still predicts like the float64 oracle."""
    X, Y = _problem(200, 6, 20, seed=5)
    X = torch.cat([X, X[:, :3], torch.ones(200, 2, dtype=torch.float64)], 1)
    al = np.logspace(-6, 3, 30)
    for cv in (5, "loo", "gcv"):
        r = kernels.ridge_cv(X.float(), Y.float(), al, cv=cv)
        ref = kernels.ridge_cv_ref(X, Y, al, cv=cv)
        assert torch.isfinite(r.coef).all() and torch.isfinite(r.cv_scores).all()
        pred, want = r.predict(X.float()).double(), ref.predict(X)
        assert ((pred - want).abs().max() / want.abs().max()).item() < 1e-3


def test_ridge_cv_reference_fallback(monkeypatch):
    X, Y = _problem(60, 5, 4, seed=6)
    al = np.logspace(-2, 3, 6)
    want = {cv: kernels.ridge_cv(X, Y, al, cv=cv) for cv in (3, "loo", "gcv")}
    monkeypatch.setattr(kernels, "_ext", lambda: False)  # the path taken when no compiler is present
    for cv, w in want.items():
        r = kernels.ridge_cv(X, Y, al, cv=cv)
        assert torch.equal(r.best_alphas, w.best_alphas)
        torch.testing.assert_close(r.coef, w.coef)


def test_ridge_cv_bad_input():
    X, Y = _problem(30, 4, 5)
    al = [0.1, 1.0]
    Yn = Y.clone()
    Yn[:, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite values in 1 of targets 0..4 \\(first target 3, 30 of 30 rows\\)"):
        kernels.ridge_cv(X, Yn, al)
    with pytest.raises(ValueError, match="Y must be 2-D \\(n_samples=30"):
        kernels.ridge_cv(X, Y[:20], al)
    with pytest.raises(ValueError, match="alphas must be a non-empty list of positive"):
        kernels.ridge_cv(X, Y, [0.0, 1.0])
    with pytest.raises(ValueError, match="k-fold needs 2 <= k <= n_samples"):
        kernels.ridge_cv(X, Y, al, cv=1)
    with pytest.raises(ValueError, match="expected an int \\(k-fold\\), 'loo', 'gcv'"):
        kernels.ridge_cv(X, Y, al, cv="lol")
    with pytest.raises(ValueError, match="group vector has 1 distinct"):
        kernels.ridge_cv(X, Y, al, cv=np.zeros(30))
