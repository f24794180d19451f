"""Encoder warping: train any nn.Module only through a d-dimensional subspace of its D parameters, and d_warp.

    python train.py --stage warp --features F.h5 --targets brain --subject 1 --roi LOC --d 1,10,100,1000 \
        --out runs/warp/NAME_LOC.json                      # THINGS-fMRI voxels of one ROI (fmri.py loaders)
    python train.py --stage warp --features F.h5 --targets spose --d 1,10,100 --out runs/warp/NAME_spose.json
    python evaluate.py --task dwarp --warp-runs 'runs/warp/*_LOC.json' --out runs/eval/dwarp.json   # curves, d_warp

Subspace training (Li et al. 2018, "Measuring the intrinsic dimension of objective landscapes"; Aghajanyan
et al. 2020, "Intrinsic dimensionality explains the effectiveness of language model fine-tuning"): the
warped parameters are theta_D = theta_0 + lambda_g * P theta_d, where theta_0 is the module's own initial
state, theta_d (d,) the only trained vector (zero at the start, so training starts at theta_0), P a fixed
random (D, d) projection with unit-norm columns and lambda_g one trained scale per parameter group (SAID;
parameters outside every group keep scale 1). P is Fastfood, P = (H G Pi H B) / (|G| sqrt(L)) restricted
to the first D rows (L = next power of two >= D; B random signs, Pi a permutation, G Gaussian, H the
Walsh-Hadamard transform `kernels.fwht`): O(L log L) time and O(L) memory; or dense (a stored Gaussian
matrix: the reference); or identity (d = D: ordinary training, a test of the wrapper). The forward pass is
torch.func.functional_call, so the wrapped module is never modified.

The encoding model: features (z-scored) -> residual MLP body x + W2 gelu(W1 x + b1) (W2 = 0 at the start,
so the body starts as the identity and d = 0 is the linear encoding model) -> linear read-out, fit first by
ridge (kernels.ridge_cv) and then either warped with the body (--readout ridge) or trained directly beside
theta_d (--readout joint). --objective rsa drops the read-out and trains the body's RDM towards the
target's (1 - Pearson r of the RDMs' upper triangles, per minibatch). For each d the model is trained by
Adam with early stopping on a validation split; held-out performance (mean R^2 over targets, or RSA) is
recorded with the full fit (every parameter trained directly) and the linear baseline (d = 0). d_warp is the
smallest d whose performance reaches --warp-frac of the full fit's.
"""
import math
import os
import re
import time

import numpy as np
import torch
from torch import nn

import data
import kernels

# ------------------------------------------------------------------------------------------------ defaults
defaults_warp = dict(
    targets="brain",                            # warp: brain (THINGS-fMRI voxels of --roi) | spose (SPoSE embedding)
    d="1,10,100,1000",                          # warp: subspace dimensions, comma-separated ('full' is always added)
    data="data/world/data",                     # warp: folder with the human data files
    field="features",                           # warp: dataset inside --features (e.g. layers/block6)
    subject="1",                                # warp (brain): THINGS-fMRI subject
    roi="LOC",                                  # warp (brain): ROI column of VoxelMetadata
    nc_min=5.0,                                 # warp (brain): keep voxels with nc_singletrial > nc_min
    projection="fastfood",                      # warp: fastfood | dense (reference) | identity (d = D only)
    groups="",                                  # warp: parameter groups with their own scale, regexes, e.g. 'body,readout'
    objective="ridge",                          # warp: ridge (linear read-out, MSE) | rsa (differentiable RSA, no read-out)
    readout="ridge",                            # warp: ridge (fit by ridge, then warped) | joint (trained directly beside theta_d)
    readout_penalty=True,                       # warp: keep the ridge penalty of the read-out while training (see fit_one)
    hidden=0,                                   # warp: MLP hidden width (0 = feature width)
    warp_lr=0.05,                               # warp: Adam learning rate of theta_d and the scales
    full_lr=1e-3,                               # warp: Adam learning rate of the full fit
    warp_steps=1000,                            # warp: maximum Adam steps per d
    warp_batch=256,                             # warp: rows per step
    warp_eval_every=25,                         # warp: steps between validation checks
    warp_patience=8,                            # warp: validation checks without improvement before stopping
    val_frac=0.15,                              # warp: share of the training rows held out for early stopping
    test_frac=0.2,                              # warp (spose): share of concepts held out for the test score
    warp_threads=1,                             # warp: torch threads (small ops: 1 is ~100x faster than 2 contended threads; 0 = torch default)
    name="",                                    # warp: model name in the results ('' = the features' backbone attr or file stem)
)
ALPHAS = np.logspace(-2, 6, 17)  # ridge read-out: alphas chosen per target by 5-fold CV


# ------------------------------------------------------------------------------------------------ projections

class FastfoodProjection(nn.Module):
    """theta (d,) -> P theta (D,): P = H G Pi H B / (|G| sqrt(L)) on theta zero-padded to L = 2^ceil(log2 D),
    first D entries, rescaled by sqrt(L / D) so that columns have unit norm in expectation (Le et al. 2013;
    Li et al. 2018). Never stores P: O(L) memory, two kernels.fwht per call."""

    def __init__(self, d, D, seed=0):
        super().__init__()
        self.d, self.D = d, D
        self.L = 1 << max(0, math.ceil(math.log2(D)))
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randint(0, 2, (self.L,), generator=g).float() * 2 - 1)
        self.register_buffer("Pi", torch.randperm(self.L, generator=g))
        self.register_buffer("G", torch.randn(self.L, generator=g))
        self.norm = float(self.G.norm()) * math.sqrt(self.L) * math.sqrt(D / self.L)

    def forward(self, theta):
        v = torch.nn.functional.pad(theta, (0, self.L - self.d)) * self.B
        v = kernels.fwht(v)[self.Pi] * self.G
        return kernels.fwht(v)[:self.D] / self.norm


class DenseProjection(nn.Module):
    """theta (d,) -> P theta (D,) with a stored Gaussian P (D, d), unit-norm columns: the reference."""

    MAX_ENTRIES = 1 << 28

    def __init__(self, d, D, seed=0):
        super().__init__()
        if d * D > self.MAX_ENTRIES:
            raise ValueError(f"dense projection: D x d = {D} x {d} entries would need {4 * d * D / 2**30:.1f} GiB; "
                             "use --projection fastfood")
        P = torch.randn(D, d, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("P", P / P.norm(dim=0, keepdim=True))

    def forward(self, theta):
        return self.P @ theta


class IdentityProjection(nn.Module):
    """d = D: theta_D = theta_0 + theta, ordinary training written as a subspace (the wrapper's own test)."""

    def __init__(self, d, D, seed=0):
        super().__init__()
        if d != D:
            raise ValueError(f"identity projection needs d = D, got d = {d}, D = {D}")

    def forward(self, theta):
        return theta


PROJECTIONS = {"fastfood": FastfoodProjection, "dense": DenseProjection, "identity": IdentityProjection}


# ------------------------------------------------------------------------------------------------ the wrapper

class SubspaceWrapper(nn.Module):
    """Any nn.Module trained only through theta_d (d,) and per-group scales; see the module docstring.

    module: the model (its parameters are theta_0 and are frozen unless listed in `free`);
    d: subspace dimension (1 <= d <= D, D = parameters warped); projection: fastfood | dense | identity;
    groups: regexes (re.search on parameter names); each gets a trained scale, first match wins;
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
        self.theta = nn.Parameter(torch.zeros(d, dtype=dt))
        self.scales = nn.Parameter(torch.ones(len(self.groups), dtype=dt)) if self.groups else None
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
        return torch.func.functional_call(self.module, self.params(), args, kwargs, strict=False)


def param_group_index(names, groups):
    """Group of each name (index of the first regex in `groups` that re.search-es it, -1 for none) and the
    group patterns; a pattern that matches no parameter is an error naming it."""
    groups = [g for g in (groups or []) if g]
    idx = []
    for n in names:
        idx.append(next((k for k, g in enumerate(groups) if re.search(g, n)), -1))
    empty = [g for k, g in enumerate(groups) if k not in idx]
    if empty:
        raise ValueError(f"parameter group(s) {empty} match no warped parameter; the warped parameters are "
                         f"{names[:20]}{' ...' if len(names) > 20 else ''}")
    return idx, groups


# ------------------------------------------------------------------------------------------------ encoding model

class WarpEncoder(nn.Module):
    """z-scored features (n, p) -> body(x) = x + W2 gelu(W1 x + b1) + b2 (W2, b2 zero: the identity at the
    start) -> read-out Linear(p, n_out), or no read-out (n_out = 0: the body's representation, for RSA)."""

    def __init__(self, p, hidden, n_out, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(p, hidden)
        self.fc2 = nn.Linear(hidden, p)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.readout = nn.Linear(p, n_out) if n_out else None

    def body(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))

    def forward(self, x):
        h = self.body(x)
        return self.readout(h) if self.readout is not None else h


def _upper_rdm(Z):
    """Correlation-distance RDM (1 - Pearson r between rows), upper triangle -> (n (n - 1) / 2,)."""
    Z = Z - Z.mean(1, keepdim=True)
    Z = Z / Z.norm(dim=1, keepdim=True).clamp_min(1e-8)
    R = 1 - Z @ Z.T
    i, j = torch.triu_indices(len(Z), len(Z), 1, device=Z.device)
    return R[i, j]


def rsa_score(A, B):
    """Pearson r of the correlation-distance RDMs of A (n, p) and B (n, q): differentiable."""
    a, b = _upper_rdm(A), _upper_rdm(B)
    a, b = a - a.mean(), b - b.mean()
    return (a @ b) / (a.norm() * b.norm()).clamp_min(1e-12)


def r2_score(pred, Y):
    """Mean over targets of 1 - SSE / SST on rows of Y (n, t)."""
    sse = ((Y - pred) ** 2).sum(0)
    sst = ((Y - Y.mean(0)) ** 2).sum(0).clamp_min(1e-12)
    return float((1 - sse / sst).mean())


def ridge_readout(Xtr, Ytr):
    """Linear read-out of z-scored features by kernels.ridge_cv (alpha per target, 5-fold)
    -> (W (t, p), b (t,), alphas (t,))."""
    fit = kernels.ridge_cv(Xtr.float(), Ytr.float(), ALPHAS, cv=5)
    return fit.coef.T.contiguous(), fit.intercept, fit.best_alphas.float()


# ------------------------------------------------------------------------------------------------ one fit

def fit_one(split, d, cfg, seed=0):
    """Train the encoding model for one d ('full': every parameter directly; 0: none, the linear baseline)
    on split = dict(Xtr, Ytr, Xva, Yva, Xte, Yte) (torch tensors, features z-scored) -> result dict."""
    t0 = time.perf_counter()
    dev = split["Xtr"].device
    p = split["Xtr"].shape[1]
    rsa = cfg["objective"] == "rsa"
    if cfg["objective"] not in ("ridge", "rsa"):
        raise ValueError(f"objective {cfg['objective']!r}: expected ridge or rsa")
    if cfg["readout"] not in ("ridge", "joint"):
        raise ValueError(f"readout {cfg['readout']!r}: expected ridge or joint")
    model = WarpEncoder(p, cfg["hidden"] or p, 0 if rsa else split["Ytr"].shape[1], seed=seed).to(dev)
    if not rsa:
        W, b, alphas = split.get("readout") or ridge_readout(split["Xtr"], split["Ytr"])
        split["readout"] = (W, b, alphas)  # one ridge fit per target split, shared by every d
        with torch.no_grad():
            model.readout.weight.copy_(W.to(dev))
            model.readout.bias.copy_(b.to(dev))
    free = ("readout.weight", "readout.bias") if (cfg["readout"] == "joint" and not rsa) else ()
    if d == "full":
        net, params, lr = model, list(model.parameters()), cfg["full_lr"]
    elif int(d) == 0:
        net, params, lr = model, [], 0.0
    else:
        groups = [g for g in str(cfg["groups"]).split(",") if g]
        net = SubspaceWrapper(model, int(d), cfg["projection"], groups, seed=seed, free=free).to(dev)
        params, lr = [q for q in net.parameters() if q.requires_grad], cfg["warp_lr"]

    ysd = split["Ytr"].std(0).clamp_min(1e-8)  # MSE in units of each target's training sd
    # The read-out keeps its ridge penalty: per target, SSE_t + alpha_t |w_t|^2 in the same units as the loss
    # (1 / (n t sd_t^2)), so the ridge solution is a stationary point of the linear part and gradient steps
    # move it only as far as the warp pays for itself (without it, every fit drifts towards the unregularised
    # least-squares read-out: overfitting on small data).
    pen = None
    if not rsa and cfg.get("readout_penalty", True):
        pen = split["readout"][2].to(dev) / (len(split["Xtr"]) * split["Ytr"].shape[1] * ysd ** 2)

    def loss_fn(x, y):
        if isinstance(net, SubspaceWrapper):
            P = net.params()
            out = torch.func.functional_call(net.module, P, (x,), strict=False)
            W = P.get("readout.weight", model.readout.weight if model.readout is not None else None)
        else:
            out, W = net(x), (model.readout.weight if model.readout is not None else None)
        if rsa:
            return 1 - rsa_score(out, y)
        loss = (((out - y) / ysd) ** 2).mean()
        return loss + (pen * (W ** 2).sum(1)).sum() if pen is not None else loss

    def score(x, y):
        with torch.no_grad():
            out = net(x)
            return float(rsa_score(out, y)) if rsa else r2_score(out, y)

    best = dict(val=score(split["Xva"], split["Yva"]), step=0,
                state={k: v.detach().clone() for k, v in net.state_dict().items()})
    steps = 0
    if params:
        opt = torch.optim.Adam(params, lr=lr)
        g = torch.Generator().manual_seed(seed)
        n, bad = len(split["Xtr"]), 0
        bs = min(cfg["warp_batch"], n)
        for steps in range(1, cfg["warp_steps"] + 1):
            idx = torch.randint(0, n, (bs,), generator=g).to(dev) if bs < n else torch.arange(n, device=dev)
            loss = loss_fn(split["Xtr"][idx], split["Ytr"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if steps % cfg["warp_eval_every"] == 0 or steps == cfg["warp_steps"]:
                v = score(split["Xva"], split["Yva"])
                if v > best["val"]:
                    best = dict(val=v, step=steps, state={k: t.detach().clone() for k, t in net.state_dict().items()})
                    bad = 0
                else:
                    bad += 1
                    if bad >= cfg["warp_patience"]:
                        break
        net.load_state_dict(best["state"])
    D = net.D if isinstance(net, SubspaceWrapper) else sum(q.numel() for q in model.parameters())
    return dict(d=d if d == "full" else int(d), D=int(D), test=score(split["Xte"], split["Yte"]), val=best["val"],
                train=score(split["Xtr"], split["Ytr"]), best_step=best["step"], steps=steps,
                n_scales=len(net.groups) if isinstance(net, SubspaceWrapper) else 0,
                seconds=time.perf_counter() - t0)


def make_split(X, Y, test_idx, val_frac, seed, device="cpu", Xte=None, Yte=None):
    """Train/validation/test tensors; features z-scored with the training rows' statistics. test_idx: rows
    of X, Y for the test set, or None with explicit Xte, Yte (e.g. averaged repeats)."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if test_idx is not None:
        te = np.zeros(len(X), bool)
        te[test_idx] = True
        Xte, Yte, X, Y = X[te], Y[te], X[~te], Y[~te]
    rng = np.random.default_rng(seed)
    va = np.zeros(len(X), bool)
    va[rng.choice(len(X), max(2, int(round(val_frac * len(X)))), replace=False)] = True
    mu, sd = X[~va].mean(0), X[~va].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    z = lambda a: t((np.asarray(a, np.float64) - mu) / sd)  # noqa: E731
    return dict(Xtr=z(X[~va]), Ytr=t(Y[~va]), Xva=z(X[va]), Yva=t(Y[va]), Xte=z(Xte), Yte=t(Yte))


def warp_curve(split, ds, cfg, seed=0, done=None, on_result=None, progress=False):
    """Results for d = 0 (linear), 'full' and each d in ds -> {str(d): result}; entries in `done` are kept
    (resume) and on_result(results) is called after each new one (to save)."""
    from tqdm import tqdm
    res = dict(done or {})
    todo = [d for d in [0, "full"] + list(ds) if str(d) not in res]
    for d in tqdm(todo, disable=not progress, desc="warp d", leave=False):
        res[str(d)] = fit_one(split, d, cfg, seed=seed)
        if on_result is not None:
            on_result(res)
    return res


# ------------------------------------------------------------------------------------------------ d_warp

def d_warp(curve, full, frac):
    """Smallest d whose performance reaches frac * full -> (d or None, log-linearly interpolated d or None).

    curve: [(d, perf), ...] with d >= 1; the interpolated value places the crossing on the straight line
    between the last d below and the first d at or above the threshold, in log10 d."""
    if not full > 0:
        return None, None  # no positive full-fit performance: the fraction has no meaning
    thr = frac * full
    pts = sorted(curve)
    for k, (d, v) in enumerate(pts):
        if v >= thr:
            if k == 0:
                return d, float(d)
            (d0, v0) = pts[k - 1]
            f = (thr - v0) / (v - v0) if v != v0 else 1.0
            return d, float(10 ** (math.log10(d0) + f * (math.log10(d) - math.log10(d0))))
    return None, None


def summarise(run, frac):
    """One warp run's JSON -> dict(name, curve [(d, test)], full, linear, d_warp, d_warp_interp, threshold)."""
    res = run["results"]
    curve = sorted((int(k), v["test"]) for k, v in res.items() if k not in ("0", "full"))
    full = res["full"]["test"] if "full" in res else float("nan")
    dw, dwi = d_warp(curve, full, frac)
    return dict(name=run.get("name", "?"), target=run.get("target", ""), curve=curve, full=full,
                linear=res["0"]["test"] if "0" in res else float("nan"), d_warp=dw, d_warp_interp=dwi,
                threshold=frac * full if full == full else float("nan"), D=run.get("D"), metric=run.get("metric"))


def plot_curves(summaries, frac, path):
    """Performance vs d (log x) per model, the full fit and its threshold as lines, d_warp marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for k, s in enumerate(summaries):
        c = f"C{k}"
        if s["curve"]:
            ds, vs = zip(*s["curve"])
            ax.plot(ds, vs, "o-", color=c, label=f"{s['name']} (d_warp {s['d_warp'] if s['d_warp'] else '> max'})")
        ax.axhline(s["full"], color=c, ls="--", lw=0.8)
        ax.axhline(s["threshold"], color=c, ls=":", lw=0.8)
        if s["linear"] == s["linear"]:
            ax.plot([min(d for d, _ in s["curve"]) if s["curve"] else 1], [s["linear"]], "x", color=c)
        if s["d_warp_interp"]:
            ax.axvline(s["d_warp_interp"], color=c, lw=0.6, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d")
    ax.set_ylabel(f"held-out {summaries[0]['metric'] if summaries else ''}")
    ax.set_title(f"encoder warping: dashed = full fit, dotted = {frac:.0%} of it, x = linear", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def task_dwarp(cfg):
    """evaluate.py --task dwarp: read warp runs (--warp-runs, comma-separated globs of train.py --stage warp
    outputs), give each model's performance-vs-d curve, full fit, linear baseline and d_warp at --warp-frac,
    and draw them into <out>.png."""
    import glob
    import json
    pats = [p.strip() for p in str(cfg.get("warp_runs", "")).split(",") if p.strip()]
    if not pats:
        raise data.DataError("--warp-runs not given; expected result files of train.py --stage warp "
                             "(e.g. --warp-runs 'runs/warp/*.json')")
    paths = []
    for pat in pats:
        hits = sorted(glob.glob(pat))
        if not hits:
            raise data.DataError(f"{pat}: no warp result file matches; expected train.py --stage warp --out files")
        paths += [h for h in hits if h not in paths]
    frac = float(cfg.get("warp_frac", 0.9))
    if not 0 < frac <= 1:
        raise data.DataError(f"--warp-frac {frac}: expected a fraction in (0, 1]")
    summaries = []
    for path in paths:
        try:
            with open(path) as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as e:
            raise data.DataError(f"{path}: not a readable JSON warp result ({e})") from None
        res = doc.get("results") if isinstance(doc, dict) else None
        if not isinstance(res, dict) or "full" not in res or "0" not in res:
            raise data.DataError(f"{path}: field 'results' must hold the fits '0' (linear) and 'full' "
                                 "(train.py --stage warp writes them first); the run is incomplete or not a warp run")
        s = summarise(doc, frac)
        s["file"] = path
        summaries.append(s)
    keys = [s["name"] for s in summaries]
    if len(set(keys)) < len(keys):  # one model on several targets: name them apart
        keys = [f"{s['name']} ({s['target']})" for s in summaries]
    png = os.path.splitext(cfg.get("_out") or cfg.get("out") or os.path.join("runs", "eval", "dwarp.json"))[0] + ".png"
    for k, s in zip(keys, summaries):
        s["name"] = k
    plot_curves(summaries, frac, png)
    print(f"\nencoder warping: d_warp = smallest d reaching {frac:.0%} of the full fit (held-out {summaries[0]['metric']})")
    print(f"{'model':<28}{'linear':>9}{'full':>9}{'d_warp':>9}{'interp':>10}")
    for s in summaries:
        interp = f"{s['d_warp_interp']:.1f}" if s["d_warp_interp"] else "-"
        print(f"{s['name']:<28}{s['linear']:>9.4f}{s['full']:>9.4f}{str(s['d_warp']):>9}{interp:>10}")
    return dict(models={s["name"]: s for s in summaries}, warp_frac=frac, figure=png, files=paths)


# ------------------------------------------------------------------------------------------------ targets

def brain_target(cfg, X, ids):
    """THINGS-fMRI voxels of --roi for --subject: rows of X per trial (fmri.trial_rows), split by trial_split
    -> (Xtr, Ytr, Xte, Yte, info)."""
    import fmri
    concepts = data.load_concepts(cfg["data"])
    s = str(cfg["subject"])
    tag = s if s.startswith("sub-") else f"sub-{int(s):02d}"
    sub = fmri.load_subject(cfg["data"], tag, cfg["nc_min"])
    spath = os.path.join(cfg["data"], "brain_data", f"{tag}_StimulusMetadata.csv")
    vpath = os.path.join(cfg["data"], "brain_data", f"{tag}_VoxelMetadata.csv")
    if cfg["roi"] not in sub["rois"] or not sub["rois"][cfg["roi"]].any():
        have = [r for r, m in sub["rois"].items() if m.any()]
        raise data.DataError(f"{vpath}: ROI column {cfg['roi']!r} missing or without voxels with nc_singletrial > "
                             f"{cfg['nc_min']}; ROIs with voxels: {have}")
    rows, _ = fmri.trial_rows(sub["stimuli"], ids, concepts, spath)
    Y = sub["Y"][:, sub["rois"][cfg["roi"]]]                      # (n_trials, n_voxels in the ROI)
    train, test_groups, how = trial_split(rows, sub["stimuli"]["session"].to_numpy())
    Yte = np.stack([Y[g].mean(0) for g in test_groups])
    Xte = X[np.array([rows[g[0]] for g in test_groups])]
    return X[rows[train]], Y[train], Xte, Yte, dict(subject=tag, roi=cfg["roi"], n_voxels=int(Y.shape[1]), test=how)


def trial_split(rows, sessions):
    """Train/test split of fMRI trials by image -> (train trial mask, test trial groups, description).

    rows (n_trials,): the image of each trial. The images shown more than once (THINGS-fMRI's test images)
    are the test set, one group of trials per image (their responses are averaged); the single-presentation
    trials train. Without repeated images, the last session is the test set (one trial per group)."""
    uniq, inv, counts = np.unique(rows, return_inverse=True, return_counts=True)
    rep = counts[inv] > 1
    if rep.any() and (~rep).sum() >= 10:
        return ~rep, [np.nonzero(rows == r)[0] for r in uniq[counts > 1]], "repeated images, averaged over repeats"
    last = sessions == sessions.max()
    return ~last, [np.array([i]) for i in np.nonzero(last)[0]], "last session"


def spose_target(cfg, X, ids):
    """SPoSE embedding: concept rows of X (first sorted image per concept, as evaluate.py's cka task);
    a random --test-frac of concepts (seeded) is the test set."""
    concepts = data.load_concepts(cfg["data"])
    rows = data.concept_rows(ids, concepts, path=cfg["features"])
    Y = data.load_spose(cfg["data"], n_concepts=len(concepts))
    rng = np.random.default_rng(cfg["seed"])
    te = rng.choice(len(concepts), max(2, int(round(cfg["test_frac"] * len(concepts)))), replace=False)
    mask = np.zeros(len(concepts), bool)
    mask[te] = True
    Xc = X[rows]
    return Xc[~mask], Y[~mask], Xc[mask], Y[mask], dict(n_concepts=len(concepts), test=f"{len(te)} random concepts")


# ------------------------------------------------------------------------------------------------ the stage

RESUME_KEYS = ("features", "field", "targets", "data", "subject", "roi", "nc_min", "projection", "groups",
               "objective", "readout", "readout_penalty", "hidden", "warp_lr", "full_lr", "warp_steps", "warp_batch", "seed",
               "val_frac", "test_frac")


def parse_ds(text):
    ds = []
    for tok in str(text).split(","):
        tok = tok.strip()
        if not tok or tok == "full":
            continue
        try:
            v = int(float(tok))
        except ValueError:
            raise ValueError(f"--d {text!r}: {tok!r} is not an integer") from None
        if v < 1:
            raise ValueError(f"--d {text!r}: subspace dimensions must be >= 1, got {v}")
        ds.append(v)
    return sorted(set(ds))


def stage_warp(cfg):
    """train.py --stage warp: the performance-vs-d curve of one model (features file) on one target."""
    import json
    import sys
    try:
        ds = parse_ds(cfg["d"])
        X, ids = data.read_features(cfg["features"], field=cfg["field"])
        if cfg["targets"] == "brain":
            Xtr, Ytr, Xte, Yte, info = brain_target(cfg, X, ids)
        elif cfg["targets"] == "spose":
            Xtr, Ytr, Xte, Yte, info = spose_target(cfg, X, ids)
        else:
            raise data.DataError(f"--targets {cfg['targets']!r}: expected brain or spose")
    except ValueError as e:  # DataError is a ValueError
        sys.exit(f"train.py: error: {e}")
    dev = "cuda" if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu"
    split = make_split(Xtr, Ytr, None, cfg["val_frac"], cfg["seed"], dev, Xte, Yte)
    name = cfg["name"]
    if not name:
        with data.open_h5(cfg["features"], "features") as f:
            name = str(f.attrs.get("backbone", "")) or os.path.splitext(os.path.basename(cfg["features"]))[0]
    tgt = cfg["targets"] if cfg["targets"] == "spose" else f"{info['subject']} {info['roi']}"
    out = cfg["out"] or os.path.join("runs", "warp", f"{name}_{tgt.replace(' ', '_')}.json")
    done = {}
    if os.path.exists(out):  # resume: keep the d values already fitted under the same settings
        with open(out) as fh:
            old = json.load(fh)
        diff = [k for k in RESUME_KEYS if str(old.get("config", {}).get(k)) != str(cfg.get(k))]
        if diff:
            sys.exit(f"train.py: error: {out} was written with different settings ({', '.join(diff)}); "
                     "delete it or pass another --out")
        done = old.get("results", {})
        print(f"warp: resuming {out}: {len(done)} fits done ({', '.join(done)})")
    # D (warped parameters) is only known after the model is built: a too large d fails before any training
    p, t = split["Xtr"].shape[1], split["Ytr"].shape[1]
    joint = cfg["readout"] == "joint"
    probe = WarpEncoder(p, cfg["hidden"] or p, 0 if cfg["objective"] == "rsa" else t)
    warped = {n: q.numel() for n, q in probe.named_parameters() if not (joint and n.startswith("readout"))}
    D = int(sum(warped.values()))
    try:  # parameter groups that match nothing fail here, before any fit is written
        param_group_index(list(warped), [g for g in str(cfg["groups"]).split(",") if g])
    except ValueError as e:
        sys.exit(f"train.py: error: --groups {cfg['groups']!r}: {e}")
    if ds and max(ds) > D:
        sys.exit(f"train.py: error: --d {max(ds)} is larger than D = {D}, the number of warped parameters "
                 f"({', '.join(f'{n} {k}' for n, k in warped.items())}); pass smaller d values")
    cfg_json = {k: v for k, v in cfg.items() if not k.startswith("_")}

    def save(res):
        doc = dict(name=name, target=tgt, target_info=info, metric="rsa" if cfg["objective"] == "rsa" else "r2",
                   D=D, n_train=int(len(split["Xtr"])), n_val=int(len(split["Xva"])), n_test=int(len(split["Xte"])),
                   results=res, config=cfg_json, versions=data.versions())
        with data.atomic_path(out) as tmp, open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2)

    from choice import torch_threads
    with torch_threads(cfg["warp_threads"]):
        res = warp_curve(split, ds, cfg, seed=cfg["seed"], done=done, on_result=save, progress=cfg["progress"])
    save(res)
    s = summarise(dict(results=res, name=name), frac=0.9)
    print(f"\nwarp {name} -> {tgt} (D = {D}): held-out {'RSA' if cfg['objective'] == 'rsa' else 'R^2'}")
    print(f"{'d':>8}{'test':>10}{'val':>10}{'steps':>8}")
    for k in ["0"] + [str(d) for d in sorted(int(x) for x in res if x not in ("0", "full"))] + ["full"]:
        r = res[k]
        print(f"{k:>8}{r['test']:>10.4f}{r['val']:>10.4f}{r['steps']:>8}")
    print(f"d_warp (90% of the full fit): {s['d_warp']}; wrote {out}")
    return res
