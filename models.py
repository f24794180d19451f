"""Models shared by train.py and evaluate.py: the SAE (issue 3) and the meta-learner (issue 4).

    from models import load_meta
    model, ckpt = load_meta("runs/meta/world.pt")      # MetaLearner in eval mode + config/versions
    Z = model.encode(X)                                # (n, d) features -> (n, d_model) aligned

    from models import load_sae
    sae, info = load_sae("sae/world.pt")               # TopKSAE (own or ViT-Prisma checkpoint) + config/versions
    values, indices = sae.encode(X)                    # (n, k) top-k codes by the fused kernels.topk_encode
"""

# =========================================================================================================
# sparse autoencoder (issue 3): TopKSAE (Gao et al. 2024), its checkpoints, the ViT-Prisma format
# =========================================================================================================
import json as _json
import os as _os
import pickle as _pickle

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


def sae_size(n_rows, d, min_nonzero=120, rows_seen=800_000, rows_per_step=256):
    """The SAE sizing rule: width, k and epochs from the training pool's size and the feature width.

        k          = clip(round(d / 24), 8, 128)              active latents per row (Gao et al. 2024: 32 at d 768)
        n_latents  = clip(n_rows k / (4 min_nonzero), d, 16 d), rounded up to a multiple of 64: on average every
                     latent fires on 4x the rows a function needs (min_nonzero, train.py --min-nonzero), so the
                     dictionary cannot outgrow the pool and most latents become functions
        epochs     = clip(ceil(rows_seen / n_rows), 1, 200)   about rows_seen rows in all (800k = ~3,000 steps of 256)

    Measured on the full-size world (20,000 x 768 pool -> 1,344 latents, k 32, 40 epochs; README, Sparse
    autoencoders): 98 % of the planted h and g directions have a decoder row at cosine > 0.8, no dead
    latents, ~1,300 functions with >= 120 positives. -> dict of train.py --stage sae flags' values."""
    if n_rows < 1 or d < 1 or min_nonzero < 1:
        raise ValueError(f"sae_size needs positive n_rows, d and min_nonzero, got {n_rows}, {d}, {min_nonzero}")
    k = int(min(128, max(8, round(d / 24))))
    width = n_rows * k / (4 * min_nonzero)
    n_latents = int(-(-min(16 * d, max(d, width)) // 64) * 64)
    epochs = int(min(200, max(1, -(-rows_seen // n_rows))))
    return dict(n_latents=n_latents, k=min(k, n_latents), epochs=epochs, rows_per_step=rows_per_step)


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
# meta-learning (issue 4): functions from SAE codes or neurons, the meta-learned Transformer, LSTM and
# static-linear baselines, encode(), checkpoint loading
# =========================================================================================================
import math as _math

import numpy as _np
import torch as _torch
import torch.nn as _nn
import torch.nn.functional as _F


def read_codes(path, n_rows=None, image_ids=None):
    """SAE codes (/sae/indices (n, k) int, /sae/values (n, k) float) -> (indices int64, values float32) numpy.

    n_rows / image_ids: the rows of the features file the codes must align with (checked; a mismatch names
    both counts or the first differing id)."""
    import h5py
    from data import DataError, _decode
    import os
    if not os.path.exists(path):
        raise DataError(f"{path} not found; expected an HDF5 file with /sae/indices and /sae/values (train.py --stage sae)")
    with h5py.File(path, "r") as f:
        for k in ("sae/indices", "sae/values"):
            if k not in f:
                raise DataError(f"{path}: field '/{k}' missing; encode the features with the SAE first "
                                f"(train.py --stage sae) or pass --codes FILE")
        idx, val = _np.asarray(f["sae/indices"][...]), _np.asarray(f["sae/values"][...], dtype=_np.float32)
        ids = _decode(f["image_ids"][...]) if "image_ids" in f else None
    if idx.ndim != 2 or idx.shape != val.shape:
        raise DataError(f"{path}: /sae/indices {idx.shape} and /sae/values {val.shape} must both be (n_images, k)")
    if not _np.issubdtype(idx.dtype, _np.integer) or (idx.size and idx.min() < 0):
        raise DataError(f"{path}: /sae/indices must hold non-negative integers, got dtype {idx.dtype}")
    if n_rows is not None and idx.shape[0] != n_rows:
        raise DataError(f"{path}: /sae/indices has {idx.shape[0]} rows but the features file has {n_rows}; "
                        f"codes and features must be row-aligned (mismatched feature/code files)")
    if image_ids is not None and ids is not None and list(ids) != list(image_ids):
        bad = next(i for i, (a, b) in enumerate(zip(ids, image_ids)) if a != b)
        raise DataError(f"{path}: /image_ids differs from the features file at row {bad} ({ids[bad]!r} vs "
                        f"{image_ids[bad]!r}); mismatched feature/code files")
    return idx.astype(_np.int64), val


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
    out, e = {}, []
    for name, m in (("pos", Z > 0), ("neg", Z <= 0)):
        cols = [_np.nonzero(m[:, j])[0] for j in range(len(dims))]
        out[f"{name}_ptr"] = _torch.from_numpy(_np.concatenate([[0], _np.cumsum([len(c) for c in cols])]).astype(_np.int64))
        out[f"{name}_idx"] = _torch.from_numpy(_np.concatenate(cols).astype(_np.int64))
        out[f"{name}_val"] = _torch.from_numpy(_np.concatenate([Z[c, j] for j, c in enumerate(cols)]).astype(_np.float32))
    out["mag_scale"] = _torch.from_numpy((1 / _np.maximum(Z.std(0), 1e-6)).astype(_np.float32))
    out["latents"], out["n_rows"] = _torch.from_numpy(dims.astype(_np.int64)), n
    return out


def make_episodes(features, fns, n_episodes, length, seed):
    """kernels.episodes on a functions dict -> x (B, L, 1+d), y (B, L), mag (B, L), fn (B,), rows (B, L)."""
    import kernels
    return kernels.episodes(features, fns["pos_ptr"], fns["pos_idx"], fns["pos_val"], fns["neg_ptr"], fns["neg_idx"],
                            fns["neg_val"], fns["mag_scale"], n_episodes, length, seed)


def rope(x, base=10000.0):
    """Rotary position embedding on (B, H, L, hd) (hd even): rotate pairs (i, i + hd/2) by position * freq_i."""
    L, hd = x.shape[-2], x.shape[-1]
    freq = base ** (-_torch.arange(0, hd // 2, device=x.device, dtype=_torch.float32) / (hd // 2))
    ang = _torch.arange(L, device=x.device, dtype=_torch.float32)[:, None] * freq  # (L, hd/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return _torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(_nn.Module):
    """Pre-LN block: x + causal self-attention(LN(x)) (SDPA, RoPE on q/k), then x + MLP(LN(x)) if mlp."""

    def __init__(self, d_model, n_heads, mlp=True, dropout=0.0):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model={d_model} must split into n_heads={n_heads} heads of even size (RoPE)")
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1 = _nn.LayerNorm(d_model)
        self.qkv = _nn.Linear(d_model, 3 * d_model)
        self.proj = _nn.Linear(d_model, d_model)
        self.ln2 = _nn.LayerNorm(d_model) if mlp else None
        self.mlp = _nn.Sequential(_nn.Linear(d_model, 4 * d_model), _nn.GELU(), _nn.Linear(4 * d_model, d_model)) if mlp else None

    def forward(self, x):  # (B, L, d_model)
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
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
    """

    def __init__(self, d, d_model=0, n_layers=2, n_heads=4, mlp=True, model="transformer", n_functions=0,
                 no_embed=False, dropout=0.0, input_rank=0):
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
            self.layers = _nn.ModuleList([Block(d_model, n_heads, mlp, dropout) for _ in range(n_layers)])
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

    def loss(self, logit, mag_pred, y, mag, mse_on_positives=True):
        """BCE + MSE (on positives for sparse functions) weighted by learned uncertainty (Kendall et al. 2018):
        exp(-s1) BCE + s1/2 + exp(-s2) MSE / 2 + s2/2 -> (total, bce, mse)."""
        bce = _F.binary_cross_entropy_with_logits(logit.float(), y.float())
        w = y.float() if mse_on_positives else _torch.ones_like(y, dtype=_torch.float32)
        mse = ((mag_pred.float() - mag.float()) ** 2 * w).sum() / w.sum().clamp_min(1)
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
                  batch=64):
    """Held-out in-context performance on fixed episodes (same seed -> same episodes) -> dict(accuracy,
    accuracy_by_position (L,), magnitude_r2, bce). heads (F,) int64: the static_linear head of each function."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct, bce, sse, sst_parts, n_items = _torch.zeros(length, dtype=_torch.float64), 0.0, 0.0, [], 0
    preds, targs = [], []
    for start in range(0, n_episodes, batch):
        B = min(batch, n_episodes - start)
        x, y, mag, fn, _ = make_episodes(features, fns, B, length, seed + start)
        fh = heads[fn] if heads is not None else fn
        logit, m = model(x.to(dev), fh.to(dev))
        logit, m, y, mag = logit.float().cpu(), m.float().cpu(), y.float(), mag.float()
        correct += ((logit > 0).float() == y).double().sum(0)
        bce += float(_F.binary_cross_entropy_with_logits(logit, y, reduction="sum"))
        w = y > 0 if mse_on_positives else _torch.ones_like(y, dtype=_torch.bool)
        preds.append(m[w]); targs.append(mag[w])
    p, t = _torch.cat(preds).double(), _torch.cat(targs).double()
    r2 = float(1 - ((p - t) ** 2).sum() / ((t - t.mean()) ** 2).sum().clamp_min(1e-12)) if len(t) > 1 else float("nan")
    model.train(was)
    by_pos = (correct / n_episodes).tolist()
    return dict(accuracy=float(sum(by_pos) / length), accuracy_by_position=by_pos, magnitude_r2=r2,
                bce=bce / (n_episodes * length))
