"""evaluate.py --task report: every result JSON of a folder in one markdown report, and its pieces that other code
reads: control_rows (aligned against base and the best control, per task and measure; experiments/seeds_table.py
builds its table from it), demo_summary (the README's "What the demo shows", make demo) and update_readme.

    python evaluate.py --task report --results runs/demo --out runs/demo/report.md [--readme README.md]
"""
import json
import os
import time

import numpy as np

import data

REPORT_METRICS = ("accuracy", "cka", "r2", "rsa", "class_separation_coarse", "class_separation_fine",
                  # the headline value of a representation, first match wins
                  "trustworthiness", "probe_full", "mcfadden_r2")


def task_report(cfg, defaults):
    """Collect every result JSON in --results into one markdown table (runs/demo/report.md); `defaults`: evaluate.py's
    flag defaults, so the report lists the flags each result changed."""
    folder = cfg["results"]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".json")) if os.path.isdir(folder) else []
    if not files:
        raise data.DataError(f"{folder}: no result .json files to report (run evaluate.py tasks first)")
    docs = {}
    for f in files:
        with open(os.path.join(folder, f)) as fh:
            docs[f] = json.load(fh)
    synth = [f for f, r in docs.items() if str(r.get("header", "")).startswith(data.SYNTHETIC)]
    lines = [f"# metalign report{': ' + data.SYNTHETIC if synth else ''}", ""]
    if synth:
        lines += [f"Built from the embedded {data.SYNTHETIC} (world.py), not from human data: {len(synth)} of "
                  f"{len(files)} result files say so in their header.", ""]
    lines += [f"Results from `{folder}`, written {time.strftime('%Y-%m-%d %H:%M')}.", "",
              "| task | representation | metric | value | CI | noise ceiling |", "|---|---|---|---|---|---|"]
    fmri_rows = []
    for f, r in docs.items():
        task = r.get("config", {}).get("task", f[:-5])
        for name, v in r.items():
            if not isinstance(v, dict) or not (set(REPORT_METRICS) & set(v)):
                continue
            metric = next(m for m in REPORT_METRICS if m in v)  # fmri: r2 = R^2 / noise ceiling
            if "rois" in v:  # fmri: early / high-level ROI means and every ROI, one cell
                fmri_rows.append(f"| {name} | {v['r2_early']:.3f} | {v['r2_high']:.3f} | "
                                 + ", ".join(f"{r} {x:.2f}" for r, x in v["rois"].items()) + " |")
            ci = "" if not v.get("ci") else f"[{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
            nc = r.get("noise_ceiling", float("nan"))
            lines.append(f"| {task} | {name} | {metric} | {v[metric]:.3f} | {ci} | {nc:.3f} |")
            # behavioural fits (eval_behaviour.py): a second row
            fit = v.get("fit") if metric != "mcfadden_r2" else None
            if isinstance(fit, dict) and "mcfadden_r2" in fit:
                lines.append(f"| {task} | {name} | McFadden R^2 (held-out) | {fit['mcfadden_r2']:.3f} | "
                             f"[{fit['r2_ci'][0]:.3f}, "
                             f"{fit['r2_ci'][1]:.3f}] | {r.get('r2_noise_ceiling', float('nan')):.3f} |")
            for key, label in (("ridge_bound", "online ridge on the features"),
                               ("identifier", "identifier over the training functions")):
                if isinstance(v.get(key), dict):  # icl: the reference learners on the same episodes
                    lines.append(f"| {task} | {name}: {label} | accuracy | {v[key]['accuracy']:.3f} |  | nan |")
    if fmri_rows:
        lines += ["", "THINGS-fMRI, R^2 / noise ceiling by ROI (mean over subjects):", "",
                  "| representation | early (V1-hV4) | high-level | ROIs |", "|---|---|---|---|"] + fmri_rows
    for r in docs.values():
        if "consistency" in r:  # similarity: one line per measure
            lines += ["", f"Model similarity ({', '.join(r['models'])}) across datasets {r['datasets']}: "
                      "mean correlation of the matrices' upper triangles", ""]
            for m, C in r["consistency"].items():
                C = np.array(C)
                lines.append(f"- {m}: {C[np.triu_indices(len(C), 1)].mean() if len(C) > 1 else float('nan'):.3f}")
    rows = control_rows(docs)
    if rows:
        lines += ["", "## Aligned against base and the controls", "",
                  "Per task and measure: the aligned representation, base, and the best control (the highest value "
                  "among the controls of --ckpt: README \"Controls\"); the gain is aligned minus the best control, "
                  "whatever its sign, with its CI paired over the task's units.", "",
                  "| task | measure | aligned | base | best control | gain over best control | CI | paired over |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in rows:
            ci = "" if t["ci"] is None else f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]"
            lines.append(f"| {t['task']} | {t['measure']} | {t['aligned']:.3f} | {t['base']:.3f} | "
                         + (f"{t['control']} {t['control_value']:.3f} | {t['gain']:.3f} | {ci} | {t['unit']} |"
                            if t["control"] else "(no control) |  |  |  |"))
    summary = demo_summary(docs)
    if summary:
        lines += ["", "## What the demo shows", "", summary]
    lines += ["", "Flags that differ from the defaults (every file stores its full config and versions):", ""]
    for f, r in docs.items():
        c = r.get("config", {})
        changed = {k: v for k, v in c.items() if k in defaults and v != defaults[k] and k not in ("task", "out")}
        lines.append(f"- `{f}`: " + (", ".join(f"`--{k.replace('_', '-')} {v}`" for k,
                                               v in changed.items()) or "defaults"))
    return "\n".join(lines).replace("| nan |", "|  |") + "\n"


MEASURES = {"accuracy": "accuracy", "fit.mcfadden_r2": "McFadden R^2 (fit)", "mcfadden_r2": "McFadden R^2",
            "cka": "CKA with SPoSE", "rsa": "RSA with SPoSE", "r2": "R^2 / noise ceiling (all voxels)",
            "class_separation_coarse": "class separation (coarse)", "trustworthiness": "t-SNE trustworthiness",
            "probe_full": "linear probe (full)"}


def _value(v, key):
    """A representation's value of a measure key ('fit.mcfadden_r2' reads v['fit']['mcfadden_r2']); None if absent."""
    for k in key.split("."):
        v = v.get(k) if isinstance(v, dict) else None
    return v if isinstance(v, (int, float)) else None


def control_rows(docs):
    """One row per (task, aligned representation, measure): aligned, base, the best control (highest value among
    the controls, representations.CONTROLS) and the gain over it with its paired CI (the task's 'vs' entries;
    tasks with no unit-level resampling, e.g. t-SNE, give the gain without a CI); the gain over base likewise
    (base_gain, base_ci)."""
    from representations import is_control, kind
    out = []
    for f, r in docs.items():
        task = r.get("config", {}).get("task", f[:-5])
        for a, v in r.items():
            if kind(a) != "aligned" or not isinstance(v, dict):
                continue
            keys = list(v.get("vs", {})) or [next((m for m in REPORT_METRICS if _value(v, m) is not None), None)]
            for key in [k for k in keys if k and _value(v, k) is not None and _value(r.get("base"), k) is not None]:
                ctrl = {n: _value(c, key) for n, c in r.items() if is_control(n) and _value(c, key) is not None}
                best = max(ctrl, key=ctrl.get) if ctrl else None
                g = v.get("vs", {}).get(key, {}).get(best) if best else None
                gb = v.get("vs", {}).get(key, {}).get("base")
                out.append(dict(task=task + ("" if a == "aligned" else f" ({a})"), measure=MEASURES.get(key, key),
                                key=key, aligned=_value(v, key), base=_value(r["base"], key), control=best,
                                control_value=ctrl.get(best), gain=(g["delta"] if g else
                                                                   (_value(v, key) - ctrl[best] if best else None)),
                                ci=g["ci"] if g else None, unit=g["unit"] if g else "no CI for this task",
                                base_gain=gb["delta"] if gb else _value(v, key) - _value(r["base"], key),
                                base_ci=gb["ci"] if gb else None))
    return out


README_BEGIN = "<!-- demo summary: generated by make demo from runs/demo/report.md; edit eval_report.demo_summary -->"
README_END = "<!-- end of demo summary -->"


def demo_summary(docs):
    """'What the demo shows': one paragraph of the report's own numbers (formatted as in its tables), from the
    things-ooo, cka, rsa, category- and reward-learning, fmri and icl results in `docs` ({file: result}), with
    every measure where aligned loses to a control; '' without things-ooo and cka. make demo copies it into
    README.md (--readme)."""
    from representations import is_control

    def get(task, rep, key, sub=None):
        v = docs.get(f"{task}.json", {}).get(rep, {})
        v = v.get(sub, {}) if sub else v
        return v.get(key) if isinstance(v, dict) else None

    if get("things-ooo", "base", "accuracy") is None or get("cka", "base", "cka") is None:
        return ""
    ceiling = docs["things-ooo.json"].get("noise_ceiling")
    measures = [("odd-one-out accuracy", "things-ooo", "accuracy", None),
                ("odd-one-out McFadden R^2", "things-ooo", "mcfadden_r2", "fit"),
                ("CKA with SPoSE", "cka", "cka", None), ("RSA with SPoSE", "rsa", "rsa", None),
                ("category-learning McFadden R^2", "category-learning", "mcfadden_r2", None),
                ("reward-learning McFadden R^2", "reward-learning", "mcfadden_r2", None),
                ("THINGS-fMRI high-level ROIs (R^2 / noise ceiling)", "fmri", "r2_high", None)]
    have = [m for m in measures if get(m[1], "base", m[2], m[3]) is not None]
    fmt = "{:.3f}".format
    h = f"- **Humans' h (SPoSE).** Odd-one-out accuracy {fmt(get('things-ooo', 'spose', 'accuracy'))}"
    if ceiling is not None and ceiling == ceiling:
        h += f" (noise ceiling {fmt(ceiling)})"
    if get("things-ooo", "spose", "mcfadden_r2", "fit") is not None:
        h += f", McFadden R^2 {fmt(get('things-ooo', 'spose', 'mcfadden_r2', 'fit'))}"
    lines = [h + ".", f"- **Base features.** Odd-one-out accuracy {fmt(get('things-ooo', 'base', 'accuracy'))}, "
             f"CKA with SPoSE {fmt(get('cka', 'base', 'cka'))}."]
    if get("things-ooo", "aligned", "accuracy") is not None:
        parts, above, above_ctrl, n_ctrl = [], 0, 0, 0
        for label, task, key, sub in have:
            a, b = get(task, "aligned", key, sub), get(task, "base", key, sub)
            if a is None:
                continue
            ctrl = {n: get(task, n, key, sub) for n in docs.get(f"{task}.json", {}) if is_control(n)}
            ctrl = {n: c for n, c in ctrl.items() if c is not None}
            best = max(ctrl, key=ctrl.get) if ctrl else None
            parts.append(f"{label} {fmt(a)} vs {fmt(b)}" + (f" vs {fmt(ctrl[best])} ({best})" if best else ""))
            above += a > b
            if best:
                n_ctrl += 1
                above_ctrl += a > ctrl[best]
        verdict = f"above base on {above} of {len(parts)} measures"
        if n_ctrl:
            verdict += f" and above the best control on {above_ctrl} of {n_ctrl}"
        lines.append("- **The meta-learned `aligned` representation** (vs base" + (" vs the best control" if n_ctrl
                                                                                    else "") + "): "
                     + "; ".join(parts) + f". It is {verdict}.")
    rows = [t for t in control_rows(docs) if t["control"]]
    if rows:
        lost = [t for t in rows if t["gain"] < 0]
        ci = lambda t: "" if t["ci"] is None else f" [{fmt(t['ci'][0])}, {fmt(t['ci'][1])}]"  # noqa: E731
        lines.append("- **Against its controls** (gain = aligned minus the best control, CI paired over the task's "
                     "units; the report's table \"Aligned against base and the controls\"): it loses on "
                     f"{len(lost)} of {len(rows)} measures" + (": " + "; ".join(
                         f"{t['task']}: {t['measure']} {fmt(t['gain'])}{ci(t)} against {t['control']}" for t in lost)
                         if lost else "") + ".")
    icl = docs.get("icl.json", {}).get("model", {})
    if icl.get("accuracy") is not None:
        line = f"- **In context**, the meta-learner predicts held-out functions with accuracy {fmt(icl['accuracy'])} " \
               "(chance 0.5)"
        if isinstance(icl.get("ridge_bound"), dict) and isinstance(icl.get("identifier"), dict):
            line += (f"; on the same episodes an online ridge learner on the features reaches "
                     f"{fmt(icl['ridge_bound']['accuracy'])} and a Bayes identifier over the training functions "
                     f"{fmt(icl['identifier']['accuracy'])}")
        lines.append(line + ".")
    return "\n".join(lines)


def update_readme(path, summary):
    """Replace the text between README_BEGIN and README_END in `path` by `summary` (atomically)."""
    with open(path) as fh:
        text = fh.read()
    if (text.count(README_BEGIN) != 1 or text.count(README_END) != 1
            or text.index(README_BEGIN) > text.index(README_END)):
        raise data.DataError(f"{path}: expected one line {README_BEGIN!r} and, after it, one line {README_END!r}")
    head, rest = text.split(README_BEGIN)
    tail = rest.split(README_END)[1]
    with data.atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(f"{head}{README_BEGIN}\n{summary}\n{README_END}{tail}")
    return path
