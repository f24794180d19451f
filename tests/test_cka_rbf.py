"""RBF CKA from Gram tiles: the tile op against its ref and its CUDA-grid emulation, cka against the
float64 Gram-matrix reference, the exact median heuristic against numpy."""
import numpy as np
import pytest
import torch

import kernels


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext()


def _pair(n, d1=5, d2=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d1, generator=g, dtype=torch.float64) * 3 + 1
    Y = X[:, :d2] ** 2 / 3 + 0.5 * torch.randn(n, d2, generator=g, dtype=torch.float64)  # nonlinear relation
    return X, Y


def _tile_args(ti, tj, diagonal, seed=0):
    X, Y = _pair(max(ti, tj) + 3, seed=seed)
    Xi, Xj = X[:ti], (X[:tj] if diagonal else X[3:3 + tj])
    Yi, Yj = Y[:ti], (Y[:tj] if diagonal else Y[3:3 + tj])
    return (Xi @ Xj.T, Yi @ Yj.T, (Xi ** 2).sum(1), (Xj ** 2).sum(1), (Yi ** 2).sum(1), (Yj ** 2).sum(1), 0.05, 0.2,
            diagonal)


@pytest.mark.parametrize("ti,tj,diagonal", [(1, 1, True), (7, 7, True), (7, 13, False), (129, 33, False), (100, 100,
                                                                                                           True)])
def test_cka_rbf_tile(ti, tj, diagonal):
    args = _tile_args(ti, tj, diagonal)
    for got, want in zip(torch.ops.metalign_ops.cka_rbf_tile(*args), kernels.cka_rbf_tile_ref(*args)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 16, 5])
@pytest.mark.parametrize("ti,tj,diagonal", [(7, 7, True), (37, 20, False)])
def test_cka_rbf_tile_grid(block, ti, tj, diagonal):
    """The CUDA launch grid (2-D blocks, one element per thread), run on the CPU with the same functions."""
    args = _tile_args(ti, tj, diagonal, seed=1)
    for got, want in zip(torch.ops.metalign_ops.cka_rbf_tile_grid(*args, block), kernels.cka_rbf_tile_ref(*args)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [4, 7, 130, 501])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("sigma", [None, 2.5])
def test_cka_rbf_matches_gram(n, debiased, sigma):
    X, Y = _pair(n)
    for tile in ((7, 64) if n <= 130 else (64,)):
        got = kernels.cka(X, Y, kernel="rbf", sigma=sigma, debiased=debiased, tile=tile).item()
        want = kernels.cka_ref(X, Y, kernel="rbf", sigma=sigma, debiased=debiased).item()
        assert abs(got - want) < 1e-6, (tile, got, want)


@pytest.mark.parametrize("n,cap", [(2, 1 << 24), (7, 1 << 24), (200, 1 << 24), (200, 50), (333, 7)])
def test_median_sq_dist_exact(n, cap):
    """np.median over the full matrix, also when histogram passes must narrow the range (small cap)."""
    X, _ = _pair(n, d1=3, d2=3, seed=n)
    X[5 % n] = X[0]  # a duplicate point: zero off-diagonal distances too
    D = torch.cdist(X, X) ** 2
    D.fill_diagonal_(0)
    assert kernels.median_sq_dist(X, tile=16, cap=cap) == pytest.approx(float(np.median(D.numpy())), rel=1e-10,
                                                                        abs=1e-12)


def test_median_sq_dist_many_ties():
    """More equal distances than `cap`: the narrowing must stop at float resolution, not loop."""
    X = torch.zeros(60, 2, dtype=torch.float64)
    X[:40, 0] = 1.0  # 40 copies of one point, 20 of another: distances are 0 or 1 only
    D = torch.cdist(X, X) ** 2
    assert kernels.median_sq_dist(X, tile=16, cap=5) == pytest.approx(float(np.median(D.numpy())))


def test_cka_rbf_invariances():
    X, Y = _pair(300)
    base = kernels.cka(X, Y, kernel="rbf").item()
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    assert kernels.cka(X @ Q + 7.0, Y, kernel="rbf").item() == pytest.approx(base, abs=1e-9)  # rigid motion
    assert kernels.cka(X * 13.0, Y, kernel="rbf").item() == pytest.approx(base, abs=1e-9)      # median sigma scales
    assert kernels.cka(X * 13.0, Y, kernel="rbf", sigma=1.0).item() != pytest.approx(base,
                                                                                     abs=1e-3)  # fixed sigma does not
    for debiased in (False, True):
        assert kernels.cka(X, X, kernel="rbf", debiased=debiased).item() == pytest.approx(1.0, abs=1e-12)
    # large bandwidth: RBF CKA tends to linear CKA (Kornblith et al. 2019)
    assert kernels.cka(X, Y, kernel="rbf", sigma_frac=200.0).item() == pytest.approx(kernels.cka(X, Y).item(), abs=1e-3)


def test_cka_rbf_float32_and_numpy():
    X, Y = _pair(400)
    want = kernels.cka_ref(X, Y, kernel="rbf").item()
    assert kernels.cka(X.float(), Y.float(), kernel="rbf", tile=128).item() == pytest.approx(want, abs=1e-5)
    assert kernels.cka(X.numpy(), Y.numpy(), kernel="rbf").item() == pytest.approx(want, abs=1e-9)


def test_cka_rbf_bad_input():
    X, Y = _pair(20)
    with pytest.raises(ValueError, match="constant representation"):
        kernels.cka(torch.ones(20, 3, dtype=torch.float64), Y, kernel="rbf")
    with pytest.raises(ValueError, match="expected 'linear' or 'rbf'"):
        kernels.cka(X, Y, kernel="poly")
