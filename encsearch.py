"""Encoding-model search (the Algonauts-2021 pipeline): layers x PCA x regression, chosen per subject and ROI by CV.

    python encsearch.py --features L1.h5 L2.h5 L3.h5 --data DIR --out runs/encsearch/NAME.json   # one file per layer
    python encsearch.py --features F.h5 --layers layers/block3,layers/block6,features --pca 0,32,128 \
        --regressions ridge,pls --data DIR --out runs/encsearch/NAME.json        # datasets of one file as layers
    python encsearch.py --features data/world/features/things.h5 data/world/features/things_b3.h5 --pca 0,8

For every subject (THINGS-fMRI, loaded by fmri.py: voxels with nc_singletrial > --nc-min) and ROI, and for
every layer, the candidates are PCA sizes (--pca; 0 = the raw features; sklearn PCA fitted on the training
rows only, after z-scoring with the training rows' statistics) x regressions: ridge (kernels.ridge_cv, one
alpha per subject x ROI from --alphas, chosen inside by the same folds) and PLS (sklearn PLSRegression, one
n_components from --pls-components). Each candidate is scored by --folds-fold CV on the training trials
(mean over the ROI's voxels of 1 - validation MSE of z-scored responses); the best candidate is refit on all
training trials and scored on the test set. Train/test split: the images shown more than once (THINGS-fMRI's
test images) are the test set, responses averaged over their repeats; the single-presentation trials train.

Writes --out (JSON: one row per subject x ROI x layer with the chosen PCA size, regression, hyperparameter,
CV score and held-out R^2 / Pearson r, every candidate's CV score, the best layer per subject x ROI, config,
versions) and <out>.md (the table). PCA-compressed feature files (extract.py's /pca, when it lands) are just
more --features/--layers inputs.
"""
import json
import os
import sys
import time

import numpy as np
import torch

import data
import fmri
import kernels
import warp

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    features=["data/world/features/things.h5"],  # feature files: one per layer, or one file with --layers
    layers="",                                  # datasets inside each --features file used as layers, comma-separated ('' = /features)
    data="data/world/data",                     # folder with brain_data/ and unique_id.txt
    subjects="",                                # subjects, e.g. 1,2 ('' = every sub-0X in DIR/brain_data)
    rois="",                                    # ROIs, comma-separated ('' = every ROI with kept voxels)
    nc_min=5.0,                                 # keep voxels with nc_singletrial > nc_min (percent)
    pca="0",                                    # PCA sizes to try, comma-separated (0 = raw features)
    regressions="ridge,pls",                    # regressions to try: ridge (kernels.ridge_cv) | pls (sklearn PLSRegression)
    alphas="1e-2,1e-1,1,10,100,1e3,1e4,1e5",    # ridge alphas
    pls_components="1,2,4,8,16,32",             # PLS n_components (sizes above the feature count are skipped)
    folds=5,                                    # inner CV folds on the training trials (random, seeded)
    out="runs/encsearch/encsearch.json",        # result JSON (<out>.md: the table)
    seed=0,                                     # fold assignment seed
    threads=1,                                  # torch threads (small problems: 1 avoids oversubscription; 0 = torch default)
    progress=True,                              # tqdm progress bar
)
REGRESSIONS = ("ridge", "pls")


def parse(argv=None):
    return vars(data.flag_parser(__doc__, defaults).parse_args(argv))


def _ints(text, flag, low):
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise data.DataError(f"--{flag} {text!r}: expected comma-separated integers") from None
    bad = [v for v in vals if v < low]
    if bad or not vals:
        raise data.DataError(f"--{flag} {text!r}: expected integers >= {low}")
    return vals


# --------------------------------------------------------------------------------------------- the search

def cv_folds(n, k, seed):
    """Fold id per training row (a random balanced assignment, seeded) -> (n,) int64."""
    if not 2 <= k <= n:
        raise data.DataError(f"--folds {k}: needs 2 <= folds <= training trials ({n})")
    return np.random.default_rng(seed).permutation(np.arange(n) % k)


def _pls_predict(Xa, Ya, Xb, k):
    from sklearn.cross_decomposition import PLSRegression
    return PLSRegression(n_components=k, scale=False).fit(Xa, Ya).predict(Xb)


def candidates(Xtr, Ytr, fold_id, pcas, regressions, alphas, pls_ks):
    """CV score of every candidate on training rows: Xtr (n, p) z-scored features, Ytr (n, t) z-scored responses.

    Returns a list of dict(pca, regression, hyper, cv_r2) with cv_r2 = 1 - mean over voxels and folds of the
    validation MSE; the PCA of each size is fitted once on all training rows (unsupervised; the test rows
    are never seen)."""
    from sklearn.decomposition import PCA
    out = []
    folds = [np.nonzero(fold_id == f)[0] for f in np.unique(fold_id)]
    for n_pc in pcas:
        if n_pc > min(Xtr.shape):
            raise data.DataError(f"--pca {n_pc}: larger than the features ({Xtr.shape[1]} columns) or the "
                                 f"training trials ({Xtr.shape[0]}); pass smaller sizes")
        Z = PCA(n_components=n_pc, random_state=0).fit_transform(Xtr) if n_pc else Xtr
        Zt = torch.as_tensor(np.ascontiguousarray(Z), dtype=torch.float64)
        for reg in regressions:
            if reg == "ridge":
                fit = kernels.ridge_cv(Zt, torch.as_tensor(Ytr, dtype=torch.float64), alphas, cv=fold_id,
                                       local_alpha=False)  # one alpha per subject x ROI, the same folds as PLS
                out.append(dict(pca=n_pc, regression="ridge", hyper=float(fit.best_alphas[0]),
                                cv_r2=float(1 - fit.cv_scores.mean())))
            else:
                for k in [k for k in pls_ks if k <= min(Z.shape[1], min(len(Z) - len(v) for v in folds))]:
                    mse = np.mean([((Ytr[v] - _pls_predict(np.delete(Z, v, 0), np.delete(Ytr, v, 0), Z[v], k)) ** 2).mean()
                                   for v in folds])
                    out.append(dict(pca=n_pc, regression="pls", hyper=int(k), cv_r2=float(1 - mse)))
    return out


def refit_score(Xtr, Ytr, Xte, Yte, best):
    """Refit the chosen candidate on all training rows, score the test rows -> (R^2 per voxel, r per voxel)."""
    from sklearn.decomposition import PCA
    if best["pca"]:
        pca = PCA(n_components=best["pca"], random_state=0).fit(Xtr)
        Xtr, Xte = pca.transform(Xtr), pca.transform(Xte)
    if best["regression"] == "ridge":
        fit = kernels.ridge_cv(torch.as_tensor(Xtr, dtype=torch.float64), torch.as_tensor(Ytr, dtype=torch.float64),
                               [best["hyper"]], cv=2, local_alpha=False)
        pred = fit.predict(torch.as_tensor(Xte, dtype=torch.float64)).numpy()
    else:
        pred = _pls_predict(Xtr, Ytr, Xte, best["hyper"])
    sse = ((Yte - pred) ** 2).sum(0)
    sst = np.maximum(((Yte - Yte.mean(0)) ** 2).sum(0), 1e-12)
    pc, yc = pred - pred.mean(0), Yte - Yte.mean(0)
    r = (pc * yc).sum(0) / np.maximum(np.sqrt((pc ** 2).sum(0) * (yc ** 2).sum(0)), 1e-12)
    return 1 - sse / sst, r


def load_layers(cfg):
    """{layer name: (features (n_images, d) float32, image_ids)} from --features and --layers."""
    fields = [f.strip() for f in cfg["layers"].split(",") if f.strip()] or ["features"]
    out = {}
    for path in cfg["features"]:
        stem = os.path.splitext(os.path.basename(path))[0]
        for field in fields:
            name = field if len(cfg["features"]) == 1 else (stem if fields == ["features"] else f"{stem}:{field}")
            out[name] = data.read_features(path, field=field)
    return out


def run(cfg):
    from tqdm import tqdm
    pcas = _ints(cfg["pca"], "pca", 0)
    regs = [r.strip() for r in cfg["regressions"].split(",") if r.strip()]
    if not regs or set(regs) - set(REGRESSIONS):
        raise data.DataError(f"--regressions {cfg['regressions']!r}: expected some of {list(REGRESSIONS)}")
    try:
        alphas = np.array([float(a) for a in cfg["alphas"].split(",")], dtype=np.float64)
    except ValueError:
        raise data.DataError(f"--alphas {cfg['alphas']!r}: expected comma-separated numbers") from None
    if (alphas <= 0).any():
        raise data.DataError(f"--alphas {cfg['alphas']!r}: ridge alphas must be > 0")
    pls_ks = _ints(cfg["pls_components"], "pls-components", 1)
    layers = load_layers(cfg)
    concepts = data.load_concepts(cfg["data"])
    tags = fmri.subjects(cfg["data"]) if not cfg["subjects"] else [
        s if s.startswith("sub-") else f"sub-{int(s):02d}" for s in cfg["subjects"].split(",")]
    want_rois = [r.strip() for r in cfg["rois"].split(",") if r.strip()]
    rows_out, best_layer, how = [], {}, ""
    for tag in tags:
        sub = fmri.load_subject(cfg["data"], tag, cfg["nc_min"])
        spath = os.path.join(cfg["data"], "brain_data", f"{tag}_StimulusMetadata.csv")
        vpath = os.path.join(cfg["data"], "brain_data", f"{tag}_VoxelMetadata.csv")
        have = [r for r, m in sub["rois"].items() if m.any()]
        missing = [r for r in want_rois if r not in have]
        if missing:
            raise data.DataError(f"{vpath}: ROI(s) {missing} missing or without voxels with nc_singletrial > "
                                 f"{cfg['nc_min']}; ROIs with voxels: {have}")
        rois = want_rois or have
        sessions = sub["stimuli"]["session"].to_numpy()
        trows = {name: fmri.trial_rows(sub["stimuli"], ids, concepts, spath)[0] for name, (X, ids) in layers.items()}
        first = next(iter(trows.values()))
        train, test_groups, how = warp.trial_split(first, sessions)
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
                cands = candidates(Xtr, Ytr_z, fold_id, pcas, regs, alphas, pls_ks)
                best = max(cands, key=lambda c: c["cv_r2"])
                r2, rr = refit_score(Xtr, Ytr_z, Xte, Yte_z, best)
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


def main(argv=None):
    cfg = parse(argv)
    from choice import torch_threads
    t0 = time.perf_counter()
    try:
        with torch_threads(cfg["threads"]):
            res = run(cfg)
    except data.DataError as e:
        sys.exit(f"encsearch.py: error: {e}")
    res["seconds"] = time.perf_counter() - t0
    res["config"], res["versions"] = cfg, data.versions()
    out = cfg["out"]
    with data.atomic_path(out) as tmp, open(tmp, "w") as fh:
        json.dump(res, fh, indent=2)
    md = os.path.splitext(out)[0] + ".md"
    text = table(res)
    with data.atomic_path(md) as tmp, open(tmp, "w") as fh:
        fh.write(f"# Encoding-model search\n\n{res['split']}; chosen per subject x ROI x layer by {cfg['folds']}-fold CV.\n\n"
                 + text)
    print(text)
    print(f"wrote {out} and {md} ({res['seconds']:.1f} s)")
    return res


if __name__ == "__main__":
    main()
