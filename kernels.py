"""Custom ops of metalign: one Python entry point per op, the build of csrc/, and the *_ref oracles.

    python kernels.py                # build or load the extension, print what was found
    python kernels.py --nvcc-check   # compile every csrc/*.cu to an object with nvcc (no GPU needed)
    python setup.py build_ext --inplace   # ahead-of-time build (make build), preferred when fresh

The extension is JIT-compiled with ninja into .cache/torch_extensions/ (or $TORCH_EXTENSIONS_DIR) the
first time an op is called (~30 s), then loaded from that cache. Ops live in the `metalign_ops`
TORCH_LIBRARY namespace (torch.ops.metalign_ops.*), with CPU (C++/OpenMP) kernels always and CUDA kernels
when torch sees a GPU. Without a compiler you get one warning and the *_ref path; with KERNELS_REQUIRE=1
(set by `make test`) that is an error instead.

Ops and entry points:
    cka(X, Y, kernel="linear", debiased=False)   streaming CKA over row chunks      oracle: cka_ref
    cka_moments(x, y, shift_x, shift_y)          one chunk's moments (op)          oracle: cka_moments_ref
    cka_shift_rows(x, shift)                     shifted rows + squared norms (op) oracle: cka_shift_rows_ref
"""
import functools
import logging
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = sorted(str(p) for p in CSRC.glob("*.cpp"))
CUDA_SOURCES = sorted(str(p) for p in CSRC.glob("*.cu"))
HEADERS = sorted(str(p) for p in CSRC.glob("*.h"))
CACHE = Path(os.environ.get("TORCH_EXTENSIONS_DIR", ROOT / ".cache" / "torch_extensions"))
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3", "--expt-relaxed-constexpr"]
CHUNK_ROWS = 8192  # rows per chunk when streaming: O(chunk * d) memory, large enough to keep BLAS busy


def _cuda_home():
    """The CUDA toolkit root (env, /usr/local/cuda, or where the `nvcc` on PATH really lives), or None."""
    for cand in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if cand and Path(cand, "bin", "nvcc").exists():
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    text = Path(nvcc).read_text(errors="ignore") if Path(nvcc).stat().st_size < 4096 else ""
    for tok in text.split():  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        if tok.endswith("/bin/nvcc") and Path(tok).exists():
            return str(Path(tok).parent.parent)
    return str(Path(nvcc).resolve().parent.parent)


def _prebuilt():
    """Path of an ahead-of-time build (setup.py build_ext --inplace) newer than every source, or None.
    METALIGN_PREBUILT=0 ignores it (forces the JIT build)."""
    if os.environ.get("METALIGN_PREBUILT") == "0":
        return None
    newest_src = max(os.path.getmtime(p) for p in SOURCES + CUDA_SOURCES + HEADERS)
    libs = [p for p in glob.glob(str(ROOT / "metalign_ops*.so")) if os.path.getmtime(p) >= newest_src]
    return libs[0] if libs else None


logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its "no CUDA runtime" note is noise here
if _cuda_home():  # before torch.utils.cpp_extension is imported, which reads it once
    os.environ.setdefault("CUDA_HOME", _cuda_home())


@functools.cache
def _ext():
    """Build/load the extension once per process; returns where it came from, or False (use *_ref)."""
    try:
        lib = _prebuilt()
        if lib:
            torch.ops.load_library(lib)
            return lib
        from torch.utils import cpp_extension
        with_cuda = bool(torch.cuda.is_available() and _cuda_home())
        name = "metalign_ops_cuda" if with_cuda else "metalign_ops"
        build = CACHE / name
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=SOURCES + (CUDA_SOURCES if with_cuda else []),
                           extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, extra_cuda_cflags=CUDA_CFLAGS,
                           extra_include_paths=[str(CSRC)], build_directory=str(build),
                           with_cuda=with_cuda, is_python_module=False, verbose=False)
        return str(build)
    except Exception as e:
        if os.environ.get("KERNELS_REQUIRE") == "1":
            raise
        warnings.warn(f"metalign custom kernels unavailable, using the torch reference (*_ref): {e}")
        return False


def has_kernel(op, device="CPU"):
    """True if torch.ops.metalign_ops.<op> has a kernel registered for the dispatch key `device`."""
    return bool(_ext()) and torch._C._dispatch_has_kernel_for_dispatch_key(f"metalign_ops::{op}", device)


def _compute_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# ---------------------------------------------------------------------------------------------------------
# streaming CKA
# ---------------------------------------------------------------------------------------------------------

def cka_shift_rows_ref(x, shift):
    """(x - shift, |x - shift|^2 per row): x (n, d) any float dtype -> (n, d) float32|64, (n,) float64."""
    xs = x.to(_compute_dtype(x, shift)) - shift.to(_compute_dtype(x, shift))
    return xs, (xs.double() ** 2).sum(1)


def cka_shift_rows(x, shift):
    if _ext():
        return torch.ops.metalign_ops.cka_shift_rows(x, shift)
    return cka_shift_rows_ref(x, shift)


def cka_moments_ref(x, y, shift_x, shift_y):
    """One chunk's moments for streaming CKA (see csrc/ops.cpp for the layout), all float64."""
    ct = _compute_dtype(x, y)
    xs, p = cka_shift_rows_ref(x.to(ct), shift_x.to(ct))
    ys, q = cka_shift_rows_ref(y.to(ct), shift_y.to(ct))
    xsd, ysd = xs.double(), ys.double()
    return ((xs.T @ xs).double(), (ys.T @ ys).double(), (xs.T @ ys).double(),
            torch.stack([xsd.sum(0), q @ xsd, p @ xsd]), torch.stack([ysd.sum(0), p @ ysd, q @ ysd]),
            torch.stack([torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
                         p.sum(), q.sum(), (p * q).sum(), (p * p).sum(), (q * q).sum()]))


def cka_moments(x, y, shift_x, shift_y):
    if _ext():
        return torch.ops.metalign_ops.cka_moments(x, y, shift_x, shift_y)
    return cka_moments_ref(x, y, shift_x, shift_y)


def _as_tensor(a):
    """A row block from a torch tensor, numpy array or h5py dataset slice, as a torch tensor."""
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _hsic_from_moments(cross, sa, sb, sab, n, debiased):
    """HSIC of centred linear kernels from |Xc'Yc|_F^2 and row-norm sums (Song et al. 2012 when debiased):
    with a_i = |xc_i|^2, b_i = |yc_i|^2 and zero-diagonal kernels K~, L~ of centred features,
    tr(K~L~) = cross - sum a b, 1'K~1 = -sum a, 1'K~L~1 = sum a b."""
    if not debiased:
        return cross
    return (cross - sab + sa * sb / ((n - 1) * (n - 2)) - 2 * sab / (n - 2)) / (n * (n - 3))


def _cka_from_moments(xx, yy, xy, vx, vy, s, debiased):
    n = s[0]
    mx, my = vx[0] / n, vy[0] / n  # means of the shifted data
    cxx = xx - n * torch.outer(mx, mx)
    cyy = yy - n * torch.outer(my, my)
    cxy = xy - n * torch.outer(mx, my)
    sp, sq, spq, spp, sqq = s[1], s[2], s[3], s[4], s[5]
    mx2, my2 = mx @ mx, my @ my
    # sums of a_i = |xs_i - mx|^2, b_i = |ys_i - my|^2 and their products, expanded in the raw moments
    sa, sb = sp - n * mx2, sq - n * my2
    sab = (spq - 2 * (my @ vy[1]) - 2 * (mx @ vx[1]) + my2 * sp + mx2 * sq + 4 * (mx @ xy @ my)
           - 3 * n * mx2 * my2)
    saa = spp - 4 * (mx @ vx[2]) + 2 * mx2 * sp + 4 * (mx @ xx @ mx) - 3 * n * mx2 * mx2
    sbb = sqq - 4 * (my @ vy[2]) + 2 * my2 * sq + 4 * (my @ yy @ my) - 3 * n * my2 * my2
    hxy = _hsic_from_moments((cxy ** 2).sum(), sa, sb, sab, n, debiased)
    hxx = _hsic_from_moments((cxx ** 2).sum(), sa, sa, saa, n, debiased)
    hyy = _hsic_from_moments((cyy ** 2).sum(), sb, sb, sbb, n, debiased)
    return hxy / torch.sqrt(hxx * hyy)


def cka(X, Y, kernel="linear", debiased=False, chunk_rows=CHUNK_ROWS):
    """Exact linear CKA between X (n, d1) and Y (n, d2) from one pass over row chunks -> 0-d float64 tensor.

    X and Y may be torch tensors, numpy arrays or h5py datasets (read chunk by chunk, so data larger
    than memory works); memory is O(d1^2 + d2^2 + d1 d2 + chunk_rows (d1 + d2)), never O(n^2).
    Each chunk's moments come from the fused op cka_moments (shift + row norms + weighted column sums in
    one pass, BLAS for the cross-products), accumulated in float64. debiased=True gives the unbiased
    HSIC estimator (Song et al. 2012) as in Kornblith et al. 2019 / Nguyen et al. 2021.
    """
    if kernel != "linear":
        raise ValueError(f"kernel={kernel!r}: only 'linear' is implemented (the RBF kernel is tracked in issue 7)")
    n = X.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"X and Y must have the same number of rows (images), got {n} and {Y.shape[0]}")
    if n < (4 if debiased else 2):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} rows{' when debiased' if debiased else ''}, got {n}")
    tot, shift_x, shift_y = None, None, None
    for start in range(0, n, chunk_rows):
        x, y = _as_tensor(X[start:start + chunk_rows]), _as_tensor(Y[start:start + chunk_rows])
        if shift_x is None:  # the first chunk's means: keeps later moments near-centred (see csrc/cka_kernel.h)
            shift_x, shift_y = x.to(_compute_dtype(x)).mean(0), y.to(_compute_dtype(y)).mean(0)
        m = cka_moments(x, y, shift_x, shift_y)
        tot = list(m) if tot is None else [a + b for a, b in zip(tot, m)]
    value = _cka_from_moments(*tot, debiased=debiased)
    if not torch.isfinite(value):
        raise ValueError("CKA is undefined: X or Y has zero variance (a constant representation)")
    return value


def cka_ref(X, Y, kernel="linear", debiased=False):
    """Gram-matrix CKA in float64 (the oracle): n x n linear kernels centred by row/column means, as
    thingsvision computes it; debiased uses the unbiased HSIC of Song et al. 2012 on the raw kernels."""
    if kernel != "linear":
        raise ValueError(f"kernel={kernel!r}: only 'linear' is implemented")
    X, Y = _as_tensor(X).double(), _as_tensor(Y).double()
    K, L = X @ X.T, Y @ Y.T
    n = K.shape[0]

    def hsic(K, L):
        if not debiased:
            Kc = K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()
            Lc = L - L.mean(0, keepdim=True) - L.mean(1, keepdim=True) + L.mean()
            return (Kc * Lc).sum()
        Kt, Lt = K - torch.diag(torch.diag(K)), L - torch.diag(torch.diag(L))
        one = torch.ones(n, dtype=K.dtype, device=K.device)
        return ((Kt * Lt).sum() + (one @ Kt @ one) * (one @ Lt @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))

    return hsic(K, L) / torch.sqrt(hsic(K, K) * hsic(L, L))


# ---------------------------------------------------------------------------------------------------------
# report and nvcc check
# ---------------------------------------------------------------------------------------------------------

def report():
    src = _ext()
    ops = sorted({sc.name.split("::")[1] for sc in torch._C._jit_get_all_schemas()
                  if sc.name.startswith("metalign_ops::")}) if src else []
    keys = {op: [k for k in ("CPU", "CUDA") if has_kernel(op, k)] for op in ops}
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})",
             f"extension: {src or 'NOT BUILT, using *_ref'}",
             f"cache: {CACHE}",
             f"OpenMP threads: {torch.get_num_threads()} (torch intra-op; set OMP_NUM_THREADS to change)",
             f"nvcc: {_cuda_home() or 'not found'}"]
    lines += [f"  metalign_ops::{op:<22} {'+'.join(keys[op]) or 'no kernel'}" for op in ops]
    return "\n".join(lines)


def nvcc_check(out_dir=ROOT / "build" / "nvcc"):
    """Compile every csrc/*.cu to an object file against torch's headers; raises on the first failure."""
    from torch.utils import cpp_extension
    home = _cuda_home()
    if home is None:
        print("nvcc not found: skipping the CUDA compile check")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    incs = cpp_extension.include_paths() + [str(Path(home, "include")), sysconfig.get_paths()["include"], str(CSRC)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    objs = []
    for cu in CUDA_SOURCES:
        obj = out_dir / (Path(cu).stem + ".o")
        cmd = [str(Path(home, "bin", "nvcc")), "-c", cu, "-o", str(obj), "-std=c++20", "-O1",
               "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=metalign_ops",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-gencode=arch=compute_90,code=sm_90",
               *cpp_extension.COMMON_NVCC_FLAGS, *[f"-I{i}" for i in incs]]
        print("nvcc", Path(cu).name, "->", obj)
        subprocess.run(cmd, check=True)
        objs.append(obj)
    return objs


if __name__ == "__main__":
    if "--nvcc-check" in sys.argv[1:]:
        nvcc_check()
    else:
        print(report())
