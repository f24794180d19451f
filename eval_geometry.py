"""Geometry evaluations: CKA (with jackknife or bootstrap intervals and per-layer tracing), RSA, class
separation, t-SNE, model similarity across datasets and linear probes. The numerics live in geometry.py and
kernels.py; this module loads representations (representations.py), runs them and draws.

    python evaluate.py --task cka|rsa|class-separation|tsne|probe --features F.h5 --data DIR [--ckpt C.pt]
    python evaluate.py --task similarity --features A.h5 B.h5 ... [--datasets things,coco] --out R.json
"""
import os

import numpy as np
import torch

import data
import geometry
import kernels
from representations import (aligned_representations, block_jackknife_gains, comparisons, device, jackknife_gain,
                             load_representations, paired_gain, print_table, put_gains, z_value)


# ---------------------------------------------------------------------------------------------------- CKA

def bootstrap_cka(A, B, n_boot, seed, debiased):
    """CKA of bootstrap resamples of rows (concepts), one streaming CKA per resample -> (n_boot,)."""
    g = torch.Generator().manual_seed(seed)  # on the CPU: the same resamples on every device
    A, B = torch.as_tensor(A), torch.as_tensor(B)
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = torch.randint(0, A.shape[0], (A.shape[0],), generator=g).to(A.device)
        out[b] = kernels.cka(A[idx], B[idx], debiased=debiased).item()
    return out


def jackknife_cka(A, B, debiased=False):
    """Leave-one-row-out linear CKA values (n,). Biased CKA in closed form: removing row i downdates the
    centred scatter matrices by rank one, S_-i = S - n/(n-1) a_i b_i' (a, b centred rows), so
    |S_-i|_F^2 = |S|^2 - 2c a_i'S b_i + c^2 |a_i|^2 |b_i|^2 with c = n/(n-1): O(n d^2), no loop. The debiased
    estimator has no such downdate and is recomputed per left-out row with kernels.cka."""
    A, B = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(B, dtype=torch.float64, device=A.device)
    n = A.shape[0]
    if debiased:
        keep = torch.ones(n, dtype=torch.bool, device=A.device)
        out = np.empty(n)
        for i in range(n):
            keep[i] = False
            out[i] = kernels.cka(A[keep], B[keep], debiased=True).item()
            keep[i] = True
        return out
    a, b = A - A.mean(0), B - B.mean(0)
    c = n / (n - 1)

    def downdated(S, u, v):
        return (S ** 2).sum() - 2 * c * ((u @ S) * v).sum(1) + c ** 2 * (u ** 2).sum(1) * (v ** 2).sum(1)
    hxy = downdated(a.T @ b, a, b)
    hxx = downdated(a.T @ a, a, a)
    hyy = downdated(b.T @ b, b, b)
    return (hxy / torch.sqrt(hxx * hyy)).cpu().numpy()


def task_cka(cfg):
    _, reps = load_representations(cfg)
    dev = device(cfg)  # every representation and the target moved there once; the values come back as floats
    target = torch.as_tensor(reps["spose"]).to(dev)
    res, loos = {}, {}
    lo_q, hi_q = (1 - cfg["ci"]) / 2, 1 - (1 - cfg["ci"]) / 2
    for name, R in reps.items():
        R = torch.as_tensor(R).to(dev)
        value = kernels.cka(R, target, debiased=cfg["debiased"]).item()
        entry = dict(cka=value, debiased=cfg["debiased"], dims=int(R.shape[1]),
                     cka_biased=kernels.cka(R, target).item(),
                     cka_debiased=kernels.cka(R, target, debiased=True).item())
        if name != "spose":  # leave-one-concept-out values: the CI (jackknife) and the paired gains
            loos[name] = jackknife_cka(R, target, cfg["debiased"])
        if name != "spose" and cfg["ci_method"] == "jackknife":
            loo = loos[name]
            n = len(loo)
            se = float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
            half = z_value(cfg["ci"]) * se
            entry.update(ci=[value - half, value + half], ci_method="jackknife over concepts (normal interval)",
                         se=se, jackknife_bias=float((n - 1) * (loo.mean() - value)))
        elif name != "spose" and cfg["ci_method"] == "bootstrap" and cfg["n_boot"] > 0:
            # Resampling concepts with replacement duplicates rows, which inflates CKA: the percentile
            # interval would sit above the estimate. The basic (reverse-percentile) bootstrap interval
            # [2c - q_hi, 2c - q_lo] corrects for that shift (Davison & Hinkley 1997, ch. 5), but when the
            # inflation exceeds the spread it can exclude the estimate: hence the jackknife default.
            boots = bootstrap_cka(R, target, cfg["n_boot"], cfg["seed"], cfg["debiased"])
            entry["ci"] = [2 * value - float(np.quantile(boots, hi_q)), 2 * value - float(np.quantile(boots, lo_q))]
            entry["ci_method"] = "basic bootstrap over concepts"
            entry["n_boot"] = cfg["n_boot"]
            entry["bootstrap_mean"] = float(boots.mean())
        elif name != "spose" and cfg["ci_method"] not in ("jackknife", "bootstrap"):
            raise data.DataError(f"--ci-method {cfg['ci_method']!r}: expected jackknife or bootstrap")
        res[name] = entry
    put_gains(res, "cka", {(a, b): jackknife_gain(res[a]["cka"] - res[b]["cka"], loos[a] - loos[b], cfg["ci"],
                                                  "concepts") for a, b in comparisons(reps)})
    dims = _dims(cfg)
    for name, R in reps.items():  # "chosen dims": CKA with a subset of SPoSE dimensions only
        if dims:
            res[name]["cka_spose_dims"] = kernels.cka(torch.as_tensor(R).to(dev), target[:, dims],
                                                      debiased=cfg["debiased"]).item()
    target = reps["spose"]
    layers = cka_by_layer(cfg, target, dims)
    if layers:
        for name, per_layer in layers.items():
            res[name]["layers"] = per_layer
        res["figure"] = plot_cka_layers(layers, res, os.path.splitext(cfg["_out"])[0] + "_layers.png")
    res["noise_ceiling"] = res["spose"]["cka"]  # SPoSE with itself: the most any representation can reach
    rows = [(k, v["cka"], v.get("ci")) for k, v in res.items() if isinstance(v, dict) and "cka" in v]
    print_table(f"linear CKA with SPoSE ({'debiased' if cfg['debiased'] else 'biased'} HSIC)", "cka", rows,
                res["noise_ceiling"])
    return res


def trace_layers(model, X):
    """Outputs of the meta model's `embedding` and of each of its `layers` (forward hooks) for one-item
    sequences [0, x] (no context, as encode) -> list of (n, d_model) arrays: embedding, layer 1, ..."""
    outs = []
    hook = lambda module, inputs, output: outs.append(output[0] if isinstance(output, tuple) else output)  # noqa: E731
    modules = [model.embedding] + (list(model.layers) if model.kind == "transformer" else [])
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad():
            x = torch.nn.functional.pad(torch.as_tensor(X, dtype=torch.float32), (1, 0)).unsqueeze(1)
            if model.kind == "transformer":
                model(x)
            else:
                model.embedding(x)  # lstm / static_linear: only the embedding is a per-item representation
    finally:
        for h in handles:
            h.remove()
    return [o.squeeze(1).float().numpy() for o in outs]


def cka_by_layer(cfg, target, dims):
    """{aligned name: {"all": [cka per traced layer], "dims": [...]}} for every --ckpt (empty without)."""
    paths = [p.strip() for p in cfg["ckpt"].split(",") if p.strip()]
    if not paths:
        return {}
    from models import load_meta
    concepts = data.load_concepts(cfg["data"])
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    Xc = X[data.concept_rows(ids, concepts, path=cfg["features"])]
    out = {}
    for k, path in enumerate(paths):
        model, _ = load_meta(path)
        reps = trace_layers(model, Xc)
        entry = {"all": [kernels.cka(torch.as_tensor(R), torch.as_tensor(target)).item() for R in reps]}
        if dims:
            entry["dims"] = [kernels.cka(torch.as_tensor(R), torch.as_tensor(target[:, dims])).item() for R in reps]
        out["aligned" if k == 0 else f"aligned{k + 1}"] = entry
    return out


def plot_cka_layers(layers, res, png):
    """CKA with SPoSE per traced layer of each aligned model, the base features as a dashed line."""
    plt = data.pyplot()
    keys = ["all"] + (["dims"] if any("dims" in v for v in layers.values()) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, v in layers.items():
            ax.plot(range(len(v[key])), v[key], marker="o", label=name)
        base = res["base"]["cka_biased"] if key == "all" else res["base"].get("cka_spose_dims")
        if base is not None:
            ax.axhline(base, ls="--", color="gray", label="base features")
        ax.set_xticks(range(len(next(iter(layers.values()))[key])))
        ax.set_xticklabels(["emb"] + [str(i) for i in range(1, len(next(iter(layers.values()))[key]))])
        ax.set_xlabel("layer")
        ax.set_ylabel("linear CKA with SPoSE")
        ax.set_title("all SPoSE dims" if key == "all" else "chosen SPoSE dims")
    axes[0, 0].legend(frameon=False)
    data.save_figure(fig, png, bbox_inches="tight")
    return png


# ------------------------------------------------------------------- geometry: RSA, separation, t-SNE, probes

def _dims(cfg):
    return [int(x) for x in cfg["spose_dims"].split(",") if x.strip()] if cfg["spose_dims"] else []


def load_categories(cfg, concepts):
    """Concept x category membership (n_concepts, n_categories) bool from a table with a `uniqueID` (or
    `concept`) column and one 0/1 column per category, as THINGS' wide-format category files."""
    import pandas as pd
    path = cfg["categories"] or os.path.join(cfg["data"], "categories.tsv")
    if not os.path.exists(path):
        raise data.DataError(f"{path} not found; expected a tab-separated table: uniqueID + one 0/1 column per "
                             "category")
    df = pd.read_csv(path, sep="\t")
    key = "uniqueID" if "uniqueID" in df.columns else "concept"
    if key not in df.columns:
        raise data.DataError(f"{path}: missing column 'uniqueID' (or 'concept'); found {list(df.columns)[:5]}")
    df = df.set_index(key)
    missing = [c for c in concepts if c not in df.index]
    if missing:
        raise data.DataError(f"{path}: no row for {len(missing)} concepts, first {missing[:3]}")
    M = df.loc[concepts].to_numpy()
    if not np.isin(M, (0, 1)).all():
        raise data.DataError(f"{path}: category columns must be 0/1")
    return M.astype(bool), list(df.columns)


def task_rsa(cfg):
    _, reps = load_representations(cfg)
    dims = _dims(cfg)
    target = geometry.rdm(reps["spose"], cfg["rdm_metric"])
    target_dims = geometry.rdm(reps["spose"][:, dims], cfg["rdm_metric"]) if dims else None
    res = {}
    for name, R in reps.items():
        rd = geometry.rdm(R, cfg["rdm_metric"])
        res[name] = dict(rsa=geometry.compare_rdms(rd, target, cfg["rdm_compare"]), metric=cfg["rdm_metric"],
                         compare=cfg["rdm_compare"], dims=int(R.shape[1]))
        if dims:
            res[name]["rsa_spose_dims"] = geometry.compare_rdms(rd, target_dims, cfg["rdm_compare"])
    others = [n for n in reps if n != "spose"]

    def rsa_on(keep):  # the statistic on a subset of concepts, for the block jackknife of the paired gains
        t = geometry.rdm(reps["spose"][keep], cfg["rdm_metric"])
        return {n: geometry.compare_rdms(geometry.rdm(reps[n][keep], cfg["rdm_metric"]), t, cfg["rdm_compare"])
                for n in others}
    if comparisons(others):
        put_gains(res, "rsa", block_jackknife_gains(rsa_on, others, len(reps["spose"]), cfg["ci"]))
    res["noise_ceiling"] = res["spose"]["rsa"]
    print_table(f"RSA with SPoSE ({cfg['rdm_metric']} RDMs, {cfg['rdm_compare']})", "rsa",
                [(k, v["rsa"], None) for k, v in res.items() if isinstance(v, dict)], res["noise_ceiling"])
    return res


def task_class_separation(cfg):
    """Fine-grained (images by concept, image-level features) and coarse (concepts by category; a concept
    in several categories counts once per category) class separation R^2."""
    concepts, reps = load_representations(cfg)
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    fine_labels = np.array([i.split("/", 1)[0] for i in ids])
    member, cats = load_categories(cfg, concepts)
    rows, labels = np.nonzero(member)  # one (concept, category) pair per membership
    res = {}
    for name, R in reps.items():
        res[name] = dict(class_separation_coarse=geometry.class_separation(R[rows], labels),
                         n_categories=int(member.any(0).sum()), n_uncategorised=int((~member.any(1)).sum()))
    if comparisons(reps):  # paired gains in the coarse separation: block jackknife over concepts
        put_gains(res, "class_separation_coarse", block_jackknife_gains(
            lambda keep: {n: geometry.class_separation(reps[n][rows[keep[rows]]], labels[keep[rows]]) for n in reps},
            list(reps), len(concepts), cfg["ci"]))
    res["base"]["class_separation_fine"] = geometry.class_separation(X, fine_labels)
    for name, Z in aligned_representations(cfg, X).items():
        res[name]["class_separation_fine"] = geometry.class_separation(Z, fine_labels)
    print_table("class separation R^2 (cosine, coarse = concepts by category)", "R^2",
                [(k, v["class_separation_coarse"], None) for k, v in res.items()], float("nan"))
    return res


def task_tsne(cfg):
    """t-SNE of every concept-level representation, Procrustes-aligned to the base panel, coloured by the
    first category of each concept; trustworthiness (sklearn) says how much neighbourhood survived."""
    plt = data.pyplot()
    from sklearn.manifold import TSNE, trustworthiness
    concepts, reps = load_representations(cfg)
    member, cats = load_categories(cfg, concepts)
    colour = np.where(member.any(1), member.argmax(1), -1)
    emb, res = {}, {}
    for name, R in reps.items():
        Z = TSNE(perplexity=min(cfg["perplexity"], (len(R) - 1) / 3), init="pca",
                 random_state=cfg["seed"]).fit_transform(R)
        emb[name] = Z if name == "base" else geometry.procrustes_to(emb["base"], Z)
        res[name] = dict(trustworthiness=float(trustworthiness(R, Z, n_neighbors=5)))
    fig, axes = plt.subplots(1, len(emb), figsize=(4.5 * len(emb), 4.5), squeeze=False)
    for ax, (name, Z) in zip(axes[0], emb.items()):
        ax.scatter(Z[:, 0], Z[:, 1], c=colour, cmap="tab20", s=8)
        ax.set_title(f"{name} (trustworthiness {res[name]['trustworthiness']:.2f})")
        ax.set_xticks([]), ax.set_yticks([])
    png = os.path.splitext(cfg["_out"])[0] + ".png"
    data.save_figure(fig, png, bbox_inches="tight")
    res["figure"] = png
    print_table("t-SNE trustworthiness (5 neighbours)", "trust",
                [(k, v["trustworthiness"], None) for k, v in res.items()
                                                              if isinstance(v, dict)], float("nan"))
    return res


def _model_name(path):
    """A model's name: the `backbone` attribute of its features file, else the file name."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get("backbone", os.path.basename(path)))
    except OSError:
        raise data.DataError(f"{path} not found or not HDF5; expected a features file (--models)") from None


def task_similarity(cfg):
    """Model-by-model similarity matrices per dataset and their consistency across datasets."""
    plt = data.pyplot()
    paths = [m.strip() for m in cfg["models"].split(",") if m.strip()]
    datasets = [d.strip() for d in cfg["datasets"].split(",") if d.strip()] or [""]
    measures = [m.strip() for m in cfg["measures"].split(",") if m.strip()]
    if len(paths) < 2:
        raise data.DataError("--models: need at least two comma-separated feature files (use {dataset} for the "
                             "dataset name)")
    names = [_model_name(p.replace("{dataset}", datasets[0])) for p in paths]
    res = dict(models=names, datasets=datasets, measures=measures, matrices={}, indices={})
    for ds in datasets:
        feats, ids0, src0 = [], None, None
        for p in paths:  # each model's features read once per dataset: O(M) loads
            f = p.replace("{dataset}", ds)
            X, ids = data.read_features(f, field=cfg["field"])
            if ids0 is not None and ids != ids0:
                raise data.DataError(f"{f}: /image_ids differ from {src0} (models must see the same images in the "
                                     "same order)")
            ids0, src0 = ids0 or ids, src0 or f
            feats.append(X)
        rng = np.random.default_rng(cfg["seed"])
        idx = np.sort(rng.choice(len(ids0), size=min(cfg["max_images"], len(ids0)), replace=False))
        dev = device(cfg)  # each model's subsample moved there once
        mats = geometry.similarity_matrices([torch.as_tensor(X[idx]).to(dev) for X in feats], measures)
        res["matrices"][ds] = {k: v.tolist() for k, v in mats.items()}
        res["indices"][ds] = idx.tolist()
    res["consistency"] = {m: geometry.consistency([np.array(res["matrices"][d][m]) for d in datasets]).tolist()
                          for m in measures}
    fig, axes = plt.subplots(len(datasets), len(measures), figsize=(3.2 * len(measures), 3 * len(datasets)),
                             squeeze=False)
    for r, ds in enumerate(datasets):
        for c, m in enumerate(measures):
            ax = axes[r, c]
            im = ax.imshow(np.array(res["matrices"][ds][m]), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{ds or 'data'}: {m}", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    png = os.path.splitext(cfg["_out"])[0] + ".png"
    data.save_figure(fig, png, bbox_inches="tight")
    res["figure"] = png
    print("\nconsistency across datasets (mean off-diagonal correlation of model-similarity upper triangles)")
    for m in measures:
        C = np.array(res["consistency"][m])
        print(f"  {m:<22}{(C[np.triu_indices(len(C), 1)].mean() if len(C) > 1 else float('nan')):>8.3f}")
    return res


def task_probe(cfg):
    """Few-shot and full linear probes of image-level representations on category labels (each image
    labelled with its concept's first category), base vs aligned, mean +- sd over seeds."""
    concepts = data.load_concepts(cfg["data"])
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    member, cats = load_categories(cfg, concepts)
    first = {c: int(member[i].argmax()) for i, c in enumerate(concepts) if member[i].any()}
    keep = np.array([i.split("/", 1)[0] in first for i in ids])
    y = np.array([first[i.split("/", 1)[0]] for i in np.array(ids)[keep]])
    reps = {"base": X[keep], **aligned_representations(cfg, X[keep])}
    rng = np.random.default_rng(cfg["seed"])
    test = np.zeros(len(y), bool)
    for c in np.unique(y):  # stratified 30% test split
        m = rng.permutation(np.nonzero(y == c)[0])
        test[m[: max(1, int(0.3 * len(m)))]] = True
    shots = [int(s) for s in cfg["shots"].split(",") if s.strip()]
    seeds = list(range(cfg["seed"], cfg["seed"] + cfg["probe_seeds"]))
    res, hits = {}, {}
    for name, R in reps.items():
        entry = {}
        for k in shots + [None]:
            accs, hit = geometry.few_shot_probe(R[~test], y[~test], R[test], y[test], shots=k, seeds=seeds,
                                                return_correct=True)
            if k is None:
                hits[name] = hit.mean(0)  # (n_test,) share of seeds that got each test image right
            entry[f"probe_{k}shot" if k else "probe_full"] = float(accs.mean())
            entry[f"probe_{k}shot_sd" if k else "probe_full_sd"] = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
        entry["n_classes"], entry["chance"] = int(len(np.unique(y))), float(np.bincount(y[test]).max() / test.sum())
        res[name] = entry
    put_gains(res, "probe_full", {(a, b): paired_gain(hits[a] - hits[b], ci=cfg["ci"], unit="test images")
                                  for a, b in comparisons(reps)})
    print_table("linear probes on categories (full)", "accuracy", [(k, v["probe_full"], None) for k, v in res.items()],
                float("nan"))
    return res
