"""Fast Walsh-Hadamard transform: the op against fwht_ref and an explicit Hadamard matrix (scipy) on odd batch
shapes, D = 1, 2, ..., non-contiguous input, float32/float64; the CUDA launch grids emulated on the CPU;
the gradient; bad input; each op test on every device of the `device` fixture."""
import pytest
import scipy.linalg
import torch

import kernels


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext(), "extension failed to build (run with KERNELS_REQUIRE=1 to see why)"


def _hadamard(D, dtype):
    return torch.from_numpy(scipy.linalg.hadamard(D)).to(dtype)


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-12, atol=1e-10)}


@pytest.mark.parametrize("D", [1, 2, 4, 8, 16, 32, 128, 1024])
@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwht_matches_hadamard_and_ref(D, lead, dtype, device):
    g = torch.Generator().manual_seed(D + len(lead))
    x = torch.randn(*lead, D, generator=g, dtype=torch.float64).to(dtype).to(device)
    got = torch.ops.metalign_ops.fwht(x)
    assert got.shape == x.shape and got.dtype == dtype and got.device == x.device
    want = (x.double() @ _hadamard(D, torch.float64).to(device)).to(dtype)  # H is symmetric: x H = (H x')'
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got, kernels.fwht_ref(x), **TOL[dtype])


@pytest.mark.parametrize("D", [1 << 15, 1 << 17, 1 << 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwht_long_vectors_cross_the_cache_blocks(D, dtype, device):
    # D beyond the 128 KiB pass-1 block (and CUDA's 16 KiB shared-memory chunk): the passes across blocks run
    x = torch.randn(3, D, dtype=dtype, device=device)
    torch.testing.assert_close(torch.ops.metalign_ops.fwht(x), kernels.fwht_ref(x), rtol=1e-4,
                               atol=1e-2 if dtype == torch.float32 else 1e-9)
    x1 = x[1]
    torch.testing.assert_close(torch.ops.metalign_ops.fwht(x1), kernels.fwht_ref(x1), rtol=1e-4,
                               atol=1e-2 if dtype == torch.float32 else 1e-9)
    # involution: H H = D I, so fwht(fwht(x)) / D = x (a check independent of the reference)
    torch.testing.assert_close(torch.ops.metalign_ops.fwht(torch.ops.metalign_ops.fwht(x.double())) / D, x.double(),
                               rtol=1e-9, atol=1e-9)


def test_fwht_noncontiguous_and_empty(device):
    z = dict(device=device)
    base = torch.randn(64, 6, 10, dtype=torch.float64, **z)
    for x in [base.permute(1, 2, 0), base[:, :, 1:9], torch.randn(8, 40, **z)[:, ::5], torch.randn(16, 32, **z).T,
              torch.randn(6, 64, **z).float()[::2, ::4]]:
        D = x.shape[-1]
        assert not x.is_contiguous()
        got = torch.ops.metalign_ops.fwht(x)
        torch.testing.assert_close(got, x.contiguous() @ _hadamard(D, x.dtype).to(device), **TOL[x.dtype])
        assert got.is_contiguous()
    e = torch.ops.metalign_ops.fwht(torch.empty(0, 4, **z))
    assert e.shape == (0, 4)


@pytest.mark.parametrize("shape,view", [((3, 1 << 16), None), ((5, 256), None), ((4, 1), None),
                                        ((64, 8), "T"), ((1 << 16, 1), None)])
def test_fwht_leaves_its_input_alone(shape, view, device):
    # the op copies blocks in during pass 1 (no separate clone); the input must come out untouched and the
    # output must be new memory, for contiguous, strided (gathered, then transformed in place) and D = 1 input
    x = torch.randn(*shape, dtype=torch.float64, device=device)
    x = x.T if view == "T" else x
    keep = x.clone()
    got = torch.ops.metalign_ops.fwht(x)
    torch.testing.assert_close(x, keep, rtol=0, atol=0)
    assert got.data_ptr() != x.data_ptr() and not got._is_view()
    want = keep.contiguous() @ _hadamard(x.shape[-1], x.dtype).to(device) if x.shape[-1] <= 4096 \
        else kernels.fwht_ref(keep)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    got.add_(1.0)  # writing the output must not reach the input
    torch.testing.assert_close(x, keep, rtol=0, atol=0)


@pytest.mark.parametrize("D,block,threads,max_blocks", [(1, 4, 1, 1), (2, 2, 1, 1), (8, 8, 3, 2), (64, 8, 4, 3),
                                                        (256, 16, 7, 5), (1024, 1024, 256, 65536),
                                                        (4096, 64, 32, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwht_grid_emulates_cuda(D, block, threads, max_blocks, dtype):
    # the CUDA kernels' launch grids (shared-memory levels, then one global pass per level, grid-stride when
    # capped) on the CPU with the same per-element functions (csrc/fwht_kernel.h)
    x = torch.randn(5, D, dtype=dtype)[::2]  # non-contiguous rows
    got = torch.ops.metalign_ops.fwht_grid(x, block, threads, max_blocks)
    torch.testing.assert_close(got, x.double().matmul(_hadamard(D, torch.float64)).to(dtype), **TOL[dtype])


def test_fwht_entry_point_gradient_and_fallback(device):
    x = torch.randn(4, 16, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(4, 16, dtype=torch.float64, device=device)
    (kernels.fwht(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, w @ _hadamard(16, torch.float64).to(device))  # d(x H . w)/dx = w H' = w H
    assert torch.autograd.gradcheck(kernels.fwht, (torch.randn(2, 8, dtype=torch.float64, device=device,
                                                               requires_grad=True),))
    assert torch.autograd.gradcheck(torch.ops.metalign_ops.fwht,  # the op itself is differentiable
                                    (torch.randn(3, 4, dtype=torch.float64, device=device, requires_grad=True),))
    h = torch.randn(3, 8, device=device).half()  # not an op dtype: the reference path
    torch.testing.assert_close(kernels.fwht(h).float(), h.float() @ _hadamard(8, torch.float32).to(device),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("fn", [kernels.fwht, kernels.fwht_ref])
def test_fwht_bad_input_python(fn):
    with pytest.raises(ValueError, match="power of two, got D = 12"):
        fn(torch.randn(3, 12))
    with pytest.raises(ValueError, match="power of two, got D = 0"):
        fn(torch.randn(3, 0))
    with pytest.raises(ValueError, match="at least one dimension"):
        fn(torch.tensor(1.0))


def test_fwht_bad_input_op(device):
    with pytest.raises(RuntimeError, match="power of two, got D = 6"):
        torch.ops.metalign_ops.fwht(torch.randn(2, 6, device=device))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.metalign_ops.fwht(torch.ones(2, 4, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="block_elems must be a power of two"):
        torch.ops.metalign_ops.fwht_grid(torch.randn(2, 8), 6, 4, 4)
