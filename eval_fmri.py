r"""THINGS-fMRI: voxelwise encoding (--task fmri), the encoding-model search (--task encsearch), trial splits.

    python evaluate.py --task fmri --features F.h5 --data DIR --out runs/demo/fmri.json [--aligned A.h5]
    python evaluate.py --task encsearch --features L1.h5 L2.h5 L3.h5 --data DIR --out runs/eval/encsearch.json
    python evaluate.py --task encsearch --features F.h5 --layers layers/block3,layers/block6,features \
        --pca 0,32,128 --regressions ridge,pls --data DIR --out runs/eval/encsearch.json

fmri, per subject: voxels with nc_singletrial > --nc-min are kept; every trial is mapped to its THINGS image
("<concept>/<stimulus>" in F.h5's /image_ids; SPoSE by concept); the outer loop leaves one session out,
the inner loop picks alpha per voxel with kernels.ridge_cv (default: exact LOO over logspace(-6, 3, 100),
sklearn RidgeCV's rule, as in the original study). R^2 on the held-out session, per voxel, is divided by
nc_singletrial / 100 (1 = the noise ceiling) and averaged over folds; ROI means are taken per fold.

encsearch (the Algonauts-2021 pipeline): layers x PCA x regression, chosen per subject and ROI by CV. For
every subject and ROI, and for every layer (one --features file per layer, or --layers datasets of one
file), the candidates are PCA sizes (--pca; 0 = the raw features; sklearn PCA fitted on the training rows
only, after z-scoring with the training rows' statistics) x regressions: ridge (kernels.ridge_cv, one alpha
per subject x ROI from --alphas, chosen inside by the same folds) and PLS (sklearn PLSRegression, one
n_components from --pls-components). Each candidate is scored by --folds-fold CV on the training trials
(mean over the ROI's voxels of 1 - validation MSE of z-scored responses); the best candidate is refit on all
training trials and scored on the test set (trial_split: the images shown more than once, responses
averaged over their repeats). Writes the result JSON (one row per subject x ROI x layer with the chosen PCA
size, regression, hyperparameter, CV score and held-out R^2 / Pearson r, every candidate's CV score, the
best layer per subject x ROI) and <out>.md (the table).
"""
import os
import time

import numpy as np
import torch

import data
import kernels
from representations import aligned_representations, combine_strata, comparisons, device, paired_gain

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


def encode(reps, Y, sessions, alphas, inner_cv="loo", device="cpu"):
    """Leave-one-session-out encoding of Y (n_trials, n_voxels) by each representation (n_trials, d).

    Returns {name: dict(r2 (n_folds, n_voxels) float64 raw held-out R^2, alphas (n_folds, n_voxels))}.
    Features are z-scored with the training sessions' statistics; alpha is chosen per voxel inside the
    training sessions (inner_cv: 'loo' | 'gcv' | k | 'sessions' for leave-one-session-out inside).
    device: Y and each representation are moved there once; kernels.ridge_cv runs on it; results come back.
    """
    folds = np.unique(sessions)
    if len(folds) < 2:
        raise data.DataError(f"StimulusMetadata: column 'session' has {len(folds)} distinct session(s); "
                             "leave-one-session-out needs >= 2")
    Yt = torch.from_numpy(np.asarray(Y, dtype=np.float32)).to(device)
    out = {}
    for name, X in reps.items():
        X = torch.as_tensor(np.asarray(X, dtype=np.float32)).to(device)
        r2 = np.zeros((len(folds), Y.shape[1]))
        best = np.zeros((len(folds), Y.shape[1]))
        for k, s in enumerate(folds):
            te, tr = [torch.from_numpy(m).to(device) for m in (sessions == s, sessions != s)]
            mu, sd = X[tr].mean(0), X[tr].std(0)
            sd = torch.where(sd > 0, sd, torch.ones_like(sd))
            Xtr, Xte = (X[tr] - mu) / sd, (X[te] - mu) / sd
            inner = sessions[sessions != s] if inner_cv == "sessions" else inner_cv
            # inner alpha choice: k-fold / sessions by mean R^2 over folds (sklearn RidgeCV(cv=K)), LOO by its MSE
            fit = kernels.ridge_cv(Xtr, Yt[tr], alphas, cv=inner, scoring=None if isinstance(inner, str) else "r2")
            pred = fit.predict(Xte).double()
            yte = Yt[te].double()
            r2[k] = data.r2_per_target(pred, yte).cpu().numpy()
            best[k] = fit.best_alphas.cpu().numpy()
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
    plt = data.pyplot()
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
    data.save_figure(fig, path, tight=True)


def plot_scatter(voxels, a, b, path):
    plt = data.pyplot()
    fig, ax = plt.subplots(figsize=(3.5, 3.5))
    for sub, v in voxels.items():
        ax.scatter(v[a], v[b], s=3, alpha=0.5, label=sub)
    lim = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lim, lim, "k-", lw=0.5)
    ax.set_xlabel(f"{a}: R$^2$ / nc")
    ax.set_ylabel(f"{b}: R$^2$ / nc")
    ax.legend(fontsize=6, markerscale=3)
    data.save_figure(fig, path, tight=True)


def flatmap(voxels, path):
    """Optional pycortex flatmap: needs pycortex with a filestore holding the subjects; else a message."""
    try:
        import cortex  # noqa: F401
    except ImportError:
        return "skipped: pycortex is not installed (pip install pycortex, plus its filestore with the subjects)"
    return "skipped: pycortex found, but voxel -> surface mapping needs the subjects' filestore (not configured)"


def run_fmri(cfg, reps_for_subject, representations):
    """The whole task. reps_for_subject(stimuli, spath) -> {name: (n_trials, d)}; returns (results, voxel arrays)."""
    alphas = np.logspace(cfg["alpha_min"], cfg["alpha_max"], cfg["n_alphas"])
    inner = int(cfg["inner_cv"]) if str(cfg["inner_cv"]).isdigit() else cfg["inner_cv"]
    tags = subjects(cfg["data"]) if not cfg["subjects"] else [data.subject_tag(s) for s in cfg["subjects"].split(",")]
    res = {name: {} for name in representations}
    res["per_subject"], voxels, timing = {}, {}, {}
    for tag in tags:
        t0 = time.perf_counter()
        sub = load_subject(cfg["data"], tag, cfg["nc_min"], cfg.get("rois", ""))
        spath = os.path.join(cfg["data"], "brain_data", f"{tag}_StimulusMetadata.csv")
        reps = reps_for_subject(sub["stimuli"], spath)
        sessions = sub["stimuli"]["session"].to_numpy()
        enc = encode(reps, sub["Y"], sessions, alphas, inner, device(cfg))
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
        per["n_voxels"], per["n_voxels_kept"] = sub["n_voxels_total"], int(len(sub["nc"]))
        per["n_trials"] = int(len(sessions))
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
    for a, b in comparisons(representations):  # paired over voxels within each subject, then the subject mean
        res[a].setdefault("vs", {}).setdefault("r2", {})[b] = combine_strata(
            [paired_gain(voxels[t][a] - voxels[t][b], ci=cfg["ci"]) for t in tags], cfg["ci"], "voxels",
            "paired over voxels within each subject (voxels treated as independent), mean over subjects, t interval")
    res["noise_ceiling"] = 1.0  # R^2 / (nc_singletrial / 100): 1 is the single-trial noise ceiling by definition
    res["alphas"] = dict(min=float(alphas[0]), max=float(alphas[-1]), n=int(len(alphas)), inner_cv=str(inner))
    return res, voxels


def write_voxels(path, voxels, cfg):
    """Per-voxel results: /<sub>/{voxel_ids, nc, roi, <rep>, <rep>_raw_r2, <rep>_alphas} + config/versions attrs."""
    with data.h5_create(path) as f:
        for tag, v in voxels.items():
            for k, a in v.items():
                f[f"{tag}/{k}"] = a
        data.write_h5_attrs(f, dict(config=cfg, description="R^2 / (nc_singletrial/100) per voxel, mean over "
                                                            "leave-one-session-out folds; *_alphas per fold"))
    return path


# ---------------------------------------------------------------------------------------------- the fmri task

def task_fmri(cfg):
    """THINGS-fMRI voxelwise encoding: leave-one-session-out ridge per subject, per representation."""
    concepts = data.load_concepts(cfg["data"])
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    spose = data.load_spose(cfg["data"], n_concepts=len(concepts))
    extra = {}  # aligned representations: features files in the same format, rows = THINGS images
    for k, path in enumerate(p for p in cfg["aligned"].split(",") if p):
        extra["aligned" if k == 0 else f"aligned{k + 1}"] = data.read_features(path, field=cfg["field"])
    for name, Z in aligned_representations(cfg, X).items():  # --ckpt: encode(features) of every THINGS image
        if name in extra:
            raise data.DataError(f"--aligned and --ckpt both define {name!r}: give one of them")
        extra[name] = (Z, ids)
    names = ["base", "spose"] + list(extra)

    def reps_for_subject(stimuli, spath):
        rows, crow = trial_rows(stimuli, ids, concepts, spath)
        reps = {"base": X[rows], "spose": spose[crow]}  # SPoSE is concept-level: one row per concept
        for name, (A, aids) in extra.items():
            reps[name] = A[trial_rows(stimuli, aids, concepts, spath)[0]]
        return reps

    res, voxels = run_fmri(cfg, reps_for_subject, names)
    out = cfg["out"] or os.path.join("runs", "eval", "fmri.json")
    stem = os.path.splitext(out)[0]
    res["voxel_file"] = write_voxels(cfg["voxel_out"] or stem + ".h5", voxels, cfg)
    if cfg["figures"]:
        plot_rois(res, names, stem + "_rois.png")
        plot_scatter(voxels, "base", names[-1], stem + "_scatter.png")
        res["figures"] = [stem + "_rois.png", stem + "_scatter.png"]
        res["flatmap"] = flatmap(voxels, stem + "_flatmap.png")
        print(f"flatmap: {res['flatmap']}")
    print(f"\nTHINGS-fMRI encoding: R^2 / noise ceiling, mean over subjects ({len(res['per_subject'])})")
    print(f"{'ROI':<8}" + "".join(f"{n:>10}" for n in names))
    for r in res["base"]["rois"]:
        print(f"{r:<8}" + "".join(f"{res[n]['rois'].get(r, float('nan')):>10.3f}" for n in names))
    return res


# ----------------------------------------------------------------------------------------- trial splits

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


# ------------------------------------------------------------------------------------- the encoding-model search

REGRESSIONS = ("ridge", "pls")


# --------------------------------------------------------------------------------------------- the search

def cv_folds(n, k, seed):
    """Fold id per training row (a random balanced assignment, seeded) -> (n,) int64."""
    if not 2 <= k <= n:
        raise data.DataError(f"--folds {k}: needs 2 <= folds <= training trials ({n})")
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def _pls_predict(Xa, Ya, Xb, k):
    from sklearn.cross_decomposition import PLSRegression
    return PLSRegression(n_components=k, scale=False).fit(Xa, Ya).predict(Xb)


def candidates(Xtr, Ytr, fold_id, pcas, regressions, alphas, pls_ks, device="cpu"):
    """CV score of every candidate on training rows: Xtr (n, p) z-scored features, Ytr (n, t) z-scored responses.

    Returns a list of dict(pca, regression, hyper, cv_r2) with cv_r2 = 1 - mean over voxels and folds of the
    validation MSE; the PCA of each size is fitted once on all training rows (unsupervised; the test rows
    are never seen). device: where kernels.ridge_cv runs (the responses are moved there once)."""
    from sklearn.decomposition import PCA
    out = []
    folds = [np.nonzero(fold_id == f)[0] for f in np.unique(fold_id)]
    Yt = torch.as_tensor(Ytr, dtype=torch.float64).to(device)
    for n_pc in pcas:
        if n_pc > min(Xtr.shape):
            raise data.DataError(f"--pca {n_pc}: larger than the features ({Xtr.shape[1]} columns) or the "
                                 f"training trials ({Xtr.shape[0]}); pass smaller sizes")
        Z = PCA(n_components=n_pc, random_state=0).fit_transform(Xtr) if n_pc else Xtr
        Zt = torch.as_tensor(np.ascontiguousarray(Z), dtype=torch.float64).to(device)
        for reg in regressions:
            if reg == "ridge":
                # one alpha per subject x ROI, the same folds as PLS, scored by MSE as PLS is (cv_r2 = 1 - MSE)
                fit = kernels.ridge_cv(Zt, Yt, alphas, cv=fold_id, local_alpha=False, scoring="mse")
                out.append(dict(pca=n_pc, regression="ridge", hyper=float(fit.best_alphas[0]),
                                cv_r2=float(1 - fit.cv_scores.mean())))
            else:
                for k in [k for k in pls_ks if k <= min(Z.shape[1], min(len(Z) - len(v) for v in folds))]:
                    mse = np.mean([((Ytr[v] - _pls_predict(np.delete(Z, v, 0), np.delete(Ytr, v, 0), Z[v], k))
                                    ** 2).mean()
                                   for v in folds])
                    out.append(dict(pca=n_pc, regression="pls", hyper=int(k), cv_r2=float(1 - mse)))
    return out


def refit_score(Xtr, Ytr, Xte, Yte, best, device="cpu"):
    """Refit the chosen candidate on all training rows, score the test rows -> (R^2 per voxel, r per voxel)."""
    from sklearn.decomposition import PCA
    if best["pca"]:
        pca = PCA(n_components=best["pca"], random_state=0).fit(Xtr)
        Xtr, Xte = pca.transform(Xtr), pca.transform(Xte)
    if best["regression"] == "ridge":
        f64 = dict(dtype=torch.float64, device=device)
        fit = kernels.ridge_cv(torch.as_tensor(Xtr, **f64), torch.as_tensor(Ytr, **f64), [best["hyper"]], cv=2,
                               local_alpha=False)
        pred = fit.predict(torch.as_tensor(Xte, **f64)).cpu().numpy()
    else:
        pred = _pls_predict(Xtr, Ytr, Xte, best["hyper"])
    pc, yc = pred - pred.mean(0), Yte - Yte.mean(0)
    r = (pc * yc).sum(0) / np.maximum(np.sqrt((pc ** 2).sum(0) * (yc ** 2).sum(0)), 1e-12)
    return data.r2_per_target(pred, Yte), r


def load_layers(cfg):
    """{layer name: (features (n_images, d) float32, image_ids)} from --features (one or more files: their
    paths are in cfg["models"] when there are several) and --layers."""
    fields = data.split_list(cfg["layers"]) or ["features"]
    paths = data.split_list(cfg["models"]) or [cfg["features"]]
    out = {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        for field in fields:
            name = field if len(paths) == 1 else (stem if fields == ["features"] else f"{stem}:{field}")
            out[name] = data.read_features(path, field=field)
    return out


def run_encsearch(cfg):
    from tqdm import tqdm
    pcas = data.parse_ints(cfg["pca"], "pca", 0)
    regs = [r.strip() for r in cfg["regressions"].split(",") if r.strip()]
    if not regs or set(regs) - set(REGRESSIONS):
        raise data.DataError(f"--regressions {cfg['regressions']!r}: expected some of {list(REGRESSIONS)}")
    try:
        alphas = np.array([float(a) for a in cfg["alphas"].split(",")], dtype=np.float64)
    except ValueError:
        raise data.DataError(f"--alphas {cfg['alphas']!r}: expected comma-separated numbers") from None
    if (alphas <= 0).any():
        raise data.DataError(f"--alphas {cfg['alphas']!r}: ridge alphas must be > 0")
    pls_ks = data.parse_ints(cfg["pls_components"], "pls-components", 1)
    layers = load_layers(cfg)
    dev = device(cfg)
    concepts = data.load_concepts(cfg["data"])
    tags = subjects(cfg["data"]) if not cfg["subjects"] else [data.subject_tag(s) for s in cfg["subjects"].split(",")]
    want_rois = [r.strip() for r in cfg["rois"].split(",") if r.strip()]
    rows_out, best_layer, how = [], {}, ""
    for tag in tags:
        sub = load_subject(cfg["data"], tag, cfg["nc_min"])
        spath = os.path.join(cfg["data"], "brain_data", f"{tag}_StimulusMetadata.csv")
        vpath = os.path.join(cfg["data"], "brain_data", f"{tag}_VoxelMetadata.csv")
        have = [r for r, m in sub["rois"].items() if m.any()]
        missing = [r for r in want_rois if r not in have]
        if missing:
            raise data.DataError(f"{vpath}: ROI(s) {missing} missing or without voxels with nc_singletrial > "
                                 f"{cfg['nc_min']}; ROIs with voxels: {have}")
        rois = want_rois or have
        sessions = sub["stimuli"]["session"].to_numpy()
        trows = {name: trial_rows(sub["stimuli"], ids, concepts, spath)[0] for name, (X, ids) in layers.items()}
        first = next(iter(trows.values()))
        train, test_groups, how = trial_split(first, sessions)
        fold_id = cv_folds(int(train.sum()), cfg["folds"], cfg["seed"])
        bar = tqdm(total=len(rois) * len(layers), disable=not cfg["progress"], desc=tag, leave=False)
        for roi in rois:
            Y = sub["Y"][:, sub["rois"][roi]].astype(np.float64)                    # (n_trials, n_voxels)
            Ytr, Yte = Y[train], np.stack([Y[g].mean(0) for g in test_groups])
            mu_y, sd_y = Ytr.mean(0), np.where(Ytr.std(0) > 0, Ytr.std(0), 1.0)
            Ytr_z, Yte_z = (Ytr - mu_y) / sd_y, (Yte - mu_y) / sd_y               # R^2 and r are unchanged
            for name, (X, _) in layers.items():
                r = trows[name]
                Xtr = X[r[train]].astype(np.float64)
                Xte = np.stack([X[r[g[0]]] for g in test_groups]).astype(np.float64)
                mu, sd = Xtr.mean(0), np.where(Xtr.std(0) > 0, Xtr.std(0), 1.0)
                Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
                cands = candidates(Xtr, Ytr_z, fold_id, pcas, regs, alphas, pls_ks, dev)
                best = max(cands, key=lambda c: c["cv_r2"])
                r2, rr = refit_score(Xtr, Ytr_z, Xte, Yte_z, best, dev)
                rows_out.append(dict(subject=tag, roi=roi, layer=name, n_voxels=int(Y.shape[1]), pca=best["pca"],
                                     regression=best["regression"], hyper=best["hyper"], cv_r2=best["cv_r2"],
                                     test_r2=float(r2.mean()), test_r=float(rr.mean()), candidates=cands))
                bar.update(1)
            mine = [x for x in rows_out if x["subject"] == tag and x["roi"] == roi]
            top = max(mine, key=lambda x: x["cv_r2"])  # the layer is chosen by CV too, never by the test score
            best_layer[f"{tag}/{roi}"] = dict(layer=top["layer"], cv_r2=top["cv_r2"], test_r2=top["test_r2"])
        bar.close()
    return dict(rows=rows_out, best_layer=best_layer, layers=list(layers),
                split=f"train: the other trials; test: {how}")


def table(res):
    lines = ["| subject | ROI | layer | voxels | PCA | regression | hyperparameter | CV R^2 | test R^2 | test r |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in res["rows"]:
        hyp = f"alpha {x['hyper']:g}" if x["regression"] == "ridge" else f"{x['hyper']} components"
        lines.append(f"| {x['subject']} | {x['roi']} | {x['layer']} | {x['n_voxels']} | {x['pca'] or 'raw'} | "
                     f"{x['regression']} | {hyp} | {x['cv_r2']:.3f} | {x['test_r2']:.3f} | {x['test_r']:.3f} |")
    return "\n".join(lines) + "\n"


def task_encsearch(cfg):
    """evaluate.py --task encsearch: the search over every subject x ROI x layer; <out>.md holds the table."""
    t0 = time.perf_counter()
    with data.torch_threads(cfg["threads"]):
        res = run_encsearch(cfg)
    res["seconds"] = time.perf_counter() - t0
    out = cfg.get("_out") or cfg.get("out") or os.path.join("runs", "eval", "encsearch.json")
    md = os.path.splitext(out)[0] + ".md"
    text = table(res)
    with data.atomic_path(md) as tmp, open(tmp, "w") as fh:
        fh.write(f"# Encoding-model search\n\n{res['split']}; chosen per subject x ROI x layer by "
                 f"{cfg['folds']}-fold CV."
                 "\n\n" + text)
    print(text)
    print(f"wrote {md} ({res['seconds']:.1f} s)")
    res["table"] = md
    return res
