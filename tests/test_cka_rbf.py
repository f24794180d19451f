"""RBF CKA from Gram tiles: the tile ops against their refs and the CUDA-grid emulation, cka (tiled and whole-matrix
paths) against the float64 Gram-matrix reference, the exact median heuristic against numpy; each op test on every
device of the `device` fixture."""
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


def _tile_args(ti, tj, diagonal, seed=0, device="cpu"):
    X, Y = (t.to(device) for t in _pair(max(ti, tj) + 3, seed=seed))
    Xi, Xj = X[:ti], (X[:tj] if diagonal else X[3:3 + tj])
    Yi, Yj = Y[:ti], (Y[:tj] if diagonal else Y[3:3 + tj])
    return (Xi @ Xj.T, Yi @ Yj.T, (Xi ** 2).sum(1), (Xj ** 2).sum(1), (Yi ** 2).sum(1), (Yj ** 2).sum(1), 0.05, 0.2,
            diagonal)


@pytest.mark.parametrize("ti,tj,diagonal",
                         [(1, 1, True), (7, 7, True), (7, 13, False), (129, 33, False), (100, 100, True)])
def test_cka_rbf_tile(ti, tj, diagonal, device):
    args = _tile_args(ti, tj, diagonal, device=device)
    for got, want in zip(torch.ops.metalign_ops.cka_rbf_tile(*args), kernels.cka_rbf_tile_ref(*args)):
        assert got.device == args[0].device
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ti,tj,diagonal", [(1, 1, True), (7, 7, True), (7, 13, False), (129, 33, False)])
def test_rbf_kernel_tile(ti, tj, diagonal, device):
    gx, _, nxi, nxj, _, _, gamma, _, _ = _tile_args(ti, tj, diagonal, device=device)
    got = torch.ops.metalign_ops.rbf_kernel_tile(gx, nxi, nxj, gamma, diagonal)
    want = kernels.rbf_kernel_tile_ref(gx, nxi, nxj, gamma, diagonal)
    assert got.shape == (ti, tj) and got.dtype == torch.float64 and got.device == gx.device
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if diagonal:
        assert (torch.diagonal(got) == 1).all()
    torch.testing.assert_close(kernels.rbf_kernel_tile(gx.T, nxj, nxi, gamma, diagonal), want.T, rtol=1e-12, atol=1e-12)


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
def test_cka_rbf_matches_gram(n, debiased, sigma, device):
    """Both paths: tiles (whole_bytes=0) and the whole Gram matrices (the default at these sizes)."""
    X, Y = _pair(n)
    want = kernels.cka_ref(X, Y, kernel="rbf", sigma=sigma, debiased=debiased).item()
    Xd, Yd = X.to(device), Y.to(device)
    for tile in ((7, 64) if n <= 130 else (64,)):
        got = kernels.cka(Xd, Yd, kernel="rbf", sigma=sigma, debiased=debiased, tile=tile, whole_bytes=0)
        assert got.device.type == device and abs(got.item() - want) < 1e-6, (tile, got.item(), want)
    got = kernels.cka(Xd, Yd, kernel="rbf", sigma=sigma, debiased=debiased).item()
    assert abs(got - want) < 1e-6, ("whole", got, want)


@pytest.mark.parametrize("n", [2, 3, 8, 9, 101])
def test_whole_gram_median_exact(n, device):
    """The whole-matrix path's median (kthvalue, then the next order statistic) is np.median of the full
    distance matrix, also with duplicate points (ties at the middle ranks)."""
    X, _ = _pair(n, d1=3, d2=3, seed=n)
    X[n // 2] = X[0]
    X[-1] = X[0]
    D = torch.cdist(X, X) ** 2
    D.fill_diagonal_(0)
    Xc, norms = kernels.centred(X.to(device))
    _, med = kernels.whole_gram(Xc, norms)
    assert med == pytest.approx(float(np.median(D.numpy())), rel=1e-10, abs=1e-12)
    assert med == pytest.approx(kernels.median_sq_dist(X.to(device), tile=4), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("n,cap", [(2, 1 << 24), (7, 1 << 24), (200, 1 << 24), (200, 50), (333, 7)])
def test_median_sq_dist_exact(n, cap, device):
    """np.median over the full matrix, also when histogram passes must narrow the range (small cap)."""
    X, _ = _pair(n, d1=3, d2=3, seed=n)
    X[5 % n] = X[0]  # a duplicate point: zero off-diagonal distances too
    D = torch.cdist(X, X) ** 2
    D.fill_diagonal_(0)
    want = float(np.median(D.numpy()))
    assert kernels.median_sq_dist(X.to(device), tile=16, cap=cap) == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_median_sq_dist_many_ties(device):
    """More equal distances than `cap`: the narrowing must stop at float resolution, not loop."""
    X = torch.zeros(60, 2, dtype=torch.float64)
    X[:40, 0] = 1.0  # 40 copies of one point, 20 of another: distances are 0 or 1 only
    D = torch.cdist(X, X) ** 2
    assert kernels.median_sq_dist(X.to(device), tile=16, cap=5) == pytest.approx(float(np.median(D.numpy())))


def test_cka_rbf_invariances(device):
    X, Y = (t.to(device) for t in _pair(300))
    base = kernels.cka(X, Y, kernel="rbf").item()
    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, device=device))
    assert kernels.cka(X @ Q + 7.0, Y, kernel="rbf").item() == pytest.approx(base, abs=1e-9)  # rigid motion
    assert kernels.cka(X * 13.0, Y, kernel="rbf").item() == pytest.approx(base, abs=1e-9)      # median sigma scales
    assert kernels.cka(X * 13.0, Y, kernel="rbf", sigma=1.0).item() != pytest.approx(base,
                                                                                     abs=1e-3)  # fixed sigma does not
    for debiased in (False, True):
        assert kernels.cka(X, X, kernel="rbf", debiased=debiased).item() == pytest.approx(1.0, abs=1e-12)
    # large bandwidth: RBF CKA tends to linear CKA (Kornblith et al. 2019)
    assert kernels.cka(X, Y, kernel="rbf", sigma_frac=200.0).item() == pytest.approx(kernels.cka(X, Y).item(), abs=1e-3)


def test_cka_rbf_float32_and_numpy(device):
    X, Y = _pair(400)
    want = kernels.cka_ref(X, Y, kernel="rbf").item()
    for whole_bytes in (0, kernels.RBF_WHOLE_BYTES):
        got = kernels.cka(X.float().to(device), Y.float().to(device), kernel="rbf", tile=128, whole_bytes=whole_bytes)
        assert got.item() == pytest.approx(want, abs=1e-5)
    assert kernels.cka(X.numpy(), Y.numpy(), kernel="rbf", device=device).item() == pytest.approx(want, abs=1e-9)
    assert kernels.cka(X.numpy(), Y.numpy(), kernel="rbf").item() == pytest.approx(want, abs=1e-9)


def test_cka_rbf_bad_input(device):
    X, Y = (t.to(device) for t in _pair(20))
    for whole_bytes in (0, kernels.RBF_WHOLE_BYTES):
        with pytest.raises(ValueError, match="constant representation"):
            kernels.cka(torch.ones(20, 3, dtype=torch.float64, device=device), Y, kernel="rbf", whole_bytes=whole_bytes)
    with pytest.raises(ValueError, match="expected 'linear' or 'rbf'"):
        kernels.cka(X, Y, kernel="poly")
