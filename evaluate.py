"""Checkpoints + features + human data -> results (JSON) and a report.

    python evaluate.py --task things-ooo --features F.h5 --data DIR --out R.json   # odd-one-out accuracy
    python evaluate.py --task cka        --features F.h5 --data DIR --out R.json   # CKA with SPoSE, bootstrap CI
    python evaluate.py --task fmri       --features F.h5 --data DIR --out R.json   # voxelwise encoding (fmri.py)
    python evaluate.py --task levels-ooo --levels-features L.h5 --data DIR --out R.json   # Levels fit (behaviour.py)
    python evaluate.py --task category-learning|reward-learning --features F.h5 --data DIR --out R.json
    python evaluate.py --task icl        --ckpt META.pt --data DIR --out R.json             # in-context curves
    python evaluate.py --task all        --features F.h5 --data DIR --out runs/eval/all.json  # every task with data
    python evaluate.py --task report     --results runs/demo --out runs/demo/report.md
    python evaluate.py --task dwarp      --warp-runs 'runs/warp/*.json' --out R.json   # d_warp curves (warp.py)

F.h5 holds /features (n_images, d) and /image_ids "<concept>/<image>.jpg" (see README, "Data formats");
DIR holds the human files (unique_id.txt, spose_embedding_66d_sorted.txt, THINGS_triplets.csv, ...).
A concept's representation is the features of its first sorted image. Each task prints a table and writes
R.json with one top-level key per representation (`base`, `spose`; `aligned` once the meta stage exists),
plus `noise_ceiling` and `config`. On a cluster node: the same command inside `srun`.
"""
import json
import os
import sys
import time

import numpy as np
import torch

import behaviour
import data
import geometry
import kernels
import warp
from choice import repeated_responses

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    task="things-ooo",                          # things-ooo | cka | fmri | report
    features="data/world/features/things.h5",   # backbone features of the THINGS images (HDF5)
    field="features",                           # dataset inside --features (e.g. layers/block6)
    data="data/world/data",                     # folder with the human data files
    out="",                                     # result file ('' -> runs/eval/<task>.json)
    results="runs/demo",                        # --task report: folder of result JSON files
    n_boot=1000,                                # bootstrap resamples of concepts for CKA confidence intervals
    ci_method="jackknife",                      # cka: jackknife (leave-one-concept-out, default) | bootstrap (basic)
    ci=0.95,                                    # confidence level of the reported intervals
    debiased=False,                             # cka: report the debiased HSIC estimator as the headline
    seed=0,                                     # bootstrap seed
    aligned="",                                 # fmri: features HDF5 of aligned representation(s), comma-separated ('' -> none yet)
    subjects="",                                # fmri: subjects to evaluate, e.g. 1,2 ('' -> every sub-0X in DIR/brain_data)
    rois="",                                    # fmri: only voxels in these ROIs, e.g. FFA,PPA ('' -> every voxel kept by --nc-min)
    nc_min=5.0,                                 # fmri: keep voxels with nc_singletrial > nc_min (percent)
    alpha_min=-6.0,                             # fmri: log10 of the smallest ridge alpha (original study: -6)
    alpha_max=3.0,                              # fmri: log10 of the largest ridge alpha (original study: 3)
    n_alphas=100,                               # fmri: alphas on the log grid (original study: 100)
    inner_cv="loo",                             # fmri: inner alpha selection: loo | gcv | sessions | k (int)
    n_perm=10000,                               # fmri: sign flips per subject and ROI (test vs base)
    voxel_out="",                               # fmri: per-voxel HDF5 ('' -> --out with .h5)
    figures=True,                               # fmri: ROI bar plot + voxel scatter PNGs beside --out
    spose_dims="",                              # cka/rsa: also compare with these SPoSE dims only, e.g. 0,1,2
    ckpt="",                                    # meta checkpoint(s), comma-separated: encode(features) = `aligned`, `aligned2`, ...
    rdm_metric="correlation",                   # rsa: correlation | cosine | euclidean dissimilarity
    rdm_compare="spearman",                     # rsa: pearson | spearman | cosine comparison of RDMs
    categories="",                              # class-separation/tsne/probe: concept category table ('' -> DIR/categories.tsv)
    perplexity=30.0,                            # tsne: t-SNE perplexity
    models="",                                  # similarity: feature files (or --features A.h5 B.h5 ...), '{dataset}' in a path is replaced
    datasets="",                                # similarity: comma-separated dataset names filling '{dataset}'
    measures="cka_linear,cka_rbf_0.5,cka_rbf_1.0,cka_rbf_2.0,rsa_correlation",  # similarity: measures to compute
    max_images=10000,                           # similarity: subsample each dataset to at most this many images
    shots="1,5,10",                             # probe: k-shot settings (a full probe is always added)
    probe_seeds=5,                              # probe: seeds (draws of shots and splits) per setting
    behav_fit=True,                             # things-ooo: also fit per-participant choice models (behaviour.py)
    behav_folds=5,                              # behavioural fits: stratified CV folds per participant
    behav_l2=0.1,                               # behavioural fits: L2 penalty on each participant's choice parameters
    behav_threads=1,                            # behavioural fits: torch threads (1 is fastest on shared 2-core machines; 0 = torch default)
    levels_features="data/world/features/levels.h5",  # levels-ooo: features of the Levels (ImageNet) images
    cat_c="0.01,0.1,1,10,100",                  # category-learning: C grid of the online L2 logistic learner
    reward_lambda="0.01,0.1,1,10,100",          # reward-learning: prior precisions of the online Bayesian regression
    icl_episodes=256,                           # icl: held-out episodes for the per-position curves
    icl_features="",                            # icl: image pool of the held-out functions ('' -> the checkpoint's eval pool)
    tasks="",                                   # all: comma-separated tasks to try ('' -> every task whose data is present)
    warp_runs="",                               # dwarp: result files of train.py --stage warp, comma-separated globs
    warp_frac=0.9,                              # dwarp: d_warp = smallest d reaching this fraction of the full fit
)


def parse(argv=None):
    p = data.flag_parser(__doc__, defaults, nargs=("features",))  # several --features only for --task similarity
    cfg = vars(p.parse_args(argv))  # unknown flags are an error
    if len(cfg["features"]) > 1 and cfg["task"] != "similarity":
        p.error(f"--features takes one file for --task {cfg['task']} (several only for --task similarity)")
    if len(cfg["features"]) > 1 and not cfg["models"]:
        cfg["models"] = ",".join(cfg["features"])
    cfg["features"] = cfg["features"][0]
    return cfg


# ------------------------------------------------------------------------------------------ representations

def aligned_representations(cfg, X, chunk=8192):
    """{name: encode(X)} for every --ckpt (names aligned, aligned2, ...): the meta-learned embedding of [0, x]
    applied to image features X (n, d), in chunks, without gradients -> (n, d_model) float32 arrays.
    A checkpoint trained with --input-pca adds its control, base_pca (base_pca2, ...): the base features
    standardised and projected onto the same principal subspace, i.e. what the embedding reads before learning."""
    out = {}
    for k, path in enumerate(p.strip() for p in cfg["ckpt"].split(",") if p.strip()):
        if not os.path.exists(path):
            raise data.DataError(f"{path} not found; expected a meta checkpoint from train.py --stage meta (--ckpt)")
        from models import load_meta
        try:
            model, _ = load_meta(path)
        except (ValueError, RuntimeError) as e:  # not a meta checkpoint / weights that do not fit its model_args
            raise data.DataError(f"{path}: {e}") from None
        d_in = model.embedding.in_features - 1
        if X.shape[1] != d_in:
            raise data.DataError(f"{path}: the checkpoint embeds {d_in}-d features, --features has {X.shape[1]} columns")
        with torch.no_grad():
            Z = torch.cat([model.encode(torch.as_tensor(X[i:i + chunk])) for i in range(0, len(X), chunk)])
        out["aligned" if k == 0 else f"aligned{k + 1}"] = Z.float().numpy()
        e = model.embedding
        if e.in_basis.shape[1]:  # coordinates in the subspace: ((x - shift) * scale) @ basis
            Xt = torch.as_tensor(X, dtype=e.in_shift.dtype)
            out["base_pca" if k == 0 else f"base_pca{k + 1}"] = ((Xt - e.in_shift[1:]) * e.in_scale[1:] @ e.in_basis).numpy()
    return out


def load_representations(cfg):
    """The concept-level representations to compare: {'base': (n_concepts, d), 'spose': (n_concepts, k)}, plus
    `aligned` (and `aligned2`, ...) for each --ckpt."""
    concepts = data.load_concepts(cfg["data"])
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    rows = data.concept_rows(ids, concepts, path=cfg["features"])
    spose = data.load_spose(cfg["data"], n_concepts=len(concepts))
    reps = {"base": X[rows], "spose": spose}
    reps.update(aligned_representations(cfg, X[rows]))
    return concepts, reps


# ------------------------------------------------------------------------------------------------- odd-one-out

def cosine_similarity_matrix(R):
    """(n, d) -> (n, n) cosine similarities; zero rows get similarity 0 to everything."""
    R = torch.as_tensor(R, dtype=torch.float64)
    norms = R.norm(dim=1, keepdim=True)
    Rn = R / torch.where(norms > 0, norms, torch.ones_like(norms))
    return (Rn @ Rn.T).numpy()


def odd_one_out(S, triplets):
    """Predicted odd-one-out position (0..2) per triplet: the item outside the most similar pair.

    S (n, n) similarities, triplets (N, 3) 0-based -> (N,) int64. Pairs are scored as similarity-matrix
    look-ups, so 4.7M triplets cost three gathers, not 4.7M x 3 feature vectors.
    """
    i, j, k = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    pair_sims = np.stack([S[j, k], S[i, k], S[i, j]], axis=1)  # column p = similarity of the pair without p
    return pair_sims.argmax(1)


def noise_ceiling(triplets, choice):
    """Agreement ceiling from repeated triplets: for every unordered concept set answered more than once,
    the share of responses naming the most frequent odd one out; averaged over those sets (Hebart et al.
    2020). Returns (ceiling, n_repeated_sets, n_trials_in_them); (nan, 0, 0) without repeats."""
    counts, pairs, pair_counts, n_trials = repeated_responses(triplets, choice)
    if pairs is None:
        return float("nan"), 0, 0
    best = np.zeros(len(counts), dtype=np.int64)
    np.maximum.at(best, pairs[:, 0], pair_counts)
    rep_sets = np.nonzero(counts > 1)[0]
    return float(np.mean(best[rep_sets] / counts[rep_sets])), int(len(rep_sets)), n_trials


def task_things_ooo(cfg):
    concepts, reps = load_representations(cfg)
    t = data.load_triplets(cfg["data"], n_concepts=len(concepts))
    ceiling, n_sets, n_rep = noise_ceiling(t["triplets"], t["choice"])
    z = _z(cfg["ci"])
    res = {}
    for name, R in reps.items():
        correct = odd_one_out(cosine_similarity_matrix(R), t["triplets"]) == t["choice"]
        acc = float(correct.mean())
        half = z * np.sqrt(acc * (1 - acc) / len(correct))  # binomial normal interval over triplets
        res[name] = dict(accuracy=acc, ci=[acc - half, acc + half], n_triplets=int(len(correct)),
                         dims=int(R.shape[1]))
    res["noise_ceiling"] = ceiling
    res["noise_ceiling_detail"] = dict(repeated_sets=n_sets, trials=n_rep,
                                       definition="mean share of the majority response over repeated triplets")
    rows = [(k, v["accuracy"], v["ci"]) for k, v in res.items() if isinstance(v, dict) and "accuracy" in v]
    print_table("THINGS odd-one-out (cosine similarity, zero-shot)", "accuracy", rows, ceiling)
    if cfg["behav_fit"]:  # per-participant softmax fits, CV NLL, McFadden R^2, group statistics (behaviour.py)
        behaviour.add_things_ooo_fit(cfg, reps, t, res)
    return res


# ---------------------------------------------------------------------------------------------------- CKA

def bootstrap_cka(A, B, n_boot, seed, debiased):
    """CKA of bootstrap resamples of rows (concepts), one streaming CKA per resample -> (n_boot,)."""
    g = torch.Generator().manual_seed(seed)
    A, B = torch.as_tensor(A), torch.as_tensor(B)
    out = np.empty(n_boot)
    for b in range(n_boot):
        idx = torch.randint(0, A.shape[0], (A.shape[0],), generator=g)
        out[b] = kernels.cka(A[idx], B[idx], debiased=debiased).item()
    return out


def jackknife_cka(A, B, debiased=False):
    """Leave-one-row-out linear CKA values (n,). Biased CKA in closed form: removing row i downdates the
    centred scatter matrices by rank one, S_-i = S - n/(n-1) a_i b_i' (a, b centred rows), so
    |S_-i|_F^2 = |S|^2 - 2c a_i'S b_i + c^2 |a_i|^2 |b_i|^2 with c = n/(n-1): O(n d^2), no loop. The debiased
    estimator has no such downdate and is recomputed per left-out row with kernels.cka."""
    A, B = torch.as_tensor(np.asarray(A), dtype=torch.float64), torch.as_tensor(np.asarray(B), dtype=torch.float64)
    n = A.shape[0]
    if debiased:
        keep = torch.ones(n, dtype=torch.bool)
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
    return (hxy / torch.sqrt(hxx * hyy)).numpy()


def task_cka(cfg):
    _, reps = load_representations(cfg)
    target = reps["spose"]
    res = {}
    lo_q, hi_q = (1 - cfg["ci"]) / 2, 1 - (1 - cfg["ci"]) / 2
    for name, R in reps.items():
        value = kernels.cka(torch.as_tensor(R), torch.as_tensor(target), debiased=cfg["debiased"]).item()
        entry = dict(cka=value, debiased=cfg["debiased"], dims=int(R.shape[1]),
                     cka_biased=kernels.cka(torch.as_tensor(R), torch.as_tensor(target)).item(),
                     cka_debiased=kernels.cka(torch.as_tensor(R), torch.as_tensor(target), debiased=True).item())
        if name != "spose" and cfg["ci_method"] == "jackknife":
            loo = jackknife_cka(R, target, cfg["debiased"])
            n = len(loo)
            se = float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))
            half = _z(cfg["ci"]) * se
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
    dims = _dims(cfg)
    for name, R in reps.items():  # "chosen dims": CKA with a subset of SPoSE dimensions only
        if dims:
            res[name]["cka_spose_dims"] = kernels.cka(torch.as_tensor(R), torch.as_tensor(target[:, dims]),
                                                      debiased=cfg["debiased"]).item()
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    with data.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
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
        raise data.DataError(f"{path} not found; expected a tab-separated table: uniqueID + one 0/1 column per category")
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
    res["base"]["class_separation_fine"] = geometry.class_separation(X, fine_labels)
    for name, Z in aligned_representations(cfg, X).items():
        res[name]["class_separation_fine"] = geometry.class_separation(Z, fine_labels)
    print_table("class separation R^2 (cosine, coarse = concepts by category)", "R^2",
                [(k, v["class_separation_coarse"], None) for k, v in res.items()], float("nan"))
    return res


def task_tsne(cfg):
    """t-SNE of every concept-level representation, Procrustes-aligned to the base panel, coloured by the
    first category of each concept; trustworthiness (sklearn) says how much neighbourhood survived."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE, trustworthiness
    concepts, reps = load_representations(cfg)
    member, cats = load_categories(cfg, concepts)
    colour = np.where(member.any(1), member.argmax(1), -1)
    emb, res = {}, {}
    for name, R in reps.items():
        Z = TSNE(perplexity=min(cfg["perplexity"], (len(R) - 1) / 3), init="pca", random_state=cfg["seed"]).fit_transform(R)
        emb[name] = Z if name == "base" else geometry.procrustes_to(emb["base"], Z)
        res[name] = dict(trustworthiness=float(trustworthiness(R, Z, n_neighbors=5)))
    fig, axes = plt.subplots(1, len(emb), figsize=(4.5 * len(emb), 4.5), squeeze=False)
    for ax, (name, Z) in zip(axes[0], emb.items()):
        ax.scatter(Z[:, 0], Z[:, 1], c=colour, cmap="tab20", s=8)
        ax.set_title(f"{name} (trustworthiness {res[name]['trustworthiness']:.2f})")
        ax.set_xticks([]), ax.set_yticks([])
    png = os.path.splitext(cfg["_out"])[0] + ".png"
    with data.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    res["figure"] = png
    print_table("t-SNE trustworthiness (5 neighbours)", "trust", [(k, v["trustworthiness"], None) for k, v in res.items()
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
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = [m.strip() for m in cfg["models"].split(",") if m.strip()]
    datasets = [d.strip() for d in cfg["datasets"].split(",") if d.strip()] or [""]
    measures = [m.strip() for m in cfg["measures"].split(",") if m.strip()]
    if len(paths) < 2:
        raise data.DataError("--models: need at least two comma-separated feature files (use {dataset} for the dataset name)")
    names = [_model_name(p.replace("{dataset}", datasets[0])) for p in paths]
    res = dict(models=names, datasets=datasets, measures=measures, matrices={}, indices={})
    for ds in datasets:
        feats, ids0, src0 = [], None, None
        for p in paths:  # each model's features read once per dataset: O(M) loads
            f = p.replace("{dataset}", ds)
            X, ids = data.read_features(f, field=cfg["field"])
            if ids0 is not None and ids != ids0:
                raise data.DataError(f"{f}: /image_ids differ from {src0} (models must see the same images in the same order)")
            ids0, src0 = ids0 or ids, src0 or f
            feats.append(X)
        rng = np.random.default_rng(cfg["seed"])
        idx = np.sort(rng.choice(len(ids0), size=min(cfg["max_images"], len(ids0)), replace=False))
        mats = geometry.similarity_matrices([X[idx] for X in feats], measures)
        res["matrices"][ds] = {k: v.tolist() for k, v in mats.items()}
        res["indices"][ds] = idx.tolist()
    res["consistency"] = {m: geometry.consistency([np.array(res["matrices"][d][m]) for d in datasets]).tolist()
                          for m in measures}
    fig, axes = plt.subplots(len(datasets), len(measures), figsize=(3.2 * len(measures), 3 * len(datasets)), squeeze=False)
    for r, ds in enumerate(datasets):
        for c, m in enumerate(measures):
            ax = axes[r, c]
            im = ax.imshow(np.array(res["matrices"][ds][m]), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{ds or 'data'}: {m}", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
            ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    png = os.path.splitext(cfg["_out"])[0] + ".png"
    with data.atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
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
    res = {}
    for name, R in reps.items():
        entry = {}
        for k in shots + [None]:
            accs = geometry.few_shot_probe(R[~test], y[~test], R[test], y[test], shots=k, seeds=seeds)
            entry[f"probe_{k}shot" if k else "probe_full"] = float(accs.mean())
            entry[f"probe_{k}shot_sd" if k else "probe_full_sd"] = float(accs.std(ddof=1)) if len(accs) > 1 else 0.0
        entry["n_classes"], entry["chance"] = int(len(np.unique(y))), float(np.bincount(y[test]).max() / test.sum())
        res[name] = entry
    print_table("linear probes on categories (full)", "accuracy", [(k, v["probe_full"], None) for k, v in res.items()],
                float("nan"))
    return res


# ------------------------------------------------------------------------------------------------- report

REPORT_METRICS = ("accuracy", "cka", "r2", "rsa", "class_separation_coarse", "class_separation_fine",
                  "trustworthiness", "probe_full", "mcfadden_r2")  # the headline value of a representation, first match wins


def task_report(cfg):
    """Collect every result JSON in --results into one markdown table (runs/demo/report.md)."""
    folder = cfg["results"]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
    if not files:
        raise data.DataError(f"{folder}: no result .json files to report (run evaluate.py tasks first)")
    lines = ["# metalign report", "", f"Results from `{folder}`, written {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| task | representation | metric | value | CI | noise ceiling |", "|---|---|---|---|---|---|"]
    fmri_rows = []
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            r = json.load(fh)
        task = r.get("config", {}).get("task", f[:-5])
        for name, v in r.items():
            if not isinstance(v, dict) or not (set(REPORT_METRICS) & set(v)):
                continue
            metric = next(m for m in REPORT_METRICS if m in v)  # fmri: r2 = R^2 / noise ceiling
            if "rois" in v:  # fmri: early / high-level ROI means and every ROI, one cell
                fmri_rows.append(f"| {name} | {v['r2_early']:.3f} | {v['r2_high']:.3f} | "
                                 + ", ".join(f"{r} {x:.2f}" for r, x in v["rois"].items()) + " |")
            ci = "" if not v.get("ci") else f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
            lines.append(f"| {task} | {name} | {metric} | {v[metric]:.3f} | {ci} | {r.get('noise_ceiling', float('nan')):.3f} |")
            fit = v.get("fit") if metric != "mcfadden_r2" else None  # behavioural fits (behaviour.py): a second row
            if isinstance(fit, dict) and "mcfadden_r2" in fit:
                lines.append(f"| {task} | {name} | McFadden R^2 (held-out) | {fit['mcfadden_r2']:.3f} | [{fit['r2_ci'][0]:.3f}, "
                             f"{fit['r2_ci'][1]:.3f}] | {r.get('r2_noise_ceiling', float('nan')):.3f} |")
    if fmri_rows:
        lines += ["", "THINGS-fMRI, R^2 / noise ceiling by ROI (mean over subjects):", "",
                  "| representation | early (V1-hV4) | high-level | ROIs |", "|---|---|---|---|"] + fmri_rows
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            r = json.load(fh)
        if "consistency" in r:  # similarity: one line per measure
            lines += ["", f"Model similarity ({', '.join(r['models'])}) across datasets {r['datasets']}: "
                      "mean correlation of the matrices' upper triangles", ""]
            for m, C in r["consistency"].items():
                C = np.array(C)
                lines.append(f"- {m}: {C[np.triu_indices(len(C), 1)].mean() if len(C) > 1 else float('nan'):.3f}")
    lines += ["", "Flags that differ from the defaults (every file stores its full config and versions):", ""]
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            c = json.load(fh).get("config", {})
        changed = {k: v for k, v in c.items() if k in defaults and v != defaults[k] and k not in ("task", "out")}
        lines.append(f"- `{f}`: " + (", ".join(f"`--{k.replace('_', '-')} {v}`" for k, v in changed.items()) or "defaults"))
    return "\n".join(lines).replace("| nan |", "|  |") + "\n"


# -------------------------------------------------------------------------------------------------- helpers

def _z(ci):
    from scipy.stats import norm
    return float(norm.ppf(0.5 + ci / 2))


def print_table(title, metric, rows, ceiling):
    print(f"\n{title}\n{'representation':<16}{metric:>10}   {'CI':<20}")
    for name, value, ci in rows:
        print(f"{name:<16}{value:>10.4f}   {'' if not ci else f'[{ci[0]:.4f}, {ci[1]:.4f}]'}")
    print(f"{'noise ceiling':<16}{ceiling:>10.4f}")


# --------------------------------------------------------------------------------------------------- fMRI

def task_fmri(cfg):
    """THINGS-fMRI voxelwise encoding (fmri.py): leave-one-session-out ridge per subject, per representation."""
    import fmri
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
        rows, crow = fmri.trial_rows(stimuli, ids, concepts, spath)
        reps = {"base": X[rows], "spose": spose[crow]}  # SPoSE is concept-level: one row per concept
        for name, (A, aids) in extra.items():
            reps[name] = A[fmri.trial_rows(stimuli, aids, concepts, spath)[0]]
        return reps

    res, voxels = fmri.run(cfg, reps_for_subject, names)
    out = cfg["out"] or os.path.join("runs", "eval", "fmri.json")
    stem = os.path.splitext(out)[0]
    res["voxel_file"] = fmri.write_voxels(cfg["voxel_out"] or stem + ".h5", voxels, cfg)
    if cfg["figures"]:
        fmri.plot_rois(res, names, stem + "_rois.png")
        fmri.plot_scatter(voxels, "base", names[-1], stem + "_scatter.png")
        res["figures"] = [stem + "_rois.png", stem + "_scatter.png"]
        res["flatmap"] = fmri.flatmap(voxels, stem + "_flatmap.png")
        print(f"flatmap: {res['flatmap']}")
    print(f"\nTHINGS-fMRI encoding: R^2 / noise ceiling, mean over subjects ({len(res['per_subject'])})")
    print(f"{'ROI':<8}" + "".join(f"{n:>10}" for n in names))
    for r in res["base"]["rois"]:
        print(f"{r:<8}" + "".join(f"{res[n]['rois'].get(r, float('nan')):>10.3f}" for n in names))
    return res


TASKS = {"things-ooo": task_things_ooo, "cka": task_cka, "fmri": task_fmri}
TASKS.update({"rsa": task_rsa, "class-separation": task_class_separation, "tsne": task_tsne,
              "similarity": task_similarity, "probe": task_probe})
TASKS.update({"levels-ooo": behaviour.task_levels_ooo, "category-learning": behaviour.task_category_learning,
              "reward-learning": behaviour.task_reward_learning, "icl": behaviour.task_icl, "all": behaviour.task_all})
TASKS["dwarp"] = warp.task_dwarp


def main(argv=None):
    cfg = parse(argv)
    out = cfg["out"] or os.path.join("runs", "eval", f"{cfg['task']}.{'md' if cfg['task'] == 'report' else 'json'}")
    try:
        if cfg["task"] == "report":
            text = task_report(cfg)
            with data.atomic_path(out) as tmp, open(tmp, "w") as fh:
                fh.write(text)
        elif cfg["task"] in TASKS:
            cfg["_out"] = out  # tasks that draw figures put them beside the result file
            res = TASKS[cfg["task"]](cfg)
            res["config"] = cfg
            res["versions"] = data.versions()
            with data.atomic_path(out) as tmp, open(tmp, "w") as fh:  # nothing partial is ever left at `out`
                json.dump(res, fh, indent=2)
        else:
            raise data.DataError(f"--task {cfg['task']!r}: expected one of {sorted(TASKS) + ['report']}")
    except data.DataError as e:
        sys.exit(f"evaluate.py: error: {e}")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
