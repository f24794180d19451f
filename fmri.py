"""THINGS-fMRI voxelwise encoding: trial -> image mapping, leave-one-session-out ridge, statistics, figures.

Flat helper module of `evaluate.py --task fmri` (see README, "Evaluations"):

    python evaluate.py --task fmri --features F.h5 --data DIR --out runs/demo/fmri.json [--aligned A.h5]

Per subject: voxels with nc_singletrial > --nc-min are kept; every trial is mapped to its THINGS image
("<concept>/<stimulus>" in F.h5's /image_ids; SPoSE by concept); the outer loop leaves one session out,
the inner loop picks alpha per voxel with kernels.ridge_cv (default: exact LOO over logspace(-6, 3, 100),
sklearn RidgeCV's rule, as in the original study). R^2 on the held-out session, per voxel, is divided by
nc_singletrial / 100 (1 = the noise ceiling) and averaged over folds; ROI means are taken per fold.
"""
import os
import time

import numpy as np
import torch

import data
import kernels

ROIS = ["V1", "V2", "V3", "hV4", "LOC", "FFA", "PPA", "EBA", "OFA", "STS", "RSC", "TOS"]
EARLY, HIGH = ROIS[:4], ROIS[4:]


def subjects(data_dir):
    """Subject tags ("sub-01", ...) that have a ResponseData file in DIR/brain_data."""
    folder = os.path.join(data_dir, "brain_data")
    if not os.path.isdir(folder):
        raise data.DataError(f"{folder} not found; expected sub-0X_ResponseData.h5 / _VoxelMetadata.csv / "
                             "_StimulusMetadata.csv (see README, 'Real human data formats')")
    tags = sorted(f.split("_", 1)[0] for f in os.listdir(folder) if f.endswith("_ResponseData.h5"))
    if not tags:
        raise data.DataError(f"{folder}: no sub-0X_ResponseData.h5 files")
    return tags


def trial_rows(stimuli, image_ids, concepts, spath):
    """Map each trial to (feature row of its image, SPoSE row of its concept) -> two (n_trials,) int64 arrays."""
    index = {iid: i for i, iid in enumerate(image_ids)}
    keys = (stimuli["concept"].astype(str) + "/" + stimuli["stimulus"].astype(str)).tolist()
    rows = np.array([index.get(k, -1) for k in keys], dtype=np.int64)
    miss = np.nonzero(rows < 0)[0]
    if len(miss):
        raise data.DataError(f"{spath}: {len(miss)} of {len(keys)} trials show images missing from the features' "
                             f"/image_ids (first: trial {miss[0]}, '{keys[miss[0]]}')")
    cindex = {c: i for i, c in enumerate(concepts)}
    crow = np.array([cindex.get(c, -1) for c in stimuli["concept"].astype(str)], dtype=np.int64)
    miss = np.nonzero(crow < 0)[0]
    if len(miss):
        raise data.DataError(f"{spath}: column 'concept' has {len(miss)} trials whose concept is not in unique_id.txt "
                             f"(first: '{stimuli['concept'].iloc[miss[0]]}')")
    return rows, crow


def load_subject(data_dir, tag, nc_min, roi_names=""):
    """Responses (n_trials, n_kept) float32 of the voxels with nc_singletrial > nc_min (and, with rois
    "FFA,PPA", in one of those ROIs), their metadata, stimuli."""
    d = data.load_fmri(data_dir, tag)
    rpath = os.path.join(data_dir, "brain_data", f"{tag}_ResponseData.h5")
    R = d["responses"]                                            # (n_voxels, n_trials)
    finite = np.isfinite(R)
    dead = np.nonzero(~finite.any(1))[0]
    if len(dead):
        raise data.DataError(f"{rpath}: {len(dead)} of {R.shape[0]} voxels are all-NaN (first voxel_id "
                             f"{d['voxel_ids'][dead[0]]}); drop them or mark them nc_singletrial = 0")
    vox = d["voxels"]
    nc = vox["nc_singletrial"].to_numpy(np.float64)
    keep = nc > nc_min
    chosen = [r for r in roi_names.split(",") if r] if roi_names else [r for r in ROIS if r in vox.columns]
    if roi_names:  # one ROI (or a few) per job: slurm/evaluate_array.sbatch splits subjects x ROIs x models
        absent = [r for r in chosen if r not in vox.columns]
        if absent:
            raise data.DataError(f"{data_dir}/brain_data/{tag}_VoxelMetadata.csv: no ROI column(s) {absent}; "
                                 f"ROI columns: {[r for r in ROIS if r in vox.columns]}")
        keep &= vox[chosen].to_numpy(bool).any(1)
    partial = np.nonzero(keep & ~finite.all(1))[0]
    if len(partial):
        raise data.DataError(f"{rpath}: {len(partial)} kept voxels have NaN trials (first voxel_id "
                             f"{d['voxel_ids'][partial[0]]}, {int((~finite[partial[0]]).sum())} NaN trials)")
    if not keep.any():
        raise data.DataError(f"{rpath}: no voxel has nc_singletrial > {nc_min}"
                             f"{' in ROI(s) ' + roi_names if roi_names else ''}")
    rois = {r: vox[r].to_numpy(bool)[keep] for r in chosen}
    return dict(Y=np.ascontiguousarray(R[keep].T), voxel_ids=d["voxel_ids"][keep], nc=nc[keep], rois=rois,
                stimuli=d["stimuli"], n_voxels_total=int(R.shape[0]))


def encode(reps, Y, sessions, alphas, inner_cv="loo"):
    """Leave-one-session-out encoding of Y (n_trials, n_voxels) by each representation (n_trials, d).

    Returns {name: dict(r2 (n_folds, n_voxels) float64 raw held-out R^2, alphas (n_folds, n_voxels))}.
    Features are z-scored with the training sessions' statistics; alpha is chosen per voxel inside the
    training sessions (inner_cv: 'loo' | 'gcv' | k | 'sessions' for leave-one-session-out inside).
    """
    folds = np.unique(sessions)
    if len(folds) < 2:
        raise data.DataError(f"StimulusMetadata: column 'session' has {len(folds)} distinct session(s); "
                             "leave-one-session-out needs >= 2")
    Yt = torch.from_numpy(np.asarray(Y, dtype=np.float32))
    out = {}
    for name, X in reps.items():
        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        r2 = np.zeros((len(folds), Y.shape[1]))
        best = np.zeros((len(folds), Y.shape[1]))
        for k, s in enumerate(folds):
            te, tr = sessions == s, sessions != s
            mu, sd = X[tr].mean(0), X[tr].std(0)
            sd = torch.where(sd > 0, sd, torch.ones_like(sd))
            Xtr, Xte = (X[tr] - mu) / sd, (X[te] - mu) / sd
            inner = sessions[tr] if inner_cv == "sessions" else inner_cv
            fit = kernels.ridge_cv(Xtr, Yt[tr], alphas, cv=inner)
            pred = fit.predict(Xte).double()
            yte = Yt[te].double()
            sse = ((yte - pred) ** 2).sum(0)
            sst = ((yte - yte.mean(0)) ** 2).sum(0)
            r2[k] = (1 - sse / sst).numpy()
            best[k] = fit.best_alphas.numpy()
        out[name] = dict(r2=r2, alphas=best)
    return out


def sign_flip_test(diff, n_perm=10000, seed=0):
    """One-sided sign-flip permutation test of mean(diff) > 0 -> p in (0, 1]; (1 + #null >= obs) / (1 + n_perm)."""
    diff = np.asarray(diff, dtype=np.float64)
    if len(diff) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    obs = diff.mean()
    null = np.empty(n_perm)
    for start in range(0, n_perm, 1000):  # blocks keep the (block, n) sign matrix small
        m = min(1000, n_perm - start)
        signs = rng.integers(0, 2, size=(m, len(diff))) * 2 - 1
        null[start:start + m] = (signs * diff).mean(1)
    return float((1 + np.sum(null >= obs - 1e-15)) / (1 + n_perm))


def fisher_combine(pvals):
    """Fisher's method: -2 sum log p ~ chi2(2k) -> combined p (nan entries ignored)."""
    from scipy.stats import chi2
    p = np.asarray([v for v in pvals if np.isfinite(v)], dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    return float(chi2.sf(-2 * np.log(p).sum(), 2 * len(p)))


def benjamini_hochberg(pvals):
    """BH-adjusted p-values (step-up, monotone), same order as the input; nan stays nan."""
    p = np.asarray(pvals, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = len(q)
    if m == 0:
        return out
    order = np.argsort(q)
    adj = q[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.minimum(adj, 1.0)
    out[ok] = res
    return out


def roi_means(norm_r2, rois):
    """Mean normalised R^2 per ROI per fold: norm_r2 (n_folds, n_voxels) -> {roi: (n_folds,)} (ROIs with voxels)."""
    return {r: norm_r2[:, m].mean(1) for r, m in rois.items() if m.any()}


def plot_rois(res, reps, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rois = [r for r in ROIS if any(r in res["per_subject"][s][reps[0]]["rois"] for s in res["per_subject"])]
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(rois), 3.5))
    w = 0.8 / len(reps)
    for i, name in enumerate(reps):
        x = np.arange(len(rois)) + (i - (len(reps) - 1) / 2) * w
        ax.bar(x, [res[name]["rois"].get(r, np.nan) for r in rois], w, label=name, alpha=0.7)
        for sub, v in res["per_subject"].items():  # one dot per subject
            ax.plot(x, [v[name]["rois"].get(r, np.nan) for r in rois], "k.", ms=3)
    ax.set_xticks(np.arange(len(rois)), rois, rotation=45)
    ax.set_ylabel("R$^2$ / noise ceiling")
    ax.axhline(1.0, color="gray", lw=0.5, ls="--")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot_scatter(voxels, a, b, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    for sub, v in voxels.items():
        ax.scatter(v[a], v[b], s=3, alpha=0.5, label=sub)
    lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lim, lim, "k-", lw=0.5)
    ax.set_xlabel(f"{a}: R$^2$ / nc")
    ax.set_ylabel(f"{b}: R$^2$ / nc")
    ax.legend(fontsize=6, markerscale=3)
    fig.tight_layout()
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def flatmap(voxels, path):
    """Optional pycortex flatmap: needs pycortex with a filestore holding the subjects; else a message."""
    try:
        import cortex  # noqa: F401
    except ImportError:
        return "skipped: pycortex is not installed (pip install pycortex, plus its filestore with the subjects)"
    return "skipped: pycortex found, but voxel -> surface mapping needs the subjects' filestore (not configured)"


def run(cfg, reps_for_subject, representations):
    """The whole task. reps_for_subject(stimuli, spath) -> {name: (n_trials, d)}; returns (results, voxel arrays)."""
    alphas = np.logspace(cfg["alpha_min"], cfg["alpha_max"], cfg["n_alphas"])
    inner = int(cfg["inner_cv"]) if str(cfg["inner_cv"]).isdigit() else cfg["inner_cv"]
    tags = subjects(cfg["data"]) if not cfg["subjects"] else [
        s if s.startswith("sub-") else f"sub-{int(s):02d}" for s in cfg["subjects"].split(",")]
    res = {name: {} for name in representations}
    res["per_subject"], voxels, timing = {}, {}, {}
    for tag in tags:
        t0 = time.perf_counter()
        sub = load_subject(cfg["data"], tag, cfg["nc_min"], cfg.get("rois", ""))
        spath = os.path.join(cfg["data"], "brain_data", f"{tag}_StimulusMetadata.csv")
        reps = reps_for_subject(sub["stimuli"], spath)
        sessions = sub["stimuli"]["session"].to_numpy()
        enc = encode(reps, sub["Y"], sessions, alphas, inner)
        per = {}
        voxels[tag] = dict(voxel_ids=sub["voxel_ids"], nc=sub["nc"],
                           roi=np.array([next((r for r in ROIS if r in sub["rois"] and sub["rois"][r][v]), "none")
                                         for v in range(len(sub["nc"]))], dtype="S"))
        for name, e in enc.items():
            norm = e["r2"] / (sub["nc"] / 100.0)                      # (n_folds, n_voxels)
            rm = roi_means(norm, sub["rois"])
            per[name] = dict(rois={r: float(v.mean()) for r, v in rm.items()},
                             rois_per_fold={r: v.tolist() for r, v in rm.items()},
                             r2=float(norm.mean()), median_alpha=float(np.median(e["alphas"])),
                             r2_early=float(np.mean([rm[r].mean() for r in EARLY if r in rm])),
                             r2_high=float(np.mean([rm[r].mean() for r in HIGH if r in rm])))
            voxels[tag][name] = norm.mean(0)
            voxels[tag][name + "_raw_r2"] = e["r2"].mean(0)
            voxels[tag][name + "_alphas"] = e["alphas"]
        # sign-flip tests over voxels within each ROI: every representation against base
        for name in representations:
            if name == "base":
                continue
            per[name]["vs_base_p"] = {r: sign_flip_test(voxels[tag][name][m] - voxels[tag]["base"][m],
                                                        cfg["n_perm"], cfg["seed"])
                                      for r, m in sub["rois"].items() if m.any()}
        per["n_voxels"], per["n_voxels_kept"], per["n_trials"] = sub["n_voxels_total"], int(len(sub["nc"])), int(len(sessions))
        per["seconds"] = time.perf_counter() - t0
        res["per_subject"][tag] = per
        timing[tag] = per["seconds"]
    for name in representations:  # subject means; Fisher over subjects, then BH over ROIs
        subs = [res["per_subject"][t][name] for t in tags]
        rois = [r for r in ROIS if all(r in s["rois"] for s in subs)]
        res[name] = dict(r2=float(np.mean([s["r2"] for s in subs])),
                         rois={r: float(np.mean([s["rois"][r] for s in subs])) for r in rois},
                         r2_early=float(np.mean([s["rois"][r] for s in subs for r in EARLY if r in s["rois"]])),
                         r2_high=float(np.mean([s["rois"][r] for s in subs for r in HIGH if r in s["rois"]])))
        if name != "base":
            comb = {r: fisher_combine([s["vs_base_p"][r] for s in subs]) for r in rois}
            adj = benjamini_hochberg([comb[r] for r in rois])
            res[name]["vs_base"] = {r: dict(p_fisher=comb[r], p_bh=float(q),
                                            delta=res[name]["rois"][r] - res["base"]["rois"][r])
                                    for r, q in zip(rois, adj)}
    res["noise_ceiling"] = 1.0  # R^2 / (nc_singletrial / 100): 1 is the single-trial noise ceiling by definition
    res["alphas"] = dict(min=float(alphas[0]), max=float(alphas[-1]), n=int(len(alphas)), inner_cv=str(inner))
    return res, voxels


def write_voxels(path, voxels, cfg):
    """Per-voxel results: /<sub>/{voxel_ids, nc, roi, <rep>, <rep>_raw_r2, <rep>_alphas} + config/versions attrs."""
    import h5py
    with data.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for tag, v in voxels.items():
            for k, a in v.items():
                f[f"{tag}/{k}"] = a
        data.write_h5_attrs(f, dict(config=cfg, description="R^2 / (nc_singletrial/100) per voxel, mean over "
                                                            "leave-one-session-out folds; *_alphas per fold"))
    return path
