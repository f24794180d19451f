"""Checkpoints + features + human data -> results (JSON) and a report.

    python evaluate.py --task things-ooo --features F.h5 --data DIR --out R.json   # odd-one-out (eval_behaviour.py)
    python evaluate.py --task cka        --features F.h5 --data DIR --out R.json   # CKA with SPoSE (eval_geometry.py)
    python evaluate.py --task fmri       --features F.h5 --data DIR --out R.json   # voxelwise encoding (eval_fmri.py)
    python evaluate.py --task levels-ooo --levels-features L.h5 --data DIR --out R.json   # Levels fit
    python evaluate.py --task category-learning|reward-learning --features F.h5 --data DIR --out R.json
    python evaluate.py --task icl        --ckpt META.pt --data DIR --out R.json             # in-context curves
    python evaluate.py --task encsearch  --features L1.h5 L2.h5 --data DIR --out R.json     # encoding-model search
    python evaluate.py --task dwarp      --warp-runs 'runs/warp/*.json' --out R.json   # d_warp curves (eval_warp.py)
    python evaluate.py --task all        --features F.h5 --data DIR --out runs/eval/all.json  # every task with data
    python evaluate.py --task report     --results runs/demo --out runs/demo/report.md
    python evaluate.py --task paper-table --results runs/paper --out runs/paper/table.json  # the paper grid's table

Where a task lives: things-ooo, levels-ooo, category-learning, reward-learning, icl in eval_behaviour.py;
cka, rsa, class-separation, tsne, similarity, probe in eval_geometry.py; fmri, encsearch in eval_fmri.py;
dwarp in eval_warp.py; paper-table in eval_paper.py; report in eval_report.py. This file holds the flags, the
registry (TASKS), `all` and main.

F.h5 holds /features (n_images, d) and /image_ids "<concept>/<image>.jpg" (see README, "Data formats");
DIR holds the human files (unique_id.txt, spose_embedding_66d_sorted.txt, THINGS_triplets.csv, ...).
A concept's representation is the features of its first sorted image. Each task prints a table and writes
R.json with one top-level key per representation (`base`, `spose`, `aligned` per --ckpt, ...), plus
`noise_ceiling`, `config` and `versions`. On a cluster node: the same command inside `srun`.
"""
import glob
import json
import os
import sys
import traceback

import numpy as np

import data
import eval_behaviour
import eval_fmri
import eval_geometry
import eval_paper
import eval_report
import eval_warp

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    task="things-ooo",                          # a key of TASKS, all or report
    config="",                                  # TOML preset: its [evaluate] table sets flags (flags given override)
    features="data/features/clip/things.h5",    # backbone features of the THINGS images (HDF5; extract.py's output)
    field="features",                           # dataset inside --features (e.g. layers/block6)
    data="data/external",                       # human data files (make data; the world's: data/world/data)
    out="",                                     # result file ('' -> runs/eval/<task>.json)
    results="runs/demo",                        # report, paper-table: folder of results (the grid: runs/paper)
    readme="",                                  # report: also copy its demo summary into this file (make demo)
    n_boot=1000,                                # bootstrap resamples of concepts for CKA confidence intervals
    ci_method="jackknife",                      # cka: jackknife (leave-one-concept-out, default) | bootstrap (basic)
    ci=0.95,                                    # confidence level of the reported intervals
    debiased=False,                             # cka: report the debiased HSIC estimator as the headline
    seed=0,                                     # bootstrap seed
    aligned="",                                 # fmri: features files of aligned representations, comma-separated
    subjects="",                                # fmri, encsearch: subjects, e.g. 1,2 ('' -> all in DIR/brain_data)
    rois="",                                    # fmri, encsearch: only these ROIs, e.g. FFA,PPA ('' -> every voxel)
    nc_min=5.0,                                 # fmri: keep voxels with nc_singletrial > nc_min (percent)
    alpha_min=-6.0,                             # fmri: log10 of the smallest ridge alpha (original study: -6)
    alpha_max=3.0,                              # fmri: log10 of the largest ridge alpha (original study: 3)
    n_alphas=100,                               # fmri: alphas on the log grid (original study: 100)
    inner_cv="loo",                             # fmri: inner alpha selection: loo | gcv | sessions | k (int)
    n_perm=10000,                               # fmri: sign flips per subject and ROI (test vs base)
    voxel_out="",                               # fmri: per-voxel HDF5 ('' -> --out with .h5)
    figures=True,                               # fmri: ROI bar plot + voxel scatter PNGs beside --out
    spose_dims="",                              # cka/rsa: also compare with these SPoSE dims only, e.g. 0,1,2
    ckpt="",                                    # meta checkpoints, comma-separated: encode(features) = aligned, ...
    controls="base_z,base_white,base_minus_pcs,sae_codes",  # controls beside each --ckpt ('' = none; README
                                                # "Controls"): fitted on the checkpoint's training pool
    controls_ckpt="",                           # meta checkpoints of control models (static_linear, --no-embed)
    pool="",                                    # controls: training pool ('' = the checkpoint's --features)
    sae="",                                     # sae_codes: SAE checkpoint ('' = the SAE of the checkpoint's codes)
    remove_pcs=0,                               # base_minus_pcs: principal components removed (0: max(1, round(d/100)))
    device="auto",                              # fmri, encsearch, cka, similarity, probe, encode: auto (cuda if
                                                # available, else cpu) | cpu | cuda
    rdm_metric="correlation",                   # rsa: correlation | cosine | euclidean dissimilarity
    rdm_compare="spearman",                     # rsa: pearson | spearman | cosine comparison of RDMs
    categories="",                              # class-separation, tsne, probe: categories ('' -> DIR/categories.tsv)
    perplexity=30.0,                            # tsne: t-SNE perplexity
    models="",                                  # similarity, encsearch: feature files (or --features A.h5 B.h5 ...);
                                                # similarity fills '{dataset}' in a path
    datasets="",                                # similarity: comma-separated dataset names filling '{dataset}'
    measures="cka_linear,cka_rbf_0.5,cka_rbf_1.0,cka_rbf_2.0,rsa_correlation",  # similarity: measures to compute
    max_images=10000,                           # similarity: subsample each dataset to at most this many images
    shots="1,5,10",                             # probe: k-shot settings (a full probe is always added)
    probe_seeds=5,                              # probe: seeds (draws of shots and splits) per setting
    behav_fit=True,                             # things-ooo: also fit per-participant choice models
    behav_folds=5,                              # behavioural fits: stratified CV folds per participant
    behav_l2=0.1,                               # behavioural fits: L2 penalty on each participant's choice parameters
    threads=1,                                  # behavioural fits, encsearch: torch threads (1: fastest on busy
                                                # 2-core machines; 0: torch default)
    levels_features="",                         # levels-ooo: features of the Levels (ImageNet) images ('' = levels.h5
                                                # beside --features)
    cat_c="0.01,0.1,1,10,100",                  # category-learning: C grid of the online L2 logistic learner
    reward_lambda="0.01,0.1,1,10,100",          # reward-learning: prior precisions of the online Bayesian regression
    learner="ours",                             # category/reward learning: ours (online learners, CV choice fits) |
                                                # paper (the original's sklearn learners, in-sample temperature)
    icl_episodes=256,                           # icl: held-out episodes for the per-position curves
    icl_features="",                            # icl: image pool of the held-out functions ('' -> the checkpoint's eval
                                                # pool)
    icl_noise=0.01,                             # icl: label-noise rate of the Bayes identifier over training functions
    tasks="",                                   # all: comma-separated tasks to try ('' -> every task whose data is
                                                # present)
    warp_runs="",                               # dwarp: result files of train.py --stage warp, comma-separated globs
    warp_frac=0.9,                              # dwarp: d_warp = smallest d reaching this fraction of the full fit
    layers="",                                  # encsearch: datasets inside each --features file used as layers, comma-
                                                # separated ('' = /features)
    pca="0",                                    # encsearch: PCA sizes to try, comma-separated (0 = raw features)
    regressions="ridge,pls",                    # encsearch: ridge (kernels.ridge_cv) | pls (sklearn PLSRegression)
    alphas="1e-2,1e-1,1,10,100,1e3,1e4,1e5",    # encsearch: ridge alphas
    pls_components="1,2,4,8,16,32",             # encsearch: PLS n_components (sizes above the feature count are
                                                # skipped)
    folds=5,                                    # encsearch: inner CV folds on the training trials (random, seeded)
    progress=True,                              # tqdm progress bars
)
CHECKS = dict(n_boot=">= 1", ci="in (0, 1)", n_alphas=">= 1", n_perm=">= 1", perplexity="> 0", max_images=">= 2",
              probe_seeds=">= 1", behav_folds=">= 2", behav_l2=">= 0", threads=">= 0", icl_episodes=">= 1",
              warp_frac="in (0, 1]", folds=">= 2")  # numeric flags checked at parse time (data.check_flags)
MULTI_FEATURES = ("similarity", "encsearch")  # the tasks that take several --features files
NO_DATA = ("similarity", "dwarp", "icl", "paper-table")  # tasks that run without the human data folder (--data)


def parse(argv=None):
    p = data.flag_parser(__doc__, defaults, nargs=("features",))  # several --features: MULTI_FEATURES only
    cfg = data.parse_flags(p, argv, defaults, "evaluate", {"evaluate": defaults}, nargs=("features",))
    if len(cfg["features"]) > 1 and cfg["task"] not in MULTI_FEATURES:
        p.error(f"--features takes one file for --task {cfg['task']} (several only for --task "
                f"{' or '.join(MULTI_FEATURES)})")
    if len(cfg["features"]) > 1 and not cfg["models"]:
        cfg["models"] = ",".join(cfg["features"])
    cfg["features"] = cfg["features"][0]
    data.check_flags(p, cfg, CHECKS)
    for key, low in (("shots", 1), ("pca", 0), ("pls_components", 1)):
        try:
            data.parse_ints(cfg[key], key.replace("_", "-"), low)
        except data.DataError as e:
            p.error(str(e))
    if not cfg["levels_features"]:  # the Levels images' features beside --features (same backbone), never elsewhere
        cfg["levels_features"] = os.path.join(os.path.dirname(cfg["features"]), "levels.h5")
    return cfg


def input_files(cfg, res):
    """The HDF5 files a task's result was built from (features files and fMRI responses), for its header."""
    task = cfg["task"]
    if task == "levels-ooo":
        paths = [cfg["levels_features"]]
    elif task in MULTI_FEATURES:
        paths = [m.replace("{dataset}", ds) for m in (data.split_list(cfg["models"]) or [cfg["features"]])
                 for ds in (data.split_list(cfg["datasets"]) or [""])]
    elif task == "icl":  # the pools the checkpoints' held-out functions were drawn from
        paths = [v["features"] for v in res.values() if isinstance(v, dict) and "features" in v]
    elif task in ("dwarp", "all", "paper-table"):
        paths = []
    else:
        paths = [cfg["features"]]
    paths += data.split_list(cfg["aligned"])
    if task in ("fmri", "encsearch"):
        paths += sorted(glob.glob(os.path.join(cfg["data"], "brain_data", "*_ResponseData.h5")))
    return paths


def header(cfg, res):
    """'synthetic world: ...' when the result was built from the world's files (directly, or through the warp runs
    or the tasks it collects), else the task and its inputs."""
    h = data.result_header(input_files(cfg, res), f"--task {cfg['task']}")
    subs = []
    if cfg["task"] == "dwarp":
        for f in res.get("files", []):
            with open(f) as fh:
                subs.append(json.load(fh).get("header", ""))
    elif cfg["task"] == "all":
        subs = [s.get("header", "") for s in res.get("tasks", {}).values()]
    if not h.startswith(data.SYNTHETIC) and any(s.startswith(data.SYNTHETIC) for s in subs):
        h = f"{data.SYNTHETIC}: --task {cfg['task']} collects results built from the embedded synthetic world"
    return h


def write_result(path, res, cfg):
    """The result JSON: header first, then the task's keys, config and versions; written atomically."""
    doc = {"header": header(cfg, res), **res, "config": {k: v for k, v in cfg.items() if k != "_controls"},
           "versions": data.versions()}
    if cfg.get("_controls"):  # what each control of --ckpt was fitted on (representations.aligned_representations)
        doc["controls"] = cfg["_controls"]
    with data.atomic_path(path) as tmp, open(tmp, "w") as fh:  # nothing partial is ever left at `path`
        json.dump(doc, fh, indent=2, default=_json_default)
    return doc


# --------------------------------------------------------------------------------------------- the registry

TASKS = {  # every --task X lives in the eval_*.py named for its family; `all` and `report` are below
    "things-ooo": eval_behaviour.task_things_ooo, "cka": eval_geometry.task_cka, "fmri": eval_fmri.task_fmri,
    "rsa": eval_geometry.task_rsa, "class-separation": eval_geometry.task_class_separation,
    "tsne": eval_geometry.task_tsne, "similarity": eval_geometry.task_similarity, "probe": eval_geometry.task_probe,
    "levels-ooo": eval_behaviour.task_levels_ooo, "category-learning": eval_behaviour.task_category_learning,
    "reward-learning": eval_behaviour.task_reward_learning, "icl": eval_behaviour.task_icl,
    "dwarp": eval_warp.task_dwarp, "encsearch": eval_fmri.task_encsearch,
    "paper-table": eval_paper.task_paper_table,
}


# ------------------------------------------------------------------------------------------------------ all

PRESENT = {  # task -> files that must exist for --task all to run it
    "things-ooo": lambda c: [os.path.join(c["data"], "THINGS_triplets.csv")],
    "cka": lambda c: [os.path.join(c["data"], "unique_id.txt")],
    "levels-ooo": lambda c: [os.path.join(c["data"], "levels.pkl"), c["levels_features"]],
    "category-learning": lambda c: [os.path.join(c["data"], "category_learning.csv")],
    "reward-learning": lambda c: [os.path.join(c["data"], "reward_learning.csv")],
    "icl": lambda c: [p.strip() for p in (c.get("ckpt") or "").split(",") if p.strip()] or ["<--ckpt not given>"],
    "fmri": lambda c: [os.path.join(c["data"], "brain_data")],
    "encsearch": lambda c: [os.path.join(c["data"], "brain_data")],
    "dwarp": lambda c: [f for p in data.split_list(c.get("warp_runs") or "") for f in sorted(glob.glob(p))]
    or ["<--warp-runs not given, or matching no file>"],
    "paper-table": lambda c: ["<not part of all: make paper-table>"],
}


def task_all(cfg):
    """Run every registered task whose data is present; each writes <folder>/<task>.json; one summary table."""
    json_path, stem = eval_behaviour.out_paths(cfg)
    folder = os.path.dirname(os.path.abspath(json_path))
    summary, rows = {}, []
    wanted = [t.strip() for t in cfg.get("tasks", "").split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TASKS))
    if unknown:
        raise data.DataError(f"--tasks: unknown task(s) {unknown}; expected some of {sorted(TASKS)}")
    for name, fn in TASKS.items():
        if name in ("all", "report") or (wanted and name not in wanted):
            continue
        need = PRESENT.get(name, lambda c: [])(cfg)
        missing = [p for p in need if not os.path.exists(p)]
        if missing:
            summary[name] = dict(status="skipped", reason=f"missing {missing}")
            continue
        sub = dict(cfg, task=name, out=os.path.join(folder, f"{name}.json"))
        sub["_out"] = sub["out"]
        try:
            r = fn(sub)
        except (Exception, SystemExit) as e:  # the other tasks still run; main exits non-zero listing the failures
            if isinstance(e, SystemExit) and not isinstance(e.code, str):
                raise
            reason = str(e) if isinstance(e, (data.DataError, SystemExit)) else f"{type(e).__name__}: {e}"
            if not isinstance(e, (data.DataError, SystemExit)):
                traceback.print_exc()
            summary[name] = dict(status="error", reason=reason)
            print(f"all: {name}: error: {reason}", file=sys.stderr)
            continue
        r = write_result(sub["out"], r, sub)
        heads = {}
        for rep, v in r.items():  # headline: the report's first matching metric, plus the behavioural fit
            if not isinstance(v, dict) or rep in ("config", "versions", "files", "group_stats"):
                continue
            metric = next((m for m in eval_report.REPORT_METRICS if isinstance(v.get(m), (int, float))), None)
            fit = v.get("fit") if isinstance(v.get("fit"), dict) else {}
            r2 = v.get("mcfadden_r2", fit.get("mcfadden_r2"))
            if metric is not None or r2 is not None:
                heads[rep] = dict(metric=metric, value=float(v[metric]) if metric else None,
                                  mcfadden_r2=float(r2) if r2 is not None else None)
        summary[name] = dict(status="done", file=sub["out"], header=r["header"], headline=heads)
        for rep, m in heads.items():
            rows.append((name, rep, m))
    lines = ["| task | representation | metric | value | McFadden R^2 (held-out) |", "|---|---|---|---|---|"]
    for task, rep, m in rows:
        r2 = "" if m["mcfadden_r2"] is None else f"{m['mcfadden_r2']:.4f}"
        val = "" if m["value"] is None else f"{m['value']:.4f}"
        lines.append(f"| {task} | {rep} | {m['metric'] or ''} | {val} | {r2} |")
    for name, s in summary.items():
        if s["status"] != "done":
            lines.append(f"| {name} | ({s['status']}) | | {s['reason'][:120]} | |")
    table = "\n".join(lines) + "\n"
    with data.atomic_path(stem + ".md") as tmp, open(tmp, "w") as fh:
        fh.write(table)
    print("\n" + table)
    # one figure: McFadden R^2 per task (bars) from the summary
    bars = [(t, {rep: m["mcfadden_r2"] for rep, m in s["headline"].items() if m["mcfadden_r2"] is not None})
            for t, s in summary.items() if s["status"] == "done"]
    bars = [(t, {k: [] for k in p}, p) for t, p in bars if p]
    files = dict(table=stem + ".md")
    if bars:
        files["r2_figure"] = eval_behaviour.plot_r2_bars(bars, stem + ".r2.png")
    return dict(tasks=summary, files=files)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


SIDE_FILES = {  # what a task writes beside --out (<stem><suffix>), checked with --out before any work
    **{t: (".trials.h5", ".r2.png", ".pxp.png", ".curves.png") for t in
       ("things-ooo", "levels-ooo", "category-learning", "reward-learning")},
    "icl": (".curves.png",), "fmri": (".h5", "_rois.png", "_scatter.png", "_flatmap.png"), "encsearch": (".md",),
    "cka": ("_layers.png",), "tsne": (".png",), "similarity": (".png",), "dwarp": (".png",), "all": (".md", ".r2.png"),
}
SPLITEXT = ("fmri", "encsearch", "cka", "tsne", "similarity", "dwarp")  # their stem drops any extension, not .json


def files(cfg, out):
    """(outputs, inputs) of a run, {label: path}, for data.claim_outputs: --out first (it is locked), the files
    written beside it (for --task all, every task's), and every input file, the human data folder's included."""
    outputs, folder = {"--out": out}, os.path.dirname(os.path.abspath(out))
    tasks = [cfg["task"]]
    if cfg["task"] == "all":
        tasks += [t for t in TASKS if t in (data.split_list(cfg["tasks"]) or TASKS)]
    for t in tasks:
        o = out if t == cfg["task"] else os.path.join(folder, f"{t}.json")
        if t != cfg["task"]:
            outputs[f"--out ({t}.json beside it)"] = o
        stem = os.path.splitext(o)[0] if t in SPLITEXT else o[:-5] if o.endswith(".json") else o
        for suffix in SIDE_FILES.get(t, ()):
            outputs[f"--out ({os.path.basename(stem + suffix)} beside it)"] = stem + suffix
    if cfg["task"] == "fmri" and cfg["voxel_out"]:
        outputs["--voxel-out"] = cfg["voxel_out"]
    inputs = {"--config": cfg["config"], "--features": cfg["features"], "--levels-features": cfg["levels_features"],
              "--icl-features": cfg["icl_features"], "--categories": cfg["categories"]}
    for flag in ("aligned", "ckpt", "models"):
        for k, p in enumerate(data.split_list(cfg[flag])):
            for ds in data.split_list(cfg["datasets"]) or [""]:
                inputs[f"--{flag} #{k + 1}{' ' + ds if ds else ''}"] = p.replace("{dataset}", ds)
    for p in data.split_list(cfg["warp_runs"]):
        inputs.update({f"--warp-runs ({f})": f for f in glob.glob(p)})
    for where, flag in ((cfg["data"], "--data"), (os.path.join(cfg["data"], "brain_data"), "--data"),
                        (cfg["results"] if cfg["task"] == "report" else "", "--results")):
        if where and os.path.isdir(where):  # the report reads only the .json files of --results, never its own .md
            inputs.update({f"{flag} ({f})": os.path.join(where, f) for f in sorted(os.listdir(where))
                           if os.path.isfile(os.path.join(where, f)) and (flag != "--results" or f.endswith(".json"))})
    return outputs, inputs


def main(argv=None):
    with data.script_errors("evaluate.py"):
        cfg = parse(argv)
        out = cfg["out"] or os.path.join("runs", "eval", f"{cfg['task']}.{'md' if cfg['task'] == 'report' else 'json'}")
        if cfg["task"] not in TASKS and cfg["task"] not in ("all", "report"):
            raise data.DataError(f"--task {cfg['task']!r}: expected one of {sorted(TASKS) + ['all', 'report']}")
        with data.claim_outputs(*files(cfg, out)):  # before any work: inputs are never outputs, one writer
            if cfg["task"] == "report":
                text = eval_report.task_report(cfg, defaults)
                with data.atomic_path(out) as tmp, open(tmp, "w") as fh:
                    fh.write(text)
                if cfg["readme"]:
                    summary = text.split("## What the demo shows\n\n", 1)[-1].split("\n\n", 1)[0] if \
                        "## What the demo shows" in text else ""
                    if not summary:
                        raise data.DataError(f"--readme {cfg['readme']}: {cfg['results']} lacks the results of the "
                                             "demo summary (things-ooo and cka)")
                    print(f"wrote the demo summary into {eval_report.update_readme(cfg['readme'], summary)}")
            else:
                cfg["_out"] = out  # tasks that draw figures put them beside the result file
                if cfg["task"] not in NO_DATA and not os.path.isdir(cfg["data"]):
                    raise data.DataError(f"--data {cfg['data']}: folder not found; expected the human data sets "
                                         "there (make data, README 'Data formats'), or pass --data DIR (the "
                                         "synthetic world's: data/world/data)")
                res = task_all(cfg) if cfg["task"] == "all" else TASKS[cfg["task"]](cfg)
                print(write_result(out, res, cfg)["header"])
                failed = {k: v["reason"] for k, v in res.get("tasks", {}).items() if v["status"] == "error"}
                if cfg["task"] == "all" and failed:  # after the others ran and the summary was written
                    print(f"wrote {out}")
                    raise data.DataError(f"--task all: {len(failed)} of {len(res['tasks'])} tasks failed ("
                                         + "; ".join(f"{k}: {r}" for k, r in failed.items())
                                         + f"); the other tasks' results and the summary are in {out}")
        print(f"wrote {out}")
        return out


if __name__ == "__main__":
    main()
