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

import behaviour
import data
import geometry_tasks as gt
import warp
from choice import repeated_responses
from representations import (aligned_representations, cosine_similarity_matrix, load_representations, print_table,
                             z_value)

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


# ------------------------------------------------------------------------------------------------- odd-one-out

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
    z = z_value(cfg["ci"])
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


TASKS = {"things-ooo": task_things_ooo, "cka": gt.task_cka, "fmri": task_fmri}
TASKS.update({"rsa": gt.task_rsa, "class-separation": gt.task_class_separation, "tsne": gt.task_tsne,
              "similarity": gt.task_similarity, "probe": gt.task_probe})
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
