"""Aligned against base and every control, on every task, over seeds, in the positive and the negative-control world.

    export OMP_NUM_THREADS=1
    python experiments/seeds_table.py run   [--seeds 0 1 2] [--worlds positive control] [--root runs/seeds]
                                            [--size small|full] [--config configs/demo.toml]
    python experiments/seeds_table.py table [--seeds 0 1 2] [--worlds positive control] [--root runs/seeds]
                                            [--out runs/seeds/table.md]

run: for each seed and world kind, the demo chain through the Makefile into its own folders,
    make demo WORLD=<root>/worlds/<kind>-s<seed> RUN=<root>/runs/<kind>-s<seed> SEED=<seed> SIZE=<size> CONTROL=<1|>
         CONFIG=<config>
--config: the preset whose [sae] and [meta] tables train each seed (default the demo's; at full size
configs/icl_full_cpu.toml, the recipe that learns in context at the ridge bound, with the SAE by the sizing rule).
SEED seeds the world and both trainings (SAE, meta), so each seed is a different world and a different training
run; the control world of a seed has the positive world's features bit for bit (world.py), only its people differ.
Finished stages are skipped (the Makefile's file targets), so a killed run resumes; make's output goes to
<root>/logs/<kind>-s<seed>.log, one line per run here, and the first failing run stops the loop, named.
table: every run's result JSONs through eval_report.control_rows (the report's table "Aligned against base and the
controls": paired gains and CIs as each task computed them) -> <out> (markdown) and <out>.json beside it: per
world kind, one row per task and measure; per seed the gain of aligned over base and over the best control (the
highest control on that seed, named), then the mean over seeds and how many seeds have the CI above / straddling /
below 0. A cluster node: the same commands inside `srun`; the runs are independent, so one seed per job works.
"""
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import eval_report  # noqa: E402  (control_rows: the report's own gains and CIs)

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    seeds=[0, 1, 2],                # world and training seeds (make SEED=)
    worlds=["positive", "control"],  # world kinds: positive | control (the negative control, make CONTROL=1)
    root="runs/seeds",              # <root>/worlds/<kind>-s<seed>, <root>/runs/<kind>-s<seed>, <root>/logs
    size="small",                   # run: world size (make SIZE=): small | full
    config="configs/demo.toml",     # run: the training preset (make CONFIG=), [sae] and [meta] tables
    out="",                         # table: markdown file ('' -> <root>/table.md); its JSON beside it (.json)
    make="make",                    # run: the make program
)
KINDS = ("positive", "control")
TAIL = 30  # lines of a failed run's log shown with the error


def parse(argv=None):
    p = data.flag_parser(__doc__, defaults, prog="seeds_table.py")
    p.add_argument("command", choices=("run", "table"), help="run: the demo chains; table: the table of their results")
    a = vars(p.parse_args(argv))
    try:
        a["seeds"] = [int(s) for s in a["seeds"]]
    except ValueError:
        p.error(f"--seeds: expected integers, got {a['seeds']}")
    bad = [w for w in a["worlds"] if w not in KINDS]
    if bad:
        p.error(f"--worlds: unknown kind(s) {bad}; expected some of {list(KINDS)}")
    if len(set(a["seeds"])) != len(a["seeds"]) or len(set(a["worlds"])) != len(a["worlds"]):
        p.error(f"--seeds {a['seeds']} and --worlds {a['worlds']}: each value once")
    a["root"] = os.path.abspath(a["root"])
    a["config"] = config_path(a["config"], p)
    a["out"] = os.path.abspath(a["out"]) if a["out"] else os.path.join(a["root"], "table.md")
    return a


def config_path(path, p):
    """--config as an absolute path: as given (from the working folder), else under the repository; it must exist."""
    for c in (os.path.abspath(path), os.path.join(ROOT, path)):
        if os.path.isfile(c):
            return c
    p.error(f"--config {path}: file not found (looked in {os.getcwd()} and {ROOT}); expected a TOML preset with "
            f"[sae] and/or [meta] tables, e.g. configs/demo.toml or configs/icl_full_cpu.toml")


def name(kind, seed):
    return f"{kind}-s{seed}"


def run_dir(root, kind, seed):
    return os.path.join(root, "runs", name(kind, seed))


def world_dir(root, kind, seed):
    return os.path.join(root, "worlds", name(kind, seed))


def make_command(a, kind, seed):
    """The make command line of one run (run in the repository root)."""
    return [a["make"], "demo", f"WORLD={world_dir(a['root'], kind, seed)}", f"RUN={run_dir(a['root'], kind, seed)}",
            f"SEED={seed}", f"SIZE={a['size']}", f"CONTROL={'1' if kind == 'control' else ''}", f"CONFIG={a['config']}"]


def check_world(a, kind, seed):
    """A world folder written before must be the one this run asks for (make would reuse it silently)."""
    p = os.path.join(world_dir(a["root"], kind, seed), "features", "things.h5")
    if not os.path.exists(p):
        return
    import h5py
    with h5py.File(p, "r") as f:
        c = json.loads(f.attrs.get("config", "{}"))
    want = dict(size=a["size"], seed=seed, control=kind == "control")
    have = {k: c.get(k) for k in want}
    if have != want:
        raise data.DataError(f"{p}: config {have} but this run asks for {want}; use another --root or remove "
                             f"{world_dir(a['root'], kind, seed)} and {run_dir(a['root'], kind, seed)}")


def run(a):
    """Each (seed, kind) through make demo, one after the other; stops at the first failure, naming the run."""
    jobs = [(seed, kind) for seed in a["seeds"] for kind in a["worlds"]]
    os.makedirs(os.path.join(a["root"], "logs"), exist_ok=True)
    t_all = time.time()
    for i, (seed, kind) in enumerate(jobs, 1):
        check_world(a, kind, seed)
        log = os.path.join(a["root"], "logs", f"{name(kind, seed)}.log")
        cmd = make_command(a, kind, seed)
        done_before = os.path.exists(os.path.join(run_dir(a["root"], kind, seed), "report.md"))
        t0 = time.time()
        with open(log, "a") as fh:
            fh.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT).returncode
        dt = time.time() - t0
        if rc != 0:
            with open(log) as fh:
                tail = "".join(fh.readlines()[-TAIL:])
            raise data.DataError(f"run {name(kind, seed)} failed (make exited with {rc} after {dt:.0f} s): "
                                 f"{' '.join(cmd)}\nits log: {log}; the last lines:\n{tail}")
        print(f"[{i}/{len(jobs)}] {name(kind, seed)}: {'resumed, ' if done_before else ''}done in {dt:.0f} s "
              f"({time.time() - t_all:.0f} s in all) -> {run_dir(a['root'], kind, seed)}/report.md", flush=True)


def read_run(folder):
    """{file: result} of one finished run: every result JSON in `folder` (what evaluate.py --task report reads)."""
    if not os.path.isdir(folder):
        raise data.DataError(f"{folder}: run folder not found; run `python experiments/seeds_table.py run` for it")
    if not os.path.exists(os.path.join(folder, "report.md")):
        raise data.DataError(f"{folder}: no report.md, so the run did not finish (make demo writes it last); "
                             "rerun `python experiments/seeds_table.py run`, it resumes")
    docs = {}
    for p in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(p) as fh:
            try:
                docs[os.path.basename(p)] = json.load(fh)
            except json.JSONDecodeError as e:
                raise data.DataError(f"{p}: not a result JSON ({e})") from None
    if not docs:
        raise data.DataError(f"{folder}: no result .json files")
    return docs


def sign(ci):
    """'above', 'straddling' or 'below' 0 for a CI [lo, hi]; 'no CI' without one."""
    if ci is None:
        return "no CI"
    return "above" if ci[0] > 0 else "below" if ci[1] < 0 else "straddling"


def summarise(a):
    """The table's content: per world kind, one entry per (task, measure) with every seed's gains and their summary.
    Every run of a kind must report the same (task, measure) rows."""
    kinds = {}
    for kind in a["worlds"]:
        per_seed = {}
        for seed in a["seeds"]:
            folder = run_dir(a["root"], kind, seed)
            rows = eval_report.control_rows(read_run(folder))
            if not rows:
                raise data.DataError(f"{folder}: no aligned results (tasks run without --ckpt?)")
            per_seed[seed] = ({(t["task"], t["measure"]): t for t in rows}, folder)
        keys = list(per_seed[a["seeds"][0]][0])
        for seed, (rows, folder) in per_seed.items():
            if set(rows) != set(keys):
                first = per_seed[a["seeds"][0]][1]
                raise data.DataError(f"{folder}: its rows differ from {first}'s: missing "
                                     f"{sorted(set(keys) - set(rows))}, extra {sorted(set(rows) - set(keys))}")
        entries = []
        for key in keys:
            seeds = []
            for seed in a["seeds"]:
                t = per_seed[seed][0][key]
                seeds.append(dict(seed=seed, aligned=t["aligned"], base=t["base"], gain_base=t["base_gain"],
                                  ci_base=t["base_ci"], control=t["control"], control_value=t["control_value"],
                                  gain_control=t["gain"], ci_control=t["ci"], unit=t["unit"]))
            e = dict(task=key[0], measure=key[1], seeds=seeds)
            for what in ("base", "control"):
                g = [s[f"gain_{what}"] for s in seeds if s[f"gain_{what}"] is not None]
                e[f"mean_gain_{what}"] = float(np.mean(g)) if g else None
                e[f"sd_gain_{what}"] = float(np.std(g, ddof=1)) if len(g) > 1 else None
                e[f"counts_{what}"] = {c: sum(sign(s[f"ci_{what}"]) == c for s in seeds if s[f"gain_{what}"]
                                              is not None) for c in ("above", "straddling", "below", "no CI")}
            entries.append(e)
        kinds[kind] = dict(runs={seed: f for seed, (_, f) in per_seed.items()}, rows=entries)
    return kinds


def git_commit():
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cell(g, ci, extra=""):
    if g is None:
        return ""
    return f"{g:+.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci is not None else "") + extra


def counts(c):
    return f"{c['above']} / {c['straddling']} / {c['below']}" + (f" ({c['no CI']} no CI)" if c["no CI"] else "")


def markdown(kinds, cfg):
    lines = [f"<!-- seeds_table.py: seeds {' '.join(map(str, cfg['seeds']))}; size {cfg['size']}; worlds "
             f"{' '.join(cfg['worlds'])}; commit {cfg['git_commit']}; versions {json.dumps(cfg['versions'])} -->", ""]
    for kind, k in kinds.items():
        title = "positive world" if kind == "positive" else "negative-control world (meta-learning should gain nothing)"
        lines += [f"**{title}**, size {cfg['size']}: aligned − base and aligned − the best control (named), per seed, "
                  "[CI] paired over the task's units; mean over seeds; seeds with the CI above / straddling / below 0.",
                  ""]
        head = ["task", "measure"]
        for s in cfg["seeds"]:
            head += [f"s{s}: − base", f"s{s}: − best control"]
        head += ["mean − base", "CI vs 0 (base)", "mean − best control", "CI vs 0 (best control)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for e in k["rows"]:
            row = [e["task"], e["measure"]]
            for s in e["seeds"]:
                row += [cell(s["gain_base"], s["ci_base"]),
                        cell(s["gain_control"], s["ci_control"], f" ({s['control']})" if s["control"] else "")]
            row += [cell(e["mean_gain_base"], None), counts(e["counts_base"]),
                    cell(e["mean_gain_control"], None), counts(e["counts_control"])]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def table(a):
    kinds = summarise(a)
    sizes = set()
    for kind in a["worlds"]:  # the size each world was written with (extract.py's config in its features file)
        for seed in a["seeds"]:
            p = os.path.join(world_dir(a["root"], kind, seed), "features", "things.h5")
            if os.path.exists(p):
                import h5py
                with h5py.File(p, "r") as f:
                    sizes.add(json.loads(f.attrs.get("config", "{}")).get("size", "unknown"))
    cfg = dict(seeds=a["seeds"], worlds=a["worlds"], root=a["root"],
               size=",".join(sorted(sizes)) if sizes else "unknown (no world folder beside the runs)",
               git_commit=git_commit(), versions=data.versions(), command=" ".join(["seeds_table.py"] + sys.argv[1:]))
    text = markdown(kinds, cfg)
    json_path = os.path.splitext(a["out"])[0] + ".json"
    with data.atomic_path(json_path) as tmp, open(tmp, "w") as fh:
        json.dump(dict(config=cfg, worlds=kinds), fh, indent=2)
    with data.atomic_path(a["out"]) as tmp, open(tmp, "w") as fh:
        fh.write(text)
    print(text)
    print(f"wrote {a['out']} and {json_path}")
    return text


def main(argv=None):
    with data.script_errors("seeds_table.py"):
        a = parse(argv)
        return run(a) if a["command"] == "run" else table(a)


if __name__ == "__main__":
    main()
