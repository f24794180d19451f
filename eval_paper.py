"""The original study's grid (make paper: the main run and its ablations x four backbones) as one results table.

    python evaluate.py --task paper-table --results runs/paper --out runs/paper/table.json   # make paper-table

slurm/paper_array.sbatch writes one folder per cell, runs/paper/<backbone>/<variant>/, holding the meta checkpoint
and the evaluations of its `aligned` representation (things-ooo.json, levels-ooo.json, category-learning.json,
reward-learning.json, fmri.json). This task reads them and writes <out>.md: per backbone x variant, base -> aligned
on THINGS and Levels odd-one-out (zero-shot accuracy), category and reward learning (McFadden R^2) and THINGS-fMRI
(high-level ROIs, R^2 / noise ceiling), with the original's published numbers beside ours where they exist.
Cells not run yet show "-"; nothing is filled in from elsewhere.
"""
import json
import os

import data

VARIANTS = ("main", "2layers", "8heads", "32heads", "lstm", "midsae", "mlp", "noemb", "raw", "static_linear", "wd")
BACKBONES = ("clip", "dinov3", "mae", "siglip2")
# (column, result file, key in each representation's entry): the measures of the original's results table
MEASURES = (("THINGS odd-one-out", "things-ooo", "accuracy"), ("Levels odd-one-out", "levels-ooo", "accuracy"),
            ("category learning R^2", "category-learning", "mcfadden_r2"),
            ("reward learning R^2", "reward-learning", "mcfadden_r2"),
            ("fMRI high-level R^2/ceiling", "fmri", "r2_high"))
# The original paper's published numbers, base -> aligned (main run): zero-shot odd-one-out accuracy.
PUBLISHED = {("clip", "things-ooo"): (0.495, 0.540), ("dinov3", "things-ooo"): (0.452, 0.514),
             ("mae", "things-ooo"): (0.377, 0.481), ("siglip2", "things-ooo"): (0.486, 0.536),
             ("clip", "levels-ooo"): (0.602, 0.626)}


def cell_values(folder, headers=None):
    """{result file: (base, aligned)} of one grid cell (None where a file or a value is missing); each file's
    header is appended to `headers`."""
    out = {}
    for _, task, key in MEASURES:
        path = os.path.join(folder, f"{task}.json")
        if not os.path.exists(path):
            out[task] = (None, None)
            continue
        try:
            with open(path) as fh:
                res = json.load(fh)
        except json.JSONDecodeError as e:
            raise data.DataError(f"{path}: not a result JSON ({e})") from None
        if headers is not None:
            headers.append(str(res.get("header", "")))
        vals = []
        for rep in ("base", "aligned"):
            v = res.get(rep, {}).get(key) if isinstance(res.get(rep), dict) else None
            vals.append(float(v) if isinstance(v, (int, float)) else None)
        out[task] = tuple(vals)
    return out


def _pair(p):
    f = "{:.3f}".format
    return "-" if p is None or p[0] is None or p[1] is None else f"{f(p[0])} -> {f(p[1])}"


def task_paper_table(cfg):
    """--task paper-table: the grid's results table from --results (runs/paper) into <out>.md (and the JSON)."""
    root = cfg["results"]
    if not os.path.isdir(root):
        raise data.DataError(f"--results {root}: folder not found; expected the paper grid's output (make paper)")
    cells, lines = {}, []
    head = ["backbone", "variant"]
    for label, task, _ in MEASURES:
        head.append(label)
        if any(t == task for _, t in PUBLISHED):
            head.append(f"{label} (original)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    done, headers = 0, []
    for b in BACKBONES:
        for v in VARIANTS:
            vals = cell_values(os.path.join(root, b, v), headers)
            cells[f"{b}/{v}"] = {t: dict(base=p[0], aligned=p[1]) for t, p in vals.items()}
            done += any(p[1] is not None for p in vals.values())
            row = [b, v]
            for _, task, _ in MEASURES:
                row.append(_pair(vals[task]))
                if any(t == task for _, t in PUBLISHED):
                    row.append(_pair(PUBLISHED.get((b, task))) if v == "main" else "")
            lines.append("| " + " | ".join(row) + " |")
    if not done:
        raise data.DataError(f"--results {root}: no cell of the grid has results yet (<backbone>/<variant>/"
                             f"{MEASURES[0][1]}.json, ...); run make paper first")
    synth = sum(h.startswith(data.SYNTHETIC) for h in headers)
    note = [f"Built from the embedded {data.SYNTHETIC} (world.py), not from human data: {synth} of {len(headers)} "
            "result files say so in their header.", ""] if synth else []
    text = "\n".join([f"# The paper's grid: base -> aligned{': ' + data.SYNTHETIC if synth else ''}", ""] + note + [
                      f"From `{root}` ({done} of {len(BACKBONES) * len(VARIANTS)} cells with results). Odd-one-out: "
                      "zero-shot accuracy; learning tasks: held-out McFadden R^2; fMRI: high-level ROIs, R^2 / noise "
                      "ceiling. (original): the published numbers of the original study's main run.", ""] + lines)
    stem = os.path.splitext(cfg.get("_out") or os.path.join(root, "table.json"))[0]
    with data.atomic_path(stem + ".md") as tmp, open(tmp, "w") as fh:
        fh.write(text + "\n")
    print(text)
    published = {f"{b}/{t}": dict(base=p[0], aligned=p[1]) for (b, t), p in PUBLISHED.items()}
    return dict(cells=cells, synthetic_files=synth, published=published,
                files=dict(table=stem + ".md"))
