"""Streaming CKA: the ops against their *_ref oracles, cka against the Gram-matrix reference, invariances; each
op test on every device of the `device` fixture (cpu; cuda where a GPU is visible)."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext(), "extension failed to build (run with KERNELS_REQUIRE=1 to see why)"


def _pair(n, d1, d2, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d1, generator=g, dtype=torch.float64) * 2 + 5       # offset: centring matters
    Y = X[:, :1] * torch.randn(n, d2, generator=g, dtype=torch.float64) + torch.randn(n, d2, generator=g,
                                                                                      dtype=torch.float64) - 3
    return X.to(dtype), Y.to(dtype)


@pytest.mark.parametrize("n,d", [(1, 1), (7, 3), (129, 65), (1000, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cka_shift_rows(n, d, dtype, device):
    x, _ = _pair(n, d, 1, dtype)
    shift = torch.randn(d, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x, shift = x.to(device), shift.to(device)
    xs, sq = torch.ops.metalign_ops.cka_shift_rows(x, shift)
    rxs, rsq = kernels.cka_shift_rows_ref(x, shift)
    assert xs.dtype == rxs.dtype and sq.dtype == torch.float64 and xs.device == x.device
    torch.testing.assert_close(xs, rxs)
    torch.testing.assert_close(sq, rsq, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 32, 256])
@pytest.mark.parametrize("n,d", [(1, 1), (7, 300), (33, 513)])
def test_cka_shift_rows_grid(threads, n, d):
    """The CUDA launch grid, run on the CPU through the same __host__ __device__ functions."""
    x, _ = _pair(n, d, 1, torch.float32)
    x = x[:, :]  # rows contiguous
    shift = torch.randn(d)
    xs, sq = torch.ops.metalign_ops.cka_shift_rows_grid(x, shift, threads)
    rxs, rsq = kernels.cka_shift_rows_ref(x, shift)
    torch.testing.assert_close(xs, rxs)
    torch.testing.assert_close(sq, rsq, rtol=1e-10, atol=1e-10)
    xt = torch.randn(d, n).T  # non-contiguous: column stride != 1
    torch.testing.assert_close(torch.ops.metalign_ops.cka_shift_rows_grid(xt, shift, threads)[0], xt - shift)


@pytest.mark.parametrize("n,d1,d2", [(1, 1, 1), (7, 3, 5), (129, 65, 1), (1000, 300, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cka_moments(n, d1, d2, dtype, device):
    X, Y = (t.to(device) for t in _pair(n, d1, d2, dtype))
    sx, sy = X[: max(1, n // 3)].mean(0), Y[: max(1, n // 3)].mean(0)
    got = torch.ops.metalign_ops.cka_moments(X, Y, sx, sy)
    want = kernels.cka_moments_ref(X, Y, sx, sy)
    tol = dict(rtol=1e-10, atol=1e-8) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-2)
    for name, a, b in zip(["xx", "yy", "xy", "vx", "vy", "s"], got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape and a.device == X.device, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def test_cka_moments_noncontiguous_and_half(device):
    X, Y = (t.to(device) for t in _pair(301, 40, 22, torch.float32))
    Xn, Yn = X[:, ::2], Y.T.contiguous().T  # strided columns; column-major
    sx, sy = Xn.mean(0), Yn.mean(0)
    for a, b in zip(torch.ops.metalign_ops.cka_moments(Xn, Yn, sx, sy), kernels.cka_moments_ref(Xn, Yn, sx, sy)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-2)
    Xh, Yh = Xn.half(), Yn.half()
    for a, b in zip(torch.ops.metalign_ops.cka_moments(Xh, Yh, sx, sy), kernels.cka_moments_ref(Xh, Yh, sx, sy)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-2)


@pytest.mark.parametrize("n,d1,d2", [(7, 3, 5), (129, 64, 31), (1001, 17, 255)])
@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
def test_cka_matches_gram(n, d1, d2, debiased, chunk_rows, device):
    X, Y = _pair(n, d1, d2)
    got = kernels.cka(X.to(device), Y.to(device), debiased=debiased, chunk_rows=chunk_rows)
    want = kernels.cka_ref(X, Y, debiased=debiased)
    assert got.dim() == 0 and got.device.type == device
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item())), (got.item(), want.item())


def test_cka_float32_close_to_float64(device):
    X, Y = _pair(5000, 96, 200)
    for debiased in (False, True):
        assert abs(kernels.cka(X.float().to(device), Y.float().to(device), debiased=debiased, chunk_rows=999).item()
                   - kernels.cka_ref(X, Y, debiased=debiased).item()) < 1e-4


def test_cka_invariances(device):
    X, Y = (t.to(device) for t in _pair(500, 30, 20))
    base = kernels.cka(X, Y).item()
    Q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64, device=device))
    assert abs(kernels.cka(X @ Q, Y).item() - base) < 1e-10           # rotation
    assert abs(kernels.cka(X * 17.5, Y * 0.01).item() - base) < 1e-10  # isotropic scaling
    assert abs(kernels.cka(X + 100.0, Y).item() - base) < 1e-9         # translation
    for debiased in (False, True):
        assert abs(kernels.cka(X, X, debiased=debiased).item() - 1.0) < 1e-12
    # independent isotropic Gaussians: biased CKA ~ sqrt(d1 d2) / n = 0.0025 (E|X'Y|^2 = n d1 d2,
    # E|X'X|^2 ~ n^2 d1), the debiased estimator ~ 0
    g = torch.Generator().manual_seed(3)
    A, B = (torch.randn(4000, 10, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    assert abs(kernels.cka(A, B, debiased=True).item()) < 0.001
    assert 0.00125 < kernels.cka(A, B).item() < 0.00375


def test_cka_streams_from_hdf5(tmp_path, device):
    """HDF5 datasets read chunk by chunk; device= moves each chunk to the device as it is read."""
    X, Y = _pair(3001, 20, 12, torch.float32)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f.create_dataset("x", data=X.numpy(), chunks=(256, 20))
        f.create_dataset("y", data=Y.numpy().astype(np.float16), chunks=(256, 12))
    with h5py.File(tmp_path / "f.h5", "r") as f:
        got = kernels.cka(f["x"], f["y"], chunk_rows=500, device=device)
    assert got.device.type == device
    assert abs(got.item() - kernels.cka_ref(X, Y.half().float()).item()) < 1e-5


def test_cka_numpy_input_and_reference_fallback(monkeypatch):
    X, Y = _pair(200, 9, 4)
    want = kernels.cka_ref(X, Y).item()
    assert abs(kernels.cka(X.numpy(), Y.numpy()).item() - want) < 1e-10
    monkeypatch.setattr(kernels, "_ext", lambda: False)  # the path taken when no compiler is present
    assert abs(kernels.cka(X, Y).item() - want) < 1e-10


def test_cka_bad_input(device):
    X, Y = (t.to(device) for t in _pair(20, 3, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        kernels.cka(X, Y[:10])
    with pytest.raises(ValueError, match="expected 'linear' or 'rbf'"):
        kernels.cka(X, Y, kernel="laplace")
    with pytest.raises(ValueError, match="zero variance"):
        kernels.cka(torch.ones(20, 3, dtype=torch.float64, device=device), Y)
    with pytest.raises(ValueError, match="at least 4 rows"):
        kernels.cka(X[:3], Y[:3], debiased=True)
    with pytest.raises(RuntimeError, match="shift_x must be 1-D of length 3"):
        torch.ops.metalign_ops.cka_moments(X, Y, torch.zeros(4, device=device), torch.zeros(3, device=device))


@pytest.mark.parametrize("require,expect", [("1", "error"), ("0", "warning")])
def test_missing_compiler(tmp_path, require, expect):
    """No working compiler: one clear warning and the *_ref path, or an error under KERNELS_REQUIRE=1."""
    code = ("import warnings, torch, kernels\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    v = kernels.cka(torch.randn(50, 3, dtype=torch.float64), torch.randn(50, 2, dtype=torch.float64))\n"
            "print('WARN' if any('using the torch reference' in str(x.message) for x in w) else 'NOWARN', float(v))\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               METALIGN_PREBUILT="0", KERNELS_REQUIRE=require)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if expect == "error":
        assert r.returncode != 0 and "no-such-compiler" in r.stderr + r.stdout
    else:
        assert r.returncode == 0 and r.stdout.startswith("WARN"), r.stderr
