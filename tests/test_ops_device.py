"""Every op as torch sees it, on every device of the `device` fixture: registrations (torch.library.opcheck:
schema, fake kernel, autograd, AOT dispatch), torch.compile tracing through the ops without graph breaks, a kernel
for each device where one is expected, bad input rejected with the same message on every device; and the build
logic: a CPU-only library on a GPU node, the nvcc check's command line, allocations that follow the inputs' device."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.linalg
import torch

import kernels

ROOT = Path(__file__).resolve().parents[1]
OPS = torch.ops.metalign_ops
E64 = torch.empty(0, dtype=torch.int64)


@pytest.fixture(scope="module", autouse=True)
def ext():
    assert kernels._ext(), "extension failed to build (run with KERNELS_REQUIRE=1 to see why)"


def _csr(n=40, F=3, seed=0):
    """Functions over n rows: function f holds rows f, f + F, ... (strictly increasing), complement negatives."""
    g = torch.Generator().manual_seed(seed)
    idx = [torch.arange(f, n, F) for f in range(F)]
    ptr = torch.tensor([0] + [int(sum(len(i) for i in idx[:f + 1])) for f in range(F)])
    pidx = torch.cat(idx)
    return ptr, pidx, torch.rand(len(pidx), generator=g) + 0.1, E64, E64, torch.empty(0), torch.rand(F, generator=g)


def _ridge(n=12, p=5, t=4, m=3, device="cpu"):
    """Valid inputs of the ridge scoring ops on `device`: spectrum s (p,) with one dropped direction (s = z = b =
    xr = 0 there, as ridge_cv zeroes it), z and b (p, t), yy (t,), Gram (p, p) and rows (m, p) of the validation
    fold, rotated rows xr (n, p), y (n, t), an alpha basis (p, 2) and its coef (n_alphas, 2); alphas (n_alphas,)
    stay on the host (a parameter list the ops read there, as ridge_cv passes them)."""
    g = torch.Generator().manual_seed(1)
    f64 = dict(generator=g, dtype=torch.float64)
    s = torch.rand(p, **f64) * 10 + 1
    z, b, rows, xr, y = (torch.randn(*sh, **f64) for sh in ((p, t), (p, t), (m, p), (n, p), (n, t)))
    s[0], z[0], b[0], rows[:, 0], xr[:, 0] = 0.0, 0.0, 0.0, 0.0, 0.0
    alphas = torch.logspace(-2, 2, 6, dtype=torch.float64)
    basis, coef = torch.randn(p, 2, **f64), torch.randn(len(alphas), 2, **f64)
    dev = (s, z, b, torch.rand(t, **f64) * 50 + 1, rows.T @ rows, rows, xr, y, basis, coef)
    return (*(a.to(device) for a in dev), alphas)


def _samples(device="cpu"):
    """(op name, args) for every op, small and valid, on `device` (the *_grid ops are CPU only)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)
    X, Y = r(9, 4), r(9, 3)
    A, B = r(6, 3, dtype=torch.float64), r(5, 3, dtype=torch.float64)
    na, nb = (A ** 2).sum(1), (B ** 2).sum(1)
    tile = (A @ B.T, A @ B.T * 0.5, na, nb, na * 0.5, nb * 0.5, 0.3, 0.7, False)
    csr = tuple(t.to(device) for t in _csr())
    out = [("cka_shift_rows", (X, r(4))), ("cka_moments", (X, Y, r(4), r(3))), ("cka_rbf_tile", tile),
           ("rbf_kernel_tile", (A @ B.T, na, nb, 0.3, False)),
           ("episodes", (r(40, 5), *csr, 6, 4, 123)), ("topk_encode", (X, r(4, 11), r(11), 3, r(4))),
           ("topk_encode", (X, r(4, 11), r(11), 3, None)), ("fwht", (r(3, 8),))]
    s, z, b, yy, gram, rows, xr, y, basis, coef, al = _ridge(device=device)
    kfold, loo, gcv = (s, z, b, yy, gram, al, False), (xr, y, s, z, al, 1 / 12), (s, z, yy, al, 12.0, 1.0)
    out += [("ridge_score_kfold", kfold), ("ridge_score_kfold", (s, z, b, yy, rows, al, True)),
            ("ridge_score_kfold_basis", (*kfold, basis, coef)), ("ridge_score_loo", (*loo, 5)),
            ("ridge_score_loo_basis", (*loo, basis, coef, 5)), ("ridge_score_gcv", gcv)]
    if device == "cpu":
        out += [("cka_shift_rows_grid", (X, r(4), 4)), ("cka_rbf_tile_grid", (*tile, 2)),
                ("episodes_grid", (r(40, 5), *csr, 6, 4, 123, 8)),
                ("topk_encode_grid", (X, r(4, 11), r(11), 3, None, 2, 4)), ("fwht_grid", (r(3, 8), 4, 2, 2)),
                ("ridge_score_kfold_grid", (*kfold, 3)), ("ridge_score_loo_grid", (*loo, 5, 3)),
                ("ridge_score_loo_basis_grid", (*loo, basis, coef, 5, 3)), ("ridge_score_gcv_grid", (*gcv, 3))]
    return out


CUDA_OPS = ["cka_shift_rows", "cka_moments", "cka_rbf_tile", "rbf_kernel_tile", "episodes", "topk_encode", "fwht",
            "ridge_score_kfold", "ridge_score_kfold_basis", "ridge_score_loo", "ridge_score_loo_basis",
            "ridge_score_gcv"]


@pytest.mark.parametrize("op,args", _samples(), ids=[f"{o}-{i}" for i, (o, _) in enumerate(_samples())])
def test_opcheck(op, args):
    """Schema (no hidden mutation or aliasing), fake kernel (shapes, dtypes, strides as the real one), autograd
    registration and AOT dispatch with dynamic shapes; fwht also with inputs that require grad (its backward)."""
    torch.library.opcheck(getattr(OPS, op), args)
    if op == "fwht":
        torch.library.opcheck(OPS.fwht, (args[0].double().requires_grad_(),))


def test_compile_traces_through_the_ops():
    """torch.compile(fullgraph=True): the ops trace through their fake kernels with no graph break, and the
    compiled function gives the eager values (aot_eager: the traced graph run eagerly, no code generation)."""
    X, Y = torch.randn(50, 6), torch.randn(50, 4)
    csr = _csr(60, 3)
    feats = torch.randn(60, 5)

    def f(X, Y, feats, x8):
        xs, sq = OPS.cka_shift_rows(X, X.mean(0))
        m = OPS.cka_moments(X, Y, X.mean(0), Y.mean(0))
        v, i = OPS.topk_encode(X, torch.ones(6, 7), torch.zeros(7), 2, None)
        ep = OPS.episodes(feats, *csr, 4, 5, 0)
        k = OPS.rbf_kernel_tile(X.double() @ X.double().T, sq, sq, 0.1, True)
        return xs.sum() + m[2].sum() + v.sum() + ep[0].sum() + k.sum() + kernels.fwht(x8).sum()

    x8 = torch.randn(3, 16, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(X, Y, feats, x8), f(X, Y, feats, x8)
    torch.testing.assert_close(got, want)
    got.backward()  # fwht's autograd formula through the compiled graph: d sum(x H) / dx = 1' H
    torch.testing.assert_close(x8.grad, torch.ones(3, 16) @ torch.from_numpy(scipy.linalg.hadamard(16)).float())


def test_compile_traces_through_the_ridge_ops():
    """The ridge wrappers under torch.compile(fullgraph=True): every scoring op traced through its fake kernel, no
    graph break, the eager values."""
    s, z, b, yy, gram, rows, xr, y, basis, coef, al = _ridge()

    def f(s, z, b, yy, gram, rows, xr, y):
        out = [kernels.ridge_score_kfold(s, z, b, yy, gram, al, False),
               kernels.ridge_score_kfold(s, z, b, yy, rows, al, True),
               kernels.ridge_score_kfold_basis(s, z, b, yy, gram, al, False, basis, coef),
               *kernels.ridge_score_loo(xr, y, s, z, al, 1 / 12, 5),
               *kernels.ridge_score_loo_basis(xr, y, s, z, al, 1 / 12, basis, coef, 5),
               *kernels.ridge_score_gcv(s, z, yy, al, 12, 1)]
        return [o * 2 for o in out]  # something for the graph to compute around the ops

    args = (s, z, b, yy, gram, rows, xr, y)
    got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(*args), f(*args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_every_op_has_a_kernel_for_the_device(device):
    """Where torch sees a GPU the library must hold the CUDA kernels (else kernels._ext rebuilds or refuses)."""
    key = "CUDA" if device == "cuda" else "CPU"
    assert [op for op in CUDA_OPS if not kernels.has_kernel(op, key)] == []
    for op, args in _samples(device):
        assert kernels.use_op(op, *[a for a in args if isinstance(a, torch.Tensor)])


def _bad_inputs(device):
    """(op, args, message) triples: each op's bad input, and the message every device must give."""
    d = dict(device=device)
    f32, f64 = dict(**d), dict(dtype=torch.float64, **d)
    x = torch.randn(10, 4, **f32)
    W, b = torch.randn(4, 6, **f32), torch.randn(6, **f32)
    g, n5, n6 = torch.randn(5, 6, **f64), torch.rand(5, **f64), torch.rand(6, **f64)
    feats = torch.randn(40, 5, **f32)
    pp, pi, pv, np_, ni, nv, sc = (t.to(device) for t in _csr())
    return [
        ("cka_shift_rows", (x[0], torch.zeros(4, **f32)), "x must be 2-D \\(n_rows, d\\)"),
        ("cka_shift_rows", (x, torch.zeros(3, **f32)), "shift must be 1-D of length 4 \\(the columns of x\\)"),
        ("cka_shift_rows", (x.long(), torch.zeros(4, **f32)), "x must be floating point"),
        ("cka_moments", (x, x[:9], torch.zeros(4, **f32), torch.zeros(4, **f32)),
         "x and y must have the same number of rows, got 10 and 9"),
        ("cka_moments", (x, x, torch.zeros(4, **f32), torch.zeros(5, **f32)), "shift_y must be 1-D of length 4"),
        ("cka_rbf_tile", (g, g[:, :5], n5, n6, n5, n6, 1.0, 1.0, False), "gx and gy must be 2-D tiles of one shape"),
        ("cka_rbf_tile", (g.float(), g.float(), n5, n6, n5, n6, 1.0, 1.0, False), "gx and gy must be float64"),
        ("cka_rbf_tile", (g, g, n5, n5, n5, n6, 1.0, 1.0, False), "nxj must be float64 of length 6"),
        ("rbf_kernel_tile", (g, n6, n6, 1.0, False), "ni must be float64 of length 5"),
        ("rbf_kernel_tile", (g.float(), n5, n6, 1.0, False), "g must be a 2-D float64 Gram tile"),
        ("topk_encode", (x, W, b, 7, None), "topk_encode: k must be in 1..n_latents = 6, got 7"),
        ("topk_encode", (x, W[:3], b, 2, None), "topk_encode: W_enc must have d = 4 rows"),
        ("topk_encode", (x, W, b[:5], 2, None), "topk_encode: b_enc must be 1-D of length n_latents = 6"),
        ("topk_encode", (x, W, b, 2, torch.zeros(3, **f32)), "topk_encode: b_pre must be 1-D of length d = 4"),
        ("fwht", (torch.randn(2, 6, **f32),), "fwht: the last dimension of x must be a power of two, got D = 6"),
        ("fwht", (torch.ones(2, 4, dtype=torch.int32, **d),), "fwht: x must be float32 or float64"),
        ("episodes", (feats[0], pp, pi, pv, np_, ni, nv, sc, 4, 5, 0), "features must be 2-D"),
        ("episodes", (feats, pp, pi, pv, np_, ni, nv, sc[:2], 4, 5, 0), "mag_scale must be 1-D of length 3"),
        ("episodes", (feats, pp, pi, pv, np_, ni, nv, sc, 4, 0, 0), "length \\(L\\) must be >= 1"),
        ("episodes", (feats, pp, pi, pv, np_, ni, nv, sc, 4, 14, 0),
         "function 1 has 13 positives, fewer than the episode length L = 14"),
        ("episodes", (feats, pp + 1, pi, pv, np_, ni, nv, sc, 4, 5, 0),
         "pos_ptr must start at 0 and end at 40 \\(the length of pos_idx\\), got 1 .. 41"),
        ("episodes", (feats, pp, pi.flip(0), pv, np_, ni, nv, sc, 4, 5, 0),
         "pos_idx of function 0 must be strictly increasing row indices in \\[0, 40\\)"),
        ("episodes", (feats, pp, torch.where(pi == 38, 99, pi), pv, np_, ni, nv, sc, 4, 5, 0),
         "pos_idx of function 2 must be strictly increasing row indices in \\[0, 40\\)"),
        ("episodes", (feats[:16], pp, pi, pv, np_, ni, nv, sc, 4, 5, 0),
         "pos_idx of function 0 must be strictly increasing row indices in \\[0, 16\\)"),
    ] + _ridge_bad_inputs(device)


def _ridge_bad_inputs(device):
    """The ridge scoring ops' bad inputs (one set of checks in csrc/ridge_cpu.cpp serves the CPU and CUDA kernels):
    p = 5 directions, n = 12 rows, t = 4 targets, 6 alphas."""
    s, z, b, yy, gram, rows, xr, y, basis, coef, al = _ridge(device=device)
    return [
        ("ridge_score_kfold", (s, z[:3], b, yy, gram, al, False), "z must be 2-D \\(p, n_targets\\) with p = 5"),
        ("ridge_score_kfold", (s, z, b[:, :3], yy, gram, al, False), "b must have the shape of z"),
        ("ridge_score_kfold", (s, z, b.float(), yy, gram, al, False), "b must have the dtype of z"),
        ("ridge_score_kfold", (s, z, b, yy, rows, al, False),
         "quad \\(rotated validation Gram V'Xv'XvV\\) must be \\(p, p\\) with p = 5"),
        ("ridge_score_kfold", (s, z, b, yy, rows.float(), al, True), "quad must have the dtype of z"),
        ("ridge_score_kfold", (s.float(), z, b, yy, gram, al, False), "s must have the dtype of z"),
        ("ridge_score_kfold", (s, z, b, yy, gram, -al, False), "alphas must be positive"),
        ("ridge_score_kfold", (s, z.int(), b, yy, gram, al, False), "z must be float32 or float64"),
        ("ridge_score_gcv", (s, z, yy, -al, 12.0, 1.0), "alphas must be positive"),
        ("ridge_score_gcv", (s, z, yy, al[:0], 12.0, 1.0), "alphas must be 1-D and non-empty"),
        ("ridge_score_gcv", (s, z, yy[:3], al, 12.0, 1.0), "yy must be 1-D \\(n_targets,\\) of length 4"),
        ("ridge_score_gcv", (s, z, yy, al, 1.0, 1.0), "n \\(1\\) must exceed df0 \\(1\\)"),
        ("ridge_score_loo", (xr[:, :3], y, s, z, al, 0.05, 8),
         "xr \\(rotated centred rows X V\\) must be \\(n, p\\) with p = 5"),
        ("ridge_score_loo", (xr, y[:5], s, z, al, 0.05, 8), "y must be \\(n, n_targets\\) = \\(12, 4\\)"),
        ("ridge_score_loo", (xr.float(), y, s, z, al, 0.05, 8), "xr and y must have the dtype of z"),
        ("ridge_score_loo", (xr, y, s, z, al, 0.05, 0), "chunk_rows must be positive"),
        ("ridge_score_loo", (xr[:1], y[:1], s, z, al, 0.05, 8), "leave-one-out needs at least 2 rows"),
        ("ridge_score_loo_basis", (xr, y, s, z, al, 0.05, basis, coef[:3], 8),
         "coef must be \\(n_alphas, r\\) = \\(6, 2\\)"),
        ("ridge_score_loo_basis", (xr, y, s, z, al, 0.05, basis[:4], coef, 8), "basis must be \\(p, r\\) with p = 5"),
        ("ridge_score_kfold_basis", (s, z, b, yy, gram, al, False, basis[:4], coef),
         "basis must be \\(p, r\\) with p = 5"),
        ("ridge_score_kfold_basis", (s, z, b, yy, gram, al, False, basis, coef[:, :1]),
         "coef must be \\(n_alphas, r\\) = \\(6, 2\\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs("cpu"))))
def test_bad_input_same_message_on_every_device(case, device):
    op, args, msg = _bad_inputs(device)[case]
    with pytest.raises(RuntimeError, match=msg):
        getattr(OPS, op)(*args)


def test_mixed_devices_rejected(device):
    """A tensor on another device than the first one: a clear message, never a kernel reading host memory."""
    if device == "cpu":
        pytest.skip("needs a second device")
    x = torch.randn(10, 4, device=device)
    with pytest.raises(RuntimeError, match="shift must be on the device of x"):
        OPS.cka_shift_rows(x, torch.zeros(4))
    with pytest.raises(RuntimeError, match="must be on one device"):
        OPS.topk_encode(x, torch.randn(4, 6), torch.randn(6, device=device), 2, None)
    feats = torch.randn(40, 5, device=device)
    with pytest.raises(RuntimeError, match="the function tensors must be on the device of features"):
        OPS.episodes(feats, *_csr(), 4, 5, 0)
    s, z, b, yy, gram, rows, xr, y, basis, coef, al = _ridge(device=device)
    for msg, op, args in [("b must be on the device of z", OPS.ridge_score_kfold, (s, z, b.cpu(), yy, gram, al, False)),
                          ("yy must be on the device of z", OPS.ridge_score_gcv, (s, z, yy.cpu(), al, 12.0, 1.0)),
                          ("y must be on the device of z", OPS.ridge_score_loo, (xr, y.cpu(), s, z, al, 0.05, 8)),
                          ("coef must be on the device of z", OPS.ridge_score_loo_basis,
                           (xr, y, s, z, al, 0.05, basis, coef.cpu(), 8))]:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_missing_kernel_warns_or_raises(monkeypatch):
    """No kernel for the inputs' device: a warning naming the fix and the *_ref path, or, under
    KERNELS_REQUIRE=1, an error; never a silent fallback."""
    x, W, b = torch.randn(8, 4, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64), torch.zeros(9)
    monkeypatch.setattr(kernels, "has_kernel", lambda op, key="CPU": False)
    monkeypatch.setattr(kernels, "_NO_KERNEL_WARNED", set())
    monkeypatch.setenv("KERNELS_REQUIRE", "1")
    with pytest.raises(RuntimeError, match="metalign_ops::topk_encode has no CPU kernel"):
        kernels.topk_encode(x, W, b, 3)
    monkeypatch.setenv("KERNELS_REQUIRE", "0")
    with pytest.warns(UserWarning, match="metalign_ops::fwht has no CPU kernel .*using the torch reference"):
        y = kernels.fwht(x[:, :4])
    torch.testing.assert_close(y, kernels.fwht_ref(x[:, :4]))
    with pytest.warns(UserWarning, match="topk_encode has no CPU kernel .*Fix: rebuild the extension"):
        assert torch.equal(kernels.topk_encode(x, W, b, 3)[1], kernels.topk_encode_ref(x, W, b, 3)[1])


def test_library_cuda_marker(tmp_path):
    cpu, cuda = tmp_path / "cpu.so", tmp_path / "cuda.so"
    cpu.write_bytes(b"\0ELF" + b"x" * 5000)
    cuda.write_bytes(b"\0ELF" + b"x" * 3000 + kernels.CUDA_MARKER + b"y" * 100)
    assert not kernels.library_has_cuda(cpu) and kernels.library_has_cuda(cuda)
    src = (ROOT / "csrc" / "ops_cuda.cu").read_text()
    assert kernels.CUDA_MARKER.decode() in src and str(ROOT / "csrc" / "ops_cuda.cu") in kernels.CUDA_SOURCES


_PROBE = """
import sys, warnings, torch
torch.cuda.is_available = lambda: True  # as on a GPU node
import kernels
from torch.utils import cpp_extension
class Stop(BaseException):
    pass
def load(**kw):  # stands in for the JIT build: report what it was asked for
    print("JIT", kw["name"], kw["with_cuda"], sum(s.endswith(".cu") for s in kw["sources"]))
    raise Stop
cpp_extension.load = load
torch.ops.load_library = lambda path: print("LOADED", path)  # the library is never really loaded
kernels._prebuilt = lambda: sys.argv[1]
kernels.cuda_home = lambda: sys.argv[2] or None
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    try:
        kernels._ext()
    except RuntimeError as e:
        print("ERROR", e)
    except Stop:
        pass
    print("WARN", " | ".join(str(x.message) for x in w))
"""


@pytest.mark.parametrize("home,require", [("/usr/local/cuda", "0"), ("", "1"), ("", "0")])
def test_cpu_only_library_on_a_gpu_node(tmp_path, home, require):
    """A prebuilt library without CUDA kernels where torch sees a GPU: JIT-rebuilt with them when nvcc is there;
    without nvcc an error under KERNELS_REQUIRE=1 (nothing loaded), else a warning and the CPU library; both
    name the fix. (A subprocess with torch.cuda.is_available patched; no library is really loaded or built.)"""
    lib = tmp_path / "metalign_ops.cpython-311-x86_64-linux-gnu.so"
    lib.write_bytes(b"\0ELF no marker here")
    env = dict(os.environ, KERNELS_REQUIRE=require)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(lib), home], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300).stdout
    if home:
        assert f"JIT metalign_ops_cuda True {len(kernels.CUDA_SOURCES)}" in out, out
        assert "has no CUDA kernels (built without a GPU) but torch sees one: JIT-building" in out, out
        assert "LOADED" not in out
    elif require == "1":
        assert "ERROR" in out and "has no CUDA kernels but torch sees a GPU" in out and "CUDA_HOME" in out, out
        assert "LOADED" not in out
    else:
        assert f"LOADED {lib}" in out and "has no CUDA kernels but torch sees a GPU" in out and "make build" in out, out


def test_nvcc_command_is_the_real_builds(tmp_path):
    """The nvcc check compiles with the flags torch's own ninja build writes for this extension's .cu files
    (same defines, include paths, COMMON_NVCC_FLAGS, CUDA_CFLAGS, -fPIC, -std), for sm_80 and sm_90."""
    from torch.utils import cpp_extension
    cmd = kernels.nvcc_command(kernels.CUDA_SOURCES[0], tmp_path / "x.o")
    assert "-gencode=arch=compute_80,code=sm_80" in cmd and "-gencode=arch=compute_90,code=sm_90" in cmd
    for flag in kernels.CUDA_CFLAGS + cpp_extension.COMMON_NVCC_FLAGS + ["-std=c++20", "-fPIC"]:
        assert flag in cmd
    if not hasattr(cpp_extension, "_write_ninja_file_to_build_library"):
        pytest.skip("this torch has no ninja writer to compare with")
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = kernels.NVCC_ARCHS
    try:
        cpp_extension._write_ninja_file_to_build_library(
            tmp_path / "build.ninja", "metalign_ops", kernels.SOURCES + kernels.CUDA_SOURCES, kernels.CFLAGS,
            kernels.CUDA_CFLAGS, [], kernels.LDFLAGS, [str(kernels.CSRC)], True, False, False)
    finally:
        os.environ.pop("TORCH_CUDA_ARCH_LIST") if old is None else os.environ.update(TORCH_CUDA_ARCH_LIST=old)
    ninja = (tmp_path / "build.ninja").read_text().splitlines()
    flags = next(line for line in ninja if line.startswith("cuda_cflags = ")).split(" = ", 1)[1]
    want = set(flags.replace("'", "").replace("-isystem ", "-isystem=").split())
    got = set(" ".join(cmd[5:]).replace("-isystem ", "-isystem=").split())
    assert want - got == set(), "flags of the real build missing from the nvcc check"
    assert got - want == set(), "flags of the nvcc check that the real build does not use"


ALLOCATORS = {"zeros", "ones", "empty", "full", "tensor", "arange", "eye", "linspace", "logspace", "rand", "randn",
              "randint", "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like"}


def test_allocations_follow_the_inputs_device():
    """Every torch allocation in kernels.py's functions (the ops' wrappers and oracles, ridge_cv, CKA) names a
    device (or copies one with *_like / new_*), so nothing lands on the host behind a GPU caller's back."""
    tree = ast.parse((ROOT / "kernels.py").read_text())
    fns = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert {"ridge_cv", "ridge_cv_ref", "ridge_score_loo_ref", "ridge_alpha_basis"} <= {f.name for f in fns}
    bad = []
    for fn in fns:
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in ALLOCATORS and not node.func.attr.endswith("_like")
                    and not any(k.arg == "device" or k.arg is None for k in node.keywords)):
                bad.append(f"{fn.name}:{node.lineno} torch.{node.func.attr}")
    assert bad == []


def test_similarity_matrices_on_device(device):
    """geometry.similarity_matrices takes tensors on any device and computes there (RBF tiles from the op): the
    same matrices as from numpy input, to rounding."""
    import geometry
    g = torch.Generator().manual_seed(4)
    shared = torch.randn(90, 3, generator=g, dtype=torch.float64)
    models = [shared @ torch.randn(3, 5 + m, generator=g, dtype=torch.float64) * (m + 1)
              + torch.randn(90, 5 + m, generator=g, dtype=torch.float64) for m in range(3)]
    measures = ("cka_linear", "cka_rbf_1.0", "rsa_correlation")
    want = geometry.similarity_matrices([m.numpy() for m in models], measures, tile=32)
    got = geometry.similarity_matrices([m.to(device) for m in models], measures, tile=32)
    for k in measures:
        assert got[k].shape == (3, 3)
        assert abs(got[k] - want[k]).max() < 1e-10, k
    assert abs(want["cka_linear"][0, 1] - kernels.cka_ref(models[0], models[1]).item()) < 1e-10
    assert abs(want["cka_rbf_1.0"][0, 2] - kernels.cka_ref(models[0], models[2], kernel="rbf").item()) < 1e-10
