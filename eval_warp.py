r"""Encoder warping: fit an encoding model through a d-dimensional subspace of its parameters, and d_warp.

The fitting library of `train.py --stage warp` and the task `evaluate.py --task dwarp`:

    python train.py --stage warp --features F.h5 --targets brain --subjects 1 --rois LOC --d 1,10,100,1000 \
        --out runs/warp/NAME_LOC.json                      # THINGS-fMRI voxels of one ROI (eval_fmri.py loaders)
    python train.py --stage warp --features F.h5 --targets spose --d 1,10,100 --out runs/warp/NAME_spose.json
    python evaluate.py --task dwarp --warp-runs 'runs/warp/*_LOC.json' --out runs/eval/dwarp.json   # curves, d_warp

Subspace training (models.SubspaceWrapper; Li et al. 2018, Aghajanyan et al. 2020): the warped parameters
are theta_D = theta_0 + lambda_g * P theta_d with theta_d (d,) the only trained vector and P a fixed random
(D, d) projection (Fastfood by default, dense as the reference, identity for d = D).

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
import time

import numpy as np
import torch
from torch import nn

import data
import eval_fmri
import kernels
from models import SubspaceWrapper

ALPHAS = np.logspace(-2, 6, 17)  # ridge read-out: alphas chosen per target by 5-fold CV


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
    return float(data.r2_per_target(pred, Y).mean())


def ridge_readout(Xtr, Ytr):
    """Linear read-out of z-scored features by kernels.ridge_cv (alpha per target, 5-fold)
    -> (W (t, p), b (t,), alphas (t,))."""
    fit = kernels.ridge_cv(Xtr.float(), Ytr.float(), ALPHAS, cv=5, scoring="r2")
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
        params, lr = [q for q in net.parameters() if q.requires_grad], cfg["lr"]

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
        bs = min(cfg["batch"], n)
        for steps in range(1, cfg["steps"] + 1):
            idx = torch.randint(0, n, (bs,), generator=g).to(dev) if bs < n else torch.arange(n, device=dev)
            loss = loss_fn(split["Xtr"][idx], split["Ytr"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if steps % cfg["eval_every"] == 0 or steps == cfg["steps"]:
                v = score(split["Xva"], split["Yva"])
                if v > best["val"]:
                    best = dict(val=v, step=steps, state={k: t.detach().clone() for k, t in net.state_dict().items()})
                    bad = 0
                else:
                    bad += 1
                    if bad >= cfg["patience"]:
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
    plt = data.pyplot()
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
    data.save_figure(fig, path, tight=True)
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
    print(f"\nencoder warping: d_warp = smallest d reaching {frac:.0%} of the full fit "
          f"(held-out {summaries[0]['metric']})")
    print(f"{'model':<28}{'linear':>9}{'full':>9}{'d_warp':>9}{'interp':>10}")
    for s in summaries:
        interp = f"{s['d_warp_interp']:.1f}" if s["d_warp_interp"] else "-"
        print(f"{s['name']:<28}{s['linear']:>9.4f}{s['full']:>9.4f}{str(s['d_warp']):>9}{interp:>10}")
    return dict(models={s["name"]: s for s in summaries}, warp_frac=frac, figure=png, files=paths)


# ------------------------------------------------------------------------------------------------ targets

def brain_target(cfg, X, ids):
    """THINGS-fMRI voxels of --rois (one ROI) for --subjects (one subject): rows of X per trial
    (eval_fmri.trial_rows), split by eval_fmri.trial_split -> (Xtr, Ytr, Xte, Yte, info)."""
    concepts = data.load_concepts(cfg["data"])
    tag, roi = data.subject_tag(cfg["subjects"]), cfg["rois"].strip()
    sub = eval_fmri.load_subject(cfg["data"], tag, cfg["nc_min"])
    spath = os.path.join(cfg["data"], "brain_data", f"{tag}_StimulusMetadata.csv")
    vpath = os.path.join(cfg["data"], "brain_data", f"{tag}_VoxelMetadata.csv")
    if roi not in sub["rois"] or not sub["rois"][roi].any():
        have = [r for r, m in sub["rois"].items() if m.any()]
        raise data.DataError(f"{vpath}: ROI column {roi!r} missing or without voxels with nc_singletrial > "
                             f"{cfg['nc_min']}; ROIs with voxels: {have}")
    rows, _ = eval_fmri.trial_rows(sub["stimuli"], ids, concepts, spath)
    Y = sub["Y"][:, sub["rois"][roi]]                      # (n_trials, n_voxels in the ROI)
    train, test_groups, how = eval_fmri.trial_split(rows, sub["stimuli"]["session"].to_numpy())
    Yte = np.stack([Y[g].mean(0) for g in test_groups])
    Xte = X[np.array([rows[g[0]] for g in test_groups])]
    return X[rows[train]], Y[train], Xte, Yte, dict(subject=tag, roi=roi, n_voxels=int(Y.shape[1]), test=how)


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
