"""Streaming ridge: the scoring ops against their *_ref oracles (and the CUDA grids run on the CPU), ridge_cv
against the float64 SVD oracle, sklearn RidgeCV (exact LOO) and himalaya RidgeCV (k-fold), on every device of
the `device` fixture (cpu; cuda where present). The peers' own test cases are ported in test_ridge_peers.py."""
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
        got, best = OPS.ridge_score_loo(xr, y, _lift(s), z, ALPHAS, 1 / 300, 64)
        want, wbest = kernels.ridge_score_loo_ref(xr, y, _lift(s), z, ALPHAS, 1 / 300, 64)
        torch.testing.assert_close(got, want)
        assert torch.equal(best, wbest)
        basis, coef, _ = kernels.ridge_alpha_basis(_fitted(_lift(s)), ALPHAS)
        got, best = OPS.ridge_score_loo_basis(xr, y, _lift(s), z, ALPHAS, 1 / 300, basis, coef, 64)
        want = kernels.ridge_score_loo_basis_ref(xr, y, _lift(s), z, ALPHAS, 1 / 300, basis, coef, 64)[0]
        torch.testing.assert_close(got, want)
        yy2 = _consistent_yy(s, z, yy)
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


def _consistent_yy(s, z, rest):
    """|y|^2 of a target whose fit has eigenvalues s and rotated cross-products z: the fitted part
    sum_j z_j^2 / s_j (positive s) plus `rest` outside the span."""
    s64 = s.double()
    return rest.to(s64.device) + (torch.where(s64 > 0, 1 / s64, 0.0)[:, None] * z.double() ** 2).sum(0)


def _lift(s):
    """The spectrum with every fitted eigenvalue raised by 1 (leverages below 1), the dropped one left at 0."""
    return torch.where(s > 0, s + 1, s)


def _fitted(s):
    """The spectrum the alpha basis is built on, as ridge_cv builds it: a dropped direction (s = 0, z = 0) gets a
    harmless eigenvalue instead of widening the basis."""
    return torch.where(s > 0, s, s.max())


def _spectrum(n, p, t, m, dtype, seed=0, device="cpu"):
    """Random inputs of the scoring ops on `device`: a PSD spectrum (with a dropped zero direction, z = b = 0
    there), z, b, yy, a Gram and rows."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(p, generator=g, dtype=torch.float64) * 50
    s[0] = 0.0
    z = torch.randn(p, t, generator=g, dtype=torch.float64) * 5
    b = torch.randn(p, t, generator=g, dtype=torch.float64) * 5
    rows = torch.randn(m, p, generator=g, dtype=torch.float64)
    yy = torch.rand(t, generator=g, dtype=torch.float64) * 100 + 1
    xr = torch.randn(n, p, generator=g, dtype=torch.float64) / np.sqrt(n)
    y = torch.randn(n, t, generator=g, dtype=torch.float64)
    z[0], b[0], xr[:, 0] = 0.0, 0.0, 0.0  # the dropped direction: ridge_cv zeroes its eigenvector
    cast = lambda a: a.to(device, dtype)  # noqa: E731
    return cast(s), cast(z), cast(b), yy.to(device), cast(rows.T @ rows), cast(rows), cast(xr), cast(y)


ALPHAS = torch.logspace(-3, 3, 7, dtype=torch.float64)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-8), torch.float32: dict(rtol=2e-4, atol=1e-2)}


@pytest.mark.parametrize("p,t,m", [(1, 1, 1), (7, 3, 5), (33, 129, 9), (65, 300, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_kfold(p, t, m, dtype, device):
    s, z, b, yy, gram, rows, _, _ = _spectrum(5, p, t, m, dtype, device=device)
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
def test_ridge_score_loo(n, p, t, chunk, dtype, device):
    s, z, _, _, _, _, xr, y = _spectrum(n, p, t, 1, dtype, device=device)
    s = _lift(s)  # leverages below 1 for every alpha
    got, best = OPS.ridge_score_loo(xr, y, s, z, ALPHAS, 1.0 / n, chunk)
    want, wbest = kernels.ridge_score_loo_ref(xr, y, s, z, ALPHAS, 1.0 / n, chunk)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype == torch.float64:
        assert torch.equal(best, wbest)


@pytest.mark.parametrize("p,t", [(1, 1), (7, 3), (65, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_gcv(p, t, dtype, device):
    s, z, _, yy, _, _, _, _ = _spectrum(5, p, t, 1, dtype, device=device)
    yy = _consistent_yy(s, z, yy)
    got, best = OPS.ridge_score_gcv(s, z, yy, ALPHAS, 500.0, 1.0)
    want, wbest = kernels.ridge_score_gcv_ref(s, z, yy, ALPHAS, 500.0, 1.0)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if dtype == torch.float64:
        assert torch.equal(best, wbest)


@pytest.mark.parametrize("n,p,t,chunk", [(2, 1, 1, 1), (7, 3, 5, 3), (129, 17, 300, 50), (300, 40, 517, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_loo_basis(n, p, t, chunk, dtype, device):
    """The alpha-basis LOO equals its ref for any basis, and with ridge_alpha_basis the exact LOO."""
    s, z, _, _, _, _, xr, y = _spectrum(n, p, t, 1, dtype, device=device)
    s = _lift(s)
    alphas = torch.logspace(-6, 3, 100, dtype=torch.float64)
    basis, coef, amp = kernels.ridge_alpha_basis(_fitted(s), alphas, tol=1e-10)
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
    b2, c2 = b2.to(device), c2.to(device)
    torch.testing.assert_close(OPS.ridge_score_loo_basis(xr, y, s, z, alphas, 0.0, b2, c2, chunk)[0],
                               kernels.ridge_score_loo_basis_ref(xr, y, s, z, alphas, 0.0, b2, c2, chunk)[0],
                               **TOL[dtype])


@pytest.mark.parametrize("p,t,m", [(1, 1, 1), (7, 3, 5), (33, 129, 9), (65, 300, 100), (40, 1100, 60)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ridge_score_kfold_basis(p, t, m, dtype, device):
    """The alpha-basis k-fold scores equal their ref for any basis, and with ridge_alpha_basis the exact scores;
    the Gram and rows forms of the quadratic give the same result (t = 1100 spans several target tiles)."""
    s, z, b, yy, gram, rows, _, _ = _spectrum(5, p, t, m, dtype, device=device)
    s = _lift(s)
    alphas = torch.logspace(-3, 3, 20, dtype=torch.float64)
    basis, coef, _ = kernels.ridge_alpha_basis(_fitted(s), alphas, tol=1e-10)
    exact = kernels.ridge_score_kfold_ref(s, z, b, yy, gram, alphas, False)
    for quad, is_rows in [(gram, False), (rows, True)]:
        got = OPS.ridge_score_kfold_basis(s, z, b, yy, quad, alphas, is_rows, basis.to(dtype), coef)
        want = kernels.ridge_score_kfold_basis_ref(s, z, b, yy, quad, alphas, is_rows, basis.to(dtype), coef)
        assert got.dtype == torch.float64 and got.shape == (len(alphas), t)
        torch.testing.assert_close(got, want, **TOL[dtype])
        torch.testing.assert_close(got, exact, **TOL[dtype])
    g = torch.Generator().manual_seed(2)  # any basis: the op is exact for the weights it is given
    b2, c2 = torch.randn(p, 3, generator=g, dtype=torch.float64), torch.randn(20, 3, generator=g, dtype=torch.float64)
    b2, c2 = b2.to(device), c2.to(device)
    torch.testing.assert_close(OPS.ridge_score_kfold_basis(s, z, b, yy, rows, alphas, True, b2.to(dtype), c2),
                               kernels.ridge_score_kfold_basis_ref(s, z, b, yy, rows, alphas, True, b2, c2),
                               **TOL[dtype])
    with pytest.raises(RuntimeError, match="coef must be \\(n_alphas, r\\) = \\(20, 3\\)"):
        OPS.ridge_score_kfold_basis(s, z, b, yy, gram, alphas, False, b2.to(dtype), c2[:, :2])


def _himalaya_ridge_cv(X, Y, alphas, cv, scoring):
    """himalaya RidgeCV (numpy backend): its default scores folds by MSE (l2_neg_loss); 'r2' passes its
    r2_score, as himalaya's own test against sklearn RidgeCV(cv=K) does."""
    pytest.importorskip("himalaya")
    from himalaya.backend import set_backend
    from himalaya.ridge import RidgeCV as HimalayaRidgeCV
    from himalaya.scoring import r2_score
    set_backend("numpy", on_error="warn")
    params = dict(score_func=r2_score) if scoring == "r2" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HimalayaRidgeCV(alphas=alphas, cv=cv, fit_intercept=True, solver_params=params).fit(X, Y)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scoring", ["r2", "mse"])
def test_ridge_cv_kfold_basis_matches_direct_and_himalaya(dtype, scoring, device, monkeypatch):
    """Sizes where ridge_cv takes the alpha-basis path (p large enough that r basis GEMMs beat one per alpha):
    the same alphas and predictions as one GEMM per alpha, as the float64 oracle and as himalaya."""
    rng = np.random.default_rng(7)  # evenly scaled features (a narrow spectrum, like himalaya's benchmark)
    X = torch.from_numpy(rng.normal(size=(600, 150)) + 2)
    Y = X @ torch.from_numpy(rng.normal(size=(150, 200)) * (rng.random((150, 200)) < 0.2)) \
        + torch.from_numpy(rng.normal(size=(600, 200)) * rng.uniform(1, 30, 200)) + 1
    al = np.logspace(-2, 5, 20)
    Xn, Yn = X.numpy().astype(dtype), Y.numpy().astype(dtype)
    Xt, Yt = torch.from_numpy(Xn).to(device), torch.from_numpy(Yn).to(device)
    calls = []
    op = kernels.ridge_score_kfold_basis
    monkeypatch.setattr(kernels, "ridge_score_kfold_basis", lambda *a: calls.append(a[-2].shape[1]) or op(*a))
    r = kernels.ridge_cv(Xt, Yt, al, cv=3, scoring=scoring)
    assert len(calls) == 3 and max(calls) < 15  # every fold scored through a basis of < 15 functions
    assert r.coef.device.type == device
    direct = kernels.ridge_cv(Xt, Yt, al, cv=3, kfold_basis=False, scoring=scoring)
    ref = kernels.ridge_cv_ref(X, Y, al, cv=3, scoring=scoring)
    r = RidgeCVResultCPU(r)
    assert (r.best_alphas == direct.best_alphas.cpu()).float().mean() >= 0.99
    assert (r.best_alphas == ref.best_alphas).float().mean() >= 0.99
    torch.testing.assert_close(r.cv_scores, ref.cv_scores, rtol=1e-4 if dtype == np.float32 else 1e-9, atol=0)
    pred, want = r.predict(Xt.cpu()).double(), ref.predict(X)
    assert ((pred - want).abs().max() / want.abs().max()).item() < 1e-4
    if scoring == "mse":  # himalaya's r2_score path takes ~30 s here; the R^2 rule meets himalaya in the test below
        hm = _himalaya_ridge_cv(Xn, Yn, al, 3, scoring)
        assert np.mean(np.isclose(r.best_alphas.numpy(), hm.best_alphas_, rtol=1e-5)) >= 0.99


def RidgeCVResultCPU(r):
    """A ridge_cv result moved to the CPU (comparisons with the CPU oracles)."""
    return kernels.RidgeCVResult(*(x.cpu() for x in r))


@pytest.mark.parametrize("threads", [1, 32, 256])
def test_ridge_score_grids(threads):
    """The CUDA launch grids (one thread per target), run on the CPU through the same functions."""
    s, z, b, yy, gram, rows, xr, y = _spectrum(41, 19, 300, 7, torch.float32)
    for quad, is_rows in [(gram, False), (rows, True)]:
        torch.testing.assert_close(OPS.ridge_score_kfold_grid(s, z, b, yy, quad, ALPHAS, is_rows, threads),
                                   kernels.ridge_score_kfold_ref(s, z, b, yy, quad, ALPHAS, is_rows),
                                   **TOL[torch.float32])
    basis, coef, _ = kernels.ridge_alpha_basis(_fitted(_lift(s)), ALPHAS)
    got, best = OPS.ridge_score_loo_basis_grid(xr, y, _lift(s), z, ALPHAS, 1 / 41, basis, coef, 16, threads)
    want = kernels.ridge_score_loo_basis_ref(xr, y, _lift(s), z, ALPHAS, 1 / 41, basis, coef, 16)[0]
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert torch.equal(best, got.argmin(0))
    got, best = OPS.ridge_score_loo_grid(xr, y, _lift(s), z, ALPHAS, 1 / 41, 16, threads)
    want, _ = kernels.ridge_score_loo_ref(xr, y, _lift(s), z, ALPHAS, 1 / 41, 16)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert torch.equal(best, got.argmin(0))
    yy2 = _consistent_yy(s, z, yy)
    got, best = OPS.ridge_score_gcv_grid(s, z, yy2, ALPHAS, 500.0, 1.0, threads)
    torch.testing.assert_close(got, kernels.ridge_score_gcv_ref(s, z, yy2, ALPHAS, 500.0, 1.0)[0], **TOL[torch.float32])
    assert torch.equal(best, got.argmin(0))


def test_ridge_score_noncontiguous_and_bad_threads(device):
    """A column-major z scores as a contiguous one; a grid op refuses a launch no CUDA block could run. (The ops'
    bad inputs, the same message on every device, are in tests/test_ops_device.py.)"""
    s, z, b, yy, gram, rows, xr, y = _spectrum(20, 9, 12, 4, torch.float64, device=device)
    zt = z.T.contiguous().T  # column-major
    torch.testing.assert_close(OPS.ridge_score_kfold(s, zt, b[:, :], yy, gram, ALPHAS, False),
                               kernels.ridge_score_kfold_ref(s, z, b, yy, gram, ALPHAS, False))
    with pytest.raises(RuntimeError, match="threads must be in 1..1024"):
        OPS.ridge_score_gcv_grid(s.cpu(), z.cpu(), yy.cpu(), ALPHAS, 100.0, 1.0, 0)


CVS = [5, 3, "loo", "gcv", "groups"]


def _cv(cv, n):
    return np.arange(n) % 4 if cv == "groups" else cv


@pytest.mark.parametrize("cv", CVS)
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_cv_matches_explicit_solve(cv, fit_intercept, device):
    X, Y = _problem(97, 13, 11)
    al = np.logspace(-3, 4, 15)
    for scoring in (["r2", "mse"] if cv not in ("loo", "gcv") else [None]):
        kw = dict(cv=_cv(cv, 97), fit_intercept=fit_intercept, scoring=scoring)
        r = kernels.ridge_cv(X.to(device), Y.to(device), al, **kw)
        assert r.coef.device.type == device and r.best_alphas.device.type == device
        r = RidgeCVResultCPU(r)
        ref = kernels.ridge_cv_ref(X, Y, al, **kw)
        assert torch.equal(r.best_alphas, ref.best_alphas)
        torch.testing.assert_close(r.coef, ref.coef, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(r.intercept, ref.intercept, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(r.cv_scores, ref.cv_scores, rtol=1e-9, atol=1e-9)
        # float32: the documented contract, alphas as the float64 oracle's and predictions to 1e-4 relative
        r32 = RidgeCVResultCPU(kernels.ridge_cv(X.float(), Y.float(), al, device=device, **kw))
        assert r32.coef.dtype == torch.float32
        assert (r32.best_alphas == ref.best_alphas).float().mean() >= 0.9
        pred, want = r32.predict(X.float()).double(), ref.predict(X)
        assert ((pred - want).abs().max() / want.abs().max()).item() < 1e-4


def test_ridge_cv_scoring_rules():
    """k-fold R^2 (default) and MSE pick by their own rule: on targets whose folds differ in variance the two
    disagree somewhere, and each equals its explicit float64 definition; LOO and GCV refuse 'r2'."""
    rng = np.random.default_rng(11)
    X = torch.from_numpy(rng.normal(size=(60, 6)))
    Y = X @ torch.from_numpy(rng.normal(size=(6, 40)) * 0.3) + torch.from_numpy(rng.normal(size=(60, 40)))
    Y[:20] *= 4  # the first fold is noisier: R^2 weights the folds by 1 / SST_f, MSE does not
    al = np.logspace(-2, 4, 25)
    r2, mse = kernels.ridge_cv(X, Y, al, cv=3), kernels.ridge_cv(X, Y, al, cv=3, scoring="mse")
    assert not torch.equal(r2.best_alphas, mse.best_alphas)
    folds = kernels.ridge_folds(3, 60)
    explicit = {k: torch.zeros(len(al), 40, dtype=torch.float64) for k in ("r2", "mse")}
    for v in folds:  # sklearn Ridge on each training set: an oracle independent of both our paths
        tr = np.setdiff1d(np.arange(60), v)
        for k, a in enumerate(al):
            from sklearn.linear_model import Ridge
            pred = torch.from_numpy(Ridge(alpha=a).fit(X[tr].numpy(), Y[tr].numpy()).predict(X[v].numpy()))
            sse = ((Y[v] - pred) ** 2).sum(0)
            explicit["r2"][k] += (1 - sse / ((Y[v] - Y[v].mean(0)) ** 2).sum(0)) / 3
            explicit["mse"][k] += sse / len(v) / 3
    for name, r, sign in (("r2", r2, -1), ("mse", mse, 1)):
        crit = sign * explicit[name] - 1e-10 * torch.log(torch.as_tensor(al))[:, None]
        assert torch.equal(r.best_alphas, torch.as_tensor(al)[crit.argmin(0)])
        want = explicit[name].gather(0, crit.argmin(0)[None]).ravel()
        torch.testing.assert_close(r.cv_scores, want, rtol=1e-9, atol=0)
    for cv in ("loo", "gcv"):
        with pytest.raises(ValueError, match="scoring='r2' with cv="):
            kernels.ridge_cv(X, Y, al, cv=cv, scoring="r2")
    with pytest.raises(ValueError, match="scoring='auc'"):
        kernels.ridge_cv(X, Y, al, cv=3, scoring="auc")
    groups = np.r_[np.zeros(59), 1]  # a group of one row has no validation variance
    for fn in (kernels.ridge_cv, kernels.ridge_cv_ref):
        with pytest.raises(ValueError, match="validation fold 1 has 1 row, and R\\^2 needs at least 2"):
            fn(X, Y, al, cv=groups)
        assert fn(X, Y, al, cv=groups, scoring="mse").coef.shape == (6, 40)


def test_ridge_cv_compute_dtype():
    """Integer and boolean input compute in float64 (as sklearn); compute_dtype forces either dtype."""
    rng = np.random.default_rng(12)
    Xi, Yi = rng.integers(0, 5, size=(40, 6)), rng.integers(0, 5, size=(40, 3))
    al = [0.1, 1.0, 10.0]
    want = kernels.ridge_cv(torch.from_numpy(Xi.astype(np.float64)), Yi.astype(np.float64), al, cv="loo")
    for X in (torch.from_numpy(Xi), Xi.astype(bool).astype(np.int64), torch.from_numpy(Xi.astype(bool))):
        got = kernels.ridge_cv(X, Yi, al, cv="loo")
        assert got.coef.dtype == torch.float64
    got = kernels.ridge_cv(torch.from_numpy(Xi), Yi, al, cv="loo")
    torch.testing.assert_close(got.coef, want.coef, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.cv_scores, want.cv_scores, rtol=1e-12, atol=0)
    forced = kernels.ridge_cv(torch.from_numpy(Xi), Yi, al, cv="loo", compute_dtype=torch.float32)
    assert forced.coef.dtype == torch.float32
    assert kernels.ridge_cv(Xi.astype(np.float32), Yi, al, cv=4, compute_dtype="float64").coef.dtype == torch.float64
    assert kernels.ridge_cv(Xi.astype(np.float16), Yi, al, cv=4).coef.dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype=torch.int32: expected float32 or float64"):
        kernels.ridge_cv(Xi, Yi, al, compute_dtype=torch.int32)


@pytest.mark.parametrize("cv", [4, "loo", "gcv", "groups"])
def test_ridge_cv_allocates_on_the_input_device(cv):
    """Every tensor ridge_cv and ridge_cv_ref create names its device: with the default device set to 'meta', an
    allocation that ignored the inputs' device would land there and fail (or return a meta tensor)."""
    X, Y = _problem(61, 7, 9, seed=13)
    al = np.logspace(-2, 4, 20)
    for fn in (kernels.ridge_cv, kernels.ridge_cv_ref):
        want = fn(X, Y, al, cv=_cv(cv, 61))
        with torch.device("meta"):
            got = fn(X, Y, al, cv=_cv(cv, 61))
        assert all(x.device.type == "cpu" for x in got)
        assert torch.equal(got.best_alphas, want.best_alphas) and torch.equal(got.coef, want.coef)


def test_ridge_cv_device_argument(device):
    """device= moves CPU (numpy, torch, HDF5-like) inputs there; the result lives there and equals the CPU fit."""
    X, Y = _problem(50, 5, 6, seed=14)
    al = np.logspace(-2, 3, 8)
    want = kernels.ridge_cv(X, Y, al, cv=5)
    got = kernels.ridge_cv(X.numpy(), Y.numpy(), al, cv=5, device=device)
    assert got.coef.device.type == device and got.cv_scores.device.type == device
    got = RidgeCVResultCPU(got)
    assert torch.equal(got.best_alphas, want.best_alphas)
    torch.testing.assert_close(got.coef, want.coef, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(kernels.ridge_cv(X, Y, al, cv=5, device=device).predict(X).cpu(), want.predict(X),
                               rtol=1e-9, atol=1e-9)


def test_ridge_cv_shared_alpha(device):
    X, Y = _problem(80, 9, 7, seed=1)
    al = np.logspace(-2, 4, 13)
    for cv in (4, "loo"):
        r = RidgeCVResultCPU(kernels.ridge_cv(X.to(device), Y.to(device), al, cv=cv, local_alpha=False, target_batch=3))
        ref = kernels.ridge_cv_ref(X, Y, al, cv=cv, local_alpha=False)
        assert len(torch.unique(r.best_alphas)) == 1 and torch.equal(r.best_alphas, ref.best_alphas)
        torch.testing.assert_close(r.coef, ref.coef, rtol=1e-9, atol=1e-10)


def test_gcv_closed_form(device):
    """GCV(a) = (|y - H y|^2 / n) / (1 - tr(H)/n)^2 with the explicit hat matrix H (intercept included)."""
    X, Y = _problem(60, 8, 5, seed=2)
    al = np.logspace(-2, 3, 6)
    r = RidgeCVResultCPU(kernels.ridge_cv(X.to(device), Y.to(device), al, cv="gcv"))
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
def test_ridge_cv_loo_matches_sklearn(dtype, device):
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
            r = kernels.ridge_cv(torch.from_numpy(Xn), torch.from_numpy(Yn), grid, cv="loo", loo_basis=basis,
                                 device=device)
            r = RidgeCVResultCPU(r)
            assert np.mean(np.isclose(r.best_alphas.numpy(), sk.alpha_, rtol=1e-12)) >= 0.99
            pred, want = r.predict(torch.from_numpy(Xn)).numpy().astype(np.float64), sk.predict(Xn)
            assert np.abs(pred - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("scoring", ["r2", "mse"])
def test_ridge_cv_kfold_matches_himalaya(dtype, scoring, device):
    """k-fold alphas as himalaya's RidgeCV with the same scoring (its r2_score or its default MSE)."""
    from sklearn.datasets import load_diabetes
    X, Y = _problem(250, 23, 300, seed=3)
    Xd, yd = load_diabetes(return_X_y=True)
    for Xn, Yn, grid, cv in [(X.numpy(), Y.numpy(), np.logspace(-3, 5, 20), 5),
                             (Xd, np.c_[yd, yd * 0.5 + np.random.default_rng(1).normal(size=len(yd)) * 60],
                              np.logspace(-6, 3, 100), 3)]:
        Xn, Yn = Xn.astype(dtype), Yn.astype(dtype)
        hm = _himalaya_ridge_cv(Xn, Yn, grid, cv, scoring)
        r = RidgeCVResultCPU(kernels.ridge_cv(torch.from_numpy(Xn), torch.from_numpy(Yn), grid, cv=cv,
                                              scoring=scoring, device=device))
        assert np.mean(np.isclose(r.best_alphas.numpy(), hm.best_alphas_, rtol=1e-5)) >= 0.99
        pred, want = r.predict(torch.from_numpy(Xn)).numpy().astype(np.float64), np.asarray(hm.predict(Xn), np.float64)
        assert np.abs(pred - want).max() / np.abs(want).max() < 1e-4
        # himalaya's cv_scores_: mean R^2, or mean negative MSE
        want_scores = np.asarray(hm.cv_scores_, np.float64) * (1 if scoring == "r2" else -1)
        np.testing.assert_allclose(r.cv_scores.numpy(), want_scores, rtol=1e-4 if dtype == np.float32 else 1e-6,
                                   atol=1e-6 if scoring == "r2" else 0)


@pytest.mark.parametrize("cv", [4, "loo", "gcv", "groups", "kfold_basis"])
def test_ridge_cv_streams_from_hdf5(tmp_path, cv, monkeypatch, device):
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
    mem = kernels.ridge_cv(X.to(device), Y.to(device), al, cv=cv)
    with h5py.File(tmp_path / "y.h5", "r") as f:  # Y read from disk in batches, moved to X's device
        disk = kernels.ridge_cv(X.to(device), f["y"], al, cv=cv, target_batch=10, chunk_rows=25)
    assert disk.coef.device.type == device
    assert len(calls) == (3 + 3 * 4 if X.shape[1] == 150 else 0)  # in memory: 3 folds; from disk: x 4 batches
    assert torch.equal(disk.best_alphas, mem.best_alphas)
    # float32 GEMMs of other widths round differently: absolute tolerance relative to the largest coefficient
    torch.testing.assert_close(disk.coef, mem.coef, rtol=1e-5, atol=1e-6 * max(1.0, float(mem.coef.abs().max())))
    torch.testing.assert_close(disk.intercept, mem.intercept, rtol=1e-5, atol=1e-5)


def test_ridge_cv_float32_collinear_is_finite(device):
    """Duplicated and constant columns: a singular X'X whose float rounding gives tiny negative and spurious
    positive eigenvalues, dropped at the rank tolerance; the chosen model predicts like the float64 oracle."""
    X, Y = _problem(200, 6, 20, seed=5)
    X = torch.cat([X, X[:, :3], torch.ones(200, 2, dtype=torch.float64)], 1)
    al = np.logspace(-6, 3, 30)
    for cv in (5, "loo", "gcv"):
        r = RidgeCVResultCPU(kernels.ridge_cv(X.float(), Y.float(), al, cv=cv, device=device))
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
