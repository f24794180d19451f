"""Fused SAE top-k encode: the op against topk_encode_ref on odd sizes, ties, strides and dtypes; the CUDA
launch grid emulated on the CPU; bad input; each op test on every device of the `device` fixture."""
import pytest
import torch

import kernels


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext(), "extension failed to build (run with KERNELS_REQUIRE=1 to see why)"


def _inputs(n, d, L, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.5
    W = torch.randn(d, L, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(L, generator=g, dtype=torch.float64) * 0.3
    bp = torch.randn(d, generator=g, dtype=torch.float64) * 0.2
    return tuple(t.to(dtype).to(device) for t in (x, W, b, bp))


def _check(got, want, pre, tol):
    """Values match; indices match except where float rounding reorders (near-)equal values, and every
    returned index carries its own post-activation."""
    (v, i), (rv, ri) = got, want
    assert v.shape == rv.shape and i.dtype == torch.int64 and v.dtype == rv.dtype and v.device == rv.device
    torch.testing.assert_close(v, rv, rtol=tol, atol=tol)
    torch.testing.assert_close(pre.gather(1, i), v, rtol=tol, atol=tol)
    differ = i != ri
    assert ((rv - v).abs()[differ] <= 4 * tol).all()
    assert (i.sort(1).values.diff(dim=1) > 0).all(), "an index appears twice in a row"


@pytest.mark.parametrize("n,d,L,k", [(1, 1, 1, 1), (1, 5, 7, 7), (7, 13, 129, 1), (129, 65, 1000, 17),
                                     (1000, 31, 257, 64), (601, 7, 40, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_pre", [False, True])
def test_topk_encode(n, d, L, k, dtype, with_pre, device):
    x, W, b, bp = _inputs(n, d, L, dtype, device=device)
    bp = bp if with_pre else None
    got = torch.ops.metalign_ops.topk_encode(x, W, b, k, bp)
    want = kernels.topk_encode_ref(x, W, b, k, bp)
    pre = torch.relu((x.double() - (bp.double() if bp is not None else 0)) @ W.double() + b.double())
    _check(got, want, pre.to(dtype), 1e-4 if dtype == torch.float32 else 1e-10)
    if dtype == torch.float64:  # exact ordering in float64: indices identical
        assert torch.equal(got[1], want[1])


def test_topk_encode_noncontiguous_half_and_strided_w(device):
    x, W, b, bp = _inputs(300, 40, 513, torch.float32, seed=1, device=device)
    xn = torch.randn(80, 300, device=device).T[:, ::2]  # (300, 40) with column stride 600
    Wt = W.T.contiguous().T                              # column-major W
    Ws = torch.randn(40, 2 * 513, device=device)[:, ::2]  # neither stride 1
    for xx, WW in [(xn, W), (x, Wt), (x, Ws), (x.half(), W), (x.bfloat16(), W)]:
        got = torch.ops.metalign_ops.topk_encode(xx, WW, b, 9, bp)
        want = kernels.topk_encode_ref(xx, WW, b, 9, bp)
        pre = torch.relu((xx.float() - bp) @ WW.float() + b)
        _check(got, want, pre, 1e-4)


def test_topk_encode_ties_go_to_lower_index(device):
    """Integer-valued inputs make the matmul exact, so many values tie exactly (zeros included)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (257, 9), generator=g).double().to(device)
    W = torch.randint(-1, 2, (9, 301), generator=g).double().to(device)
    b = torch.randint(-1, 2, (301,), generator=g).double().to(device)
    for dtype in (torch.float32, torch.float64):
        for k in (1, 5, 64, 301):
            v, i = torch.ops.metalign_ops.topk_encode(x.to(dtype), W.to(dtype), b.to(dtype), k)
            rv, ri = kernels.topk_encode_ref(x.to(dtype), W.to(dtype), b.to(dtype), k)
            assert torch.equal(v, rv) and torch.equal(i, ri), (dtype, k)
    # all-zero post-activations: the k lowest indices, in order
    z = dict(device=device)
    v, i = torch.ops.metalign_ops.topk_encode(torch.zeros(3, 4, **z), torch.zeros(4, 10, **z), -torch.ones(10, **z), 4)
    assert torch.equal(i, torch.arange(4, **z).repeat(3, 1)) and (v == 0).all()


def test_topk_encode_many_rows_tiles_and_threads(device):
    """More rows and latents than one CPU block / tile, so every block and tile boundary is crossed."""
    x, W, b, bp = _inputs(1500, 24, 1100, torch.float64, seed=5, device=device)
    got = torch.ops.metalign_ops.topk_encode(x, W, b, 33, bp)
    want = kernels.topk_encode_ref(x, W, b, 33, bp)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows_per_block,threads", [(1, 1), (3, 32), (8, 256)])
@pytest.mark.parametrize("n,d,L,k", [(1, 3, 5, 5), (17, 11, 300, 7), (40, 33, 257, 64)])
def test_topk_encode_grid(rows_per_block, threads, n, d, L, k):
    """The CUDA launch grid, run on the CPU through the same __host__ __device__ functions."""
    if threads < rows_per_block:
        pytest.skip("needs rows_per_block <= threads")
    x, W, b, bp = _inputs(n, d, L, torch.float64, seed=2)
    got = torch.ops.metalign_ops.topk_encode_grid(x, W, b, k, bp, rows_per_block, threads)
    want = kernels.topk_encode_ref(x, W, b, k, bp)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    Wt = W.T.contiguous().T  # strided W, as the kernel indexes it
    assert torch.equal(torch.ops.metalign_ops.topk_encode_grid(x[:, :], Wt, b, k, None, rows_per_block, threads)[1],
                       kernels.topk_encode_ref(x, W, b, k)[1])


def test_topk_encode_entry_point_and_fallback(monkeypatch, device):
    x, W, b, bp = _inputs(50, 6, 20, torch.float64, device=device)
    want = kernels.topk_encode_ref(x, W, b, 4, bp)
    got = kernels.topk_encode(x, W, b, 4, bp)
    assert torch.equal(got[1], want[1])
    monkeypatch.setattr(kernels, "_ext", lambda: False)  # no compiler: the reference path
    assert torch.equal(kernels.topk_encode(x, W, b, 4, bp)[1], want[1])


def test_topk_encode_bad_input(device):
    x, W, b, bp = _inputs(10, 4, 6, device=device)
    op = torch.ops.metalign_ops.topk_encode
    with pytest.raises(RuntimeError, match="k must be in 1..n_latents = 6"):
        op(x, W, b, 7, None)
    with pytest.raises(RuntimeError, match="k must be in"):
        op(x, W, b, 0, None)
    with pytest.raises(RuntimeError, match="W_enc must have d = 4 rows"):
        op(x, W[:3], b, 2, None)
    with pytest.raises(RuntimeError, match="b_enc must be 1-D of length n_latents = 6"):
        op(x, W, b[:5], 2, None)
    with pytest.raises(RuntimeError, match="b_pre must be 1-D of length d = 4"):
        op(x, W, b, 2, bp[:3])
    with pytest.raises(ValueError, match="k = 7 must be in 1..n_latents = 6"):
        kernels.topk_encode(x, W, b, 7)
    xn = x.clone()
    xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="x has 1 NaN/inf"):
        kernels.topk_encode(xn, W, b, 2)
