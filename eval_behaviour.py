"""Behavioural evaluations: odd-one-out (THINGS, Levels), category and reward learning, in-context learning.

Run through evaluate.py (this module holds the tasks; evaluate.py registers them):

    python evaluate.py --task things-ooo        --features F.h5 --data DIR --out R.json   # + the behavioural fit
    python evaluate.py --task levels-ooo        --levels-features L.h5 --data DIR --out R.json
    python evaluate.py --task category-learning --features F.h5 --data DIR --out R.json
    python evaluate.py --task reward-learning   --features F.h5 --data DIR --out R.json
    python evaluate.py --task icl --ckpt META.pt --data DIR --out R.json              # model vs human curves

things-ooo scores each representation zero-shot (cosine similarity, the odd one out is the item outside the
most similar pair) against the noise ceiling of repeated triplets, then fits it as below. Each task maps the
trials' images to representations (base, SPoSE, aligned with --ckpt), fits every
representation with choice.py (a conditional logit per participant by batched Newton steps, stratified 5-fold
cross-validation, held-out per-trial NLL, group statistics) and writes, beside its JSON: <out>.trials.h5
(per-trial held-out NLL, correctness, fold; config + versions attrs) and PNG figures.
"""
import os
import time

import numpy as np
import torch

import data
from choice import (LN3, crossval_choice, entropy_ceiling, fit_odd_one_out, fit_temperature, group_statistics,
                    online_blr, online_logistic, paper_category_learner, paper_reward_learner, participant_codes,
                    repeated_responses, span_project, stratified_folds, summarise_fit, to_panels)
from data import with_threads
from representations import (aligned_representations, comparisons, cosine_similarity_matrix, fit_gains,
                             load_representations, paired_gain, print_table, put_gains, z_value)


# ================================================================================================ figures

def plot_r2_bars(panels, path, ceiling=None):
    """panels: list of (title, {name: per-participant r2 array}, {name: pooled r2}) -> one bar panel each."""
    plt = data.pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.5, 3.2), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (title, dots, pooled) in zip(axes[0], panels):
        names = list(pooled)
        ax.bar(range(len(names)), [pooled[n] for n in names], color="lightsteelblue", edgecolor="k", lw=0.6)
        for i, n in enumerate(names):
            d = np.asarray(dots[n])
            if len(d) > 400:
                d = rng.choice(d, 400, replace=False)
            ax.scatter(i + rng.uniform(-0.25, 0.25, len(d)), d, s=4, color="k", alpha=0.35, lw=0)
        c = ceiling.get(title) if isinstance(ceiling, dict) else ceiling
        if c is not None and np.isfinite(c):
            ax.axhline(c, color="firebrick", ls="--", lw=0.8, label="noise ceiling")
            ax.legend(fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(names)), names)
        ax.set(title=title, ylabel="McFadden R$^2$ (held-out)")
    return data.save_figure(fig, path, dpi=110, tight=True)


def plot_curves(curves, path, xlabel="trial", ylabel="P(correct)", title=""):
    """curves: {label: (x, y)} -> one line plot."""
    plt = data.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, (x, y) in curves.items():
        ax.plot(x, y, lw=1.2, label=label)
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return data.save_figure(fig, path, dpi=110, tight=True)


def plot_pxp(group, path):
    """Protected exceedance probabilities of every BMS comparison in a group-statistics dict."""
    plt = data.pyplot()
    items = [(k, v["bms"] if "bms" in v else v) for k, v in group.items()]
    if not items:
        return None
    fig, axes = plt.subplots(1, len(items), figsize=(2.8 * len(items) + 0.4, 3), squeeze=False)
    for ax, (k, b) in zip(axes[0], items):
        ax.bar(range(len(b["models"])), b["pxp"], color="darkseagreen", edgecolor="k", lw=0.6)
        ax.set_xticks(range(len(b["models"])), b["models"])
        ax.set(ylim=(0, 1), title=f"{k}\nBOR {b['bor']:.2g}", ylabel="protected exceedance prob.")
    return data.save_figure(fig, path, dpi=110, tight=True)


# ============================================================================================ task plumbing

def out_paths(cfg):
    """(json path, stem for side files) of a task, matching evaluate.main's default output."""
    out = cfg.get("_out") or cfg.get("out") or os.path.join("runs", "eval", f"{cfg['task']}.json")
    return out, out[:-5] if out.endswith(".json") else out


def write_trials(path, cfg, tables):
    """Per-trial results to HDF5 (atomic): tables = {group: {name: array}}; attrs config + versions."""
    import h5py
    with data.h5_create(path) as f:
        for gname, cols in tables.items():
            for k, v in cols.items():
                v = np.asarray(v)
                if v.dtype.kind in "OU":
                    f.create_dataset(f"{gname}/{k}", data=v.astype(str).astype(object),
                                     dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(f"{gname}/{k}", data=v, compression="gzip" if v.size > 100000 else None)
        data.write_h5_attrs(f, dict(config=cfg))
    return path


def image_representations(cfg, image_paths, csv_path, column):
    """Image-level representations of the images a CSV names -> ({name: (n_unique, d) float64}, row (n,) into them).

    image_paths (n,) THINGS relative paths "<concept>/<image>.jpg" (a leading "THINGS/" or "images/" and
    backslashes are tolerated), matched to rows of --features by /image_ids. base: those feature rows;
    spose: the row of the image's concept (unique_id.txt order); aligned: encode(base features) with --ckpt.
    Unknown paths raise DataError naming the file, the column, the count and the first ones."""
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    norm = lambda p: p.replace("\\", "/").split("THINGS/", 1)[-1].lstrip("/")  # noqa: E731
    paths = np.array([norm(str(p)) for p in image_paths])
    uniq, inv = np.unique(paths, return_inverse=True)
    index = {s: i for i, s in enumerate(ids)}
    rows = np.array([index.get(u, -1) for u in uniq])
    if (rows < 0).any():
        bad = uniq[rows < 0]
        raise data.DataError(f"{csv_path}: column '{column}' names {len(bad)} image(s) not in {cfg['features']} "
                             f"/image_ids, first: {bad[:3].tolist()} (expected paths like '{ids[0]}')")
    concepts = data.load_concepts(cfg["data"])
    cidx = {c: i for i, c in enumerate(concepts)}
    ccol = np.array([cidx.get(u.split("/", 1)[0], -1) for u in uniq])
    reps = {"base": X[rows].astype(np.float64)}
    if (ccol >= 0).all():
        reps["spose"] = data.load_spose(cfg["data"], n_concepts=len(concepts))[ccol].astype(np.float64)
    reps.update({k: v.astype(np.float64) for k, v in aligned_representations(cfg, X[rows]).items()})  # --ckpt
    return reps, inv.ravel()


def _standardise(R):
    """Centre and scale rows to unit mean squared norm, so one C / lambda grid fits every representation."""
    R = R - R.mean(0)
    s = np.sqrt((R ** 2).sum(1).mean())
    return R / (s if s > 0 else 1.0)


# ------------------------------------------------------------------------------------------------ things-ooo

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
    res, hits = {}, {}
    for name, R in reps.items():
        correct = hits[name] = odd_one_out(cosine_similarity_matrix(R), t["triplets"]) == t["choice"]
        acc = float(correct.mean())
        half = z * np.sqrt(acc * (1 - acc) / len(correct))  # binomial normal interval over triplets
        res[name] = dict(accuracy=acc, ci=[acc - half, acc + half], n_triplets=int(len(correct)),
                         dims=int(R.shape[1]))
    put_gains(res, "accuracy", {(a, b): paired_gain(hits[a].astype(float) - hits[b], ci=cfg["ci"], unit="triplets")
                                for a, b in comparisons(reps)})
    res["noise_ceiling"] = ceiling
    res["noise_ceiling_detail"] = dict(repeated_sets=n_sets, trials=n_rep,
                                       definition="mean share of the majority response over repeated triplets")
    rows = [(k, v["accuracy"], v["ci"]) for k, v in res.items() if isinstance(v, dict) and "accuracy" in v]
    print_table("THINGS odd-one-out (cosine similarity, zero-shot)", "accuracy", rows, ceiling)
    if cfg["behav_fit"]:  # per-participant softmax fits, CV NLL, McFadden R^2, group statistics (below)
        add_things_ooo_fit(cfg, reps, t, res)
    return res


# ------------------------------------------------------------------------------------- things-ooo (the fit)

@with_threads
def add_things_ooo_fit(cfg, reps, t, res):
    """Extend the zero-shot things-ooo result `res` with the per-participant behavioural fit (in place)."""
    _, stem = out_paths(cfg)
    per, dots, pooled, tables = {}, {}, {}, {}
    r2_ceiling = entropy_ceiling(t["triplets"], t["choice"])
    for name, R in reps.items():
        t0 = time.perf_counter()
        fit = fit_odd_one_out(cosine_similarity_matrix(R), t["triplets"], t["choice"], t["subject"],
                              n_folds=cfg["behav_folds"], l2=cfg["behav_l2"], seed=cfg["seed"])
        summary, per[name] = summarise_fit(fit["nll"], fit["correct"], fit["codes"], len(fit["labels"]), 3,
                                           fit["labels"], cfg["ci"], cfg["seed"])
        summary["r2_over_ceiling"] = summary["mcfadden_r2"] / r2_ceiling if r2_ceiling > 0 else float("nan")
        summary["skipped"] = fit["skipped"]
        summary["not_converged"] = int((~fit["converged"]).sum())
        summary["newton_iterations"] = int(fit["n_iter"])
        summary["beta_median"] = float(np.median(fit["theta"][:, :, 0]))
        summary["fit_seconds"] = round(time.perf_counter() - t0, 2)
        res[name]["fit"] = summary
        dots[name], pooled[name] = per[name]["r2"], summary["mcfadden_r2"]
        tables[name] = dict(nll=fit["nll"].astype(np.float32), correct=fit["correct"], fold=fit["fold"].astype(np.int8))
        print(f"things-ooo fit {name:<10} McFadden R^2 {summary['mcfadden_r2']:.4f} "
              f"({summary['n_participants']} participants, {summary['fit_seconds']} s)")
    tables["trials"] = dict(subject=t["subject"])
    put_gains(res, "fit.mcfadden_r2", fit_gains(per, 3, cfg["ci"]))  # paired over participants
    res["r2_noise_ceiling"] = r2_ceiling
    res["r2_noise_ceiling_definition"] = "1 - (Miller-Madow entropy of repeated-triplet responses) / ln 3"
    res["group_stats"] = group_statistics(per)
    res["files"] = _write_side_files(cfg, stem, tables, per, [("THINGS odd-one-out", dots, pooled)], res["group_stats"],
                                     r2_ceiling)
    return res


def _write_side_files(cfg, stem, tables, per, panels, group, ceiling=None, curves=None):
    """Per-trial HDF5 + per-participant tables + figures beside the JSON; returns their paths."""
    for name, p in per.items():
        tables[f"participants/{name}"] = {k: v for k, v in p.items()}
    files = dict(trials=write_trials(stem + ".trials.h5", cfg, tables),
                 r2_figure=plot_r2_bars(panels, stem + ".r2.png", ceiling))
    if group:
        files["pxp_figure"] = plot_pxp(group, stem + ".pxp.png")
    if curves:
        files["curves_figure"] = plot_curves(curves, stem + ".curves.png", title=cfg["task"])
    return files


# ------------------------------------------------------------------------------------------------ levels-ooo

def levels_representations(cfg, image_keys):
    """Levels image representations in the loader's image-key order: base (+ aligned with --ckpt).

    Features /image_ids are matched by file name (ImageNet paths like 'n01440764/n01440764_10026.JPEG'
    and bare names both work). SPoSE has no row for ImageNet images, so it is not a Levels representation."""
    path = cfg["levels_features"]
    X, ids = data.read_features(path, field=cfg["field"])
    base = [s.replace("\\", "/").rsplit("/", 1)[-1] for s in ids]
    index = {}
    for i, b in enumerate(base):
        if b in index:
            raise data.DataError(f"{path}: /image_ids has the file name {b!r} twice; Levels images are matched by name")
        index[b] = i
    rows = np.array([index.get(k, -1) for k in image_keys])
    if (rows < 0).any():
        bad = np.asarray(image_keys)[rows < 0]
        raise data.DataError(f"{os.path.join(cfg['data'], 'levels.pkl')}: {len(bad)} image(s) not in {path} "
                             f"/image_ids, first: {bad[:3].tolist()}")
    reps = {"base": X[rows]}
    reps.update(aligned_representations(cfg, X[rows]))  # aligned, aligned2, ... for each --ckpt
    return reps


@with_threads
def task_levels_ooo(cfg, reps=None):
    """Levels odd-one-out: zero-shot accuracy and the per-participant fit, overall and per triplet type."""
    trials, keys = data.load_levels(cfg["data"])
    reps = levels_representations(cfg, keys) if reps is None else reps
    kidx = {k: i for i, k in enumerate(keys)}
    trip = np.stack([trials[f"image{j}"].map(kidx).to_numpy() for j in (1, 2, 3)], 1).astype(np.int64)
    choice = trials["selected"].to_numpy(np.int64)
    ttype = trials["triplet_type"].astype(str).to_numpy()
    types = sorted(set(ttype.tolist()))
    _, stem = out_paths(cfg)
    res, per, dots, pooled, tables, hits = {}, {}, {}, {}, {}, {}
    for name, R in reps.items():
        S = cosine_similarity_matrix(R)
        zs = hits[name] = odd_one_out(S, trip) == choice
        fit = fit_odd_one_out(S, trip, choice, trials["participant"].to_numpy(), cfg["behav_folds"], cfg["behav_l2"],
                              cfg["seed"])
        summary, per[name] = summarise_fit(fit["nll"], fit["correct"], fit["codes"], len(fit["labels"]), 3,
                                           fit["labels"], cfg["ci"], cfg["seed"])
        by_type = {}
        for ty in types:
            m = (ttype == ty) & (fit["codes"] >= 0)
            by_type[ty] = dict(mcfadden_r2=float(1 - fit["nll"][m].mean() / LN3) if m.any() else float("nan"),
                               heldout_accuracy=float(fit["correct"][m].mean()) if m.any() else float("nan"),
                               accuracy=float(zs[ttype == ty].mean()), n_trials=int((ttype == ty).sum()))
        res[name] = dict(accuracy=float(zs.mean()), mcfadden_r2=summary["mcfadden_r2"],
                         fit=dict(summary, skipped=fit["skipped"], not_converged=int((~fit["converged"]).sum())),
                         by_triplet_type=by_type, dims=int(R.shape[1]))
        dots[name], pooled[name] = per[name]["r2"], summary["mcfadden_r2"]
        tables[name] = dict(nll=fit["nll"].astype(np.float32), correct=fit["correct"], fold=fit["fold"].astype(np.int8))
    tables["trials"] = dict(participant=trials["participant"].astype(str).to_numpy(), triplet_type=ttype)
    put_gains(res, "accuracy", {(a, b): paired_gain(hits[a].astype(float) - hits[b], ci=cfg["ci"], unit="trials")
                                for a, b in comparisons(reps)})
    put_gains(res, "mcfadden_r2", fit_gains(per, 3, cfg["ci"]))
    res["noise_ceiling"] = float("nan")  # Levels has no repeated triplets
    res["group_stats"] = group_statistics(per)
    res["files"] = _write_side_files(cfg, stem, tables, per, [("Levels odd-one-out", dots, pooled)], res["group_stats"])
    _print_fit_table("Levels odd-one-out", res, types)
    return res


# ------------------------------------------------------------------------------------------ category learning

def _category_columns(df):
    """(choice (N,), true_category_binary (N,)) of the category-learning table, both checked to be 0/1."""
    choice = df["choice"].to_numpy()
    ytrue = df["true_category_binary"].to_numpy()
    for col, v in (("choice", choice), ("true_category_binary", ytrue)):
        bad = ~np.isin(v, [0, 1])
        if bad.any():
            raise data.DataError(f"category_learning.csv: column '{col}' has {int(bad.sum())} values not in {{0, 1}}, "
                                 f"first {v[bad][0]!r} (row {np.flatnonzero(bad)[0] + 1})")
    return choice.astype(np.int64), ytrue.astype(np.int64)


def _reward_columns(df):
    """(choice (N,) 0 left / 1 right, rewards (N, 2) left/right) of the reward-learning table, checked."""
    choice = df["choice"].to_numpy()
    bad = ~np.isin(choice, [0, 1])
    if bad.any():
        raise data.DataError(f"reward_learning.csv: column 'choice' has {int(bad.sum())} values not in "
                             f"{{0 (left), 1 (right)}}, "
                             f"first {choice[bad][0]!r} (row {np.flatnonzero(bad)[0] + 1})")
    rew = df[["left_reward", "right_reward"]].to_numpy(np.float64)
    if not np.isfinite(rew).all():
        raise data.DataError(f"reward_learning.csv: columns 'left_reward'/'right_reward' have "
                             f"{int((~np.isfinite(rew)).sum())} "
                             f"non-numeric or missing values")
    return choice.astype(np.int64), rew


PAPER_FIT = ("--learner paper: the original study's learner and choice rule, softmax(values / T) with T fitted in "
             "sample per participant; every participant is fitted and the NLL is in-sample, not cross-validated")


def fit_paper_learner(reps, df, values_of, choice, target):
    """--learner paper, per participant and representation: values_of(R, rows) -> (values (T, 2), C or nan) for
    that participant's trials `rows` (in order); the temperature is fitted in sample (choice.fit_temperature).
    -> {name: fit dict} with the keys of fit_category_learning's (p_target: the tempered probability of `target`)."""
    from scipy.special import softmax
    labels, idx, valid = to_panels(df)
    codes = np.full(len(df), -1, np.int64)
    for p in range(len(labels)):
        codes[idx[p][valid[p]]] = p
    skipped = dict(participants=len(labels), kept=len(labels), skipped=0, skipped_single_trial=0, skipped_trials=0,
                   rule=PAPER_FIT)
    out = {}
    for name, R in reps.items():
        nll, p_target, C = np.full(len(df), np.nan), np.full(len(df), np.nan), np.full(len(df), np.nan)
        correct = np.zeros(len(df), bool)
        beta, conv = np.zeros(len(labels)), np.zeros(len(labels), bool)
        for p in range(len(labels)):
            rows = idx[p][valid[p]]
            values, C[rows] = values_of(R, rows)
            temp, nll[rows], conv[p] = fit_temperature(values, choice[rows])
            pr = softmax(values / temp, axis=1)
            correct[rows] = pr.argmax(1) == choice[rows]
            p_target[rows] = pr[np.arange(len(rows)), target[rows]]
            beta[p] = 1 / temp
        out[name] = dict(nll=nll, correct=correct, p_target=p_target, codes=codes, labels=labels, skipped=skipped,
                         fold=np.zeros(len(df), np.int64), chosen_C=C, beta=beta, converged=conv)
    return out


def paper_category_fits(reps, row, df):
    """--learner paper for category learning (choice.paper_category_learner on each participant's images)."""
    choice, ytrue = _category_columns(df)

    def values_of(R, rows):
        p1, C = paper_category_learner(R[row[rows]], ytrue[rows])
        return np.log(np.clip(np.stack([1 - p1, p1], 1), 1e-15, 1.0)), C
    return fit_paper_learner(reps, df, values_of, choice, ytrue)


def paper_reward_fits(reps, rows_lr, df):
    """--learner paper for reward learning (choice.paper_reward_learner on raw features and rewards)."""
    choice, rew = _reward_columns(df)
    best = (rew[:, 1] > rew[:, 0]).astype(np.int64)

    def values_of(R, rows):
        return paper_reward_learner(R[rows_lr[0][rows]], R[rows_lr[1][rows]], rew[rows, 0], rew[rows, 1]), np.nan
    return fit_paper_learner(reps, df, values_of, choice, best)


def fit_category_learning(reps, row, df, Cs, n_folds, l2, seed=0):
    """Online L2 logistic learner per representation -> {name: dict(nll, correct, p_correct, codes, labels, ...)}.

    reps {name: (n_unique, d)}, row (N,) each trial's row in reps, df the category-learning table. Human choice
    model: P(choose 1) = sigmoid(beta_p * learner log-odds), beta fitted per participant by CV, C chosen per
    participant on the training folds from Cs."""
    choice, ytrue = _category_columns(df)
    _, idx, valid = to_panels(df)
    codes, labels, skipped = participant_codes(df["participant"].to_numpy(), n_folds, "category learning")
    fold = np.where(codes >= 0, stratified_folds(codes, choice, n_folds, seed), -1)
    out = {}
    for name, R in reps.items():
        Rs = _standardise(np.asarray(R, np.float64))
        Z = torch.from_numpy(Rs[row[np.maximum(idx, 0)]])  # (P, T, d)
        Z = span_project(Z * torch.from_numpy(valid)[:, :, None], Z.shape[1])
        Y = torch.from_numpy(np.where(valid, ytrue[np.maximum(idx, 0)], 0))
        logits = online_logistic(Z, Y, torch.from_numpy(valid), Cs)  # (nC, P, T)
        lt = np.zeros((len(Cs), len(df)))
        lt[:, idx[valid]] = logits.numpy()[:, valid]
        Xs = []
        for c in range(len(Cs)):
            X = np.zeros((len(df), 2, 1))
            X[:, 1, 0] = lt[c]
            Xs.append(torch.from_numpy(X))
        r = crossval_choice(Xs, torch.from_numpy(choice.astype(np.int64)), torch.from_numpy(np.maximum(codes, 0)),
                            len(labels), torch.from_numpy(fold), n_folds, l2)
        nll = r["nll"].numpy()
        lp = r["logp"].numpy()
        out[name] = dict(nll=nll, correct=(lp.argmax(1) == choice) & (codes >= 0),
                         p_true=np.exp(lp[np.arange(len(df)), ytrue]), codes=codes, labels=labels, skipped=skipped,
                         fold=fold, chosen_C=np.asarray(Cs)[r["choice_idx"].numpy()], beta=r["theta"].numpy()[:, :, 0],
                         converged=r["converged"].numpy())
    return out


def _learner(cfg):
    learner = cfg.get("learner", "ours")
    if learner not in ("ours", "paper"):
        raise data.DataError(f"--learner {learner!r}: expected ours (default) or paper")
    return learner


def _trial_position(df):
    return df.groupby("participant", sort=False).cumcount().to_numpy()


def _position_curve(pos):
    """curve(v) -> (trial numbers 1..T, mean of v over participants at each trial position); participants a fit
    skipped (v nan) are left out of that position's mean."""
    T = pos.max() + 1

    def curve(v):
        return (np.arange(1, T + 1), np.bincount(pos, weights=np.nan_to_num(v), minlength=T)
                / np.bincount(pos, weights=np.isfinite(v).astype(float), minlength=T))
    return curve


@with_threads
def task_category_learning(cfg):
    """Category learning: online L2 logistic learner per representation; McFadden R^2 against ln 2."""
    df = data.load_category_learning(cfg["data"])
    csv = os.path.join(cfg["data"], "category_learning.csv")
    reps, row = image_representations(cfg, df["image"].to_numpy(), csv, "image")
    if _learner(cfg) == "paper":
        fits = paper_category_fits(reps, row, df)
        for f in fits.values():
            f["p_true"] = f["p_target"]
    else:
        fits = fit_category_learning(reps, row, df, data.parse_floats(cfg["cat_c"], "cat-c"), cfg["behav_folds"],
                                     cfg["behav_l2"], cfg["seed"])
    pos = _trial_position(df)
    human = (df["choice"].to_numpy() == df["true_category_binary"].to_numpy()).astype(np.float64)
    curve = _position_curve(pos)
    curves = {"human": curve(human)}
    return _learning_task(cfg, fits, 2, "category learning", curves, curve, lambda f: f["p_true"],
                          extra=lambda f: dict(C_median=float(np.median(f["chosen_C"])),
                                               beta_median=float(np.median(f["beta"]))),
                          human_curve=curves["human"])


def _learning_task(cfg, fits, K, title, curves, curve, model_curve_of, extra, human_curve=None):
    _, stem = out_paths(cfg)
    res, per, dots, pooled, tables = {}, {}, {}, {}, {}
    for name, f in fits.items():
        summary, per[name] = summarise_fit(f["nll"], f["correct"], f["codes"], len(f["labels"]), K, f["labels"],
                                           cfg["ci"], cfg["seed"])
        res[name] = dict(mcfadden_r2=summary["mcfadden_r2"], ci=summary["r2_ci"],
                         fit=dict(summary, skipped=f["skipped"], not_converged=int((~f["converged"]).sum()),
                                  **extra(f)))
        dots[name], pooled[name] = per[name]["r2"], summary["mcfadden_r2"]
        m = f["codes"] >= 0
        if model_curve_of is not None:
            mc = curve(np.where(m, model_curve_of(f), np.nan))
            curves[f"model ({name})"] = mc
            res[name]["learning_curve"] = [float(v) for v in mc[1]]
        tables[name] = dict(nll=f["nll"].astype(np.float32), correct=f["correct"], fold=f["fold"].astype(np.int8))
    if human_curve is not None:
        res["human_learning_curve"] = [float(v) for v in human_curve[1]]
    put_gains(res, "mcfadden_r2", fit_gains(per, K, cfg["ci"]))
    res["learner"] = PAPER_FIT if _learner(cfg) == "paper" else ("ours: online learner with its penalty chosen per "
                                                                 "participant, choice model cross-validated")
    res["group_stats"] = group_statistics(per)
    res["files"] = _write_side_files(cfg, stem, tables, per, [(title, dots, pooled)], res["group_stats"], curves=curves)
    _print_fit_table(title, res)
    return res


# -------------------------------------------------------------------------------------------- reward learning

def fit_reward_learning(reps, rows_lr, df, lams, n_folds, l2, seed=0):
    """Online Bayesian linear regression learner per representation -> {name: fit dict} (see fit_category_learning)."""
    choice, rew = _reward_columns(df)
    rew = (rew - rew.mean()) / (rew.std() if rew.std() > 0 else 1.0)
    _, idx, valid = to_panels(df)
    codes, labels, skipped = participant_codes(df["participant"].to_numpy(), n_folds, "reward learning")
    fold = np.where(codes >= 0, stratified_folds(codes, choice, n_folds, seed), -1)
    ix = np.maximum(idx, 0)
    vt = torch.from_numpy(valid)
    out = {}
    for name, R in reps.items():
        Rs = _standardise(np.asarray(R, np.float64))
        P, T = idx.shape
        Zb = torch.from_numpy(np.concatenate([Rs[rows_lr[0][ix]], Rs[rows_lr[1][ix]]], 1))
        Zb = Zb * torch.cat([vt, vt], 1)[:, :, None]
        Zb = span_project(Zb, 2 * T)  # (P, 2T, r) shared basis for the left and right images
        vals = online_blr(Zb[:, :T], Zb[:, T:], torch.from_numpy(rew[ix, 0]), torch.from_numpy(rew[ix, 1]), vt, lams)
        Xs = []
        for li in range(len(lams)):
            X = np.zeros((len(df), 2, 1))
            X[idx[valid], :, 0] = vals[li].numpy()[valid]
            Xs.append(torch.from_numpy(X))
        r = crossval_choice(Xs, torch.from_numpy(choice.astype(np.int64)), torch.from_numpy(np.maximum(codes, 0)),
                            len(labels), torch.from_numpy(fold), n_folds, l2)
        lp = r["logp"].numpy()
        best = (rew[:, 1] > rew[:, 0]).astype(np.int64)
        out[name] = dict(nll=r["nll"].numpy(), correct=(lp.argmax(1) == choice) & (codes >= 0),
                         p_best=np.exp(lp[np.arange(len(df)), best]), codes=codes, labels=labels, skipped=skipped,
                         fold=fold,
                         chosen_lambda=np.asarray(lams)[r["choice_idx"].numpy()], beta=r["theta"].numpy()[:, :, 0],
                         converged=r["converged"].numpy())
    return out


@with_threads
def task_reward_learning(cfg):
    """Reward learning: online Bayesian linear regression per representation; McFadden R^2 against ln 2."""
    df = data.load_reward_learning(cfg["data"])
    csv = os.path.join(cfg["data"], "reward_learning.csv")
    both = np.r_[df["left_image"].to_numpy(), df["right_image"].to_numpy()]
    reps, row = image_representations(cfg, both, csv, "left_image/right_image")
    n = len(df)
    if _learner(cfg) == "paper":
        fits = paper_reward_fits(reps, (row[:n], row[n:]), df)
        for f in fits.values():
            f["p_best"] = f["p_target"]
    else:
        fits = fit_reward_learning(reps, (row[:n], row[n:]), df,
                                   data.parse_floats(cfg["reward_lambda"], "reward-lambda"), cfg["behav_folds"],
                                   cfg["behav_l2"], cfg["seed"])
    pos = _trial_position(df)
    best = (df["right_reward"].to_numpy() > df["left_reward"].to_numpy()).astype(np.int64)
    human = (df["choice"].to_numpy() == best).astype(np.float64)
    curve = _position_curve(pos)
    curves = {"human": curve(human)}
    return _learning_task(cfg, fits, 2, "reward learning", curves, curve, lambda f: f["p_best"],
                          extra=lambda f: dict(beta_median=float(np.median(f["beta"])),
                                               **({} if "chosen_lambda" not in f else
                                                  dict(lambda_median=float(np.median(f["chosen_lambda"]))))),
                          human_curve=curves["human"])


# ------------------------------------------------------------------------------------------------------ icl

@torch.no_grad()
def icl_curves(model, features, fns, length, n_episodes, seed=12345, heads=None, batch=64):
    """Per-position held-out accuracy and magnitude MSE (on positives) of an in-context learner.

    Fixed episodes (models.make_episodes, seeded) -> dict(accuracy (L,), magnitude_mse (L,), n_episodes)."""
    from models import make_episodes
    correct = torch.zeros(length, dtype=torch.float64)
    se = torch.zeros(length, dtype=torch.float64)
    npos = torch.zeros(length, dtype=torch.float64)
    for s in range(0, n_episodes, batch):
        B = min(batch, n_episodes - s)
        x, y, mag, fn, _ = make_episodes(features, fns, B, length, seed + s)
        logit, m = model(x, heads[fn] if heads is not None else fn)
        correct += ((logit.float() > 0).float() == y.float()).double().sum(0)
        w = (y > 0).double()
        se += ((m.float() - mag.float()).double() ** 2 * w).sum(0)
        npos += w.sum(0)
    return dict(accuracy=(correct / n_episodes).tolist(), magnitude_mse=(se / npos.clamp_min(1)).tolist(),
                n_episodes=int(n_episodes))


@torch.no_grad()
def identifier_icl_curve(features, fns, members, length, n_episodes=256, seed=12345, noise=0.01, batch=64,
                         return_predictions=False):
    """The "memorisation" bound: a Bayes identifier over the training functions, on the episodes icl_curves scores
    (same features, fns, length, n_episodes, seed and batch -> the same episodes).

    members: scipy.sparse (F, n_rows) bool, training function f's positives among the rows of `features`. The prior
    is uniform over the F functions, the likelihood of a label P(y | f, x) = 1 - noise if y = f(x) else noise (how
    items were sampled is ignored). At position t the posterior w_f given the items before t gives
    P(y_t = 1) = sum_f w_f P(y_t = 1 | f, x_t), predicted positive when > 1/2 (ties, to rounding, negative, like a zero
    logit; t = 0: the uniform prior's vote).
    -> dict(accuracy, accuracy_by_position (L,), noise, n_functions[, predictions (n_episodes, L) P(y_t = 1)])."""
    from models import make_episodes
    if not 0 < noise < 0.5:
        raise ValueError(f"identifier label noise must be in (0, 0.5), got {noise}")
    F, L = members.shape[0], int(length)
    members = members.tocsc()
    lg, lb = np.log1p(-noise), np.log(noise)
    correct, probs = torch.zeros(L, dtype=torch.float64), []
    sub = max(1, (1 << 23) // max(1, F * L))  # episodes per pass: (F, sub, L) float64 stays <= 64 MiB
    for start in range(0, n_episodes, batch):
        B = min(batch, n_episodes - start)
        _, y, _, _, rows = make_episodes(features, fns, B, L, seed + start)
        for s0 in range(0, B, sub):
            r, yb = rows[s0:s0 + sub], y[s0:s0 + sub].bool()
            M = torch.from_numpy(members[:, r.reshape(-1).numpy()].toarray()).view(F, *r.shape)  # (F, b, L) bool
            ll = torch.where(M == yb[None], lg, lb).double()
            w = torch.softmax(ll.cumsum(2) - ll, 0)  # posterior from the items before each position
            p1 = (w * M).sum(0)
            p = (1 - noise) * p1 + noise * (1 - p1)
            correct += ((p > 0.5 + 1e-9) == yb).double().sum(0)  # ties (to rounding) go negative
            probs.append(p)
    acc = (correct / n_episodes).tolist()
    out = dict(accuracy=float(np.mean(acc)), accuracy_by_position=acc, noise=noise, n_functions=int(F))
    if return_predictions:
        out["predictions"] = torch.cat(probs)
    return out


def function_members(mc, ck, X, ids, codes_path):
    """The training functions of a checkpoint on the image rows of X -> scipy.sparse (F, n) bool: SAE functions from
    the codes of those images (latent active), neuron functions from X (above the column's median), F = the
    checkpoint's training latents in order."""
    import scipy.sparse as sp
    from models import latent_positions, read_codes
    lat = np.asarray(ck["latents"])
    if mc.get("functions", "sae") == "neurons":
        Z = X[:, lat] > np.median(X[:, lat], 0)
        return sp.csr_matrix(Z.T)
    idx, val = read_codes(codes_path, len(X), ids)
    r, c = np.nonzero(val > 0)
    j = latent_positions(lat, idx[r, c])  # lat may be unsorted (the function curriculum's order)
    ok = j >= 0
    return sp.csr_matrix((np.ones(int(ok.sum()), bool), (j[ok], r[ok])), shape=(len(lat), len(X)))


def task_icl(cfg):
    """In-context learning curves of the meta-learner on held-out functions beside the human category-learning curve,
    with two reference learners on the same episodes: online ridge on the features (no meta-learning) and a Bayes
    identifier over the training functions (memorisation)."""
    _, stem = out_paths(cfg)
    res, curves = {}, {}
    cat = os.path.join(cfg["data"], "category_learning.csv")
    if os.path.exists(cat):
        df = data.load_category_learning(cfg["data"])
        pos = _trial_position(df)
        human = (df["choice"].to_numpy() == df["true_category_binary"].to_numpy()).astype(np.float64)
        T = pos.max() + 1
        hc = np.bincount(pos, weights=human, minlength=T) / np.bincount(pos, minlength=T)
        res["human"] = dict(learning_curve=hc.tolist(), accuracy=float(human.mean()),
                            n_participants=int(df["participant"].nunique()))
        curves["human category learning"] = (np.arange(1, T + 1), hc)
    paths = [p.strip() for p in (cfg.get("ckpt") or "").split(",") if p.strip()]
    if not paths:
        raise data.DataError("--ckpt: icl needs a meta checkpoint (train.py --stage meta); none given")
    for k, path in enumerate(paths):
        name = "model" if k == 0 else f"model{k + 1}"
        res[name] = _icl_one(cfg, path)
        r = res[name]
        x = np.arange(1, r["length"] + 1)
        tag = "" if len(paths) == 1 else f" {name}"
        curves[f"{name} (held-out functions)"] = (x, np.array(r["accuracy_by_position"]))
        curves[f"online ridge{tag} (no meta-learning)"] = (x, np.array(r["ridge_bound"]["accuracy_by_position"]))
        curves[f"identifier{tag} over training functions"] = (x, np.array(r["identifier"]["accuracy_by_position"]))
        print(f"\nicl {path}: held-out accuracy {r['accuracy']:.4f} "
              f"(first position {r['accuracy_by_position'][0]:.3f}, last {r['accuracy_by_position'][-1]:.3f}); "
              f"online ridge {r['ridge_bound']['accuracy']:.4f} "
              f"(alpha {r['ridge_bound']['alpha']:g}); identifier over the {r['identifier']['n_functions']} training "
              f"functions {r['identifier']['accuracy']:.4f}"
              + ("" if r["trained_functions"] else " (the held-out functions were not trained on)"))
    res["files"] = dict(curves_figure=plot_curves(curves, stem + ".curves.png", xlabel="position / trial",
                                                  ylabel="accuracy", title="in-context learning vs humans"))
    return res


def _icl_one(cfg, path):
    """Per-position curves of one meta checkpoint on its held-out functions, and the two reference learners on the
    same episodes (see task_icl); when the held-out functions were not trained on, also all three on episodes of
    the training functions (on the same pool), where memorisation can help."""
    if not os.path.exists(path):
        raise data.DataError(f"{path} not found; expected a meta checkpoint (train.py --stage meta)")
    from models import (functions_from_codes, functions_from_neurons, latent_positions, load_meta, read_codes,
                        ridge_icl_bound)
    try:
        model, ck = load_meta(path)
    except (ValueError, RuntimeError) as e:
        raise data.DataError(f"{path}: {e}") from None
    mc = ck.get("config", {})
    feats = cfg.get("icl_features") or mc.get("eval_features") or cfg["features"]
    for key, p in (("eval_features", feats), ("eval_codes", mc.get("eval_codes"))):
        if not cfg.get("icl_features") and p and p == mc.get(key) and not os.path.exists(p):
            raise data.DataError(f"{p} not found: it is the --{key.replace('_', '-')} recorded in {path}, a path "
                                 f"relative to the folder train.py ran in (this run is in {os.getcwd()}); run from "
                                 "that folder or pass --icl-features FILE (a features file with its /sae codes)")
    X, ids = data.read_features(feats)
    held = ck.get("eval_latents")
    held = None if held is None else np.asarray(held)
    L, n_ep = int(mc.get("length", 120)), cfg["icl_episodes"]
    neurons = mc.get("functions", "sae") == "neurons"
    codes = mc.get("eval_codes") or feats
    if neurons:
        fns = functions_from_neurons(X, latents=held)
    else:
        idx, val = read_codes(codes, len(X), ids)
        fns = functions_from_codes(idx, val, L, latents=held)
    heads = None
    if mc.get("model") == "static_linear":
        heads = torch.from_numpy(latent_positions(ck["latents"], fns["latents"].numpy()))
    Xt = torch.from_numpy(X)
    r = icl_curves(model, Xt, fns, L, n_ep, heads=heads)
    out = dict(accuracy=float(np.mean(r["accuracy"])), accuracy_by_position=r["accuracy"],
               magnitude_mse_by_position=r["magnitude_mse"], n_episodes=r["n_episodes"], length=L,
               n_functions=int(len(fns["latents"])), functions=mc.get("functions", "sae"), features=feats,
               held_out=held is not None, ckpt=path)
    # the reference learners read what the model reads: the features standardised by the embedding's buffers
    shift, scale = model.embedding.in_shift[1:].double(), model.embedding.in_scale[1:].double()
    train = _training_functions(cfg, mc, ck, path)
    lat = np.asarray(ck["latents"]) if ck.get("latents") is not None else None
    trained = lat is not None and bool(np.isin(fns["latents"].numpy(), lat).all())
    out["trained_functions"] = trained
    members = function_members(mc, ck, X, ids, codes) if lat is not None else None  # the same for both calls

    def bounds(eval_fns):
        if train is not None:
            rb = ridge_icl_bound(train[0], train[1], Xt, eval_fns, L, n_ep, shift=shift, scale=scale)
            rb["alpha_selected_on"] = f"episodes of the training functions on the training pool {train[2]}"
        else:  # no training pool named: the penalty is chosen on other episodes (another seed) of these functions
            rb = ridge_icl_bound(Xt, eval_fns, Xt, eval_fns, L, n_ep, shift=shift, scale=scale)
            rb["alpha_selected_on"] = "other episodes (seed + 1,000,003) of the evaluated functions: no training pool"
        idf = None
        if lat is not None:
            idf = identifier_icl_curve(Xt, eval_fns, members, L, n_ep, noise=cfg.get("icl_noise", 0.01))
        return rb, idf

    out["ridge_bound"], out["identifier"] = bounds(fns)
    if out["identifier"] is None:
        raise data.DataError(f"{path}: no 'latents' (the training functions): the identifier bound needs them")
    if not trained:  # the memorisation bound for functions the model trained on: their episodes on this pool
        tf = functions_from_neurons(X, latents=lat) if neurons else functions_from_codes(idx, val, L, latents=lat)
        th = torch.from_numpy(latent_positions(lat, tf["latents"].numpy())) if heads is not None else None
        rt = icl_curves(model, Xt, tf, L, n_ep, heads=th)
        rb, idf = bounds(tf)
        out["on_training_functions"] = dict(accuracy=float(np.mean(rt["accuracy"])),
                                            accuracy_by_position=rt["accuracy"], n_functions=int(len(tf["latents"])),
                                            ridge_bound=rb, identifier=idf)
    return out


def _training_functions(cfg, mc, ck, path):
    """(pool features tensor, training functions on it, pool path) from the checkpoint's training pool (or --pool),
    for choosing the ridge bound's penalty on training episodes; None when no pool is named."""
    from models import functions_from_codes, functions_from_neurons, read_codes
    pool = cfg.get("pool") or mc.get("features")
    if not pool or ck.get("latents") is None:
        return None
    if not os.path.exists(pool):
        raise data.DataError(f"{path}: its training pool {pool} (config 'features') not found; the ridge bound "
                             "chooses its penalty there: pass --pool FILE")
    P, pids = data.read_features(pool)
    lat = np.asarray(ck["latents"])
    if mc.get("functions", "sae") == "neurons":
        fns = functions_from_neurons(P, latents=lat)
    else:
        idx, val = read_codes(mc.get("codes") or pool, len(P), pids)
        fns = functions_from_codes(idx, val, int(mc.get("min_nonzero", mc.get("length", 120))), latents=lat)
    return torch.from_numpy(P), fns, pool


def _print_fit_table(title, res, types=()):
    print(f"\n{title} (held-out, per-participant fits)\n{'representation':<16}{'McFadden R^2':>14}{'accuracy':>10}"
          + "".join(f"{t[:14]:>16}" for t in types))
    for name, v in res.items():
        if isinstance(v, dict) and "mcfadden_r2" in v:
            acc = v.get("accuracy", v.get("fit", {}).get("heldout_accuracy", float("nan")))
            extra = "".join(f"{v['by_triplet_type'][t]['mcfadden_r2']:>16.4f}" for t in types)
            print(f"{name:<16}{v['mcfadden_r2']:>14.4f}{acc:>10.4f}{extra}")
