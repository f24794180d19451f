"""Custom ops of metalign: one Python entry point per op, the build of csrc/, and the *_ref oracles.

    python kernels.py                # build or load the extension, print what was found
    python kernels.py --nvcc-check   # compile every csrc/*.cu with the real build's nvcc flags for sm_80 and
                                     # sm_90 (NVCC_ARCHS; no GPU needed)
    python setup.py build_ext --inplace   # ahead-of-time build (make build), preferred when fresh

The extension is JIT-compiled with ninja into .cache/torch_extensions/ (or $TORCH_EXTENSIONS_DIR) the
first time an op is called (~30 s), then loaded from that cache. Ops live in the `metalign_ops`
TORCH_LIBRARY namespace (torch.ops.metalign_ops.*), with CPU (C++/OpenMP) kernels always and CUDA kernels
when torch sees a GPU. Without a compiler you get one warning and the *_ref path; with KERNELS_REQUIRE=1
(set by `make test`) that is an error instead. Every entry point runs on its inputs' device; an op without a
kernel for that device (a CPU-only build on a GPU node) warns, or raises under KERNELS_REQUIRE=1 (use_op).

Ops and entry points:
    cka(X, Y, kernel="linear", debiased=False)   streaming CKA over row chunks      oracle: cka_ref
    cka_moments(x, y, shift_x, shift_y)          one chunk's moments (op)          oracle: cka_moments_ref
    cka_shift_rows(x, shift)                     shifted rows + squared norms (op) oracle: cka_shift_rows_ref
    cka(X, Y, kernel="rbf", sigma=None)          RBF CKA from Gram tiles             oracle: cka_ref
    cka_rbf_tile(gx, gy, nxi, nxj, nyi, nyj, ...) one tile's kernel sums (op)       oracle: cka_rbf_tile_ref
    rbf_kernel_tile(g, ni, nj, gamma, diagonal)  one RBF kernel tile (op)          oracle: rbf_kernel_tile_ref
    median_sq_dist(X)                            exact median squared distance (tiles), as np.median
    episodes(features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale, n_episodes, length, seed,
             first=0)
                                                 B meta-learning episodes (op)     oracle: episodes_ref
    ridge_cv(X, Y, alphas, cv=5|"loo"|"gcv"|groups, fit_intercept=True)  per-target RidgeCV, Y streamed
                                                 from HDF5 in target batches       oracle: ridge_cv_ref
    ridge_score_kfold(s, z, b, yy, quad, alphas, rows)  every alpha x target, one fold (op)  ridge_score_kfold_ref
    ridge_score_loo(xr, y, s, z, alphas, h0, chunk_rows) exact LOO + argmin (op)    oracle: ridge_score_loo_ref
    ridge_score_gcv(s, z, yy, alphas, n, df0)    GCV + argmin, O(p) per alpha (op)  oracle: ridge_score_gcv_ref
    ridge_score_loo_basis(xr, y, s, z, alphas, h0, basis, coef, chunk_rows)  LOO via a few alpha-basis GEMMs
                                                 (op; basis from ridge_alpha_basis)  oracle: ridge_score_loo_basis_ref
    ridge_score_kfold_basis(s, z, b, yy, quad, alphas, rows, basis, coef)  k-fold via the alpha basis (op)
                                                 oracle: ridge_score_kfold_basis_ref
    topk_encode(x, W_enc, b_enc, k, b_pre=None)  fused SAE encode: matmul tiles + bias + ReLU + running top-k
                                                 per row (op)                      oracle: topk_encode_ref
    fwht(x)                                      unnormalised fast Walsh-Hadamard transform over the last dim
                                                 (a power of two), batched, differentiable (op)  oracle: fwht_ref
"""
import bisect
import concurrent.futures
import functools
import logging
import glob
import math
import mmap
import os
import shutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import NamedTuple

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
CUDA_MARKER = b"metalign_ops: built with CUDA kernels"  # csrc/ops_cuda.cu: present only in builds with CUDA kernels
NVCC_ARCHS = "8.0;9.0"  # what `make nvcc` compiles for: A100 (sm_80) and H100/H200 (sm_90) nodes
CHUNK_ROWS = 8192  # rows per chunk when streaming: O(chunk * d) memory, large enough to keep BLAS busy
RBF_TILE = 2048    # Gram tile edge for RBF CKA: two float64 tiles = 64 MiB, whatever n is
RBF_WHOLE_BYTES = 2 << 30  # RBF CKA keeps whole (n, n) float64 Gram matrices below this (n <= ~9,400), else tiles


def cuda_home():
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


def library_has_cuda(lib):
    """Whether a built library holds the CUDA kernels (csrc/ops_cuda.cu's marker string), read without loading
    it: a library loads once per process, so a CPU-only build must be recognised before it is loaded."""
    with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(CUDA_MARKER) >= 0


def _require_or_warn(msg):
    """KERNELS_REQUIRE=1 (make test, make gpu-check): an error; otherwise one warning."""
    if os.environ.get("KERNELS_REQUIRE") == "1":
        raise RuntimeError(msg)
    warnings.warn(msg, stacklevel=3)


logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # its "no CUDA runtime" note is noise here
if cuda_home():  # before torch.utils.cpp_extension is imported, which reads it once
    os.environ.setdefault("CUDA_HOME", cuda_home())

NO_NVCC_FIX = ("install a CUDA toolkit whose nvcc matches torch.version.cuda, put it on PATH or set CUDA_HOME, "
               "then run `make build` on this node")


@functools.cache
def _ext():
    """Build/load the extension once per process; returns where it came from, or False (use *_ref).

    Where torch sees a GPU, CUDA kernels are expected: a prebuilt library without them (built on a node
    without a GPU) is not loaded; the extension is JIT-built with them instead, or, without nvcc, the CPU
    library is loaded with a warning (an error under KERNELS_REQUIRE=1) that names the fix."""
    try:
        gpu = torch.cuda.is_available()
        lib = _prebuilt()
        if lib and gpu and not library_has_cuda(lib):
            if cuda_home() is None:
                _require_or_warn(f"{lib} has no CUDA kernels but torch sees a GPU, and no nvcc was found to build "
                                 f"them: CUDA tensors will use the slow *_ref paths. Fix: {NO_NVCC_FIX}")
            else:
                warnings.warn(f"{lib} has no CUDA kernels (built without a GPU) but torch sees one: JIT-building "
                              f"the extension with them into {CACHE}. `make build` on this node builds them "
                              "ahead of time (setup.py compiles CUDA sources where torch sees a GPU, or with "
                              "FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST)")
                lib = None
        if lib:
            torch.ops.load_library(lib)
            _register_fakes()
            return lib
        from torch.utils import cpp_extension
        with_cuda = bool(gpu and cuda_home())
        if gpu and not with_cuda:
            _require_or_warn(f"torch sees a GPU but no nvcc was found: building the CPU kernels only, CUDA tensors "
                             f"will use the slow *_ref paths. Fix: {NO_NVCC_FIX}")
        name = "metalign_ops_cuda" if with_cuda else "metalign_ops"
        build = CACHE / name
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name=name, sources=SOURCES + (CUDA_SOURCES if with_cuda else []),
                           extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, extra_cuda_cflags=CUDA_CFLAGS,
                           extra_include_paths=[str(CSRC)], build_directory=str(build),
                           with_cuda=with_cuda, is_python_module=False, verbose=False)
        _register_fakes()
        return str(build)
    except Exception as e:
        if os.environ.get("KERNELS_REQUIRE") == "1":
            raise
        warnings.warn(f"metalign custom kernels unavailable, using the torch reference (*_ref): {e}")
        return False


def extension():
    """Where the loaded extension came from (a path), or False when the *_ref oracles are in use."""
    return _ext()


def has_kernel(op, device="CPU"):
    """True if torch.ops.metalign_ops.<op> has a kernel registered for the dispatch key `device`."""
    return bool(_ext()) and torch._C._dispatch_has_kernel_for_dispatch_key(f"metalign_ops::{op}", device)


def _dispatch_key(*ts):
    """The dispatch key an op call on these tensors goes to: CUDA if any is a CUDA tensor, else CPU."""
    devs = {t.device.type for t in ts if isinstance(t, torch.Tensor)}
    return "CUDA" if "cuda" in devs else ("CPU" if devs <= {"cpu"} else sorted(devs - {"cpu"})[0].upper())


_NO_KERNEL_WARNED = set()


def use_op(op, *ts):
    """True: call torch.ops.metalign_ops.<op> on these tensors; False: use <op>_ref. False without the extension
    (_ext already warned), or when the op has no kernel for the tensors' device (a CPU-only build on a GPU node):
    then a warning once per (op, device), or an error under KERNELS_REQUIRE=1, naming the fix; never silently.
    Under torch.compile the op itself is traced (its fake kernel): the library was loaded by an eager call."""
    if torch.compiler.is_compiling():
        return True
    if not _ext():
        return False
    key = _dispatch_key(*ts)
    if has_kernel(op, key):
        return True
    msg = (f"metalign_ops::{op} has no {key} kernel in {_ext()}: using the torch reference (slow). "
           + (f"Fix: {NO_NVCC_FIX}" if key == "CUDA" else "Fix: rebuild the extension (make build)"))
    if os.environ.get("KERNELS_REQUIRE") == "1":
        raise RuntimeError(msg)
    if (op, key) not in _NO_KERNEL_WARNED:
        _NO_KERNEL_WARNED.add((op, key))
        warnings.warn(msg, stacklevel=3)
    return False


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
    if use_op("cka_shift_rows", x, shift):
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
    if use_op("cka_moments", x, y, shift_x, shift_y):
        return torch.ops.metalign_ops.cka_moments(x, y, shift_x, shift_y)
    return cka_moments_ref(x, y, shift_x, shift_y)


def _as_tensor(a, device=None):
    """A row block from a torch tensor, numpy array or h5py dataset slice, as a torch tensor: on `device` when
    given, else where it is (host memory for numpy and h5py)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t if device is None else t.to(device, non_blocking=True)


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


def cka(X, Y, kernel="linear", debiased=False, sigma=None, sigma_frac=1.0, chunk_rows=CHUNK_ROWS, tile=RBF_TILE,
        device=None, whole_bytes=RBF_WHOLE_BYTES):
    """Exact CKA between X (n, d1) and Y (n, d2) -> 0-d float64 tensor, on the inputs' device (or `device`).

    kernel="linear": one pass over row chunks (below). kernel="rbf": k(x, y) = exp(-|x - y|^2 / (2 sigma^2));
    a number `sigma` is the bandwidth for both X and Y; sigma=None is the median heuristic per matrix,
    sigma = sigma_frac * sqrt(median squared distance) (Kornblith et al. 2019). RBF CKA is computed from
    (tile x tile) Gram tiles that are never stored whole: memory O(n + tile^2), see _cka_rbf.

    X and Y may be torch tensors, numpy arrays or h5py datasets (read chunk by chunk, so data larger
    than memory works); memory is O(d1^2 + d2^2 + d1 d2 + chunk_rows (d1 + d2)), never O(n^2).
    Each chunk's moments come from the fused op cka_moments (shift + row norms + weighted column sums in
    one pass, BLAS for the cross-products), accumulated in float64. debiased=True gives the unbiased
    HSIC estimator (Song et al. 2012) as in Kornblith et al. 2019 / Nguyen et al. 2021.

    Every op runs where the data is: CUDA tensors stay on their GPU; `device="cuda"` moves each numpy / h5py
    chunk there as it is read. The only host reads are the scalar checks (zero variance) and, for RBF, the
    median heuristic's bandwidths.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel={kernel!r}: expected 'linear' or 'rbf'")
    n = X.shape[0]
    if Y.shape[0] != n:
        raise ValueError(f"X and Y must have the same number of rows (images), got {n} and {Y.shape[0]}")
    if n < (4 if debiased else 2):
        raise ValueError(f"CKA needs at least {4 if debiased else 2} rows{' when debiased' if debiased else ''}, "
                         f"got {n}")
    if kernel == "rbf":
        return _cka_rbf(X, Y, sigma, sigma_frac, debiased, tile, device, whole_bytes)
    tot, shift_x, shift_y = None, None, None
    for start in range(0, n, chunk_rows):
        x, y = _as_tensor(X[start:start + chunk_rows], device), _as_tensor(Y[start:start + chunk_rows], device)
        if shift_x is None:  # the first chunk's means: keeps later moments near-centred (see csrc/cka_kernel.h)
            shift_x, shift_y = x.to(_compute_dtype(x)).mean(0), y.to(_compute_dtype(y)).mean(0)
        m = cka_moments(x, y, shift_x, shift_y)
        tot = list(m) if tot is None else [a + b for a, b in zip(tot, m)]
    value = _cka_from_moments(*tot, debiased=debiased)
    if not torch.isfinite(value):
        raise ValueError("CKA is undefined: X or Y has zero variance (a constant representation)")
    return value


def cka_ref(X, Y, kernel="linear", debiased=False, sigma=None, sigma_frac=1.0):
    """Gram-matrix CKA in float64 (the oracle): n x n kernels centred by row/column means, as thingsvision
    computes it; debiased uses the unbiased HSIC of Song et al. 2012 on the raw kernels. RBF bandwidths as
    Kornblith et al.'s reference code: sigma^2 = sigma_frac^2 * np.median of the full squared-distance matrix."""
    X, Y = _as_tensor(X).double(), _as_tensor(Y).double()
    if kernel == "linear":
        K, L = X @ X.T, Y @ Y.T
    elif kernel == "rbf":
        def rbf(A):
            D = torch.cdist(A, A) ** 2
            D.fill_diagonal_(0)
            s2 = sigma ** 2 if sigma is not None else sigma_frac ** 2 * float(np.median(D.cpu().numpy()))
            return torch.exp(-D / (2 * s2))
        K, L = rbf(X), rbf(Y)
    else:
        raise ValueError(f"kernel={kernel!r}: expected 'linear' or 'rbf'")
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
# episodes: fused episode construction for meta-learning
# ---------------------------------------------------------------------------------------------------------

_M64 = (1 << 64) - 1


def _ep_mix(z):
    """splitmix64 finalizer on Python ints (csrc/episodes_kernel.h ep_mix)."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _ep_draws(seed, b):
    key = _ep_mix((seed & _M64) ^ _ep_mix(b))
    return lambda i: _ep_mix((key + i * 0xD1B54A32D192ED03) & _M64)


def _ep_floyd(draw, first, k, m):
    out = []
    for c in range(k):
        j = m - k + c
        t = (draw(first + c) * (j + 1)) >> 64
        out.append(j if t in out else t)
    return out


def episodes_ref(features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale, n_episodes, length, seed,
                 first=0):
    """The oracle of kernels.episodes: the same RNG contract (csrc/episodes_kernel.h) in Python integers,
    one episode at a time; same signature and outputs."""
    if first < 0:
        raise ValueError(f"first (index of the first episode) must be >= 0, got {first}")
    n, d = features.shape
    F, L = pos_ptr.numel() - 1, length
    pp, pi, pv = pos_ptr.tolist(), pos_idx.tolist(), pos_val.double().tolist()  # the oracle: Python integers
    has_neg = neg_ptr.numel() > 0
    if has_neg:
        npp, ni, nv = neg_ptr.tolist(), neg_idx.tolist(), neg_val.double().tolist()
    scale = mag_scale.double().tolist()
    rows, y, mag, fn = [], [], [], []
    for b in range(n_episodes):
        draw = _ep_draws(seed, first + b)
        f = (draw(0) * F) >> 64
        u1 = ((draw(1) >> 11) + 0.5) * 2.0 ** -53
        u2 = (draw(2) >> 11) * 2.0 ** -53
        z = math.sqrt(-2.0 * math.log(u1)) * math.cos(6.283185307179586 * u2)
        n_pos = int(min(max(math.floor(0.5 * L + 0.05 * L * z + 0.5), 0), L))
        p0, pc = pp[f], pp[f + 1] - pp[f]
        r, yy, mm = [], [], []
        for k in _ep_floyd(draw, 3, n_pos, pc):
            r.append(pi[p0 + k])
            yy.append(1.0)
            mm.append(pv[p0 + k] * scale[f])
        if has_neg:
            n0, nc = npp[f], npp[f + 1] - npp[f]
        else:
            keys, nc = [p - q for q, p in enumerate(pi[p0:p0 + pc])], n - pc  # P[q] - q, non-decreasing
        for k in _ep_floyd(draw, 3 + n_pos, L - n_pos, nc):
            if has_neg:
                r.append(ni[n0 + k])
                mm.append(nv[n0 + k] * scale[f])
            else:  # the k-th row that is not a positive
                r.append(k + bisect.bisect_right(keys, k))
                mm.append(0.0)
            yy.append(0.0)
        for i in range(L - 1, 0, -1):  # Fisher-Yates
            j = (draw(3 + L + (L - 1 - i)) * (i + 1)) >> 64
            for a in (r, yy, mm):
                a[i], a[j] = a[j], a[i]
        rows.append(r)
        y.append(yy)
        mag.append(mm)
        fn.append(f)
    dev, dt = features.device, features.dtype
    rows = torch.tensor(rows, dtype=torch.int64, device=dev).reshape(n_episodes, L)
    y = torch.tensor(y, dtype=torch.float64, device=dev).reshape(n_episodes, L)
    mag = torch.tensor(mag, dtype=torch.float64, device=dev).reshape(n_episodes, L).to(dt)
    fn = torch.tensor(fn, dtype=torch.int64, device=dev)
    prev = torch.cat([torch.zeros(n_episodes, 1, dtype=dt, device=dev), mag[:, :-1]], 1)  # previous magnitude
    x = torch.cat([prev[..., None], features[rows]], 2)  # (B, L, 1 + d)
    return x, y.to(dt), mag, fn, rows


def episodes(features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale, n_episodes, length, seed,
             first=0):
    """Batched episodes in one fused op -> x (B, L, 1+d), y (B, L), mag (B, L), fn (B,), rows (B, L).

    features (n_images, d) float (output dtype = features dtype); functions as CSR over image rows:
    pos_ptr (F+1,) int64, pos_idx (nnz,) int64 strictly increasing per function, pos_val (nnz,) magnitudes;
    neg_ptr/neg_idx/neg_val the same for negatives, or empty tensors for "negatives = every other row,
    magnitude 0" (SAE functions); mag_scale (F,) (1 / magnitude std per function, dtype of pos_val).
    Episode b picks f uniformly, n_pos ~ round(N(L/2, L/20)) clamped to [0, L], n_pos positives and L - n_pos
    negatives without replacement, shuffled; x[b, t] = [mag[b, t-1] (0 at t = 0), features[rows[b, t]]],
    y = 1 for positives, mag = magnitude * mag_scale[f]. Every function needs >= L positives and negatives.
    Deterministic given seed (counter-based RNG, csrc/episodes_kernel.h), whatever the thread count or device:
    the outputs are on the features' device, where every tensor must be. The op validates the CSR lists on
    that device before sampling (on CUDA: two small kernels and one 8-byte read of the verdict).
    Output episode b is episode first + b of the seed's stream: episodes(..., B, L, seed)[k:k + m] equals
    episodes(..., m, L, seed, first=k), so each DDP rank builds only its own slice of a global batch.
    """
    args = (features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale, int(n_episodes), int(length),
            int(seed), int(first))
    if use_op("episodes", features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale):
        return torch.ops.metalign_ops.episodes(*args)
    return episodes_ref(*args)


def cka_rbf_tile_ref(gx, gy, nxi, nxj, nyi, nyj, gamma_x, gamma_y, diagonal):
    """One Gram-tile pair -> (row_k, col_k, row_l, col_l, [sum kl, sum k^2, sum l^2]), all float64."""
    def kern(g, ni, nj, gamma):
        d2 = (ni[:, None] + nj[None, :] - 2 * g).clamp_min(0)
        if diagonal:
            d2.fill_diagonal_(0)
        return torch.exp(-gamma * d2)
    K, L = kern(gx, nxi, nxj, gamma_x), kern(gy, nyi, nyj, gamma_y)
    return K.sum(1), K.sum(0), L.sum(1), L.sum(0), torch.stack([(K * L).sum(), (K * K).sum(), (L * L).sum()])


def cka_rbf_tile(gx, gy, nxi, nxj, nyi, nyj, gamma_x, gamma_y, diagonal):
    if use_op("cka_rbf_tile", gx, gy, nxi, nxj, nyi, nyj):
        return torch.ops.metalign_ops.cka_rbf_tile(gx, gy, nxi, nxj, nyi, nyj, gamma_x, gamma_y, diagonal)
    return cka_rbf_tile_ref(gx, gy, nxi, nxj, nyi, nyj, gamma_x, gamma_y, diagonal)


def rbf_kernel_tile_ref(g, ni, nj, gamma, diagonal):
    """One RBF kernel tile (ti, tj) float64 from its Gram tile g = Ai Aj' and squared row norms ni, nj."""
    d2 = (ni[:, None] + nj[None, :] - 2 * g).clamp_min(0)
    if diagonal:
        d2.fill_diagonal_(0)
    return torch.exp(-gamma * d2)


def rbf_kernel_tile(g, ni, nj, gamma, diagonal):
    """exp(-gamma max(ni + nj - 2 g, 0)) in one pass (the op's rbf_from_gram, as in cka_rbf_tile), 1 on the
    diagonal of a diagonal tile; g, ni, nj float64 on one device -> (ti, tj) float64 there."""
    if use_op("rbf_kernel_tile", g, ni, nj):
        return torch.ops.metalign_ops.rbf_kernel_tile(g, ni, nj, float(gamma), bool(diagonal))
    return rbf_kernel_tile_ref(g, ni, nj, gamma, diagonal)


def centred(X, device=None):
    """(centred rows in the compute dtype, their squared norms in float64), on X's device (or `device`):
    distances are translation invariant, and centring keeps |xi|^2 + |xj|^2 - 2 xi.xj from cancelling
    catastrophically."""
    X = _as_tensor(X[:] if not isinstance(X, torch.Tensor) else X, device)
    ct = _compute_dtype(X)
    Xd = X.double()
    Xc = Xd - Xd.mean(0)
    return Xc.to(ct), (Xc ** 2).sum(1)


def tile_pairs(n, tile):
    """Upper-triangle tile pairs (i0, i1, j0, j1), j0 >= i0: each unordered pair of rows once."""
    edges = list(range(0, n, tile)) + [n]
    for a in range(len(edges) - 1):
        for b in range(a, len(edges) - 1):
            yield edges[a], edges[a + 1], edges[b], edges[b + 1]


def _offdiag_sq_dists(Xc, norms, tile):
    """Squared distances of every unordered pair i < j, one float64 tile at a time (generator)."""
    for i0, i1, j0, j1 in tile_pairs(Xc.shape[0], tile):
        d2 = (norms[i0:i1, None] + norms[None, j0:j1] - 2 * (Xc[i0:i1] @ Xc[j0:j1].T).double()).clamp_min(0)
        yield d2[torch.triu_indices(i1 - i0, j1 - j0, offset=1, device=d2.device).unbind()] if i0 == j0 else d2.ravel()


def _select_ranks(stream, n_values, ranks, upper, cap=1 << 24, bins=1 << 16):
    """Exact order statistics (0-based `ranks`) of n_values in [0, upper] produced by stream(), never
    holding more than `cap` of them. Histogram passes narrow the search: each level bins the values that
    survived the previous levels by idx = clamp(floor((v - lo) / w), 0, bins - 1), a monotone map, and keeps
    the bins holding the ranks; a value is re-classified through the same chain of levels in every later
    pass, so counts below and membership never disagree through rounding. Then kthvalue picks the ranks.
    Counts stay on the values' device; the host reads a handful of scalars per pass."""
    levels = []  # (lo, w, c0, c1) per level

    def classify(d):
        below = torch.zeros((), dtype=torch.int64, device=d.device)
        for lo_l, w_l, c0, c1 in levels:
            idx = torch.floor((d - lo_l) / w_l).clamp(0, bins - 1)
            below = below + (idx < c0).sum()
            d = d[(idx >= c0) & (idx <= c1)]
        return below, d

    lo, w, count_in = 0.0, (float(upper) * (1 + 1e-9) + 1e-300) / bins, n_values
    while count_in > cap:
        hist, below = None, 0
        for d in stream():
            b, inside = classify(d)
            below = below + b
            h = torch.bincount(torch.floor((inside - lo) / w).clamp(0, bins - 1).long(), minlength=bins)
            hist = h if hist is None else hist + h
        cum = below + torch.cumsum(hist, 0)
        want = torch.tensor(ranks, dtype=cum.dtype, device=cum.device)
        first = torch.searchsorted(cum, want, right=True).tolist()  # one host read per pass
        c0, c1 = min(first), min(max(first), bins - 1)
        levels.append((lo, w, c0, c1))
        count_in = int(hist[c0:c1 + 1].sum())
        if count_in > cap and c0 == c1 and w <= 1e-15 * max(abs(lo), 1e-300) * bins:
            return [lo + c0 * w] * len(ranks)  # more than cap values equal to float precision
        lo, w = lo + c0 * w, w * (c1 - c0 + 1) / bins
    below, kept = 0, []
    for d in stream():
        b, inside = classify(d)
        below = below + b
        kept.append(inside)
    vals, below = torch.cat(kept), int(below)
    return _order_stats(vals, [r - below for r in ranks])


def _order_stats(vals, ks):
    """The ks-th smallest (0-based) of a 1-D tensor, as floats: np.partition on the CPU (one introselect for
    every k, ~3x faster than torch.kthvalue there), torch.kthvalue elsewhere."""
    if vals.device.type == "cpu":
        part = np.partition(vals.numpy(), ks)
        return [float(part[k]) for k in ks]
    return [float(torch.kthvalue(vals, k + 1).values) for k in ks]


def _median_ranks(n):
    """The 0-based ranks whose mean is np.median of n values."""
    return [n // 2 - 1, n // 2] if n % 2 == 0 else [(n - 1) // 2]


def median_sq_dist(X, tile=RBF_TILE, cap=1 << 24):
    """np.median of the full (n, n) squared-distance matrix of X's rows (zero diagonal and both triangles
    included, as Kornblith et al.'s reference code), exact, from Gram tiles: memory O(n + tile^2)."""
    Xc, norms = centred(X)
    n = Xc.shape[0]
    return _median_from_offdiag(n, lambda ks: _select_ranks(lambda: _offdiag_sq_dists(Xc, norms, tile),
                                                            n * (n - 1) // 2, ks, 4 * float(norms.max()), cap=cap))


def _median_from_offdiag(n, select):
    """np.median of a full (n, n) symmetric distance matrix with a zero diagonal, from order statistics of its
    n (n - 1) / 2 off-diagonal values (select(ks) -> their ks-th smallest): the sorted full matrix is the n
    zeros of the diagonal, then every off-diagonal value twice."""
    ranks = _median_ranks(n * n)
    offdiag = sorted({(r - n) // 2 for r in ranks if r >= n})
    got = dict(zip(offdiag, select(offdiag))) if offdiag else {}
    return float(np.mean([0.0 if r < n else got[(r - n) // 2] for r in ranks]))


def rbf_sigma(X, sigma_frac=1.0, tile=RBF_TILE):
    """Median-heuristic bandwidth sigma_frac * sqrt(median squared distance)."""
    return sigma_frac * float(np.sqrt(median_sq_dist(X, tile)))


def whole_gram(Xc, norms, median=True):
    """(the whole (n, n) float64 Gram matrix Xc Xc', np.median of the full squared-distance matrix as
    median_sq_dist defines it, or None): one GEMM; the median from the off-diagonal values of the upper triangle
    by one selection (_order_stats) instead of histogram passes over recomputed tiles."""
    G = (Xc @ Xc.T).double()
    if not median:
        return G, None
    n = G.shape[0]
    d2 = G.mul(-2).add_(norms[:, None]).add_(norms[None, :]).clamp_min_(0)
    upper = d2[torch.ones(n, n, dtype=torch.bool, device=G.device).triu_(1)]  # (n (n - 1) / 2,)
    del d2
    return G, _median_from_offdiag(n, lambda ks: _order_stats(upper, ks))


def _cka_rbf(X, Y, sigma, sigma_frac, debiased, tile, device=None, whole_bytes=RBF_WHOLE_BYTES):
    """RBF CKA from upper-triangle Gram tile pairs: per pair, BLAS gives Xi Xj' and Yi Yj', the op turns
    them into kernel values and reduces them to row/column sums and [sum KL, sum K^2, sum L^2]. With the
    row sums r_K = K1, r_L = L1 (O(n)), HSIC(K, L) = sum KL - 2/n r_K.r_L + (1'r_K)(1'r_L)/n^2 (biased);
    debiased with the zero-diagonal kernels (diag K = 1): tr(K~L~) = sum KL - n, 1'K~1 = 1'r_K - n,
    1'K~L~1 = (r_K - 1).(r_L - 1) (Song et al. 2012).

    Where four (n, n) float64 matrices fit in whole_bytes, the tile is the whole matrix: each Gram matrix is
    computed once (one GEMM) and serves both the median heuristic (kthvalue on it) and the op, instead of
    two tiled passes of GEMMs; the values are the same up to rounding."""
    (Xc, nx), (Yc, ny) = centred(X, device), centred(Y, device)
    n = Xc.shape[0]
    whole = 4 * n * n * 8 <= whole_bytes  # two Gram matrices, one distance buffer, its upper triangle twice
    if whole:
        (Gx, mx), (Gy, my) = whole_gram(Xc, nx, sigma is None), whole_gram(Yc, ny, sigma is None)
    else:
        mx = median_sq_dist(Xc, tile) if sigma is None else 0.0
        my = median_sq_dist(Yc, tile) if sigma is None else 0.0
    sx = sigma if sigma is not None else sigma_frac * float(np.sqrt(mx))
    sy = sigma if sigma is not None else sigma_frac * float(np.sqrt(my))
    if not (sx > 0 and sy > 0):
        raise ValueError(f"RBF CKA is undefined: bandwidth sigma_x={sx}, sigma_y={sy} (constant representation?)")
    gx_, gy_ = 1 / (2 * sx ** 2), 1 / (2 * sy ** 2)
    f64 = dict(dtype=torch.float64, device=Xc.device)
    rk, rl, S = torch.zeros(n, **f64), torch.zeros(n, **f64), torch.zeros(3, **f64)
    pairs = [(0, n, 0, n)] if whole else tile_pairs(n, tile)
    for i0, i1, j0, j1 in pairs:
        diag = i0 == j0
        gx = Gx if whole else (Xc[i0:i1] @ Xc[j0:j1].T).double()
        gy = Gy if whole else (Yc[i0:i1] @ Yc[j0:j1].T).double()
        row_k, col_k, row_l, col_l, sums = cka_rbf_tile(gx, gy, nx[i0:i1], nx[j0:j1], ny[i0:i1], ny[j0:j1],
                                                        gx_, gy_, diag)
        S += sums if diag else 2 * sums  # an off-diagonal tile stands for itself and its transpose
        rk[i0:i1] += row_k
        rl[i0:i1] += row_l
        if not diag:
            rk[j0:j1] += col_k
            rl[j0:j1] += col_l

    def hsic(s_ab, ra, rb):
        if not debiased:
            return s_ab - 2 / n * (ra @ rb) + ra.sum() * rb.sum() / n ** 2
        return (s_ab - n + (ra.sum() - n) * (rb.sum() - n) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * ((ra - 1) @ (rb - 1))) / (n * (n - 3))

    return hsic(S[0], rk, rl) / torch.sqrt(hsic(S[1], rk, rk) * hsic(S[2], rl, rl))


# ---------------------------------------------------------------------------------------------------------
# streaming ridge: X'X / X'Y from row blocks, one eigendecomposition per fold, every alpha scored for every
# target by the fused ops ridge_score_{kfold,loo,gcv} (csrc/ridge_cpu.cpp, csrc/ridge_cuda.cu), refit of the
# chosen alphas; everything on the device of the inputs
# ---------------------------------------------------------------------------------------------------------

def ridge_score_kfold_ref(s, z, b, yy, quad, alphas, rows):
    """Validation SSE (n_alphas, t) float64 of one fold from the spectrum (see csrc/ridge_cpu.cpp)."""
    a = torch.as_tensor(alphas, dtype=torch.float64, device=s.device)
    d = 1.0 / (s.double()[None, :, None] + a[:, None, None])                                           # (a, p, 1)
    dz = d * z.double()                                                                                # (a, p, t)
    q = ((quad.double() @ dz) ** 2).sum(1) if rows else (dz * (quad.double() @ dz)).sum(1)
    return yy.double() - 2 * (b.double() * dz).sum(1) + q


def ridge_score_kfold(s, z, b, yy, quad, alphas, rows):
    if use_op("ridge_score_kfold", s, z, b, yy, quad):
        return torch.ops.metalign_ops.ridge_score_kfold(s, z, b, yy, quad, alphas, rows)
    return ridge_score_kfold_ref(s, z, b, yy, quad, alphas, rows)


def ridge_score_kfold_basis_ref(s, z, b, yy, quad, alphas, rows, basis, coef):
    """ridge_score_kfold_ref with the quadratic form's spectral weights replaced by coef @ basis.T (the linear
    term b'(d z) exact): r GEMMs per fold instead of one per alpha."""
    a = torch.as_tensor(alphas, dtype=torch.float64, device=s.device)
    d = 1.0 / (s.double()[None, :, None] + a[:, None, None])                                           # (a, p, 1)
    qz = (coef.double() @ basis.double().T)[:, :, None] * z.double()                                   # (a, p, t)
    q = ((quad.double() @ qz) ** 2).sum(1) if rows else (qz * (quad.double() @ qz)).sum(1)
    return yy.double() - 2 * (b.double() * d * z.double()).sum(1) + q


def ridge_score_kfold_basis(s, z, b, yy, quad, alphas, rows, basis, coef):
    if use_op("ridge_score_kfold_basis", s, z, b, yy, quad, basis, coef):
        return torch.ops.metalign_ops.ridge_score_kfold_basis(s, z, b, yy, quad, alphas, rows, basis, coef)
    return ridge_score_kfold_basis_ref(s, z, b, yy, quad, alphas, rows, basis, coef)


def _ridge_loo_parts_ref(xr, y, s, z, alphas, h0):
    """The LOO pieces without cancellation (see csrc/ridge_checks.h): y outside the span y_perp (n, t), the leverage
    outside it base (n,), both exactly 0 when the positive s_j span the n - df0 centred rows (df0 = h0 n), and the
    residual weights g (n_alphas, p) = a / (s (s + a)) on positive s_j: the LOO residual of alpha a is
    y_perp + xr (g z), 1 - h = base + xr^2 . g."""
    n = xr.shape[0]
    df0 = round(h0 * n) if h0 > 0 else 0
    a = torch.as_tensor(alphas, dtype=torch.float64, device=s.device)
    s, xr, y, z = s.double(), xr.double(), y.double(), z.double()
    pos = s > 0
    inv_s = torch.where(pos, 1 / s, 0.0)
    spans = pos.sum() >= n - df0
    base = torch.where(spans, 0.0, (1 - h0 - (xr ** 2) @ inv_s).clamp_min(0))
    y_perp = torch.where(spans, 0.0, y - xr @ (inv_s[:, None] * z))
    g = torch.where(pos, a[:, None] / (s * (s + a[:, None])), 0.0)
    return y_perp, base, g, inv_s, bool(spans)


def ridge_score_loo_ref(xr, y, s, z, alphas, h0, chunk_rows):
    """Exact LOO mean squared error (n_alphas, t) float64 and its first argmin (t,), from the hat-matrix
    identity r_i = e_i / (1 - h_ii) (Allen 1974), materialising every (alpha, row, target) residual; e and 1 - h
    without cancellation (_ridge_loo_parts_ref), so p >= n scores right."""
    y_perp, base, g, _, _ = _ridge_loo_parts_ref(xr, y, s, z, alphas, h0)
    xr, z = xr.double(), z.double()
    e = y_perp[None] + torch.einsum("np,ap,pt->ant", xr, g, z)          # (a, n, t)
    q = base[:, None] + (xr ** 2) @ g.T                                  # (n, a): 1 - h
    scores = ((e / q.T[:, :, None]) ** 2).mean(1)
    return scores, scores.argmin(0)


def ridge_score_loo(xr, y, s, z, alphas, h0, chunk_rows=1024):
    if use_op("ridge_score_loo", xr, y, s, z):
        return torch.ops.metalign_ops.ridge_score_loo(xr, y, s, z, alphas, h0, chunk_rows)
    return ridge_score_loo_ref(xr, y, s, z, alphas, h0, chunk_rows)


def ridge_score_gcv_ref(s, z, yy, alphas, n, df0):
    """GCV (n_alphas, t) float64 = (SSE/n) / (1 - df/n)^2 and its first argmin (t,), without cancellation: over
    the directions with s_j > 0 (s_j = 0 is outside the fit), SSE = sum_j (a d_j)^2 z_j^2 / s_j + |y outside the
    span|^2, the latter max(yy - sum_j z_j^2 / s_j, 0), or exactly 0 when the positive directions span the
    n - df0 centred rows (p >= n), and n - df = max(n - df0 - #positive, 0) + sum_j a d_j."""
    a = torch.as_tensor(alphas, dtype=torch.float64, device=s.device)
    s, zz = s.double(), z.double() ** 2
    pos = s > 0
    inv_s = torch.where(pos, 1 / s, 0.0)
    ad = pos * (a[:, None] / (s[None] + a[:, None]))                     # (a, p)
    sse_in = (ad ** 2 * inv_s) @ zz
    n_pos = pos.sum()
    rest = torch.where(n_pos >= n - df0, 0.0, (yy.double() - inv_s @ zz).clamp_min(0))
    den = (n - df0 - n_pos).clamp_min(0) + ad.sum(1)
    scores = n * (sse_in + rest) / den[:, None] ** 2
    return scores, scores.argmin(0)


def ridge_score_gcv(s, z, yy, alphas, n, df0):
    if use_op("ridge_score_gcv", s, z, yy):
        return torch.ops.metalign_ops.ridge_score_gcv(s, z, yy, alphas, float(n), float(df0))
    return ridge_score_gcv_ref(s, z, yy, alphas, n, df0)


def ridge_alpha_basis(s, alphas, tol=1e-8):
    """Truncated SVD of the spectral weights D_ja = 1/(s_j + a) (p, n_alphas), columns scaled to unit norm:
    -> basis (p, r), coef (n_alphas, r) float64 on the device of s with D ~ basis @ coef.T to `tol` relative in
    every entry, r the smallest rank that achieves it, and the amplification max_ja sum_m |basis_jm coef_am| / D_ja
    (how much rounding in the r basis products is magnified when they are recombined). 1/(s + a) is a Cauchy
    kernel of positive nodes, so r is small (measured 6-9 at 1e-6, 10-15 at 1e-8 for logspace(-6, 3, 100),
    p = 768). The ranks are tried 8 at a time on the device, one host sync per 8."""
    s = _as_tensor(s).double()
    a = torch.as_tensor(alphas, dtype=torch.float64, device=s.device)
    D = 1.0 / (s[:, None] + a[None, :])
    scale = D.norm(dim=0)
    U, S, Wt = torch.linalg.svd(D / scale, full_matrices=False)
    C = Wt.T * S * scale[:, None]                                        # (n_alphas, k): coef of every rank
    recon, absrec = torch.zeros_like(D), torch.zeros_like(D)
    k = len(S)
    for r0 in range(0, k, 8):
        errs, amps = [], []
        for m in range(r0, min(k, r0 + 8)):
            recon += torch.outer(U[:, m], C[:, m])
            absrec += torch.outer(U[:, m].abs(), C[:, m].abs())
            errs.append(((recon - D).abs() / D).amax())
            amps.append((absrec / D).amax())
        e = torch.stack(errs + amps).tolist()
        hit = next((i for i, v in enumerate(e[:len(errs)]) if v <= tol), None)
        if hit is not None or r0 + 8 >= k:
            hit = len(errs) - 1 if hit is None else hit
            r = r0 + hit + 1
            return U[:, :r].contiguous(), C[:, :r].contiguous(), e[len(errs) + hit]


def ridge_score_loo_basis_ref(xr, y, s, z, alphas, h0, basis, coef, chunk_rows):
    """LOO as ridge_score_loo_ref with the fit's spectral weights d(a) replaced by coef @ basis.T, or, when the
    rows are interpolated, the residual weights g(a) = a d(a) / s by that expansion scaled (exact leverages)."""
    y_perp, base, g, inv_s, spans = _ridge_loo_parts_ref(xr, y, s, z, alphas, h0)
    a = torch.as_tensor(alphas, dtype=torch.float64, device=s.device)
    xr, z = xr.double(), z.double()
    if spans:   # the residual is xr (g z), g expanded as (a coef) (basis / s)'
        e = torch.einsum("np,ap,pt->ant", xr, (a[:, None] * coef.double()) @ (basis.double() * inv_s[:, None]).T, z)
    else:       # y minus the fit, d expanded as coef basis'
        e = y.double()[None] - torch.einsum("np,ap,pt->ant", xr, coef.double() @ basis.double().T, z)
    q = base[:, None] + (xr ** 2) @ g.T
    scores = ((e / q.T[:, :, None]) ** 2).mean(1)
    return scores, scores.argmin(0)


def ridge_score_loo_basis(xr, y, s, z, alphas, h0, basis, coef, chunk_rows=1024):
    if use_op("ridge_score_loo_basis", xr, y, s, z, basis, coef):
        return torch.ops.metalign_ops.ridge_score_loo_basis(xr, y, s, z, alphas, h0, basis, coef, chunk_rows)
    return ridge_score_loo_basis_ref(xr, y, s, z, alphas, h0, basis, coef, chunk_rows)


class RidgeCVResult(NamedTuple):
    """What ridge_cv returns; `.predict(X)` applies it. Shapes: (n_targets,) and (n_features, n_targets)."""
    best_alphas: torch.Tensor   # (n_targets,) float64, the alpha chosen per target (or the shared one)
    coef: torch.Tensor          # (n_features, n_targets), refit on all rows with the chosen alphas
    intercept: torch.Tensor     # (n_targets,), zeros when fit_intercept=False
    cv_scores: torch.Tensor     # (n_targets,) float64, the CV score at the chosen alpha: the mean over folds of
    #                             R^2 (scoring="r2", higher is better) or of the MSE ("mse"); LOO's MSE; GCV

    def predict(self, X):
        return _as_tensor(X).to(self.coef.device, self.coef.dtype) @ self.coef + self.intercept


def ridge_folds(cv, n):
    """Validation index arrays of a partition of range(n): int k (contiguous KFold, sklearn/himalaya order) or
    a group vector (leave-one-group-out, groups in sorted order)."""
    if isinstance(cv, (int, np.integer)) and not isinstance(cv, bool):
        if not 2 <= cv <= n:
            raise ValueError(f"cv={cv}: k-fold needs 2 <= k <= n_samples ({n})")
        sizes = np.full(cv, n // cv)
        sizes[: n % cv] += 1
        edges = np.r_[0, np.cumsum(sizes)]
        return [np.arange(edges[f], edges[f + 1]) for f in range(cv)]
    groups = np.asarray(cv.cpu() if isinstance(cv, torch.Tensor) else cv)
    if groups.ndim != 1 or len(groups) != n:
        raise ValueError(f"cv: expected an int, 'loo', 'gcv' or a group vector of length n_samples={n}, "
                         f"got {type(cv).__name__} of shape {getattr(groups, 'shape', None)}")
    labels = np.unique(groups)
    if len(labels) < 2:
        raise ValueError(f"cv: the group vector has {len(labels)} distinct group(s); leave-one-group-out needs >= 2")
    return [np.nonzero(groups == g)[0] for g in labels]


def _ridge_mode(cv, scoring):
    """cv -> 'folds' | 'loo' | 'gcv', and the scoring it uses: k-fold / groups 'r2' (default) or 'mse'; LOO its
    mean squared error ('mse', sklearn's rule); GCV its own criterion ('gcv')."""
    mode = cv if isinstance(cv, str) else "folds"
    if mode not in ("loo", "gcv", "folds"):
        raise ValueError(f"cv={cv!r}: expected an int (k-fold), 'loo', 'gcv' or a group vector")
    allowed = {"folds": ("r2", "mse"), "loo": ("mse",), "gcv": ("gcv",)}[mode]
    scoring = allowed[0] if scoring is None else scoring
    if scoring not in allowed:
        raise ValueError(f"scoring={scoring!r} with cv={'k-fold/groups' if mode == 'folds' else repr(cv)}: expected "
                         f"one of {allowed} (k-fold and groups: 'r2', the default, or 'mse'; LOO scores by its mean "
                         f"squared error; GCV by its own criterion)")
    return mode, scoring


def _check_r2_folds(folds, scoring):
    """R^2 needs a validation variance: a fold of one row would score 0 for every alpha."""
    sizes = [len(v) for v in folds]
    if scoring == "r2" and sizes and min(sizes) < 2:
        raise ValueError(f"scoring='r2': validation fold {sizes.index(min(sizes))} has {min(sizes)} row, and R^2 needs "
                         f"at least 2; use scoring='mse' (or cv='loo' for leave-one-out)")


def _ridge_compute_dtype(dtype, compute_dtype):
    """float64 input -> float64, other floating input -> float32, integer and boolean input -> float64 (exact,
    as sklearn computes it); compute_dtype (float32 | float64, torch, numpy or a name) overrides."""
    if compute_dtype is None:
        return dtype if dtype in (torch.float32, torch.float64) else \
            torch.float32 if dtype.is_floating_point else torch.float64
    name = (compute_dtype if isinstance(compute_dtype, str) else str(compute_dtype).replace("torch.", "")
            if isinstance(compute_dtype, torch.dtype) else np.dtype(compute_dtype).name)
    if name not in ("float32", "float64"):
        raise ValueError(f"compute_dtype={compute_dtype!r}: expected float32 or float64")
    return getattr(torch, name)


def _read_columns(Y, c0, c1, dtype, device):
    """Columns c0:c1 of Y (n, t): torch tensor, numpy array or h5py dataset (read from disk) -> (n, c1-c0)."""
    block = Y[:, c0:c1]
    return _as_tensor(block).to(device, dtype)


def _eigh_one_thread(C):
    """torch.linalg.eigh on one thread in a worker thread: OpenMP's thread count is per thread, so a fresh worker
    would otherwise start its own team of all cores (measured 1.7 s instead of 5 ms for four 150 x 150 matrices)."""
    torch.set_num_threads(1)
    return torch.linalg.eigh(C)


def ridge_cv(X, Y, alphas, cv=5, fit_intercept=True, local_alpha=True, target_batch=4096, chunk_rows=1024,
             loo_basis=True, kfold_basis=True, *, scoring=None, compute_dtype=None, device=None):
    """Ridge regression with the regularisation chosen by cross-validation per target (or shared).

    X (n_samples, n_features) in memory; Y (n_samples, n_targets) a torch tensor, numpy array or h5py dataset
    (streamed from disk `target_batch` columns at a time, so memory is O(n p + p^2 + n target_batch)
    plus the returned coefficients). Everything runs on `device` (default: the device of X; a CPU array is
    moved there), every accumulator is allocated there and no data leaves it; the host only reads scalars that
    steer the algorithm (input checks, the alpha-basis rank) and the alphas.
    Compute dtype: float64 input computes in float64, other floating input in float32, integer and boolean
    input in float64 (as sklearn); compute_dtype=torch.float32|float64 forces one. The moments are accumulated
    and diagonalised in float64. Float32 contract: the chosen alphas match a float64 solver's (sklearn,
    himalaya) and the coefficients and predictions agree to ~1e-4 relative, not more (sklearn computes
    float32 input in float64 inside RidgeCV; pass compute_dtype=torch.float64 for that).
    Rank: eigen-directions of a (training) Gram with eigenvalue <= p * eps * s_max (numpy.linalg.matrix_rank's
    tolerance for the p x p Gram, eps of the compute dtype) are dropped, as a pseudo-inverse would: the ridge
    solution at a tiny alpha is then the minimum-norm least-squares one (sklearn's regularisation limits) instead
    of rounding noise divided by alpha.
    cv: an int k (k-fold, contiguous folds as sklearn's KFold and himalaya's RidgeCV), "loo" (exact
        leave-one-out: sklearn RidgeCV semantics, scored by MSE), "gcv" (generalised CV, O(p) per alpha per
        target), or a group vector of length n_samples (leave-one-group-out). LOO and GCV are computed without
        cancellation (exact leverages; the residual of an interpolating fit computed directly), so p >= n with
        small alphas scores as in exact arithmetic.
    scoring (k-fold and groups): "r2" (default) picks per target the alpha with the best mean over folds of R^2
        on the validation rows (sklearn's RidgeCV(cv=K) rule, himalaya's RidgeCV with score_func=r2_score; a fold
        whose targets are constant scores 0, as himalaya); "mse" the smallest mean over folds of the validation
        MSE (himalaya's default l2_neg_loss). Equal scores keep the larger alpha (himalaya's tie-break).
    fit_intercept centres X and Y on each training set (sklearn semantics; the intercept is not penalised).
    loo_basis: for cv="loo", expand 1/(s + alpha) in a few alpha-basis functions (ridge_alpha_basis: 1e-6
        relative per entry in float32, 1e-10 in float64) when that needs fewer than half as many GEMMs as
        alphas and does not magnify rounding; False scores every alpha directly.
    kfold_basis: the same expansion for k-fold / groups (ridge_score_kfold_basis: the quadratic form from r
        basis GEMMs per fold, the linear term exact) when r p < 0.75 n_alphas min(n_val, p) and the squared
        amplification keeps rounding below 1e-4; False: one GEMM per alpha per fold.
    Returns RidgeCVResult(best_alphas, coef, intercept, cv_scores) on the device, with .predict(X).
    """
    Xt = _as_tensor(X)
    if Xt.dim() != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {tuple(Xt.shape)}")
    dev = torch.device(device) if device is not None else Xt.device
    ct = _ridge_compute_dtype(Xt.dtype, compute_dtype)
    Xt = Xt.to(dev)
    n, p = Xt.shape
    if len(Y.shape) != 2 or Y.shape[0] != n:
        raise ValueError(f"Y must be 2-D (n_samples={n}, n_targets), got shape {tuple(Y.shape)}")
    t = Y.shape[1]
    alphas = torch.as_tensor(np.asarray(alphas, dtype=np.float64).ravel(), device="cpu")  # parameters the ops read
    if len(alphas) == 0 or not bool((alphas > 0).all()):
        raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas.tolist()}")
    alphas_d = alphas.to(dev)
    if not bool(torch.isfinite(Xt).all()):
        raise ValueError(f"X has {int((~torch.isfinite(Xt)).sum())} non-finite values")
    mode, scoring = _ridge_mode(cv, scoring)
    folds = [torch.as_tensor(v, device=dev) for v in ridge_folds(cv, n)] if mode == "folds" else []
    _check_r2_folds(folds, scoring)
    f64 = torch.float64
    zeros = functools.partial(torch.zeros, dtype=f64, device=dev)
    eps = torch.finfo(ct).eps

    # X moments, shifted by the global mean so the float64 sums do not lose precision when centred
    mx_all = Xt.double().mean(0) if fit_intercept else zeros(p)
    Xs = (Xt.double() - mx_all).to(ct)                                     # (n, p)

    def moments(idx):  # (X'X, sum x) of rows idx, accumulated over row chunks in float64
        G, sx = zeros(p, p), zeros(p)
        for c in range(0, len(idx), chunk_rows):
            xb = Xs[idx[c:c + chunk_rows]]
            G += (xb.T @ xb).double()
            sx += xb.double().sum(0)
        return G, sx

    def eigs(Cs):
        if dev.type == "cpu":
            # LAPACK syevd on one thread each, the matrices of the folds concurrently (eigh releases the GIL): at
            # p <= a few thousand one thread is fast either way, and the threaded syevd stalls badly when the
            # cores are shared (measured 7.2 s vs 0.3 s at p = 768 on 2 busy cores)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(Cs)))) as pool:
                    out = list(pool.map(_eigh_one_thread, Cs))
            finally:
                torch.set_num_threads(threads)
        else:
            s_b, V_b = torch.linalg.eigh(torch.stack(Cs))                  # one batched call on the device
            out = list(zip(s_b, V_b))
        spectra = []
        for s, V in out:
            # float rounding gives tiny negative and spurious positive eigenvalues where X'X is singular (collinear
            # columns, n <= p): drop the directions below the rank tolerance (masked, so no shape depends on data)
            s = s.clamp_min(0)
            keep = s > p * eps * s.max()
            spectra.append((torch.where(keep, s, 0.0), V * keep))
        return spectra

    parts = [moments(v) for v in folds] if folds else [moments(torch.arange(n, device=dev))]
    G_all, sx_all = sum(P[0] for P in parts), sum(P[1] for P in parts)     # totals = sum of the fold blocks
    centre = (lambda m: m) if fit_intercept else (lambda m: torch.zeros_like(m))
    m_all = centre(sx_all / n)
    mtrs = [centre((sx_all - sxf) / (n - len(v))) for v, (_, sxf) in zip(folds, parts)]
    spectra = eigs([G_all - n * torch.outer(m_all, m_all)] +               # training folds by subtraction
                   [(G_all - Gf) - (n - len(v)) * torch.outer(mtr, mtr) for v, (Gf, _), mtr in zip(folds, parts, mtrs)])
    s_all, V_all = spectra[0]
    Vc_all = V_all.to(ct)
    fold_state = []
    for v, (Gf, sxf), mtr, (s_f, V_f) in zip(folds, parts, mtrs, spectra[1:]):
        nf, ntr = len(v), n - len(v)
        kb = None
        if kfold_basis:
            # dropped directions (s = 0, z = 0) would only widen the basis: give them a harmless eigenvalue
            U, cf, amp = ridge_alpha_basis(torch.where(s_f > 0, s_f, s_f.max()), alphas,
                                           tol=1e-6 if ct == torch.float32 else 1e-10)
            # r GEMMs of p x p x t (the basis path works on the rotated Gram) against one GEMM per alpha of
            # min(n_val, p) x p x t; the quadratic form recombines r^2 products, so rounding grows with the
            # squared amplification
            if U.shape[1] * p < 0.75 * len(alphas) * min(nf, p) and amp * amp * eps <= 1e-4:
                kb = (U.to(ct), cf)
        rows = nf < p and kb is None  # the cheaper exact quadratic form: validation rows (n_val < p) or the Gram
        if rows:
            quad = ((Xs[v].double() - mtr) @ V_f).to(ct)                   # (n_val, p)
        else:
            Gv = Gf - torch.outer(mtr, sxf) - torch.outer(sxf, mtr) + nf * torch.outer(mtr, mtr)
            Vc = V_f.to(ct)
            quad = Vc.T @ Gv.to(ct) @ Vc                                   # (p, p), GEMMs in the compute dtype
        fold_state.append(dict(idx=v, n=nf, mtr=mtr, s=s_f.to(ct), V=V_f.to(ct), quad=quad,
                               rows=rows, basis=kb, Vm=(V_f.T @ mtr).to(ct), Vsx=(V_f.T @ sxf).to(ct)))
    xr = ((Xs.double() - m_all) @ V_all).to(ct) if mode == "loo" else None  # (n, p) rotated centred rows
    basis = None
    if mode == "loo" and loo_basis:
        *basis, amp = ridge_alpha_basis(torch.where(s_all > 0, s_all, s_all.max()), alphas,
                                        tol=1e-6 if ct == torch.float32 else 1e-10)
        # too few alphas for the expansion to pay, or its recombination would magnify rounding beyond 1e-4
        # (clamped zero eigenvalues next to tiny alphas): score every alpha directly
        if 2 * basis[0].shape[1] > len(alphas) or amp * eps > 1e-4:
            basis = None
        else:
            basis = (basis[0].to(ct), basis[1])

    best_alphas = torch.empty(t, dtype=f64, device=dev)
    cv_scores = torch.empty(t, dtype=f64, device=dev)
    coef = torch.empty(p, t, dtype=ct, device=dev)
    intercept = torch.zeros(t, dtype=ct, device=dev)
    shared_total = zeros(len(alphas))
    log_slope = 1e-10 * torch.log(alphas_d)[:, None]  # himalaya's tie-break: equal scores -> the larger alpha
    sign = -1.0 if scoring == "r2" else 1.0            # the criterion is minimised: -R^2, MSE, GCV

    def batch_moments(c0, c1):
        Yb = _read_columns(Y, c0, c1, ct, dev)
        bad = ~torch.isfinite(Yb)
        if bool(bad.any()):
            cols = torch.nonzero(bad.any(0)).ravel()
            raise ValueError(f"Y has non-finite values in {len(cols)} of targets {c0}..{c1 - 1} "
                             f"(first target {c0 + int(cols[0])}, {int(bad[:, cols[0]].sum())} of {n} rows)")
        my_b = Yb.double().mean(0) if fit_intercept else zeros(c1 - c0)
        Ys = (Yb.double() - my_b).to(ct)                                   # (n, tb)
        return Ys, my_b

    def fold_cross(Ys, idx):
        """X'Y, the column sums and the centred sums of squares (per-chunk means combined as Chan et al. 1979:
        exact 0 for a constant column, no |y|^2 - n mean^2 cancellation) of rows idx."""
        tb = Ys.shape[1]
        xy, sy, m2 = zeros(p, tb), zeros(tb), zeros(tb)
        for c in range(0, len(idx), chunk_rows):
            j = idx[c:c + chunk_rows]
            xb, yb = Xs[j], Ys[j]
            xy += (xb.T @ yb).double()
            yd = yb.double()
            k, cnt = len(j), min(c, len(idx))
            cs = yd.sum(0)
            m2 += ((yd - cs / k) ** 2).sum(0)
            if cnt:
                m2 += (sy / cnt - cs / k) ** 2 * (cnt * k / (cnt + k))
            sy += cs
        return xy, sy, m2

    def refit(Ys, my_b, xy_all, sy_all, chosen):  # coef and intercept for the chosen alpha per target
        mys = centre(sy_all / n)
        # the rotations are GEMMs in the compute dtype (their inputs are float64 sums, rounded once)
        zc = (Vc_all.T @ xy_all.to(ct)).addr_((V_all.T @ m_all).to(ct), mys.to(ct), alpha=-n)  # (p, tb)
        W = Vc_all @ (zc / (s_all[:, None] + alphas_d[chosen][None, :]).to(ct))  # one GEMM for all chosen alphas
        icpt = (my_b + mys) - (mx_all + m_all) @ W.double() if fit_intercept else zeros(W.shape[1])
        return W, icpt.to(ct)

    everything = torch.arange(n, device=dev)
    stash = []
    for c0 in range(0, t, target_batch):
        c1 = min(t, c0 + target_batch)
        Ys, my_b = batch_moments(c0, c1)
        if folds:
            cross = [fold_cross(Ys, st["idx"]) for st in fold_state]
            xy_all = sum(c[0] for c in cross)
            sy_all = sum(c[1] for c in cross)
            total = zeros(len(alphas), c1 - c0)
            xa = xy_all.to(ct)
            for st, (xyf, syf, m2f) in zip(fold_state, cross):
                nf, ntr, mtr = st["n"], n - st["n"], st["mtr"]
                my_tr = centre((sy_all - syf) / ntr)
                # rotate the raw sums (V'X'Y of all rows and of the validation rows, GEMMs in the compute dtype),
                # then centre by the training means as rank-1 updates in the rotated space: X and Y are already
                # centred globally, so these corrections are small and no (p, t) float64 temporaries are needed
                b = st["V"].T @ xyf.to(ct)
                z = st["V"].T @ xa - b                                     # training rows: all minus validation
                z.addr_(st["Vm"], my_tr.to(ct), alpha=-ntr)
                b.addr_(st["Vm"], (syf - nf * my_tr).to(ct), alpha=-1)
                b.addr_(st["Vsx"], my_tr.to(ct), alpha=-1)
                yy = m2f + (syf - nf * my_tr) ** 2 / nf                    # |y_val - training mean|^2
                if st["basis"] is not None:
                    sse = ridge_score_kfold_basis(st["s"], z, b, yy, st["quad"], alphas, st["rows"], *st["basis"])
                else:
                    sse = ridge_score_kfold(st["s"], z, b, yy, st["quad"], alphas, st["rows"])
                if scoring == "mse":
                    total += sse / nf
                else:  # R^2 of the fold: 1 - SSE / (validation sum of squares around its own mean); constant: 0
                    total += torch.where(m2f > 0, 1 - sse / torch.where(m2f > 0, m2f, 1.0), 0.0)
            total /= len(fold_state)                                      # mean over folds
            crit = sign * total - log_slope
        else:
            xy_all, sy_all, m2_all = fold_cross(Ys, everything)
            mys = centre(sy_all / n)
            z = Vc_all.T @ (xy_all - n * torch.outer(m_all, mys)).to(ct)
            if mode == "loo" and basis is not None:
                total, _ = ridge_score_loo_basis(xr, (Ys.double() - mys).to(ct), s_all.to(ct), z, alphas,
                                                 1.0 / n if fit_intercept else 0.0, *basis, chunk_rows)
            elif mode == "loo":
                total, _ = ridge_score_loo(xr, (Ys.double() - mys).to(ct), s_all.to(ct), z, alphas,
                                           1.0 / n if fit_intercept else 0.0, chunk_rows)
            else:
                yy = m2_all + (sy_all - n * mys) ** 2 / n                  # |y - mean|^2, or |y|^2 without intercept
                total, _ = ridge_score_gcv(s_all.to(ct), z, yy, alphas, n, 1.0 if fit_intercept else 0.0)
            crit = total
        if local_alpha:
            chosen = crit.argmin(0)
            best_alphas[c0:c1] = alphas_d[chosen]
            cv_scores[c0:c1] = total.gather(0, chosen[None]).ravel()
            coef[:, c0:c1], intercept[c0:c1] = refit(Ys, my_b, xy_all, sy_all, chosen)
        else:
            shared_total += crit.sum(1)
            stash.append((c0, c1, total))
    if not local_alpha:  # one alpha for all targets: the best summed criterion, then a second pass to refit
        a = shared_total.argmin()
        best_alphas[:] = alphas_d[a]
        for c0, c1, total in stash:
            cv_scores[c0:c1] = total[a]
            Ys, my_b = batch_moments(c0, c1)
            xy_all, sy_all, _ = fold_cross(Ys, everything)
            coef[:, c0:c1], intercept[c0:c1] = refit(Ys, my_b, xy_all, sy_all, a.expand(c1 - c0))
    return RidgeCVResult(best_alphas, coef, intercept, cv_scores)


def ridge_cv_ref(X, Y, alphas, cv=5, fit_intercept=True, local_alpha=True, target_batch=4096, chunk_rows=1024,
                 loo_basis=True, kfold_basis=True, *, scoring=None, compute_dtype=None, device=None):
    """The oracle, float64 on the device of X (or `device`; compute_dtype is ignored): from the SVD of the centred
    training rows X = U S V' with numpy lstsq's rank rule (singular values <= max(n, p) eps s_max dropped),
    w = V S / (S^2 + a) U'y for every fold and alpha, the validation rows scored explicitly (R^2 or MSE); LOO
    and GCV from the hat matrix H = U S^2 / (S^2 + a) U' (+ 1/n with an intercept), its residual (I - H) y
    written as U (a / (S^2 + a)) U'y plus the part of y outside span(U), 1 - H_ii as the leverage outside the
    span plus sum_j U_ij^2 a / (S_j^2 + a), and n - tr(H) as (n - df0 - rank) + sum a / (S^2 + a), the parts
    outside the span exactly 0 when rank = n - df0: nothing cancels when p >= n."""
    X = _as_tensor(X)
    dev = torch.device(device) if device is not None else X.device
    X = X.to(dev, torch.float64)
    Y = _as_tensor(np.asarray(Y[:]) if not isinstance(Y, torch.Tensor) else Y).to(dev, torch.float64)
    n, p = X.shape
    mode, scoring = _ridge_mode(cv, scoring)
    alphas = torch.as_tensor(np.asarray(alphas, dtype=np.float64).ravel(), device=dev)
    eps = torch.finfo(torch.float64).eps

    def svd(Xa):
        U, S, Vt = torch.linalg.svd(Xa, full_matrices=False)
        keep = S > max(Xa.shape) * eps * S.max()
        return U[:, keep], S[keep], Vt[keep]

    def centred(A):
        return A - A.mean(0) if fit_intercept else A

    def fit(A, B, a, usv=None):  # ridge on rows A -> (W, intercept); usv: the SVD of the centred A
        U, S, Vt = usv if usv is not None else svd(centred(A))
        my = B.mean(0) if fit_intercept else torch.zeros(B.shape[1], dtype=torch.float64, device=dev)
        mx = A.mean(0) if fit_intercept else torch.zeros(p, dtype=torch.float64, device=dev)
        W = Vt.T @ ((S / (S ** 2 + a))[:, None] * (U.T @ (B - my)))
        return W, my - mx @ W

    scores = torch.zeros(len(alphas), Y.shape[1], dtype=torch.float64, device=dev)
    if mode != "folds":
        U, S, _ = svd(centred(X))
        h0, df0 = (1.0 / n, 1.0) if fit_intercept else (0.0, 0.0)
        Yc = centred(Y)
        uy = U.T @ Yc
        spans = len(S) >= n - df0                                        # the fit interpolates: nothing outside
        perp = Yc - U @ uy if not spans else torch.zeros_like(Yc)        # y outside the span
        lev0 = (1 - h0 - (U ** 2).sum(1)).clamp_min(0) * (not spans)     # 1 - leverage of the whole span
        for k, a in enumerate(alphas):
            f = a / (S ** 2 + a)                                         # 1 - shrinkage per direction
            e = U @ (f[:, None] * uy) + perp                             # (I - H) y
            if mode == "loo":
                scores[k] = ((e / (lev0 + (U ** 2) @ f)[:, None]) ** 2).mean(0)
            else:
                scores[k] = (e ** 2).mean(0) / ((max(n - df0 - len(S), 0) + f.sum()) / n) ** 2
        crit = scores
    else:
        folds = ridge_folds(cv, n)
        _check_r2_folds(folds, scoring)
        for v in folds:
            tr = torch.as_tensor(np.setdiff1d(np.arange(n), v), device=dev)
            v = torch.as_tensor(v, device=dev)
            usv = svd(centred(X[tr]))
            sst = ((Y[v] - Y[v].mean(0)) ** 2).sum(0)
            for k, a in enumerate(alphas):
                W, b = fit(X[tr], Y[tr], a, usv)
                sse = ((Y[v] - X[v] @ W - b) ** 2).sum(0)
                fold = sse / len(v) if scoring == "mse" else torch.where(sst > 0, 1 - sse / sst, 0.0)
                scores[k] += fold / len(folds)
        crit = (-scores if scoring == "r2" else scores) - 1e-10 * torch.log(alphas)[:, None]
    chosen = crit.argmin(0) if local_alpha else crit.sum(1).argmin().expand(Y.shape[1])
    W = torch.empty(p, Y.shape[1], dtype=torch.float64, device=dev)
    b = torch.empty(Y.shape[1], dtype=torch.float64, device=dev)
    for a in torch.unique(chosen):
        sel = chosen == a
        W[:, sel], b[sel] = fit(X, Y[:, sel], alphas[a])
    return RidgeCVResult(alphas[chosen], W, b, scores.gather(0, chosen[None]).ravel())


# ---------------------------------------------------------------------------------------------------------
# SAE top-k encode
# ---------------------------------------------------------------------------------------------------------

def topk_encode_ref(x, W_enc, b_enc, k, b_pre=None):
    """The oracle: relu((x - b_pre) @ W_enc + b_enc), its k largest per row, sorted descending, ties to the
    lower latent index (a stable sort) -> values (n, k) float32|64, indices (n, k) int64."""
    ts = [t for t in (x, W_enc, b_enc, b_pre) if t is not None]
    ct = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    xc = x.to(ct) - (b_pre.to(ct) if b_pre is not None else 0)
    z = torch.relu(xc @ W_enc.to(ct) + b_enc.to(ct))  # (n, n_latents): what the fused op never stores
    v, i = torch.sort(z, dim=1, descending=True, stable=True)
    return v[:, :k].contiguous(), i[:, :k].contiguous()


def topk_encode(x, W_enc, b_enc, k, b_pre=None):
    """Top-k SAE codes of x (n, d) under the encoder W_enc (d, n_latents), b_enc (n_latents,), optional
    pre-encoder bias b_pre (d,) -> (values (n, k), indices (n, k) int64), as topk_encode_ref.

    Fused (csrc/topk_*): per block of rows, BLAS on (rows x latent-tile) tiles kept in cache, bias + ReLU and a
    running per-row top-k; memory O(n k + tile), never the (n, n_latents) pre-activations."""
    named = [(name, t) for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("b_pre", b_pre)) if t is not None]
    bad = torch.stack([(~torch.isfinite(t)).sum() for _, t in named]).tolist()  # one host read for the four checks
    for (name, _), c in zip(named, bad):
        if c:
            raise ValueError(f"topk_encode: {name} has {c} NaN/inf values")
    if W_enc.dim() == 2 and not 1 <= k <= W_enc.shape[1]:
        raise ValueError(f"topk_encode: k = {k} must be in 1..n_latents = {W_enc.shape[1]}")
    if use_op("topk_encode", x, W_enc, b_enc, b_pre):
        return torch.ops.metalign_ops.topk_encode(x, W_enc, b_enc, k, b_pre)
    return topk_encode_ref(x, W_enc, b_enc, k, b_pre)


# ---------------------------------------------------------------------------------------------------------
# fast Walsh-Hadamard transform (the Fastfood projection of models.SubspaceWrapper)
# ---------------------------------------------------------------------------------------------------------

def _fwht_check(x):
    if x.dim() == 0:
        raise ValueError("fwht: x must have at least one dimension (the transform runs over the last one)")
    D = x.shape[-1]
    if D < 1 or D & (D - 1):
        raise ValueError(f"fwht: the last dimension of x must be a power of two, got D = {D} (shape "
                         f"{tuple(x.shape)}); zero-pad it to the next power of two")
    return D


def fwht_ref(x):
    """The oracle: x (..., D) -> x @ H_D (scipy.linalg.hadamard(D), unnormalised, natural order), by log2(D)
    reshapes: level h views the last dim as (D / 2h, 2, h) and maps each pair (a, b) to (a + b, a - b)."""
    D = _fwht_check(x)
    lead = x.shape[:-1]
    y = x.reshape(-1, D)
    h = 1
    while h < D:
        v = y.view(y.shape[0], D // (2 * h), 2, h)
        y = torch.stack([v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]], 2).reshape(-1, D)
        h *= 2
    return y.reshape(*lead, D) if D > 1 else x.clone()


def fwht(x):
    """Unnormalised fast Walsh-Hadamard transform over the last dimension of x (..., D), D a power of two:
    x @ scipy.linalg.hadamard(D), batched over the leading dims, O(D log D) per row; differentiable (the op's
    autograd formula, registered in _register_fakes: H is symmetric, so the backward is the same op).

    float32/float64 go to the op (csrc/fwht_*: in-cache blocked passes on the CPU, shared-memory levels
    then global passes on CUDA); other dtypes, or no extension, to fwht_ref. Divide by sqrt(D) for the
    orthonormal transform (then it is its own inverse)."""
    _fwht_check(x)
    if x.dtype in (torch.float32, torch.float64) and use_op("fwht", x):
        return torch.ops.metalign_ops.fwht(x)
    return fwht_ref(x)


# ---------------------------------------------------------------------------------------------------------
# fake (meta) kernels: output shapes and dtypes without running the op, so torch.compile and FakeTensor
# tracing pass through the ops; and the autograd formula of fwht
# ---------------------------------------------------------------------------------------------------------

def _fake_cka_shift_rows(x, shift, *threads):
    ct = _compute_dtype(x, shift)
    return x.new_empty(x.shape, dtype=ct), x.new_empty(x.shape[:1], dtype=torch.float64)


def _fake_cka_moments(x, y, shift_x, shift_y):
    d1, d2 = x.shape[1], y.shape[1]
    f = dict(dtype=torch.float64)
    return (x.new_empty((d1, d1), **f), x.new_empty((d2, d2), **f), x.new_empty((d1, d2), **f),
            x.new_empty((3, d1), **f), x.new_empty((3, d2), **f), x.new_empty((6,), **f))


def _fake_cka_rbf_tile(gx, gy, nxi, nxj, nyi, nyj, gamma_x, gamma_y, diagonal, *block):
    ti, tj = gx.shape
    return (gx.new_empty((ti,)), gx.new_empty((tj,)), gx.new_empty((ti,)), gx.new_empty((tj,)), gx.new_empty((3,)))


def _fake_rbf_kernel_tile(g, ni, nj, gamma, diagonal):
    return g.new_empty(g.shape)


def _fake_episodes(features, pos_ptr, pos_idx, pos_val, neg_ptr, neg_idx, neg_val, mag_scale, n_episodes, length,
                   seed, *rest):  # rest: [threads,] first
    B, L, d = n_episodes, length, features.shape[1]
    i64 = dict(dtype=torch.int64)
    return (features.new_empty((B, L, d + 1)), features.new_empty((B, L)), features.new_empty((B, L)),
            features.new_empty((B,), **i64), features.new_empty((B, L), **i64))


def _fake_topk_encode(x, W_enc, b_enc, k, b_pre=None, *grid):
    ct = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (x, W_enc, b_enc, b_pre)) \
        else torch.float32
    return x.new_empty((x.shape[0], k), dtype=ct), x.new_empty((x.shape[0], k), dtype=torch.int64)


def _fake_fwht(x, *grid):
    return x.new_empty(x.shape)


def _fake_ridge_score_kfold(s, z, b, yy, quad, alphas, rows, *rest):
    """k-fold SSE (n_alphas, t) float64 on the device of z; rest: basis and coef, or the grid's threads."""
    return z.new_empty((alphas.shape[0], z.shape[1]), dtype=torch.float64)


def _fake_ridge_scores_best(z, alphas):
    """(scores (n_alphas, t) float64, best (t,) int64) on the device of z."""
    return (z.new_empty((alphas.shape[0], z.shape[1]), dtype=torch.float64),
            z.new_empty((z.shape[1],), dtype=torch.int64))


def _fake_ridge_score_loo(xr, y, s, z, alphas, h0, *rest):  # rest: [basis, coef,] chunk_rows[, threads]
    return _fake_ridge_scores_best(z, alphas)


def _fake_ridge_score_gcv(s, z, yy, alphas, n, df0, *threads):
    return _fake_ridge_scores_best(z, alphas)


FAKES = {"cka_shift_rows": _fake_cka_shift_rows, "cka_shift_rows_grid": _fake_cka_shift_rows,
         "cka_moments": _fake_cka_moments, "cka_rbf_tile": _fake_cka_rbf_tile,
         "cka_rbf_tile_grid": _fake_cka_rbf_tile, "rbf_kernel_tile": _fake_rbf_kernel_tile,
         "episodes": _fake_episodes, "episodes_grid": _fake_episodes, "topk_encode": _fake_topk_encode,
         "topk_encode_grid": _fake_topk_encode, "fwht": _fake_fwht, "fwht_grid": _fake_fwht,
         "ridge_score_kfold": _fake_ridge_score_kfold, "ridge_score_kfold_grid": _fake_ridge_score_kfold,
         "ridge_score_kfold_basis": _fake_ridge_score_kfold, "ridge_score_loo": _fake_ridge_score_loo,
         "ridge_score_loo_grid": _fake_ridge_score_loo, "ridge_score_loo_basis": _fake_ridge_score_loo,
         "ridge_score_loo_basis_grid": _fake_ridge_score_loo, "ridge_score_gcv": _fake_ridge_score_gcv,
         "ridge_score_gcv_grid": _fake_ridge_score_gcv}


def _fwht_backward(ctx, grad):
    return torch.ops.metalign_ops.fwht(grad)  # y = x H with H symmetric: dL/dx = dL/dy H


_REGISTERED = []


def _register_fakes():
    """Fake kernels for the ops in FAKES and fwht's autograd formula, once per process, after the library is
    loaded (the schemas must exist)."""
    if _REGISTERED:
        return
    _REGISTERED.append(True)
    for op, fn in FAKES.items():
        if hasattr(torch.ops.metalign_ops, op):
            torch.library.register_fake(f"metalign_ops::{op}")(fn)
    if hasattr(torch.ops.metalign_ops, "fwht"):
        torch.library.register_autograd("metalign_ops::fwht", _fwht_backward)


# ---------------------------------------------------------------------------------------------------------
# report and nvcc check
# ---------------------------------------------------------------------------------------------------------

def report():
    src = _ext()
    ops = sorted({sc.name.split("::")[1] for sc in torch._C._jit_get_all_schemas()
                  if sc.name.startswith("metalign_ops::")}) if src else []
    keys = {op: [k for k in ("CPU", "CUDA") if has_kernel(op, k)] for op in ops}
    cuda_lib = (library_has_cuda(src) if src.endswith(".so") else bool(list(Path(src).glob("*.cuda.o")))) if src \
        else False
    lines = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()})",
             f"extension: {src or 'NOT BUILT, using *_ref'} ({'with' if cuda_lib else 'without'} CUDA kernels)",
             f"cache: {CACHE}",
             f"OpenMP threads: {torch.get_num_threads()} (torch intra-op; set OMP_NUM_THREADS to change)",
             f"nvcc: {cuda_home() or 'not found'}"]
    lines += [f"  metalign_ops::{op:<22} {'+'.join(keys[op]) or 'no kernel'}" for op in ops]
    return "\n".join(lines)


def nvcc_command(cu, obj, archs=NVCC_ARCHS):
    """The nvcc command line of the real build for one csrc/*.cu file, compiling to the object `obj`: what
    torch.utils.cpp_extension's ninja build runs for the JIT load and for setup.py alike (its defines, include
    paths, COMMON_NVCC_FLAGS, the -gencode flags of TORCH_CUDA_ARCH_LIST = archs, -fPIC, our CUDA_CFLAGS and
    -std=c++20), plus -c."""
    from torch.utils import cpp_extension
    home = cuda_home()
    old = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        gencode = cpp_extension._get_cuda_arch_flags(list(CUDA_CFLAGS))
    finally:
        if old is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old
    system = cpp_extension.include_paths("cuda") + [sysconfig.get_paths()["include"]]
    return [str(Path(home, "bin", "nvcc")) if home else "nvcc", "-c", str(cu), "-o", str(obj),
            "-DTORCH_EXTENSION_NAME=metalign_ops", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{CSRC}",
            *[f for i in system for f in ("-isystem", i)], *cpp_extension.COMMON_NVCC_FLAGS, *gencode,
            "--compiler-options", "-fPIC", *CUDA_CFLAGS, "-std=c++20"]


def nvcc_check(out_dir=ROOT / "build" / "nvcc", archs=NVCC_ARCHS, jobs=2):
    """Compile every csrc/*.cu to an object file with the real build's nvcc command (nvcc_command) for each
    architecture in `archs` (sm_80 and sm_90 by default), `jobs` files at a time; raises on the first failure
    with nvcc's output. Needs nvcc, not a GPU."""
    if cuda_home() is None:
        print("nvcc not found: skipping the CUDA compile check")
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(cu):
        obj = out_dir / (Path(cu).stem + ".o")
        r = subprocess.run(nvcc_command(cu, obj, archs), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"nvcc failed on {Path(cu).name} ({archs}):\n{r.stdout}{r.stderr}")
        print(f"nvcc {Path(cu).name} -> {obj} ({archs})", flush=True)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, CUDA_SOURCES))


if __name__ == "__main__":
    if "--nvcc-check" in sys.argv[1:]:
        nvcc_check()
    else:
        print(report())
