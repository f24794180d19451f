"""Why does in-context learning plateau below the online ridge bound at full size? Small, logged experiments.

Runs on any world folder (or real features): the training pool is split into a training part and a held-out
part (images only; the same functions), so every choice here is made on the held-out pool of the training
functions, never on THINGS or other evaluation images.

    P=.venv/bin/python; E=experiments/icl_plateau.py; export OMP_NUM_THREADS=1
    $P $E split --features data/world_full/features/coco.h5 --codes runs/icl/coco_codes.h5 --out runs/icl/pool
    $P $E bound --pool runs/icl/pool --length 32,64,120       # ridge bound per L -> runs/icl/pool/bound.json
    $P $E probe --pool runs/icl/pool --name smear --smear --length 120 --minutes 15 --no-cosine
                                                              # one training run with the knobs under test, logged
                                                              # step by step -> runs/icl/probe/NAME.csv
    $P $E table --runs runs/icl/probe --markdown               # one line per run: steps, steps/s, accuracy
    $P $E figure --csv RUN.csv --ckpt RUN.pt --out docs/icl_full_cpu.png   # a train.py meta run + its bound

probe is a compact copy of train.py's meta loop (models.MetaLearner, models.evaluate_meta) with the knobs the
experiments vary; what they found is kept in train.py's meta stage (--smear, --length-start, ...).
Functions: the latents of the SAE whose codes are given (--codes), active on >= --min-nonzero pool images.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import models  # noqa: E402


def split(a):
    """Seeded split of the pool's rows into train / eval parts: features and codes, as four HDF5 files."""
    import h5py
    X, ids = data.read_features(a.features)
    idx, val = models.read_codes(a.codes, len(X), ids)
    perm = np.random.default_rng(a.seed).permutation(len(X))
    n_eval = int(round(a.eval_share * len(X)))
    os.makedirs(a.out, exist_ok=True)
    for part, rows in (("train", np.sort(perm[n_eval:])), ("eval", np.sort(perm[:n_eval]))):
        cfg = dict(vars(a), part=part, n_rows=len(rows))
        data.write_features(os.path.join(a.out, f"{part}.h5"), X[rows], [ids[r] for r in rows], attrs=dict(config=cfg))
        with data.atomic_path(os.path.join(a.out, f"{part}_codes.h5")) as tmp, h5py.File(tmp, "w") as f:
            f["sae/indices"] = idx[rows].astype(np.int32)
            f["sae/values"] = val[rows].astype(np.float32)
            f["image_ids"] = np.array([ids[r] for r in rows], dtype=object)
            data.write_h5_attrs(f, dict(config=cfg))
        print(f"{part}: {len(rows)} rows -> {a.out}/{part}.h5, {part}_codes.h5")


def _pool(pool, length, min_nonzero):
    """Training and held-out functions of a split pool (held-out: the training latents with >= L positives and
    negatives among the held-out images) -> X, train_fns, Xe, eval_fns."""
    X, ids = data.read_features(os.path.join(pool, "train.h5"))
    Xe, ide = data.read_features(os.path.join(pool, "eval.h5"))
    idx, val = models.read_codes(os.path.join(pool, "train_codes.h5"), len(X), ids)
    eidx, evl = models.read_codes(os.path.join(pool, "eval_codes.h5"), len(Xe), ide)
    tr = models.functions_from_codes(idx, val, min_nonzero)
    ev = models.functions_from_codes(eidx, evl, length, latents=tr["latents"].numpy())
    keep = ev["latents"].numpy()[(len(Xe) - ev["pos_ptr"].diff().numpy()) >= length]
    ev = models.functions_from_codes(eidx, evl, length, latents=keep)
    return torch.from_numpy(X), tr, torch.from_numpy(Xe), ev


def bound(a):
    out = {}
    for L in [int(s) for s in a.length.split(",")]:
        X, tr, Xe, ev = _pool(a.pool, L, a.min_nonzero)
        mean, std = X.mean(0), X.std(0)
        t0 = time.time()
        b = models.ridge_icl_bound(X, tr, Xe, ev, L, a.episodes, seed=a.seed + 777, shift=mean, scale=1 / std)
        b.update(length=L, n_train_functions=len(tr["latents"]), n_eval_functions=len(ev["latents"]),
                 seconds=round(time.time() - t0, 1), episodes=a.episodes, eval_seed=a.seed + 777)
        out[str(L)] = b
        edge = ", grid edge" if b["at_grid_edge"] else ""
        print(f"L {L}: ridge bound {b['accuracy']:.4f} (alpha {b['alpha']:.3g}{edge}; "
              f"last 10 positions {np.mean(b['accuracy_by_position'][-10:]):.3f}) on {len(ev['latents'])} of "
              f"{len(tr['latents'])} functions, {b['seconds']} s")
    path = os.path.join(a.pool, "bound.json")
    old = json.load(open(path)) if os.path.exists(path) else {}
    old.update(out)
    with data.atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(dict(old, config=vars(a), versions=data.versions()), f, indent=1)


def table(a):
    """One line per probe CSV: L, steps, minutes, steps/s, held-out accuracy at fixed steps and at the end, bound."""
    import glob
    import pandas as pd
    rows = []
    for path in sorted(glob.glob(os.path.join(a.runs, "*.csv"))):
        try:
            df = pd.read_csv(path, comment="#")
        except pd.errors.EmptyDataError:  # a run that has not logged a step yet
            continue
        ev = df.dropna(subset=["eval_accuracy"])
        if not len(ev):
            continue
        at = {n: ev.loc[ev["step"] == n, "eval_accuracy"] for n in (500, 1000, 1500)}
        rows.append(dict(run=os.path.basename(path)[:-4], L=int(df["L"].iloc[-1]), steps=int(df["step"].iloc[-1]),
                         minutes=round(df["seconds"].iloc[-1] / 60, 1),
                         steps_per_s=round(df["step"].iloc[-1] / df["seconds"].iloc[-1], 2),
                         **{f"acc@{n}": round(float(v.iloc[0]), 4) if len(v) else None for n, v in at.items()},
                         final=round(float(ev["eval_accuracy"].iloc[-1]), 4),
                         best=round(float(ev["eval_accuracy"].max()), 4),
                         ridge_bound=round(float(ev["ridge_bound"].iloc[-1]), 4)))
    out = pd.DataFrame(rows)
    if a.markdown:  # no tabulate dependency
        print("| " + " | ".join(out.columns) + " |\n|" + "---|" * len(out.columns))
        for r in out.itertuples(index=False):
            print("| " + " | ".join("" if v is None or v != v else str(v) for v in r) + " |")
    else:
        print(out.to_string(index=False))


def figure(a):
    """The CPU learning curve of a train.py meta run (its CSV) with the online ridge bound, and the per-position
    accuracy of its best checkpoint beside the ridge learner's on the same episodes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    df = pd.read_csv(a.csv)
    ev = df.dropna(subset=["eval_accuracy"])
    ck = torch.load(a.ckpt, map_location="cpu", weights_only=False)
    m, cfg = ck["metrics"], ck["config"]
    bnd = m.get("icl_ridge_bound") or m["ridge_bound"]  # train.py today; the runs of the README figure
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ev["seconds"] / 60, ev["eval_accuracy"], marker="o", ms=3, label="meta-learner, held-out pool")
    ax[0].axhline(bnd["accuracy"], color="C3", ls=":", label=f"online ridge bound ({bnd['accuracy']:.3f})")
    ax[0].axhline(0.5, color="grey", lw=0.6, ls="--")
    rate = df["step"].iloc[-1] / df["seconds"].iloc[-1]
    ax[0].set(xlabel="training minutes (2 shared CPU cores, 1 thread)", ylabel="held-out accuracy, mean over positions",
              title=f"L {cfg['length']}: {int(df['step'].iloc[-1])} steps, {rate:.2f} steps/s")
    top = ax[0].secondary_xaxis("top", functions=(lambda t: np.interp(t, df["seconds"] / 60, df["step"]),
                                                 lambda s: np.interp(s, df["step"], df["seconds"] / 60)))
    top.set_xlabel("step")
    top.set_xticks(np.arange(0, df["step"].iloc[-1] + 1, 1000))
    ax[0].legend(fontsize=8, loc="lower right")
    pos = np.arange(1, len(m["accuracy_by_position"]) + 1)
    ax[1].plot(pos, m["accuracy_by_position"], lw=1, label=f"meta-learner (step {m['step']}): {m['accuracy']:.3f}")
    ax[1].plot(pos, bnd["accuracy_by_position"], lw=1, color="C3", label=f"online ridge (alpha {bnd['alpha']:.3g}): "
               f"{bnd['accuracy']:.3f}")
    ax[1].axhline(0.5, color="grey", lw=0.6, ls="--")
    ax[1].set(xlabel="position in the episode", ylabel="held-out accuracy", title="per position, the same episodes")
    ax[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with data.atomic_path(a.out) as tmp:
        fig.savefig(tmp, format="png", dpi=a.dpi, metadata={"Description": json.dumps(dict(vars(a), config=cfg))})
    print(f"figure -> {a.out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--features", required=True)
    s.add_argument("--codes", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--eval-share", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bound")
    b.add_argument("--pool", required=True)
    b.add_argument("--length", default="32,64,120")
    b.add_argument("--min-nonzero", type=int, default=120)
    b.add_argument("--episodes", type=int, default=256)
    b.add_argument("--seed", type=int, default=0)
    _probe_parser(sub)
    t = sub.add_parser("table")
    t.add_argument("--runs", default="runs/icl/probe")
    t.add_argument("--markdown", action="store_true")
    f = sub.add_parser("figure")
    f.add_argument("--csv", required=True)
    f.add_argument("--ckpt", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--dpi", type=int, default=90)
    a = p.parse_args(argv)
    {"split": split, "bound": bound, "probe": probe, "table": table, "figure": figure}[a.cmd](a)



def probe(a):
    """A compact copy of train.py's meta loop with the knobs under test -> CSV (step, seconds, loss, bce, mse,
    eval accuracy, lr, L) in --runs/NAME.csv; stops at --steps or --minutes, whichever first."""
    import csv
    import math
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    X, tr, Xe, ev = _pool(a.pool, a.length, a.min_nonzero)
    tr = models.densest_first(tr) if a.fn_start else tr  # without the curriculum: the episodes as before
    F = len(tr["latents"])
    mean, std = X.mean(0), X.std(0)
    basis = models.principal_basis(X, a.input_pca, scale=1 / std)[0] if a.input_pca else None
    model = models.MetaLearner(d=X.shape[1], d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, mlp=a.mlp,
                               dropout=a.dropout, input_rank=0 if basis is None else basis.shape[1], smear=a.smear)
    model.embedding.set_input_stats(mean, std)
    if basis is not None:
        model.embedding.set_input_basis(basis)
    if a.embed_init == "orthogonal":
        model.embedding.orthogonal_init(1.0)
    if a.init:
        model.load_state_dict(torch.load(a.init, map_location="cpu", weights_only=False)["model"])
    emb = [model.embedding.weight]
    mats = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embedding.")]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [dict(params=emb, weight_decay=a.embed_wd), dict(params=mats, weight_decay=a.wd),
              dict(params=rest, weight_decay=0.0)]
    if a.opt == "schedulefree":
        import schedulefree
        opt = schedulefree.AdamWScheduleFree(groups, lr=a.lr, warmup_steps=a.warmup)
    else:
        opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95))
    bnd = json.load(open(os.path.join(a.pool, "bound.json"))).get(str(a.length), {}).get("accuracy", float("nan"))
    os.makedirs(a.runs, exist_ok=True)
    path = os.path.join(a.runs, a.name + ".csv")
    fields = ["step", "seconds", "L", "functions", "lr", "loss", "bce", "mse", "eval_accuracy", "eval_bce",
              "ridge_bound"]
    fh = open(path, "w", newline="")
    w = csv.writer(fh)
    fh.write("# " + json.dumps(vars(a)) + "\n")
    w.writerow(fields)
    t0, best = time.time(), 0.0
    print(f"{a.name}: {sum(p.numel() for p in model.parameters()):,} parameters, ridge bound {bnd:.4f} at L {a.length}")
    for step in range(a.steps):
        L = a.length if not a.curriculum else \
            int(min(a.length, a.curriculum + (a.length - a.curriculum) * step / a.ramp))
        if a.opt == "schedulefree":
            opt.train()
            lr = a.lr
        else:
            lr = a.lr * min(1.0, (step + 1) / max(1, a.warmup))
            if a.cosine:
                lr *= 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / a.steps)))
            for g in opt.param_groups:
                g["lr"] = lr
        k = models.functions_at(step, F, a.fn_start, a.fn_ramp)
        x, y, mag, fn, _ = models.make_episodes(X, models.function_prefix(tr, k), a.batch, L, a.seed * 1_000_003 + step)
        if a.flip:  # the original's early recipe: flip each episode's labels with probability 1/2
            f = (torch.rand(a.batch) < 0.5).float()[:, None]
            y = y * (1 - f) + (1 - y) * f
            x[:, 1:, 0] = x[:, 1:, 0] * (1 - f) + (1 - x[:, 1:, 0].gt(0).float()) * f
        logit, mp = model(x)
        total, bce, mse = model.loss(logit, mp, y, mag)
        if a.loss == "bce":
            total = bce
        elif a.loss == "sum":
            total = bce + a.mag_weight * mse
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = dict(step=step + 1, seconds=round(time.time() - t0, 2), L=L, functions=k, lr=lr,
                   loss=float(total.detach()), bce=float(bce.detach()),
                   mse=float(mse.detach()))
        done = step + 1 == a.steps or (a.minutes and time.time() - t0 > 60 * a.minutes)
        if (step + 1) % a.eval_every == 0 or done:
            if a.opt == "schedulefree":
                opt.eval()
            e = models.evaluate_meta(model, Xe, ev, a.length, a.eval_episodes, seed=a.seed + 777)
            row.update(eval_accuracy=e["accuracy"], eval_bce=e["bce"], ridge_bound=bnd)
            best = max(best, e["accuracy"])
            print(f"{a.name} step {step + 1} {row['seconds']:.0f}s L {L} loss {row['loss']:.3f} bce {row['bce']:.3f} "
                  f"F {k} acc {e['accuracy']:.4f} (bound {bnd:.4f})", flush=True)
        w.writerow([row.get(k, "") for k in fields])
        fh.flush()
        if done:
            break
    fh.close()
    print(f"{a.name}: best {best:.4f} at {(step + 1) / (time.time() - t0):.2f} steps/s over {step + 1} steps")


def _probe_parser(sub):
    q = sub.add_parser("probe")
    q.add_argument("--pool", required=True)
    q.add_argument("--runs", default="runs/icl/probe")
    q.add_argument("--name", required=True)
    for k, v in dict(length=32, batch=32, steps=600, minutes=0.0, d_model=64, n_layers=2, n_heads=4, dropout=0.0,
                     lr=2e-3, warmup=50, wd=0.05, embed_wd=0.05, input_pca=0.95, min_nonzero=120, eval_every=100,
                     eval_episodes=256, seed=0, threads=1, curriculum=0, ramp=500, mag_weight=1.0,
                     fn_start=0, fn_ramp=2000).items():
        q.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    for k, v in dict(mlp=True, smear=False, flip=False, cosine=True).items():
        q.add_argument("--" + k.replace("_", "-"), action=argparse.BooleanOptionalAction, default=v)
    q.add_argument("--loss", default="kendall", choices=["kendall", "bce", "sum"])
    q.add_argument("--opt", default="adamw", choices=["adamw", "schedulefree"])
    q.add_argument("--init", default="", help="start from a train.py meta checkpoint's weights")
    q.add_argument("--embed-init", default="orthogonal", choices=["orthogonal", "default"])


if __name__ == "__main__":
    main()
