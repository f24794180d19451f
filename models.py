"""Models shared by train.py, extract.py and the eval_*.py tasks: the top-k SAE (and its encoder into HDF5),
the meta-learner, and the subspace wrappers of encoder warping.

    from models import load_meta
    model, ckpt = load_meta("runs/meta/world.pt")      # MetaLearner in eval mode + config/versions
    Z = model.encode(X)                                # (n, d) features -> (n, d_model) aligned

    from models import load_sae
    sae, info = load_sae("sae/world.pt")               # TopKSAE (own or ViT-Prisma checkpoint) + config/versions
    values, indices = sae.encode(X)                    # (n, k) top-k codes by the fused kernels.topk_encode
"""

# =========================================================================================================
# sparse autoencoder: TopKSAE (Gao et al. 2024), its checkpoints, the ViT-Prisma format
# =========================================================================================================
import json as _json
import math as _math
import os as _os
import pickle as _pickle
import re as _re

import numpy as _np
import torch as _torch
import torch.nn as _nn
import torch.nn.functional as _F

SAE_NORMALIZE = ("none", "expected_average", "layer_norm", "constant_norm_rescale")


class TopKSAE(_nn.Module):
    """Top-k sparse autoencoder (Gao et al. 2024) with ViT-Prisma's parameter names and shapes:
    W_enc (d, n_latents), b_enc (n_latents,), W_dec (n_latents, d) with unit-norm rows, b_dec (d,), which is
    also the pre-encoder bias:

        x' = norm(x);  z = top-k of relu((x' - b_dec) @ W_enc + b_enc);  x_hat = denorm(z @ W_dec + b_dec)

    normalize: "none"; "expected_average" (x' = x * scale, one scalar fitted on the data so that E|x'|^2 = d,
    as Gao et al.); "layer_norm" (per row (x - mean) / (std + 1e-5)) and "constant_norm_rescale" (per row
    x * sqrt(d) / |x|), both as ViT-Prisma. Codes (values, indices) live in the normalised space.
    Tied init: unit-norm random decoder rows, W_enc = W_dec^T.
    """

    def __init__(self, d, n_latents, k, normalize="expected_average"):
        super().__init__()
        if normalize not in SAE_NORMALIZE:
            raise ValueError(f"normalize must be one of {SAE_NORMALIZE}, got {normalize!r}")
        if not 1 <= k <= n_latents:
            raise ValueError(f"k = {k} must be in 1..n_latents = {n_latents}")
        self.d, self.n_latents, self.k, self.normalize = d, n_latents, k, normalize
        W = _torch.randn(n_latents, d)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = _nn.Parameter(W)                      # (n_latents, d)
        self.W_enc = _nn.Parameter(W.T.clone())            # (d, n_latents), tied init
        self.b_enc = _nn.Parameter(_torch.zeros(n_latents))
        self.b_dec = _nn.Parameter(_torch.zeros(d))
        self.register_buffer("scale", _torch.ones(()))     # expected_average: the fitted scalar

    def args(self):
        return dict(d=self.d, n_latents=self.n_latents, k=self.k, normalize=self.normalize)

    def normalize_in(self, x):
        """(n, d) -> (x' (n, d), state for denormalize)."""
        x = x.to(self.W_enc.dtype)
        if self.normalize == "expected_average":
            return x * self.scale, self.scale
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True)
            return (x - mu) / (std + 1e-5), (mu, std + 1e-5)
        if self.normalize == "constant_norm_rescale":
            c = self.d ** 0.5 / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            return x * c, c
        return x, None

    def denormalize(self, y, state):
        if self.normalize in ("expected_average", "constant_norm_rescale"):
            return y / state
        if self.normalize == "layer_norm":
            return y * state[1] + state[0]
        return y

    @_torch.no_grad()
    def fit_normalization(self, x):
        """expected_average: scale = sqrt(d / mean |x|^2) on a sample x (n, d); a no-op otherwise."""
        if self.normalize == "expected_average":
            self.scale.fill_(float((self.d / (x.double() ** 2).sum(1).mean()) ** 0.5))

    def pre_acts(self, xn):
        return (xn - self.b_dec) @ self.W_enc + self.b_enc  # (n, n_latents)

    def decode_codes(self, values, indices):
        """(n, k) codes -> (n, d) reconstruction in the normalised space: sum_j v_j W_dec[i_j] + b_dec."""
        return _F.embedding_bag(indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype),
                                mode="sum") + self.b_dec

    @_torch.no_grad()
    def encode(self, x):
        """(n, d) features -> (values (n, k), indices (n, k) int64) by the fused op kernels.topk_encode."""
        import kernels
        xn, _ = self.normalize_in(_torch.as_tensor(x))
        return kernels.topk_encode(xn, self.W_enc, self.b_enc, self.k, self.b_dec)

    @_torch.no_grad()
    def decode(self, x_or_none, values, indices):
        """Reconstruction in feature space; x_or_none: the features (needed for per-row normalisations)."""
        state = self.normalize_in(x_or_none)[1] if x_or_none is not None else self.scale
        return self.denormalize(self.decode_codes(values, indices), state)

    def forward(self, xn):
        """Training pass on normalised rows xn (n, d) -> (recon (n, d), values, indices, pre (n, n_latents))."""
        pre = self.pre_acts(xn)
        values, indices = _torch.relu(pre).topk(self.k, dim=1)
        return self.decode_codes(values, indices), values, indices, pre

    @_torch.no_grad()
    def renorm_decoder(self):
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @_torch.no_grad()
    def remove_parallel_grad(self):
        """Project out the gradient component along each (unit) decoder row (Gao et al. 2024, Sec. A.4)."""
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(1, keepdim=True) * self.W_dec


def sae_size(n_rows, d, min_nonzero=120, rows_seen=800_000, batch=256, k=None):
    """The SAE sizing rule: width, k and epochs from the training pool's size and the feature width.
    train.py --stage sae applies it by default (--n-latents auto, --k 0, --epochs 0); k: a k chosen elsewhere
    (then the width follows that k, and it is returned as given).

        k          = clip(round(d / 24), 8, 128)              active latents per row (Gao et al. 2024: 32 at d 768)
        n_latents  = clip(n_rows k / (4 min_nonzero), d, 16 d), rounded up to a multiple of 64: on average every
                     latent fires on 4x the rows a function needs (min_nonzero, train.py --min-nonzero), so the
                     dictionary cannot outgrow the pool and most latents become functions
        epochs     = clip(ceil(rows_seen / n_rows), 1, 200)   about rows_seen rows in all (800k = ~3,000 steps of 256)
        batch      = rows per Adam step, as measured (train.py's default)

    Measured on the full-size world (20,000 x 768 pool -> 1,344 latents, k 32, 40 epochs; README, Sparse
    autoencoders): 98 % of the planted h and g directions have a decoder row at cosine > 0.8, no dead
    latents, ~1,300 functions with >= 120 positives. -> dict of train.py --stage sae flags' values."""
    if n_rows < 1 or d < 1 or min_nonzero < 1 or (k is not None and k < 1):
        raise ValueError(f"sae_size needs positive n_rows, d, min_nonzero and k, got {n_rows}, {d}, {min_nonzero}, {k}")
    given = k is not None
    k = int(k) if given else int(min(128, max(8, round(d / 24))))
    width = n_rows * k / (4 * min_nonzero)
    n_latents = int(-(-min(16 * d, max(d, width)) // 64) * 64)
    epochs = int(min(200, max(1, -(-rows_seen // n_rows))))
    return dict(n_latents=n_latents, k=k if given else min(k, n_latents), epochs=epochs, batch=batch)


def geometric_median(x, iters=50, eps=1e-8):
    """Weiszfeld iterations on rows x (n, d) -> (d,): the b_dec init of Gao et al. / ViT-Prisma."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() < 1e-7 * (1 + m.norm()):
            return m_new
        m = m_new
    return m


class _ForeignStub:
    """Stands in for classes of packages that are not installed (vit_prisma, sae_lens) when unpickling a
    checkpoint: keeps the pickled attributes, so the config's fields can be read."""

    def __init__(self, *args, **kwargs):
        self._args = args

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"_state": state})


class _ForeignUnpickler(_pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            if module.split(".")[0] in ("vit_prisma", "sae_lens"):
                return type(name, (_ForeignStub,), {"__module__": module})
            raise


class _ForeignPickle:  # the pickle_module torch.load is given: pickle with the tolerant Unpickler
    Unpickler = _ForeignUnpickler
    load = staticmethod(lambda f, **kw: _ForeignUnpickler(f, **kw).load())
    __name__ = "metalign_foreign_pickle"


def _prisma_value(v):
    """config.json values as ViT-Prisma's save_config writes them ({"__type__": "torch.dtype", ...})."""
    if isinstance(v, dict) and "__type__" in v:
        return v.get("value")
    return v


def _sae_from_prisma(path, cfg, sd):
    """A TopKSAE from a ViT-Prisma config (object or dict) and state dict (W_enc, b_enc, W_dec, b_dec)."""
    get = (lambda k, default=None: _prisma_value(cfg.get(k, default))) if isinstance(cfg, dict) else \
        (lambda k, default=None: getattr(cfg, k, default))
    act = get("activation_fn_str", "relu")
    kw = get("activation_fn_kwargs", {}) or {}
    if act != "topk" or "k" not in kw:
        raise ValueError(f"{path}: ViT-Prisma config has activation_fn_str={act!r}, activation_fn_kwargs={kw!r}; "
                         f"only top-k SAEs (activation_fn_str='topk' with a k) are supported")
    arch = get("architecture", "standard")
    if arch != "standard":
        raise ValueError(f"{path}: ViT-Prisma architecture {arch!r}; only 'standard' top-k SAEs are supported")
    norm = get("normalize_activations", "none") or "none"
    if norm not in SAE_NORMALIZE:
        raise ValueError(f"{path}: normalize_activations={norm!r} is not supported (expected one of {SAE_NORMALIZE})")
    d = int(get("d_in"))
    n_lat = get("d_sae") or d * int(get("expansion_factor", 0) or 0)
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in sd]
    if missing:
        raise ValueError(f"{path}: state_dict lacks {missing}; found {sorted(sd)[:10]}")
    sae = TopKSAE(d, int(n_lat), int(kw["k"]), normalize=norm)
    _load_sae_state(path, sae, {k: sd[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, strict=False)
    return sae


def _load_sae_state(path, sae, sd, strict=True):
    want = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    for k, v in sd.items():
        if k in want and tuple(v.shape) != want[k]:
            raise ValueError(f"{path}: checkpoint of another shape: {k} is {tuple(v.shape)}, expected {want[k]} "
                             f"for d={sae.d}, n_latents={sae.n_latents}")
    sae.load_state_dict({k: _torch.as_tensor(v).float() for k, v in sd.items()}, strict=strict)


def load_sae(path, config_path=None, map_location="cpu"):
    """An SAE checkpoint -> (TopKSAE in eval mode, info dict: format, config, versions, step).

    Reads (1) train.py --stage sae checkpoints; (2) ViT-Prisma's legacy single file {"cfg": config object,
    "state_dict": {...}} (.pt, .pkl, .pkl.gz; vit_prisma need not be installed); (3) ViT-Prisma's Hugging
    Face layout, a bare state dict (weights.pt) with config.json beside it (or config_path)."""
    import gzip
    path = _os.fspath(path)
    if not _os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; expected an SAE checkpoint (train.py --stage sae --out) or a "
                                f"ViT-Prisma top-k SAE (.pt with config)")
    try:
        if path.endswith(".pkl.gz") or path.endswith(".pkl"):
            with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
                obj = _ForeignUnpickler(fh).load()
        else:
            obj = _torch.load(path, map_location=map_location, weights_only=False, pickle_module=_ForeignPickle)
    except Exception as e:
        raise ValueError(f"{path}: not a readable SAE checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if obj.get("kind") == "metalign.sae":
        sae = TopKSAE(**obj["sae_args"])
        _load_sae_state(path, sae, obj["state_dict"])
        return sae.eval(), dict(format="metalign", **{k: obj.get(k) for k in ("config", "versions", "step", "metrics")})
    if "cfg" in obj and "state_dict" in obj and config_path is None:
        sae = _sae_from_prisma(path, obj["cfg"], obj["state_dict"])
        return sae.eval(), dict(format="vit_prisma", config=dict(getattr(obj["cfg"], "__dict__", {}) or {}))
    sd = obj.get("state_dict", obj)
    if "W_enc" in sd:
        cp = config_path or _os.path.join(_os.path.dirname(_os.path.abspath(path)), "config.json")
        if not _os.path.exists(cp):
            raise ValueError(f"{path}: a bare SAE state dict needs its ViT-Prisma config.json; {cp} not found")
        with open(cp) as fh:
            cfg = _json.load(fh)
        return _sae_from_prisma(path, cfg, sd).eval(), dict(format="vit_prisma", config=cfg)
    raise ValueError(f"{path}: not an SAE checkpoint: keys {sorted(obj)[:10]} (expected train.py's 'kind': "
                     f"'metalign.sae', ViT-Prisma's 'cfg' + 'state_dict', or a state dict with W_enc)")


# =========================================================================================================
# meta-learning: functions from SAE codes or neurons, the meta-learned Transformer, LSTM and
# static-linear baselines, encode(), checkpoint loading
# =========================================================================================================

def match_rows(path, ids, image_ids, features_path="the features file"):
    """Rows of `path` (whose /image_ids are `ids`) holding each of `image_ids`, in that order -> int64 array.

    Functions may come from another file than the features the model reads (the CLIP SAE's codes while the
    model reads DINOv3 features): rows are matched by image id, so the two files may order their images
    differently and `path` may hold more images. An image of the features file missing from `path` is an
    error naming both files and the number missing; so are duplicate ids in `path`."""
    from data import DataError
    pos = {}
    for i, k in enumerate(ids):
        if pos.setdefault(k, i) != i:
            raise DataError(f"{path}: /image_ids holds {k!r} twice; image ids must be unique")
    rows = [pos.get(k, -1) for k in image_ids]
    missing = [k for k, r in zip(image_ids, rows) if r < 0]
    if missing:
        raise DataError(f"{path}: {len(missing)} of the {len(image_ids)} images of {features_path} are missing from "
                        f"its /image_ids (first: {missing[0]!r}); functions and features must cover the same images")
    return _np.asarray(rows, dtype=_np.int64)


def read_codes(path, n_rows=None, image_ids=None, features_path="the features file"):
    """SAE codes (/sae/indices (n, k) int, /sae/values (n, k) float) -> (indices int64, values float32) numpy.

    n_rows / image_ids: the rows of the features file (`features_path`) the codes must align with. When both
    files have /image_ids, rows are matched by id (match_rows: another order or a superset is fine, a missing
    image is an error); without ids in the codes file the row counts must agree."""
    import h5py
    from data import DataError, check_unique, decode_strings
    import os
    if not os.path.exists(path):
        raise DataError(f"{path} not found; expected an HDF5 file with /sae/indices and /sae/values "
                        "(train.py --stage sae)")
    with h5py.File(path, "r") as f:
        for k in ("sae/indices", "sae/values"):
            if k not in f:
                raise DataError(f"{path}: field '/{k}' missing; encode the features with the SAE first "
                                f"(train.py --stage sae) or pass --codes FILE")
        idx, val = _np.asarray(f["sae/indices"][...]), _np.asarray(f["sae/values"][...], dtype=_np.float32)
        ids = decode_strings(f["image_ids"][...]) if "image_ids" in f else None
    if ids is not None:
        check_unique(path, "/image_ids", ids)
    if idx.ndim != 2 or idx.shape != val.shape:
        raise DataError(f"{path}: /sae/indices {idx.shape} and /sae/values {val.shape} must both be (n_images, k)")
    if not _np.issubdtype(idx.dtype, _np.integer) or (idx.size and idx.min() < 0):
        raise DataError(f"{path}: /sae/indices must hold non-negative integers, got dtype {idx.dtype}")
    if image_ids is not None and ids is not None:
        if list(ids) != list(image_ids):
            rows = match_rows(path, ids, image_ids, features_path)
            idx, val = idx[rows], val[rows]
    elif n_rows is not None and idx.shape[0] != n_rows:
        raise DataError(f"{path}: /sae/indices has {idx.shape[0]} rows but {features_path} has {n_rows}, and "
                        f"{path} has no /image_ids to match them by; codes and features must be row-aligned")
    return idx.astype(_np.int64), val


def latent_positions(latents, ids):
    """Position of each of `ids` in `latents`, which may be in any order (a checkpoint's training latents are in the
    function curriculum's densest-first order, not sorted); ids not in `latents` -> -1."""
    lat, ids = _np.asarray(latents), _np.asarray(ids)
    if not len(lat):
        return _np.full(ids.shape, -1)
    order = _np.argsort(lat, kind="stable")
    s = lat[order]
    j = _np.minimum(_np.searchsorted(s, ids), len(s) - 1)
    return _np.where(s[j] == ids, order[j], -1)


def functions_from_codes(indices, values, min_nonzero=120, latents=None):
    """Binary functions from top-k codes: latent j is a function if active (value > 0) on >= min_nonzero rows.

    indices, values (n, k) -> dict(pos_ptr (F+1,), pos_idx (nnz,) rows sorted per function, pos_val (nnz,)
    float32, neg_ptr/neg_idx/neg_val empty (negatives = every other row, magnitude 0), mag_scale (F,)
    1 / std of the active values, latents (F,) latent ids, n_rows). latents: use exactly these ids
    (held-out evaluation), still requiring min_nonzero active rows."""
    n = indices.shape[0]
    active = values > 0
    rows = _np.nonzero(active)[0]
    lat, val = indices[active], values[active]
    order = _np.lexsort((rows, lat))  # by latent, then row
    lat, rows, val = lat[order], rows[order], val[order]
    ids, start, counts = _np.unique(lat, return_index=True, return_counts=True)
    keep = counts >= min_nonzero
    if latents is not None:
        keep &= _np.isin(ids, latents)
    if not keep.any():
        raise ValueError(f"no function: no latent is active on >= {min_nonzero} of {n} images "
                         f"(most active: {int(counts.max()) if len(counts) else 0}); lower --min-nonzero")
    sel = [(s, c) for s, c, k in zip(start, counts, keep) if k]
    pos_idx = _np.concatenate([rows[s:s + c] for s, c in sel])
    pos_val = _np.concatenate([val[s:s + c] for s, c in sel])
    ptr = _np.concatenate([[0], _np.cumsum([c for _, c in sel])])
    std = _np.array([val[s:s + c].std() for s, c in sel])
    e = _torch.empty(0, dtype=_torch.int64)
    return dict(pos_ptr=_torch.from_numpy(ptr.astype(_np.int64)), pos_idx=_torch.from_numpy(pos_idx.astype(_np.int64)),
                pos_val=_torch.from_numpy(pos_val.astype(_np.float32)), neg_ptr=e, neg_idx=e,
                neg_val=_torch.empty(0), mag_scale=_torch.from_numpy((1 / _np.maximum(std, 1e-6)).astype(_np.float32)),
                latents=_torch.from_numpy(ids[keep].astype(_np.int64)), n_rows=n)


def functions_from_neurons(X, latents=None):
    """Ablation: each feature dim split at its median; positive = above, magnitude = x - median (signed),
    negatives listed explicitly with their (negative) magnitudes. X (n, d) -> the functions_from_codes dict."""
    X = _np.asarray(X, dtype=_np.float32)
    n, d = X.shape
    dims = _np.arange(d) if latents is None else _np.asarray(latents)
    Z = X[:, dims] - _np.median(X[:, dims], 0)
    out = {}
    for name, m in (("pos", Z > 0), ("neg", Z <= 0)):
        cols = [_np.nonzero(m[:, j])[0] for j in range(len(dims))]
        ptr = _np.concatenate([[0], _np.cumsum([len(c) for c in cols])])
        out[f"{name}_ptr"] = _torch.from_numpy(ptr.astype(_np.int64))
        out[f"{name}_idx"] = _torch.from_numpy(_np.concatenate(cols).astype(_np.int64))
        vals = _np.concatenate([Z[c, j] for j, c in enumerate(cols)])
        out[f"{name}_val"] = _torch.from_numpy(vals.astype(_np.float32))
    out["mag_scale"] = _torch.from_numpy((1 / _np.maximum(Z.std(0), 1e-6)).astype(_np.float32))
    out["latents"], out["n_rows"] = _torch.from_numpy(dims.astype(_np.int64)), n
    return out


def densest_first(fns):
    """The functions dict (neuron functions included) reordered by positives, most first (ties: latent id), so that
    function_prefix(fns, k) is the k densest. The CSR arrays are rebuilt; latents and mag_scale follow."""
    n_pos = fns["pos_ptr"].diff()
    order = _np.lexsort((fns["latents"].numpy(), -n_pos.numpy()))
    out = dict(fns)
    for side in ("pos", "neg"):
        ptr = fns[f"{side}_ptr"]
        if not len(ptr):
            continue
        counts = ptr.diff()[order]
        rows = _torch.cat([_torch.arange(int(ptr[f]), int(ptr[f + 1])) for f in order])
        out[f"{side}_ptr"] = _torch.cat([ptr.new_zeros(1), counts.cumsum(0)])
        out[f"{side}_idx"], out[f"{side}_val"] = fns[f"{side}_idx"][rows], fns[f"{side}_val"][rows]
    t = _torch.from_numpy(order)
    out["mag_scale"], out["latents"] = fns["mag_scale"][t], fns["latents"][t]
    return out


def function_prefix(fns, k, host_ptr=None):
    """The first k functions of a functions dict (views: CSR prefixes, no copy). host_ptr: {"pos": ptr, "neg": ptr}
    CPU copies of the pointers when fns lives on a GPU (no device-to-host sync per call)."""
    k = int(k)
    out = dict(fns, mag_scale=fns["mag_scale"][:k], latents=fns["latents"][:k])
    for side in ("pos", "neg"):
        ptr = fns[f"{side}_ptr"]
        if len(ptr):
            end = int((host_ptr or {}).get(side, ptr)[k])
            out[f"{side}_ptr"] = ptr[:k + 1]
            out[f"{side}_idx"], out[f"{side}_val"] = fns[f"{side}_idx"][:end], fns[f"{side}_val"][:end]
    return out


def functions_at(step, n_functions, start, ramp):
    """Function curriculum: how many of the densest functions a step trains on, growing geometrically from `start`
    to all n_functions over `ramp` steps (start 0 or >= n_functions: all from the first step)."""
    if start <= 0 or start >= n_functions:
        return n_functions
    return int(round(min(n_functions, start * (n_functions / start) ** min(1.0, step / max(1, ramp)))))


def make_episodes(features, fns, n_episodes, length, seed, first=0):
    """kernels.episodes on a functions dict -> x (B, L, 1+d), y (B, L), mag (B, L), fn (B,), rows (B, L).
    first: index of the first episode in the seed's stream (a DDP rank's slice of a global batch)."""
    import kernels
    return kernels.episodes(features, fns["pos_ptr"], fns["pos_idx"], fns["pos_val"], fns["neg_ptr"], fns["neg_idx"],
                            fns["neg_val"], fns["mag_scale"], n_episodes, length, seed, first)


FUNCTION_TENSORS = ("pos_ptr", "pos_idx", "pos_val", "neg_ptr", "neg_idx", "neg_val", "mag_scale")


def functions_to(fns, device):
    """The functions dict with its CSR tensors on `device` (the episodes op reads them where the features are)."""
    return {k: (v.to(device) if k in FUNCTION_TENSORS else v) for k, v in fns.items()}


def rope(x, base=10000.0):
    """Rotary position embedding on (B, H, L, hd) (hd even): rotate pairs (i, i + hd/2) by position * freq_i."""
    L, hd = x.shape[-2], x.shape[-1]
    freq = base ** (-_torch.arange(0, hd // 2, device=x.device, dtype=_torch.float32) / (hd // 2))
    ang = _torch.arange(L, device=x.device, dtype=_torch.float32)[:, None] * freq  # (L, hd/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return _torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(_nn.Module):
    """Pre-LN block: x + causal self-attention(LN(x)) (SDPA, RoPE on q/k), then x + MLP(LN(x)) if mlp.

    smear: "smeared keys" (Olsson et al. 2022, In-context learning and induction heads): each head's key at
    position j is (1 - a) k_j + a k_{j-1}, a = sigmoid(a_head) learned per head (k_{-1} = 0). An episode's
    token j holds image j and the label of image j - 1, so pairing an image with its own label takes a head
    that looks one position back; with smeared keys one layer can match a query image against image j - 1 and
    read label j - 1 from token j's value, without first learning a previous-token head in an earlier layer."""

    def __init__(self, d_model, n_heads, mlp=True, dropout=0.0, smear=False):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into n_heads={n_heads} heads of even size (RoPE)")
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1 = _nn.LayerNorm(d_model)
        self.qkv = _nn.Linear(d_model, 3 * d_model)
        self.proj = _nn.Linear(d_model, d_model)
        self.ln2 = _nn.LayerNorm(d_model) if mlp else None
        self.mlp = (_nn.Sequential(_nn.Linear(d_model, 4 * d_model), _nn.GELU(), _nn.Linear(4 * d_model, d_model))
                    if mlp else None)
        self.smear = _nn.Parameter(_torch.zeros(n_heads)) if smear else None  # logits of a per head (a = 1/2 at init)

    def forward(self, x):  # (B, L, d_model)
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if self.smear is not None:  # k (B, H, L, hd): mix each key with the previous position's
            w = _torch.sigmoid(self.smear).to(k.dtype).view(1, -1, 1, 1)
            k = (1 - w) * k + w * _F.pad(k, (0, 0, 1, 0))[:, :, :L]
        a = _F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True,
                                            dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x)) if self.mlp is not None else x


class InputEmbedding(_nn.Linear):
    """Linear(1 + d -> d_model) on standardised, optionally projected inputs:
    y = W [label, B B^T ((x - shift) * scale)] + b, computed as one linear map with the standardisation and the
    projection folded into W and b (no extra pass over the episode). shift/scale are buffers (the training pool's
    feature mean and 1/std, label channel 0/1); basis (d, r) an orthonormal basis of the pool's top-r principal
    subspace of the standardised features (r = 0: no projection). All are saved with the checkpoint; a linear map
    of x all the same, so encode(x) stays a linear read-out of the backbone features."""

    def __init__(self, d_in, d_out, input_rank=0):
        super().__init__(d_in, d_out)
        self.register_buffer("in_shift", _torch.zeros(d_in))
        self.register_buffer("in_scale", _torch.ones(d_in))
        self.register_buffer("in_basis", _torch.zeros(d_in - 1, input_rank))

    @_torch.no_grad()
    def set_input_stats(self, mean, std):
        """Standardise the feature channels with the training pool's mean (d,) and std (d,)."""
        self.in_shift[1:] = _torch.as_tensor(mean, dtype=self.in_shift.dtype)
        self.in_scale[1:] = 1.0 / _torch.as_tensor(std, dtype=self.in_scale.dtype).clamp_min(1e-6)

    @_torch.no_grad()
    def set_input_basis(self, basis):
        """Project the standardised features onto span(basis) (d, r), orthonormal columns."""
        self.in_basis.copy_(_torch.as_tensor(basis, dtype=self.in_basis.dtype))

    @_torch.no_grad()
    def orthogonal_init(self, gain=1.0):
        """Semi-orthogonal weight times gain: at step 0, encode is an isometry of the standardised (projected)
        features, so what evaluate.py measures against base is what meta-learning changed, not a random
        projection (a Gaussian init spreads singular values from 0 to 2 and distorts the geometry)."""
        _nn.init.orthogonal_(self.weight, gain=gain)
        if self.in_basis.shape[1]:  # orthonormal inside the subspace: [label, B coordinates] -> d_out
            q = _torch.empty(self.weight.shape[0], 1 + self.in_basis.shape[1], dtype=self.weight.dtype)
            _nn.init.orthogonal_(q, gain=gain)
            self.weight[:, :1] = q[:, :1]
            self.weight[:, 1:] = q[:, 1:] @ self.in_basis.T

    def effective(self):
        """(weight (d_out, 1 + d), bias (d_out,)) of the one linear map on raw inputs."""
        w = self.weight
        if self.in_basis.shape[1]:
            B = self.in_basis
            w = _torch.cat([w[:, :1], (w[:, 1:] @ B) @ B.T], 1)
        w = w * self.in_scale
        return w, self.bias - w @ self.in_shift

    def forward(self, x):
        w, b = self.effective()
        return _F.linear(x, w, b)


def principal_basis(X, rank, scale=None, chunk=65536):
    """Top principal directions of X (n, d) -> (basis (d, r) float64, share of variance each direction holds (d,)).

    rank: an int >= 1 is r itself; a float in (0, 1) is the smallest r whose directions hold that share of the
    variance. scale (d,): the directions of X * scale (scale = 1 / std: the standardised features), from X's own
    covariance, so no scaled copy of X is made. Mean and covariance are accumulated in float64 in row chunks
    (n may be millions): memory O(chunk d + d^2)."""
    X = _torch.as_tensor(X)
    n, d = X.shape
    mean = sum(X[i:i + chunk].double().sum(0) for i in range(0, n, chunk)) / n
    C = _torch.zeros(d, d, dtype=_torch.float64)
    for i in range(0, n, chunk):
        Z = X[i:i + chunk].double() - mean
        C += Z.T @ Z
    if scale is not None:  # cov(X * s) = s_i s_j cov(X)_ij
        s = _torch.as_tensor(scale, dtype=_torch.float64)
        C *= s[:, None] * s[None, :]
    evals, evecs = _torch.linalg.eigh(C)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    share = evals / evals.sum().clamp_min(1e-300)
    if rank >= 1:
        r = int(rank)
    elif 0 < rank < 1:
        r = int(_torch.searchsorted(share.cumsum(0), _torch.tensor([rank], dtype=_torch.float64))[0]) + 1
    else:
        raise ValueError(f"input rank must be an int >= 1 or a share of variance in (0, 1), got {rank}")
    if r > d:
        raise ValueError(f"input rank {r} > feature width {d}")
    return evecs[:, :r], share


class MetaLearner(_nn.Module):
    """In-context learner of binary functions over images.

    model="transformer": embedding Linear(1 + d -> d_model), `layers` = pre-LN causal blocks, final LayerNorm,
    binary-logit head and magnitude head. "lstm": the same with an nn.LSTM as `layers`. "static_linear": the
    non-meta multitask baseline, embedding + LayerNorm and one (logit, magnitude) head per training function
    (ignores the label channel). no_embed: the embedding is frozen to [label -> all dims / sqrt(d), x -> x]
    (d_model = d), so encode(x) returns x unchanged.
    forward(x (B, L, 1+d), fn (B,) head index, static_linear only) -> (logits (B, L), magnitudes (B, L)).
    encode(x (n, d)) -> (n, d_model): the embedding applied to [0, x], the aligned representation.
    smear: smeared keys in every block (Block); off by default so that checkpoints written before it load.
    """

    def __init__(self, d, d_model=0, n_layers=2, n_heads=4, mlp=True, model="transformer", n_functions=0,
                 no_embed=False, dropout=0.0, input_rank=0, smear=False):
        super().__init__()
        d_model = d_model or d
        if model not in ("transformer", "lstm", "static_linear"):
            raise ValueError(f"model must be transformer | lstm | static_linear, got {model!r}")
        if no_embed and d_model != d:
            raise ValueError(f"--no-embed keeps the features as they are, so d_model must equal d = {d}, got {d_model}")
        self.kind, self.d, self.d_model = model, d, d_model
        if no_embed and input_rank:
            raise ValueError("--no-embed keeps the features as they are: no input projection (--input-pca 0)")
        self.embedding = InputEmbedding(1 + d, d_model, input_rank)
        if no_embed:
            with _torch.no_grad():
                self.embedding.weight.zero_()
                self.embedding.weight[:, 1:] = _torch.eye(d)
                self.embedding.weight[:, 0] = 1 / _math.sqrt(d)
                self.embedding.bias.zero_()
            self.embedding.requires_grad_(False)
        if model == "transformer":
            self.layers = _nn.ModuleList([Block(d_model, n_heads, mlp, dropout, smear) for _ in range(n_layers)])
        elif model == "lstm":
            self.layers = _nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True)
        else:
            self.layers = _nn.ModuleList()
        self.norm = _nn.LayerNorm(d_model)
        n_out = n_functions if model == "static_linear" else 1
        if model == "static_linear" and n_functions < 1:
            raise ValueError("static_linear needs n_functions >= 1 (one head per training function)")
        self.head = _nn.Linear(d_model, n_out)       # binary logit(s)
        self.mag_head = _nn.Linear(d_model, n_out)   # magnitude(s)
        self.log_vars = _nn.Parameter(_torch.zeros(2))  # Kendall et al. 2018: log sigma^2 of BCE and MSE

    def encode(self, x):
        """(n, d) image features -> (n, d_model): the embedding of [0, x]."""
        x = _torch.as_tensor(x, dtype=self.embedding.weight.dtype, device=self.embedding.weight.device)
        return self.embedding(_F.pad(x, (1, 0)))

    def forward(self, x, fn=None):
        if self.kind == "static_linear":
            x = _F.pad(x[..., 1:], (1, 0))  # no context: the previous label is not an input
        h = self.embedding(x)
        if self.kind == "transformer":
            for blk in self.layers:
                h = blk(h)
        elif self.kind == "lstm":
            h = self.layers(h)[0]
        h = self.norm(h)
        logit, mag = self.head(h), self.mag_head(h)
        if self.kind == "static_linear":
            idx = fn.view(-1, 1, 1).expand(-1, h.shape[1], 1)
            return logit.gather(2, idx)[..., 0], mag.gather(2, idx)[..., 0]
        return logit[..., 0], mag[..., 0]

    def loss(self, logit, mag_pred, y, mag, mse_on_positives=True, n_mse=None):
        """BCE + MSE (on positives for sparse functions) weighted by learned uncertainty (Kendall et al. 2018):
        exp(-s1) BCE + s1/2 + exp(-s2) MSE / 2 + s2/2 -> (total, bce, mse). n_mse: the count the squared errors
        are divided by (default: this batch's own); DDP ranks pass the global count / ranks, so their averaged
        gradients are those of one process on the whole batch."""
        bce = _F.binary_cross_entropy_with_logits(logit.float(), y.float())
        w = y.float() if mse_on_positives else _torch.ones_like(y, dtype=_torch.float32)
        den = w.sum().clamp_min(1) if n_mse is None else \
            _torch.as_tensor(n_mse, dtype=_torch.float32, device=w.device).clamp_min(1e-12)  # no host sync
        mse = ((mag_pred.float() - mag.float()) ** 2 * w).sum() / den
        s = self.log_vars
        return _torch.exp(-s[0]) * bce + s[0] / 2 + _torch.exp(-s[1]) * mse / 2 + s[1] / 2, bce, mse


def load_meta(path, map_location="cpu"):
    """A meta checkpoint (train.py --stage meta) -> (MetaLearner in eval mode, checkpoint dict with 'config',
    'versions', 'step', 'metrics', 'latents'). The aligned representation: model.encode(features)."""
    ckpt = _torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a meta checkpoint (expected keys 'model_args' and 'model')")
    model = MetaLearner(**ckpt["model_args"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    bad = [k for k in missing if not k.startswith("embedding.in_")] + list(unexpected)
    if bad:  # checkpoints from before input standardisation lack only the two embedding buffers (identity)
        raise RuntimeError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval(), ckpt


@_torch.no_grad()
def evaluate_meta(model, features, fns, length, n_episodes=256, seed=12345, heads=None, mse_on_positives=True,
                  batch=64, raw_targets=False):
    """Held-out in-context performance on fixed episodes (same seed -> same episodes) -> dict(accuracy,
    accuracy_by_position (L,), magnitude_r2, bce). heads (F,) int64: the static_linear head of each function.
    Episodes are built on the features' device. raw_targets: the model predicts raw magnitudes (the scaled
    magnitudes of the episodes divided by the function's mag_scale), as trained with --mag-target raw."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct, bce = _torch.zeros(length, dtype=_torch.float64), 0.0
    preds, targs = [], []
    for start in range(0, n_episodes, batch):
        B = min(batch, n_episodes - start)
        x, y, mag, fn, _ = make_episodes(features, fns, B, length, seed + start)
        if raw_targets:
            mag = mag / fns["mag_scale"].to(mag.device)[fn][:, None].to(mag.dtype)
        fh = heads.to(fn.device)[fn] if heads is not None else fn
        logit, m = model(x.to(dev), fh.to(dev))
        logit, m, y, mag = logit.float().cpu(), m.float().cpu(), y.float().cpu(), mag.float().cpu()
        correct += ((logit > 0).float() == y).double().sum(0)
        bce += float(_F.binary_cross_entropy_with_logits(logit, y, reduction="sum"))
        w = y > 0 if mse_on_positives else _torch.ones_like(y, dtype=_torch.bool)
        preds.append(m[w])
        targs.append(mag[w])
    p, t = _torch.cat(preds).double(), _torch.cat(targs).double()
    r2 = float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum().clamp_min(1e-12)) if len(t) > 1 else float("nan")
    model.train(was)
    by_pos = (correct / n_episodes).tolist()
    return dict(accuracy=float(sum(by_pos) / length), accuracy_by_position=by_pos, magnitude_r2=r2,
                bce=bce / (n_episodes * length))


# ==================================================================================================

# SAE codes into HDF5: the encoder of train.py --stage sae --encode and extract.py --sae
# =========================================================================================================

def open_features(path):
    """Open a features file for streaming -> (h5py File, /features dataset); clear errors otherwise."""
    import h5py
    from data import DataError, check_unique, decode_strings, open_h5
    f = open_h5(path, "an HDF5 features file with /features (n_images, d)")
    if "features" not in f or not isinstance(f["features"], h5py.Dataset) or f["features"].ndim != 2:
        present = list(f.keys())
        f.close()
        raise DataError(f"{path}: field '/features' missing or not 2-d (n_images, d); top-level entries: {present}")
    if "image_ids" in f:
        try:
            check_unique(path, "/image_ids", decode_strings(f["image_ids"][...]))
        except DataError:
            f.close()
            raise
    return f, f["features"]


def feature_rows(path, dset, start, stop):
    """Rows [start, stop) of /features as float32, refusing NaN/inf with the file, field and row."""
    from data import DataError
    x = _np.asarray(dset[start:stop], dtype=_np.float32)
    bad = ~_np.isfinite(x)
    if bad.any():
        r = start + int(_np.nonzero(bad.any(1))[0][0])
        raise DataError(f"{path}: /features has {int(bad.sum())} NaN/inf values in rows {start}..{stop - 1}, "
                        f"first at row {r}")
    return _torch.from_numpy(x)


def sae_encode(features, ckpt, codes_out="", codes_dtype="float16", chunk_rows=65536, config=None):
    """Top-k codes of every row of `features` -> /sae/indices (n, k) int32, /sae/values (n, k) float16 in
    `codes_out`, or in `features` itself. Written chunk by chunk into a temporary copy that replaces the
    target only when complete (data.atomic_path): a killed job leaves the old file untouched. `config` (the
    caller's settings) goes into the /sae attrs with the checkpoint and its format."""
    import shutil

    import h5py

    import data
    if codes_dtype not in ("float16", "float32"):
        raise data.DataError(f"--codes-dtype {codes_dtype!r}; expected float16 | float32")
    sae, info = load_sae(ckpt)
    src, dst = features, codes_out or features
    f, dset = open_features(src)
    n, d = dset.shape
    if d != sae.d:
        f.close()
        raise data.DataError(f"{ckpt}: checkpoint of another shape: the SAE takes d = {sae.d} features, "
                             f"{src} /features has d = {d}")
    k, chunk = sae.k, chunk_rows
    # HDF5 may crash when a write is refused (full disk, file-size limit): the room is checked first
    try:
        copy = _os.path.getsize(src) if dst == src else 0
        data.check_space(dst, copy + n * k * (4 + _np.dtype(codes_dtype).itemsize) + 64 * n)
    except data.DataError:
        f.close()
        raise
    with data.atomic_path(dst) as tmp:
        if dst == src:
            f.close()
            shutil.copyfile(src, tmp)  # the copy gets the codes; the original stays intact until the rename
            f, dset = open_features(src)
        with h5py.File(tmp, "r+" if dst == src else "w") as fo:
            if dst != src and "image_ids" in f:
                fo.create_dataset("image_ids", data=f["image_ids"][...], dtype=f["image_ids"].dtype)
            if "sae" in fo:
                del fo["sae"]
            g = fo.create_group("sae")
            cr = (max(1, min(chunk, n, 8192)), k) if n else None
            di = g.create_dataset("indices", shape=(n, k), dtype=_np.int32, chunks=cr)
            dv = g.create_dataset("values", shape=(n, k), dtype=_np.dtype(codes_dtype), chunks=cr)
            for c0 in range(0, n, chunk):
                c1 = min(n, c0 + chunk)
                v, i = sae.encode(feature_rows(src, dset, c0, c1))
                if codes_dtype == "float16" and float(v.max()) > 65504:
                    raise ValueError(f"{src}: SAE values up to {float(v.max()):.3g} overflow float16; "
                                     "use --codes-dtype float32")
                di[c0:c1] = i.numpy().astype(_np.int32)
                dv[c0:c1] = v.numpy().astype(codes_dtype)
            data.write_h5_attrs(g, dict(config=config or {}, checkpoint=_os.path.abspath(ckpt),
                                        checkpoint_format=info["format"], sae=sae.args(),
                                        features=_os.path.abspath(src)))
    f.close()
    print(f"/sae/indices, /sae/values ({n} x {k}) -> {dst}")
    return dict(n=n, k=k, out=dst)


# =========================================================================================================
# subspace wrappers (encoder warping, eval_warp.py): train any nn.Module only through a d-dimensional
# subspace of its D parameters (Li et al. 2018; Aghajanyan et al. 2020)
# =========================================================================================================

class FastfoodProjection(_nn.Module):
    """theta (d,) -> P theta (D,): P = H G Pi H B / (|G| sqrt(L)) on theta zero-padded to L = 2^ceil(log2 D),
    first D entries, rescaled by sqrt(L / D) so that columns have unit norm in expectation (Le et al. 2013;
    Li et al. 2018). Never stores P: O(L) memory, two kernels.fwht per call."""

    def __init__(self, d, D, seed=0):
        super().__init__()
        self.d, self.D = d, D
        self.L = 1 << max(0, _math.ceil(_math.log2(D)))
        g = _torch.Generator().manual_seed(seed)
        self.register_buffer("B", _torch.randint(0, 2, (self.L,), generator=g).float() * 2 - 1)
        self.register_buffer("Pi", _torch.randperm(self.L, generator=g))
        self.register_buffer("G", _torch.randn(self.L, generator=g))
        self.norm = float(self.G.norm()) * _math.sqrt(self.L) * _math.sqrt(D / self.L)

    def forward(self, theta):
        v = _F.pad(theta, (0, self.L - self.d)) * self.B
        import kernels
        v = kernels.fwht(v)[self.Pi] * self.G
        return kernels.fwht(v)[:self.D] / self.norm


class DenseProjection(_nn.Module):
    """theta (d,) -> P theta (D,) with a stored Gaussian P (D, d), unit-norm columns: the reference."""

    MAX_ENTRIES = 1 << 28

    def __init__(self, d, D, seed=0):
        super().__init__()
        if d * D > self.MAX_ENTRIES:
            raise ValueError(f"dense projection: D x d = {D} x {d} entries would need {4 * d * D / 2**30:.1f} GiB; "
                             "use --projection fastfood")
        P = _torch.randn(D, d, generator=_torch.Generator().manual_seed(seed))
        self.register_buffer("P", P / P.norm(dim=0, keepdim=True))

    def forward(self, theta):
        return self.P @ theta


class IdentityProjection(_nn.Module):
    """d = D: theta_D = theta_0 + theta, ordinary training written as a subspace (the wrapper's own test)."""

    def __init__(self, d, D, seed=0):
        super().__init__()
        if d != D:
            raise ValueError(f"identity projection needs d = D, got d = {d}, D = {D}")

    def forward(self, theta):
        return theta


PROJECTIONS = {"fastfood": FastfoodProjection, "dense": DenseProjection, "identity": IdentityProjection}


# ------------------------------------------------------------------------------------------------ the wrapper

class SubspaceWrapper(_nn.Module):
    """Any _nn.Module trained only through theta_d (d,) and per-group scales; see the module docstring.

    module: the model (its parameters are theta_0 and are frozen unless listed in `free`);
    d: subspace dimension (1 <= d <= D, D = parameters warped); projection: fastfood | dense | identity;
    groups: regexes (_re.search on parameter names); each gets a trained scale, first match wins;
    free: names of parameters trained directly beside theta_d (not warped), e.g. a joint read-out.
    Parameters that do not require grad are neither warped nor trained.
    """

    def __init__(self, module, d, projection="fastfood", groups=(), seed=0, free=()):
        super().__init__()
        self.module = module
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        unknown = sorted(set(free) - {n for n, _ in named})
        if unknown:
            raise ValueError(f"free parameters {unknown} are not trainable parameters of the module; "
                             f"it has {[n for n, _ in named]}")
        self.names = [n for n, _ in named if n not in free]
        self.shapes = [p.shape for n, p in named if n not in free]
        self.sizes = [p.numel() for n, p in named if n not in free]
        self.D = int(sum(self.sizes))
        d = int(d)
        if self.D == 0:
            raise ValueError("the module has no trainable parameters to warp")
        if not 1 <= d <= self.D:
            raise ValueError(f"d = {d} must be in 1..D = {self.D} (the number of warped parameters: "
                             f"{len(self.names)} tensors, e.g. {self.names[:4]}); pass a smaller d")
        if projection not in PROJECTIONS:
            raise ValueError(f"projection {projection!r}: expected one of {sorted(PROJECTIONS)}")
        self.d = d
        for n, p in named:
            if n not in free:
                p.requires_grad_(False)  # theta_0: read, never trained
        self.group_of, self.groups = param_group_index(self.names, groups)
        dt = next(p for n, p in named if n not in free).dtype  # theta in the parameters' dtype (float64 stays exact)
        self.theta = _nn.Parameter(_torch.zeros(d, dtype=dt))
        self.scales = _nn.Parameter(_torch.ones(len(self.groups), dtype=dt)) if self.groups else None
        self.projection = PROJECTIONS[projection](d, self.D, seed).to(dt)

    def params(self):
        """{name: theta_0 + scale * (P theta)[slice]} for the warped parameters."""
        delta = self.projection(self.theta)
        out, off = {}, 0
        p0 = dict(self.module.named_parameters())
        for name, shape, size, g in zip(self.names, self.shapes, self.sizes, self.group_of):
            step = delta[off:off + size].view(shape)
            if g >= 0:
                step = self.scales[g] * step
            out[name] = p0[name] + step
            off += size
        return out

    def forward(self, *args, **kwargs):
        return _torch.func.functional_call(self.module, self.params(), args, kwargs, strict=False)


def param_group_index(names, groups):
    """Group of each name (index of the first regex in `groups` that _re.search-es it, -1 for none) and the
    group patterns; a pattern that matches no parameter is an error naming it."""
    groups = [g for g in (groups or []) if g]
    idx = []
    for n in names:
        idx.append(next((k for k, g in enumerate(groups) if _re.search(g, n)), -1))
    empty = [g for k, g in enumerate(groups) if k not in idx]
    if empty:
        raise ValueError(f"parameter group(s) {empty} match no warped parameter; the warped parameters are "
                         f"{names[:20]}{' ...' if len(names) > 20 else ''}")
    return idx, groups


# penalties for standardised features (d ~ 10^2-10^3)
ICL_RIDGE_ALPHAS = tuple(float(a) for a in _np.logspace(-1, 4, 11))


@_torch.no_grad()
def ridge_icl_curve(features, fns, length, n_episodes=256, seed=12345, alphas=ICL_RIDGE_ALPHAS, shift=None, scale=None,
                    batch=64, return_predictions=False):
    """The "no meta-learning" bound: an online ridge learner on the episodes evaluate_meta scores (same features,
    functions, length, n_episodes, seed and batch -> the same episodes).

    At position t it fits ridge regression with an unpenalised intercept, y ~ z, on the t items before it
    (z = (x - shift) * scale, the standardised features the meta-learner reads; y in {0, 1}) and predicts item t
    as positive when the fit exceeds 1/2 (at t = 0, no context: negative, like a zero logit). All positions and
    every alpha come from one Gram matrix per episode: the context-centred Gram Kc_t is eigendecomposed once per
    position, and each alpha is then a diagonal rescaling, fit(t) = mean(y) + k^T (Kc_t + alpha I)^-1 (y - mean(y)).
    -> dict(alphas (A,), accuracy (A,), accuracy_by_position (A, L) lists, best (index of the best overall
    accuracy on THESE episodes: for reporting only; select alpha on other episodes, see ridge_icl_bound), and with
    return_predictions the fits (A, n_episodes, L) float64 and the labels (n_episodes, L))."""
    alphas = _torch.as_tensor(_np.asarray(alphas, dtype=_np.float64).reshape(-1))
    if not bool((alphas > 0).all()):
        raise ValueError(f"ridge alphas must be > 0, got {alphas.tolist()}")
    A, L = len(alphas), int(length)
    correct = _torch.zeros(A, L, dtype=_torch.float64)
    fits, labels = [], []
    for start in range(0, n_episodes, batch):
        B = min(batch, n_episodes - start)
        x, y, _, _, _ = make_episodes(features, fns, B, L, seed + start)
        z = x[..., 1:].double()
        if shift is not None:
            z = z - _torch.as_tensor(shift, dtype=_torch.float64)
        if scale is not None:
            z = z * _torch.as_tensor(scale, dtype=_torch.float64)
        y = y.double()
        K = z @ z.transpose(1, 2)  # (B, L, L)
        pred = _torch.full((A, B, L), 0.5, dtype=_torch.float64)
        pred[:, :, 0] = 0.0  # no context: predict negative (ties at 1/2 go negative, as a zero logit does)
        for t in range(1, L):
            Kt = K[:, :t, :t]
            r = Kt.mean(2)                                   # (B, t): z_i . m, m the context mean
            s = r.mean(1, keepdim=True)                      # (B, 1): m . m
            rq = K[:, t, :t].mean(1, keepdim=True)           # (B, 1): z_t . m
            Kc = Kt - r[:, :, None] - r[:, None, :] + s[:, :, None]
            k = K[:, t, :t] - r - rq + s                     # (B, t): (z_i - m) . (z_t - m)
            yb = y[:, :t].mean(1, keepdim=True)
            lam, V = _torch.linalg.eigh(Kc)                  # (B, t), (B, t, t)
            lam = lam.clamp_min(0)
            vk = (V.transpose(1, 2) @ k[:, :, None])[..., 0]          # (B, t)
            vy = (V.transpose(1, 2) @ (y[:, :t] - yb)[:, :, None])[..., 0]
            pred[:, :, t] = yb[:, 0] + ((vk * vy)[None] / (lam[None] + alphas[:, None, None])).sum(2)
        correct += ((pred > 0.5).double() == y[None]).sum(1)
        if return_predictions:
            fits.append(pred)
            labels.append(y)
    acc = correct / n_episodes
    out = dict(alphas=alphas.tolist(), accuracy=acc.mean(1).tolist(), accuracy_by_position=acc.tolist(),
               best=int(acc.mean(1).argmax()))
    if return_predictions:
        out.update(predictions=_torch.cat(fits, 1), labels=_torch.cat(labels, 0))
    return out


def ridge_icl_bound(train_features, train_fns, eval_features, eval_fns, length, n_episodes=256, seed=12345,
                    alphas=ICL_RIDGE_ALPHAS, shift=None, scale=None, select_seed=None, batch=64):
    """ridge_icl_curve with its penalty chosen on episodes of the TRAINING functions and pool (seed select_seed,
    default seed + 1,000,003), then scored on the held-out episodes evaluate_meta uses (eval_features, eval_fns,
    seed). -> dict(alpha, accuracy, accuracy_by_position (L,), selection_accuracy (A,), alphas, at_grid_edge)."""
    sel = ridge_icl_curve(train_features, train_fns, length, n_episodes,
                          seed + 1_000_003 if select_seed is None else select_seed, alphas, shift, scale, batch)
    a = sel["best"]
    ev = ridge_icl_curve(eval_features, eval_fns, length, n_episodes, seed, [sel["alphas"][a]], shift, scale, batch)
    return dict(alpha=sel["alphas"][a], accuracy=ev["accuracy"][0], accuracy_by_position=ev["accuracy_by_position"][0],
                selection_accuracy=sel["accuracy"], alphas=sel["alphas"], at_grid_edge=a in (0, len(sel["alphas"]) - 1))
