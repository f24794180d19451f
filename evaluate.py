"""Checkpoints + features + human data -> results (JSON) and a report.

    python evaluate.py --task things-ooo --features F.h5 --data DIR --out R.json   # odd-one-out accuracy
    python evaluate.py --task cka        --features F.h5 --data DIR --out R.json   # CKA with SPoSE, bootstrap CI
    python evaluate.py --task report     --results runs/demo --out runs/demo/report.md

F.h5 holds /features (n_images, d) and /image_ids "<concept>/<image>.jpg" (see README, "Data formats");
DIR holds the human files (unique_id.txt, spose_embedding_66d_sorted.txt, THINGS_triplets.csv, ...).
A concept's representation is the features of its first sorted image. Each task prints a table and writes
R.json with one top-level key per representation (`base`, `spose`; `aligned` once the meta stage exists),
plus `noise_ceiling` and `config`. On a cluster node: the same command inside `srun`.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import data
import kernels

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    task="things-ooo",                          # things-ooo | cka | report
    features="data/world/features/things.h5",   # backbone features of the THINGS images (HDF5)
    field="features",                           # dataset inside --features (e.g. layers/block6)
    data="data/world/data",                     # folder with the human data files
    out="",                                     # result file ('' -> runs/eval/<task>.json)
    results="runs/demo",                        # --task report: folder of result JSON files
    n_boot=1000,                                # bootstrap resamples of concepts for CKA confidence intervals
    ci=0.95,                                    # confidence level of the reported intervals
    debiased=False,                             # cka: report the debiased HSIC estimator as the headline
    seed=0,                                     # bootstrap seed
)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for k, v in defaults.items():
        if isinstance(v, bool):
            p.add_argument("--" + k.replace("_", "-"), action=argparse.BooleanOptionalAction, default=v)
        else:
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    return vars(p.parse_args(argv))  # unknown flags are an error


# ------------------------------------------------------------------------------------------ representations

def load_representations(cfg):
    """The concept-level representations to compare: {'base': (n_concepts, d), 'spose': (n_concepts, k)}."""
    concepts = data.load_concepts(cfg["data"])
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    rows = data.concept_rows(ids, concepts, path=cfg["features"])
    spose = data.load_spose(cfg["data"], n_concepts=len(concepts))
    return concepts, {"base": X[rows], "spose": spose}


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
    keyed = np.sort(triplets, axis=1)
    odd = triplets[np.arange(len(triplets)), choice]
    sets, set_idx, counts = np.unique(keyed, axis=0, return_inverse=True, return_counts=True)
    set_idx = set_idx.ravel()
    rep = counts[set_idx] > 1
    if not rep.any():
        return float("nan"), 0, 0
    pairs, pair_counts = np.unique(np.stack([set_idx[rep], odd[rep]], 1), axis=0, return_counts=True)
    best = np.zeros(len(sets), dtype=np.int64)
    np.maximum.at(best, pairs[:, 0], pair_counts)
    rep_sets = np.nonzero(counts > 1)[0]
    return float(np.mean(best[rep_sets] / counts[rep_sets])), int(len(rep_sets)), int(rep.sum())


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
        if name != "spose" and cfg["n_boot"] > 0:
            # Resampling concepts with replacement duplicates rows, which inflates CKA: the percentile
            # interval would sit above the estimate. The basic (reverse-percentile) bootstrap interval
            # [2c - q_hi, 2c - q_lo] corrects for that shift (Davison & Hinkley 1997, ch. 5).
            boots = bootstrap_cka(R, target, cfg["n_boot"], cfg["seed"], cfg["debiased"])
            entry["ci"] = [2 * value - float(np.quantile(boots, hi_q)), 2 * value - float(np.quantile(boots, lo_q))]
            entry["ci_method"] = "basic bootstrap over concepts"
            entry["n_boot"] = cfg["n_boot"]
            entry["bootstrap_mean"] = float(boots.mean())
        res[name] = entry
    res["noise_ceiling"] = res["spose"]["cka"]  # SPoSE with itself: the most any representation can reach
    rows = [(k, v["cka"], v.get("ci")) for k, v in res.items() if isinstance(v, dict) and "cka" in v]
    print_table(f"linear CKA with SPoSE ({'debiased' if cfg['debiased'] else 'biased'} HSIC)", "cka", rows,
                res["noise_ceiling"])
    return res


# ------------------------------------------------------------------------------------------------- report

def task_report(cfg):
    """Collect every result JSON in --results into one markdown table (runs/demo/report.md)."""
    folder = cfg["results"]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
    if not files:
        raise data.DataError(f"{folder}: no result .json files to report (run evaluate.py tasks first)")
    lines = ["# metalign report", "", f"Results from `{folder}`, written {time.strftime('%Y-%m-%d %H:%M')}.", "",
             "| task | representation | metric | value | CI | noise ceiling |", "|---|---|---|---|---|---|"]
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            r = json.load(fh)
        task = r.get("config", {}).get("task", f[:-5])
        for name, v in r.items():
            if not isinstance(v, dict) or not ({"accuracy", "cka"} & set(v)):
                continue
            metric = "accuracy" if "accuracy" in v else "cka"
            ci = "" if not v.get("ci") else f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
            lines.append(f"| {task} | {name} | {metric} | {v[metric]:.3f} | {ci} | {r.get('noise_ceiling', float('nan')):.3f} |")
    src = {f: json.load(open(os.path.join(folder, f))).get("config", {}) for f in files}
    lines += ["", "Each row's full config is stored in its JSON file:", ""] + [f"- `{f}`: `{json.dumps(c)}`" for f, c in src.items()]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- helpers

def _z(ci):
    from scipy.stats import norm
    return float(norm.ppf(0.5 + ci / 2))


def print_table(title, metric, rows, ceiling):
    print(f"\n{title}\n{'representation':<16}{metric:>10}   {'CI':<20}")
    for name, value, ci in rows:
        print(f"{name:<16}{value:>10.4f}   {'' if not ci else f'[{ci[0]:.4f}, {ci[1]:.4f}]'}")
    print(f"{'noise ceiling':<16}{ceiling:>10.4f}")


TASKS = {"things-ooo": task_things_ooo, "cka": task_cka}


def main(argv=None):
    cfg = parse(argv)
    out = cfg["out"] or os.path.join("runs", "eval", f"{cfg['task']}.{'md' if cfg['task'] == 'report' else 'json'}")
    try:
        if cfg["task"] == "report":
            text = task_report(cfg)
            with data.atomic_path(out) as tmp, open(tmp, "w") as fh:
                fh.write(text)
        elif cfg["task"] in TASKS:
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
