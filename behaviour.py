"""Behavioural evaluations (issue 5): per-participant choice models fitted to human data, vectorised with torch.

Run through evaluate.py (this module holds the fits; evaluate.py registers the tasks):

    python evaluate.py --task things-ooo        --features F.h5 --data DIR --out R.json   # + the behavioural fit
    python evaluate.py --task levels-ooo        --levels-features L.h5 --data DIR --out R.json
    python evaluate.py --task category-learning --features F.h5 --data DIR --out R.json
    python evaluate.py --task reward-learning   --features F.h5 --data DIR --out R.json
    python evaluate.py --task icl --ckpt META.pt --data DIR --out R.json              # model vs human curves
    python evaluate.py --task all               --features F.h5 --data DIR --out runs/eval/all.json

Every fit is a conditional (multinomial) logit per participant: P(option k) = softmax_k(x_nk . theta_p), fitted by
batched Newton steps on all participants at once (one (n_participants, p) parameter tensor; trials are
scatter-added into per-participant gradients and p x p Hessians), with stratified 5-fold cross-validation
and held-out per-trial NLL. Beside each task's JSON: <out>.trials.h5 (per-trial held-out NLL, correctness,
fold; config + versions attrs) and PNG figures.
"""
import contextlib
import functools
import glob
import math
import os
import time

import numpy as np
import torch

import data

LN2, LN3 = math.log(2.0), math.log(3.0)


# =========================================================================================== cross-validation

def stratified_folds(group, strata, n_folds=5, seed=0):
    """(N,) fold 0..n_folds-1 per trial, stratified by `strata` within each group.

    Within a group the trials are ordered by stratum (random order inside a stratum) and dealt round-robin
    from a random start, so every fold gets within one trial of 1/n_folds of each stratum of each group.
    """
    group, strata = np.asarray(group), np.asarray(strata)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(group)), strata, group))
    gs = group[order]
    start = np.r_[0, np.flatnonzero(gs[1:] != gs[:-1]) + 1] if len(gs) else np.zeros(0, np.int64)
    counts = np.diff(np.r_[start, len(gs)])
    rank = np.arange(len(gs)) - np.repeat(start, counts)
    offset = np.repeat(rng.integers(n_folds, size=len(start)), counts)
    fold = np.empty(len(group), np.int64)
    fold[order] = (rank + offset) % n_folds
    return fold


# ============================================================================== batched conditional logit

def _logit_pass(theta, Xt, y, group, l2, derivs, chunk=1 << 19):
    """Penalised NLL per group (G,) [and gradient (G, p), Hessian (G, p, p)] at theta (G, p), float64.

    Xt (p, K, N) float64 option features in column layout (each feature of each option a contiguous
    N-vector, so every step below is a plain elementwise op over trials), y (N,), group (N,). Trials are
    processed in chunks and scatter-added into their group: memory O(chunk p^2), never O(N K p^2).
    """
    G, p = theta.shape
    N = Xt.shape[2]
    loss = torch.zeros(G, dtype=torch.float64)
    grad = torch.zeros(G, p, dtype=torch.float64) if derivs else None
    hess = torch.zeros(G, p * (p + 1) // 2, dtype=torch.float64) if derivs else None
    for s in range(0, N, chunk):
        Xc, yc, gc = Xt[:, :, s:s + chunk], y[s:s + chunk], group[s:s + chunk]
        tg = theta[gc].T  # (p, n)
        z = (Xc * tg[:, None, :]).sum(0) if p > 4 else sum(Xc[a] * tg[a] for a in range(p))  # (K, n) utilities
        lse = torch.logsumexp(z, 0)
        zy = z.gather(0, yc[None, :])[0]
        loss.index_add_(0, gc, lse - zy)
        if derivs:
            pr = torch.exp(z - lse)  # (K, n)
            px = [pr * Xc[a] for a in range(p)]
            e = [v.sum(0) for v in px]  # E_p[x_a]
            xy = Xc.gather(1, yc[None, None, :].expand(p, 1, -1))[:, 0]  # (p, n) features of the chosen option
            grad.index_add_(0, gc, torch.stack([e[a] - xy[a] for a in range(p)], 1))
            hess.index_add_(0, gc, torch.stack([(px[a] * Xc[b]).sum(0) - e[a] * e[b]
                                                for a in range(p) for b in range(a, p)], 1))
    loss += 0.5 * l2 * (theta ** 2).sum(1)
    if not derivs:
        return loss
    grad += l2 * theta
    H = torch.zeros(G, p, p, dtype=torch.float64)
    iu = torch.triu_indices(p, p)
    H[:, iu[0], iu[1]] = hess
    H[:, iu[1], iu[0]] = hess
    return loss, grad, H + l2 * torch.eye(p, dtype=torch.float64)


def fit_conditional_logit(X, y, group, n_groups, rows=None, l2=0.1, max_iter=100, tol=1e-14, theta0=None):
    """Per-group conditional logit by batched damped Newton: every group's fit advances in the same step.

    X (N, K, p) option features, y (N,) chosen option 0..K-1, group (N,) in [0, n_groups); rows: the trials
    to fit (default all). Minimises, per group g, sum_{n in g} -log softmax(X_n theta_g)[y_n] + l2/2 |theta_g|^2.
    Returns dict(theta (G, p) float64, loss (G,) penalised objective, nll (G,) unpenalised NLL sum,
    n_trials (G,), converged (G,) bool, n_iter). A group without trials keeps theta = 0.
    """
    X, y, group = (torch.as_tensor(a) for a in (X, y, group))
    if rows is not None:  # one contiguous float64 copy of the training trials, so passes never gather
        rows = torch.as_tensor(rows, dtype=torch.int64)
        X, y, group = X[rows], y[rows], group[rows]
    Xt = X.double().permute(2, 1, 0).contiguous()  # (p, K, N) column layout for _logit_pass
    G, p = n_groups, X.shape[2]
    n_trials = torch.bincount(group, minlength=G)
    empty = n_trials == 0
    theta = torch.zeros(G, p, dtype=torch.float64) if theta0 is None else torch.as_tensor(theta0, dtype=torch.float64).clone()
    f, g, H = _logit_pass(theta, Xt, y, group, l2, True)
    converged = empty.clone()
    it = 0
    for it in range(1, max_iter + 1):
        H[empty] = torch.eye(p, dtype=torch.float64)  # nothing to fit; keeps the batched solve regular
        H = H + 1e-12 * torch.eye(p, dtype=torch.float64)
        step = -torch.linalg.solve(H, g[:, :, None])[:, :, 0]
        step[converged] = 0.0
        dec = (g * step).sum(1)  # directional derivative, <= 0 (H is positive definite)
        converged |= -dec < tol  # Newton decrement^2 below tol: at the optimum to ~tol nats
        if converged.all():
            break
        # full Newton step first, with derivatives: when every group accepts it (the usual case) this pass
        # doubles as the next iteration's, so a Newton iteration costs one pass over the trials
        cand = theta + step
        fc, gc, Hc = _logit_pass(cand, Xt, y, group, l2, True)
        ok = fc <= f + 1e-4 * dec + 1e-12 * f.abs()
        if ok.all():
            theta, f, g, H = cand, fc, gc, Hc
            continue
        # vectorised Armijo backtracking: each group halves its own step until its objective decreases enough
        t = torch.where(ok, 1.0, 0.5).double()
        accepted = converged | ok
        new_theta, new_f = torch.where(ok[:, None], cand, theta), torch.where(ok, fc, f)
        for _ in range(40):
            cand = theta + t[:, None] * step
            fc = _logit_pass(cand, Xt, y, group, l2, False)
            ok = ~accepted & (fc <= f + 1e-4 * t * dec + 1e-12 * f.abs())
            new_theta[ok], new_f[ok] = cand[ok], fc[ok]
            accepted |= ok
            if accepted.all():
                break
            t = torch.where(accepted, t, t / 2)
        converged |= ~accepted  # no decrease even at 2^-40 of the step: at the optimum to rounding
        theta = new_theta
        f, g, H = _logit_pass(theta, Xt, y, group, l2, True)
    nll = f - 0.5 * l2 * (theta ** 2).sum(1)
    return dict(theta=theta, loss=f, nll=nll, n_trials=n_trials, converged=converged, n_iter=it)


def predict_logp(X, theta, group, rows):
    """log P(option) (n, K) of `rows` under each trial's group parameters."""
    X = torch.as_tensor(X)
    z = torch.einsum("nkp,np->nk", X[rows].double(), theta[torch.as_tensor(group)[rows]])
    return torch.log_softmax(z, 1)


def crossval_choice(Xs, y, group, n_groups, fold, n_folds, l2, select_on_train=True):
    """K-fold cross-validated conditional logit, with an optional grid of option features.

    Xs: one (N, K, p) tensor, or a list of them (one per hyperparameter value, e.g. the learner's C): each
    fold fits every grid value on the training folds and keeps, per group, the value with the lowest
    training NLL, so the held-out fold never informs either theta or the hyperparameter.
    fold (N,) in 0..n_folds-1, or -1 for trials left out of the fit.
    Returns dict(nll (N,) held-out NLL (nan where fold == -1), logp (N, K), choice_idx (F, G) chosen grid index,
    theta (F, G, p), converged (F, G), n_iter).
    """
    Xs = [torch.as_tensor(X) for X in (Xs if isinstance(Xs, (list, tuple)) else [Xs])]
    y, group, fold = torch.as_tensor(y), torch.as_tensor(group), torch.as_tensor(fold)
    N, K, p = Xs[0].shape
    nll = torch.full((N,), float("nan"), dtype=torch.float64)
    logp = torch.full((N, K), float("nan"), dtype=torch.float64)
    thetas = torch.zeros(n_folds, n_groups, p, dtype=torch.float64)
    chosen = torch.zeros(n_folds, n_groups, dtype=torch.int64)
    conv = torch.ones(n_folds, n_groups, dtype=torch.bool)
    iters = 0
    for f in range(n_folds):  # n_folds fits, each batched over every group
        train = torch.nonzero((fold != f) & (fold >= 0))[:, 0]
        test = torch.nonzero(fold == f)[:, 0]
        fits = [fit_conditional_logit(X, y, group, n_groups, rows=train, l2=l2) for X in Xs]
        train_nll = torch.stack([r["nll"] for r in fits])  # (n_grid, G)
        best = train_nll.argmin(0) if select_on_train else torch.zeros(n_groups, dtype=torch.int64)
        chosen[f] = best
        thetas[f] = torch.stack([r["theta"] for r in fits])[best, torch.arange(n_groups)]
        conv[f] = torch.stack([r["converged"] for r in fits]).all(0)
        iters = max(iters, max(r["n_iter"] for r in fits))
        gi = best[group[test]]  # grid index of each held-out trial's group
        for k, X in enumerate(Xs):
            sel = test[gi == k]
            if len(sel):
                lp = predict_logp(X, thetas[f], group, sel)
                logp[sel] = lp
                nll[sel] = -lp.gather(1, y[sel][:, None])[:, 0]
    return dict(nll=nll, logp=logp, choice_idx=chosen, theta=thetas, converged=conv, n_iter=iters)


def participant_codes(participant, min_trials, what):
    """Integer codes for participants with >= min_trials trials; -1 for the rest (skipped, counted).

    Returns (codes (N,) int64, labels (G,) of kept participants, dict of skip counts)."""
    labels, inv, counts = np.unique(np.asarray(participant), return_inverse=True, return_counts=True)
    inv = inv.ravel()
    keep = counts >= min_trials
    new = np.cumsum(keep) - 1
    codes = np.where(keep[inv], new[inv], -1)
    skipped = dict(participants=int(len(labels)), kept=int(keep.sum()), skipped=int((~keep).sum()),
                   skipped_single_trial=int((counts == 1).sum()), skipped_trials=int((~keep[inv]).sum()),
                   rule=f"{what}: participants with fewer than {min_trials} trials (one per CV fold) are not fitted")
    return codes.astype(np.int64), labels[keep], skipped


def summarise_fit(nll, correct, codes, n_groups, n_options, labels, ci=0.95, seed=0):
    """Held-out NLL -> per-participant and pooled McFadden R^2 = 1 - NLL / ln K.

    nll, correct (N,) (nan / ignored where codes == -1). Returns (summary dict for JSON, per-participant dict
    of arrays: label, n_trials, nll_mean, log_lik (sum of held-out log-likelihoods), r2, accuracy)."""
    m = codes >= 0
    c, v, ok = codes[m], np.asarray(nll)[m], np.asarray(correct)[m].astype(np.float64)
    n = np.bincount(c, minlength=n_groups).astype(np.float64)
    s = np.bincount(c, weights=v, minlength=n_groups)
    acc = np.bincount(c, weights=ok, minlength=n_groups) / np.maximum(n, 1)
    per = dict(label=np.asarray(labels), n_trials=n.astype(np.int64), nll_mean=s / np.maximum(n, 1), log_lik=-s,
               r2=1 - s / np.maximum(n, 1) / math.log(n_options), accuracy=acc)
    pooled = 1 - v.mean() / math.log(n_options) if len(v) else float("nan")
    rng = np.random.default_rng(seed)  # CI: bootstrap over participants of the trial-weighted pooled R^2
    boots = []
    for _ in range(200):
        i = rng.integers(n_groups, size=n_groups)
        boots.append(1 - s[i].sum() / max(n[i].sum(), 1) / math.log(n_options))
    lo, hi = np.quantile(boots, [(1 - ci) / 2, 1 - (1 - ci) / 2]) if n_groups else (float("nan"),) * 2
    summary = dict(mcfadden_r2=float(pooled), r2_ci=[float(lo), float(hi)], r2_ci_method="percentile bootstrap over participants",
                   heldout_nll=float(v.mean()) if len(v) else float("nan"),
                   heldout_accuracy=float(ok.mean()) if len(ok) else float("nan"),
                   participant_r2_mean=float(per["r2"].mean()) if n_groups else float("nan"),
                   participant_r2_median=float(np.median(per["r2"])) if n_groups else float("nan"),
                   n_participants=int(n_groups), n_trials=int(len(v)))
    return summary, per


# ========================================================================================= odd-one-out fits

def ooo_option_features(S, triplets):
    """(N, 3, 3) float32 option features for the odd-one-out choice model.

    Option p (the odd one out is position p) has utility beta * s_p + b_p with s_p the similarity of the
    pair without p, b_0 = 0 and two free position biases. Similarities are divided by their standard
    deviation over the data, so beta and the L2 prior have one scale for every representation.
    """
    S = np.asarray(S)
    i, j, k = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    s = np.stack([S[j, k], S[i, k], S[i, j]], 1).astype(np.float64)  # (N, 3)
    sd = s.std()
    s /= sd if sd > 0 else 1.0
    X = np.zeros((len(s), 3, 3), np.float32)
    X[:, :, 0] = s
    X[:, 1, 1] = X[:, 2, 2] = 1.0
    return torch.from_numpy(X)


def fit_odd_one_out(S, triplets, choice, participant, n_folds=5, l2=0.1, seed=0):
    """Per-participant softmax fit of odd-one-out choices with 5-fold stratified CV (strata = chosen position).

    S (n, n) similarities, triplets (N, 3) 0-based, choice (N,) 0..2, participant (N,) any labels.
    Returns dict(nll (N,), correct (N,), prob (N,) of the chosen option, fold (N,), codes (N,), labels,
    skipped, theta (F, G, 3) [beta, b_1, b_2], converged (F, G))."""
    codes, labels, skipped = participant_codes(participant, n_folds, "odd-one-out")
    fold = np.where(codes >= 0, stratified_folds(codes, choice, n_folds, seed), -1)
    X = ooo_option_features(S, triplets)
    r = crossval_choice(X, torch.from_numpy(np.array(choice, dtype=np.int64)), torch.from_numpy(np.maximum(codes, 0)),
                        len(labels), torch.as_tensor(fold), n_folds, l2)
    nll = r["nll"].numpy()
    lp = r["logp"].numpy()
    correct = (lp.argmax(1) == choice) & (codes >= 0)
    return dict(nll=nll, correct=correct, prob=np.exp(-nll), fold=fold, codes=codes, labels=labels, skipped=skipped,
                theta=r["theta"].numpy(), converged=r["converged"].numpy(), n_iter=r["n_iter"])


def repeated_responses(triplets, choice):
    """Responses to triplets answered more than once, grouped by unordered concept set -> (counts (n_sets,)
    trials per set, pairs (m, 2) [set, odd concept] over repeated sets, pair_counts (m,), n_repeated_trials);
    pairs is None when nothing repeats. Shared by the accuracy and the entropy noise ceilings."""
    keyed = np.sort(triplets, axis=1)
    odd = triplets[np.arange(len(triplets)), choice]
    _, set_idx, counts = np.unique(keyed, axis=0, return_inverse=True, return_counts=True)
    set_idx = set_idx.ravel()
    rep = counts[set_idx] > 1
    if not rep.any():
        return counts, None, None, 0
    pairs, pair_counts = np.unique(np.stack([set_idx[rep], odd[rep]], 1), axis=0, return_counts=True)
    return counts, pairs, pair_counts, int(rep.sum())


def entropy_ceiling(triplets, choice, n_options=3):
    """McFadden R^2 ceiling from repeated triplets: 1 - H / ln 3, H the mean over their trials of the
    plug-in entropy of each set's response distribution (Miller-Madow bias-corrected, since sets have few
    responses). A model that knew every set's population choice probabilities would reach it."""
    counts, pairs, pc, _ = repeated_responses(triplets, choice)
    if pairs is None:
        return float("nan")
    tot = counts[pairs[:, 0]]
    h = np.zeros(len(counts))
    np.add.at(h, pairs[:, 0], -(pc / tot) * np.log(pc / tot))
    k = np.bincount(pairs[:, 0], minlength=len(counts))
    h += (k - 1) / (2 * counts)  # Miller-Madow
    rs = np.nonzero(counts > 1)[0]
    H = float(np.sum(h[rs] * counts[rs]) / counts[rs].sum())  # trial-weighted, like the model's mean NLL
    return 1 - H / math.log(n_options)


# ================================================================================ online learners (category / reward)

def _span_project(X, max_rank):
    """(P, T, d) -> (P, T, r) coordinates in each participant's own row span, r = min(d, rank bound).

    L2-penalised linear models are rotation invariant and their solutions lie in the span of the training
    rows, so projecting onto the span of every row the participant ever sees changes no prediction while
    shrinking d (768 for a real backbone) to at most the number of distinct trials."""
    P, T, d = X.shape
    if d <= max_rank:
        return X
    U, Sv, _ = torch.linalg.svd(X, full_matrices=False)  # (P, T, min(T, d))
    return U * Sv[:, None, :]


@contextlib.contextmanager
def torch_threads(n):
    """Temporarily run torch with n threads (n <= 0: leave as is). The fits are long chains of elementwise ops;
    on the shared 2-core machines one thread is fastest (measured 327 s with 2 contended threads vs ~60 s with
    one for the 4.7M-triplet fit), on a free many-core node more threads help: --behav-threads."""
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def with_behav_threads(fn):
    """Decorator: run fn(cfg, ...) with cfg["behav_threads"] torch threads (see torch_threads)."""
    @functools.wraps(fn)
    def wrapped(cfg, *args, **kwargs):
        with torch_threads(cfg.get("behav_threads", 1)):
            return fn(cfg, *args, **kwargs)
    return wrapped


def _single_thread(fn):
    """Run fn with one torch thread: the online learners issue thousands of small batched ops (B x r x r),
    where thread start-up and, on a shared machine, oversubscription cost more than the parallelism gains
    (measured 12x slower with 2 threads under load)."""
    @functools.wraps(fn)
    def wrapper(*a, **k):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*a, **k)
        finally:
            torch.set_num_threads(n)
    return wrapper


@_single_thread
def online_logistic(Z, y, valid, Cs, max_iter=50, tol=1e-9):
    """Online L2 logistic learner: for every trial t, the log-odds of class 1 from a fit on trials < t.

    Z (P, T, r) float64 trial features in presentation order, y (P, T) true class 0/1, valid (P, T) bool
    (padding), Cs (nC,) inverse regularisation. Each refit minimises C * sum logloss + |w|^2 / 2 with an
    unpenalised intercept (sklearn's LogisticRegression objective), warm-started from the previous trial's
    solution with batched Newton steps over (nC x P) problems. Until both classes were seen: log-odds 0 (p = 0.5).
    Returns logits (nC, P, T) float64.
    """
    P, T, r = Z.shape
    nC = len(Cs)
    Xa = torch.cat([Z, torch.ones(P, T, 1, dtype=Z.dtype)], 2).repeat(nC, 1, 1)  # (B, T, r+1), bias last
    yb, vb = y.double().repeat(nC, 1), valid.double().repeat(nC, 1)
    C = torch.as_tensor(Cs, dtype=torch.float64).repeat_interleave(P)  # (B,)
    B = nC * P
    pen = torch.ones(r + 1, dtype=torch.float64)
    pen[-1] = 0.0  # the intercept is not penalised
    w = torch.zeros(B, r + 1, dtype=torch.float64)
    out = torch.zeros(B, T, dtype=torch.float64)
    n1 = torch.zeros(B, dtype=torch.float64)
    n0 = torch.zeros(B, dtype=torch.float64)

    def objective(w, Xt, yt, mt, C):
        z = torch.einsum("btr,br->bt", Xt, w)
        ll = torch.nn.functional.softplus(z) - yt * z
        return C * (ll * mt).sum(1) + 0.5 * (pen * w * w).sum(1)

    for t in range(T):
        both = (n1 > 0) & (n0 > 0)
        out[:, t] = torch.where(both, (Xa[:, t] * w).sum(1), torch.zeros(B, dtype=torch.float64))
        n1 += vb[:, t] * yb[:, t]
        n0 += vb[:, t] * (1 - yb[:, t])
        active = (n1 > 0) & (n0 > 0)
        if not active.any() or t == T - 1:
            continue
        Xt, yt, mt = Xa[:, :t + 1], yb[:, :t + 1], vb[:, :t + 1]
        f = objective(w, Xt, yt, mt, C)
        todo = torch.nonzero(active)[:, 0]  # only problems still moving are touched (large C converges slowest)
        for _ in range(max_iter):
            Xa_, ya_, ma_, Ca_, wa = Xt[todo], yt[todo], mt[todo], C[todo], w[todo]
            z = torch.einsum("btr,br->bt", Xa_, wa)
            pr = torch.sigmoid(z)
            g = Ca_[:, None] * torch.einsum("bt,btr->br", (pr - ya_) * ma_, Xa_) + pen * wa
            wt = Ca_[:, None] * pr * (1 - pr) * ma_
            H = torch.einsum("btr,bts->brs", Xa_ * wt[:, :, None], Xa_) + torch.diag(pen + 1e-10)
            step = -torch.cholesky_solve(g[:, :, None], torch.linalg.cholesky(H))[:, :, 0]
            dec = (g * step).sum(1)
            moving = -dec >= tol
            todo, step, dec, Xa_, ya_, ma_, Ca_, wa = (v[moving] for v in (todo, step, dec, Xa_, ya_, ma_, Ca_, wa))
            if len(todo) == 0:
                break
            fa = f[todo]
            s = torch.ones(len(todo), dtype=torch.float64)
            acc = torch.zeros(len(todo), dtype=torch.bool)
            for _ in range(30):  # Armijo backtracking per problem
                cand = wa + s[:, None] * step
                fc = objective(cand, Xa_, ya_, ma_, Ca_)
                ok = ~acc & (fc <= fa + 1e-4 * s * dec + 1e-12 * fa.abs())
                w[todo[ok]], f[todo[ok]] = cand[ok], fc[ok]
                acc |= ok
                if acc.all():
                    break
                s = torch.where(acc, s, s / 2)
            todo = todo[acc]  # no decrease even at 2^-30 of the step: at the optimum to rounding
    return out.view(nC, P, T)


@_single_thread
def online_blr(ZL, ZR, RL, RR, valid, lams):
    """Online Bayesian linear regression of rewards on option features (prior w ~ N(0, I / lam), unit noise).

    ZL, ZR (P, T, r) float64 features of the left/right option (a bias column is appended), RL, RR (P, T)
    rewards (both observed after each trial), valid (P, T) bool, lams (nL,) prior precisions. The value of
    an option at trial t is its posterior-mean reward given trials < t (the ridge prediction with penalty
    lam); the posterior is updated by Sherman-Morrison rank-1 steps, batched over (nL x P) learners.
    Returns values (nL, P, T, 2) float64.
    """
    P, T, r = ZL.shape
    nL = len(lams)
    one = torch.ones(P, T, 1, dtype=torch.float64)
    XL = torch.cat([ZL, one], 2).repeat(nL, 1, 1)
    XR = torch.cat([ZR, one], 2).repeat(nL, 1, 1)
    RLb, RRb, vb = RL.double().repeat(nL, 1), RR.double().repeat(nL, 1), valid.double().repeat(nL, 1)
    lam = torch.as_tensor(lams, dtype=torch.float64).repeat_interleave(P)
    B, q = nL * P, r + 1
    A = torch.eye(q, dtype=torch.float64).expand(B, q, q) / lam[:, None, None]  # posterior covariance
    A = A.clone()
    mu = torch.zeros(B, q, dtype=torch.float64)
    out = torch.zeros(B, T, 2, dtype=torch.float64)
    for t in range(T):
        out[:, t, 0] = (XL[:, t] * mu).sum(1)
        out[:, t, 1] = (XR[:, t] * mu).sum(1)
        for x, rew in ((XL[:, t], RLb[:, t]), (XR[:, t], RRb[:, t])):
            Ax = torch.einsum("bij,bj->bi", A, x)
            den = 1.0 + (x * Ax).sum(1)
            k = Ax / den[:, None] * vb[:, t:t + 1]  # padding trials leave the posterior unchanged
            mu = mu + k * (rew - (x * mu).sum(1))[:, None]
            A = A - k[:, :, None] * Ax[:, None, :]
    return out.view(nL, P, T, 2)


def _to_panels(df):
    """Long table (one row per trial, in order) -> per-participant padded panels.

    Returns (labels (P,), index (P, T) row numbers into df, -1 for padding, valid (P, T) bool)."""
    part = df["participant"].to_numpy()
    labels, inv = np.unique(part, return_inverse=True)
    inv = inv.ravel()
    order = np.argsort(inv, kind="stable")  # keep trial order inside a participant
    counts = np.bincount(inv, minlength=len(labels))
    T = int(counts.max()) if len(counts) else 0
    start = np.r_[0, np.cumsum(counts)[:-1]]
    pos = np.arange(len(order)) - np.repeat(start, counts)
    idx = np.full((len(labels), T), -1, np.int64)
    idx[inv[order], pos] = order
    return labels, idx, idx >= 0


# ======================================================================================== group statistics

def wilcoxon_pair(nll_a, nll_b):
    """Two-sided Wilcoxon signed-rank test on paired per-participant mean held-out NLL (scipy)."""
    from scipy.stats import wilcoxon
    a, b = np.asarray(nll_a, np.float64), np.asarray(nll_b, np.float64)
    d = a - b
    if len(d) < 2 or np.all(d == 0):
        return dict(statistic=float("nan"), p=float("nan"), n=int(len(d)), median_difference=float(np.median(d)) if len(d) else float("nan"))
    st = wilcoxon(a, b)
    return dict(statistic=float(st.statistic), p=float(st.pvalue), n=int(len(d)), median_difference=float(np.median(d)),
                better_a=int((d < 0).sum()), better_b=int((d > 0).sum()))


def exceedance_probability(alpha):
    """P(r_k is the largest) for r ~ Dirichlet(alpha), by one-dimensional quadrature.

    A Dirichlet draw is a normalised vector of independent Gamma(alpha_k) draws, so
    xp_k = int Gamma_pdf(x; alpha_k) prod_{j != k} Gamma_cdf(x; alpha_j) dx (exact up to quadrature error)."""
    from scipy import integrate, stats
    a = np.asarray(alpha, np.float64)
    lo = max(0.0, float(np.min(a - 40 * np.sqrt(a))) - 1)
    hi = float(np.max(a + 40 * np.sqrt(a))) + 40
    xp = []
    for k in range(len(a)):
        others = np.delete(a, k)
        fun = lambda x, k=k, o=others: math.exp(stats.gamma.logpdf(x, a[k]) + stats.gamma.logcdf(x, o).sum())  # noqa: E731
        pts = sorted(set(np.clip(np.r_[a, a - 3 * np.sqrt(a), a + 3 * np.sqrt(a)], lo, hi).tolist()))
        xp.append(integrate.quad(fun, lo, hi, points=pts, limit=500, epsabs=1e-12, epsrel=1e-10)[0])
    xp = np.clip(np.array(xp), 0, 1)
    return xp / xp.sum()


def group_bms(L, alpha0=1.0, max_iter=10000, tol=1e-10):
    """Random-effects Bayesian model selection (Stephan et al. 2009) with the Bayesian omnibus risk and
    protected exceedance probabilities (Rigoux et al. 2014).

    L (n_participants, K) log model evidences (here: summed held-out log-likelihoods). Variational Bayes
    over model frequencies r ~ Dir(alpha): g_nk proportional to exp(L_nk + psi(alpha_k) - psi(sum alpha)),
    alpha = alpha0 + sum_n g_n. F1 is the free energy of that model, F0 = sum_n log mean_k exp(L_nk) the
    exact evidence of the null (all frequencies 1/K); BOR = 1 / (1 + exp(F1 - F0)),
    pxp = (1 - BOR) xp + BOR / K.
    """
    from scipy.special import digamma, gammaln, logsumexp
    L = np.asarray(L, np.float64)
    N, K = L.shape
    a0 = np.full(K, float(alpha0))
    a = a0.copy()
    for _ in range(max_iter):
        lu = L + digamma(a) - digamma(a.sum())
        g = np.exp(lu - logsumexp(lu, 1, keepdims=True))
        a_new = a0 + g.sum(0)
        if np.max(np.abs(a_new - a)) < tol:
            a = a_new
            break
        a = a_new
    lu = L + digamma(a) - digamma(a.sum())
    g = np.exp(lu - logsumexp(lu, 1, keepdims=True))
    Elogr = digamma(a) - digamma(a.sum())
    elj = gammaln(a0.sum()) - gammaln(a0).sum() + ((a0 - 1) * Elogr).sum() + (g * (L + Elogr)).sum()
    sqr = gammaln(a.sum()) - gammaln(a).sum() + ((a - 1) * Elogr).sum()  # E_q[log q(r)]
    sqm = (g * np.log(np.where(g > 0, g, 1))).sum()  # E_q[log q(m)]
    F1 = elj - sqr - sqm
    F0 = float((logsumexp(L, 1) - math.log(K)).sum())
    bor = 1.0 / (1.0 + math.exp(min(700.0, F1 - F0)))
    xp = exceedance_probability(a)
    return dict(alpha=a.tolist(), expected_frequency=(a / a.sum()).tolist(), xp=xp.tolist(), bor=float(bor),
                pxp=((1 - bor) * xp + bor / K).tolist(), F1=float(F1), F0=F0, n_participants=int(N))


def group_statistics(per):
    """Wilcoxon and group BMS for every pair of representations (and BMS over all) -> JSON-ready dict.

    per: name -> per-participant dict (summarise_fit); participants are matched by label."""
    names = list(per)
    out = {}
    if len(names) < 2:
        return out
    common = set(per[names[0]]["label"].tolist())
    for n in names[1:]:
        common &= set(per[n]["label"].tolist())
    common = np.array(sorted(common))
    if len(common) == 0:
        return out

    def take(n, key):
        idx = {l: i for i, l in enumerate(per[n]["label"].tolist())}
        return per[n][key][[idx[c] for c in common.tolist()]]

    for i, a in enumerate(names):
        for b in names[i + 1:]:
            w = wilcoxon_pair(take(a, "nll_mean"), take(b, "nll_mean"))
            bms = group_bms(np.stack([take(a, "log_lik"), take(b, "log_lik")], 1))
            out[f"{a}_vs_{b}"] = dict(wilcoxon_nll=w, bms=dict(bms, models=[a, b]))
    if len(names) > 2:
        out["bms_all"] = dict(group_bms(np.stack([take(n, "log_lik") for n in names], 1)), models=names)
    return out


# ================================================================================================ figures

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_fig(fig, path):
    plt = _plt()
    fig.tight_layout()
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_r2_bars(panels, path, ceiling=None):
    """panels: list of (title, {name: per-participant r2 array}, {name: pooled r2}) -> one bar panel each."""
    plt = _plt()
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
    return _save_fig(fig, path)


def plot_curves(curves, path, xlabel="trial", ylabel="P(correct)", title=""):
    """curves: {label: (x, y)} -> one line plot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, (x, y) in curves.items():
        ax.plot(x, y, lw=1.2, label=label)
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return _save_fig(fig, path)


def plot_pxp(group, path):
    """Protected exceedance probabilities of every BMS comparison in a group-statistics dict."""
    plt = _plt()
    items = [(k, v["bms"] if "bms" in v else v) for k, v in group.items()]
    if not items:
        return None
    fig, axes = plt.subplots(1, len(items), figsize=(2.8 * len(items) + 0.4, 3), squeeze=False)
    for ax, (k, b) in zip(axes[0], items):
        ax.bar(range(len(b["models"])), b["pxp"], color="darkseagreen", edgecolor="k", lw=0.6)
        ax.set_xticks(range(len(b["models"])), b["models"])
        ax.set(ylim=(0, 1), title=f"{k}\nBOR {b['bor']:.2g}", ylabel="protected exceedance prob.")
    return _save_fig(fig, path)


# ============================================================================================ task plumbing

def out_paths(cfg):
    """(json path, stem for side files) of a task, matching evaluate.main's default output."""
    out = cfg.get("_out") or cfg.get("out") or os.path.join("runs", "eval", f"{cfg['task']}.json")
    return out, out[:-5] if out.endswith(".json") else out


def write_trials(path, cfg, tables):
    """Per-trial results to HDF5 (atomic): tables = {group: {name: array}}; attrs config + versions."""
    import h5py
    with data.atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for gname, cols in tables.items():
            for k, v in cols.items():
                v = np.asarray(v)
                if v.dtype.kind in "OU":
                    f.create_dataset(f"{gname}/{k}", data=v.astype(str).astype(object), dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(f"{gname}/{k}", data=v, compression="gzip" if v.size > 100000 else None)
        data.write_h5_attrs(f, dict(config=cfg))
    return path


def _floats(text, flag):
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise data.DataError(f"--{flag} {text!r}: expected comma-separated numbers") from None
    if not vals or any(v <= 0 for v in vals):
        raise data.DataError(f"--{flag} {text!r}: expected positive comma-separated numbers")
    return vals


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
    import evaluate as ev
    reps.update({k: v.astype(np.float64) for k, v in ev.aligned_representations(cfg, X[rows]).items()})  # --ckpt
    return reps, inv.ravel()


def _standardise(R):
    """Centre and scale rows to unit mean squared norm, so one C / lambda grid fits every representation."""
    R = R - R.mean(0)
    s = np.sqrt((R ** 2).sum(1).mean())
    return R / (s if s > 0 else 1.0)


# ------------------------------------------------------------------------------------- things-ooo (the fit)

@with_behav_threads
def add_things_ooo_fit(cfg, reps, t, res):
    """Extend the zero-shot things-ooo result `res` with the per-participant behavioural fit (in place)."""
    import evaluate as ev
    _, stem = out_paths(cfg)
    per, dots, pooled, tables = {}, {}, {}, {}
    r2_ceiling = entropy_ceiling(t["triplets"], t["choice"])
    for name, R in reps.items():
        t0 = time.perf_counter()
        fit = fit_odd_one_out(ev.cosine_similarity_matrix(R), t["triplets"], t["choice"], t["subject"],
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
    import evaluate as ev
    reps = {"base": X[rows]}
    reps.update(ev.aligned_representations(cfg, X[rows]))  # aligned, aligned2, ... for each --ckpt
    return reps


@with_behav_threads
def task_levels_ooo(cfg, reps=None):
    """Levels odd-one-out: zero-shot accuracy and the per-participant fit, overall and per triplet type."""
    import evaluate as ev
    trials, keys = data.load_levels(cfg["data"])
    reps = levels_representations(cfg, keys) if reps is None else reps
    kidx = {k: i for i, k in enumerate(keys)}
    trip = np.stack([trials[f"image{j}"].map(kidx).to_numpy() for j in (1, 2, 3)], 1).astype(np.int64)
    choice = trials["selected"].to_numpy(np.int64)
    ttype = trials["triplet_type"].astype(str).to_numpy()
    types = sorted(set(ttype.tolist()))
    _, stem = out_paths(cfg)
    res, per, dots, pooled, tables = {}, {}, {}, {}, {}
    for name, R in reps.items():
        S = ev.cosine_similarity_matrix(R)
        zs = ev.odd_one_out(S, trip) == choice
        fit = fit_odd_one_out(S, trip, choice, trials["participant"].to_numpy(), cfg["behav_folds"], cfg["behav_l2"], cfg["seed"])
        summary, per[name] = summarise_fit(fit["nll"], fit["correct"], fit["codes"], len(fit["labels"]), 3,
                                           fit["labels"], cfg["ci"], cfg["seed"])
        by_type = {}
        for ty in types:
            m = (ttype == ty) & (fit["codes"] >= 0)
            by_type[ty] = dict(mcfadden_r2=float(1 - fit["nll"][m].mean() / LN3) if m.any() else float("nan"),
                               heldout_accuracy=float(fit["correct"][m].mean()) if m.any() else float("nan"),
                               accuracy=float(zs[ttype == ty].mean()), n_trials=int((ttype == ty).sum()))
        res[name] = dict(accuracy=float(zs.mean()), mcfadden_r2=summary["mcfadden_r2"], fit=dict(summary, skipped=fit["skipped"],
                         not_converged=int((~fit["converged"]).sum())), by_triplet_type=by_type, dims=int(R.shape[1]))
        dots[name], pooled[name] = per[name]["r2"], summary["mcfadden_r2"]
        tables[name] = dict(nll=fit["nll"].astype(np.float32), correct=fit["correct"], fold=fit["fold"].astype(np.int8))
    tables["trials"] = dict(participant=trials["participant"].astype(str).to_numpy(), triplet_type=ttype)
    res["noise_ceiling"] = float("nan")  # Levels has no repeated triplets
    res["group_stats"] = group_statistics(per)
    res["files"] = _write_side_files(cfg, stem, tables, per, [("Levels odd-one-out", dots, pooled)], res["group_stats"])
    _print_fit_table("Levels odd-one-out", res, types)
    return res


# ------------------------------------------------------------------------------------------ category learning

def fit_category_learning(reps, row, df, Cs, n_folds, l2, seed=0):
    """Online L2 logistic learner per representation -> {name: dict(nll, correct, p_correct, codes, labels, ...)}.

    reps {name: (n_unique, d)}, row (N,) each trial's row in reps, df the category-learning table. Human choice
    model: P(choose 1) = sigmoid(beta_p * learner log-odds), beta fitted per participant by CV, C chosen per
    participant on the training folds from Cs."""
    choice = df["choice"].to_numpy()
    ytrue = df["true_category_binary"].to_numpy()
    for col, v in (("choice", choice), ("true_category_binary", ytrue)):
        bad = ~np.isin(v, [0, 1])
        if bad.any():
            raise data.DataError(f"category_learning.csv: column '{col}' has {int(bad.sum())} values not in {{0, 1}}, "
                                 f"first {v[bad][0]!r} (row {np.flatnonzero(bad)[0] + 1})")
    _, idx, valid = _to_panels(df)
    codes, labels, skipped = participant_codes(df["participant"].to_numpy(), n_folds, "category learning")
    fold = np.where(codes >= 0, stratified_folds(codes, choice, n_folds, seed), -1)
    out = {}
    for name, R in reps.items():
        Rs = _standardise(np.asarray(R, np.float64))
        Z = torch.from_numpy(Rs[row[np.maximum(idx, 0)]])  # (P, T, d)
        Z = _span_project(Z * torch.from_numpy(valid)[:, :, None], Z.shape[1])
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


def _trial_position(df):
    return df.groupby("participant", sort=False).cumcount().to_numpy()


@with_behav_threads
def task_category_learning(cfg):
    """Category learning: online L2 logistic learner per representation; McFadden R^2 against ln 2."""
    df = data.load_category_learning(cfg["data"])
    csv = os.path.join(cfg["data"], "category_learning.csv")
    reps, row = image_representations(cfg, df["image"].to_numpy(), csv, "image")
    fits = fit_category_learning(reps, row, df, _floats(cfg["cat_c"], "cat-c"), cfg["behav_folds"], cfg["behav_l2"], cfg["seed"])
    pos = _trial_position(df)
    human = (df["choice"].to_numpy() == df["true_category_binary"].to_numpy()).astype(np.float64)
    T = pos.max() + 1
    curve = lambda v: (np.arange(1, T + 1), np.bincount(pos, weights=np.nan_to_num(v), minlength=T)  # noqa: E731
                       / np.bincount(pos, weights=np.isfinite(v).astype(float), minlength=T))  # skipped participants: nan
    curves = {"human": curve(human)}
    return _learning_task(cfg, fits, 2, "category learning", curves, curve, lambda f: f["p_true"],
                          extra=lambda f: dict(C_median=float(np.median(f["chosen_C"])), beta_median=float(np.median(f["beta"]))),
                          human_curve=curves["human"])


def _learning_task(cfg, fits, K, title, curves, curve, model_curve_of, extra, human_curve=None):
    _, stem = out_paths(cfg)
    res, per, dots, pooled, tables = {}, {}, {}, {}, {}
    for name, f in fits.items():
        summary, per[name] = summarise_fit(f["nll"], f["correct"], f["codes"], len(f["labels"]), K, f["labels"],
                                           cfg["ci"], cfg["seed"])
        res[name] = dict(mcfadden_r2=summary["mcfadden_r2"], ci=summary["r2_ci"], fit=dict(summary, skipped=f["skipped"],
                         not_converged=int((~f["converged"]).sum()), **extra(f)))
        dots[name], pooled[name] = per[name]["r2"], summary["mcfadden_r2"]
        m = f["codes"] >= 0
        if model_curve_of is not None:
            mc = curve(np.where(m, model_curve_of(f), np.nan))
            curves[f"model ({name})"] = mc
            res[name]["learning_curve"] = [float(v) for v in mc[1]]
        tables[name] = dict(nll=f["nll"].astype(np.float32), correct=f["correct"], fold=f["fold"].astype(np.int8))
    if human_curve is not None:
        res["human_learning_curve"] = [float(v) for v in human_curve[1]]
    res["group_stats"] = group_statistics(per)
    res["files"] = _write_side_files(cfg, stem, tables, per, [(title, dots, pooled)], res["group_stats"], curves=curves)
    _print_fit_table(title, res)
    return res


# -------------------------------------------------------------------------------------------- reward learning

def fit_reward_learning(reps, rows_lr, df, lams, n_folds, l2, seed=0):
    """Online Bayesian linear regression learner per representation -> {name: fit dict} (see fit_category_learning)."""
    choice = df["choice"].to_numpy()
    bad = ~np.isin(choice, [0, 1])
    if bad.any():
        raise data.DataError(f"reward_learning.csv: column 'choice' has {int(bad.sum())} values not in {{0 (left), 1 (right)}}, "
                             f"first {choice[bad][0]!r} (row {np.flatnonzero(bad)[0] + 1})")
    rew = df[["left_reward", "right_reward"]].to_numpy(np.float64)
    if not np.isfinite(rew).all():
        raise data.DataError(f"reward_learning.csv: columns 'left_reward'/'right_reward' have {int((~np.isfinite(rew)).sum())} "
                             f"non-numeric or missing values")
    rew = (rew - rew.mean()) / (rew.std() if rew.std() > 0 else 1.0)
    _, idx, valid = _to_panels(df)
    codes, labels, skipped = participant_codes(df["participant"].to_numpy(), n_folds, "reward learning")
    fold = np.where(codes >= 0, stratified_folds(codes, choice, n_folds, seed), -1)
    ix = np.maximum(idx, 0)
    vt = torch.from_numpy(valid)
    out = {}
    for name, R in reps.items():
        Rs = _standardise(np.asarray(R, np.float64))
        P, T = idx.shape
        Zb = torch.from_numpy(np.concatenate([Rs[rows_lr[0][ix]], Rs[rows_lr[1][ix]]], 1)) * torch.cat([vt, vt], 1)[:, :, None]
        Zb = _span_project(Zb, 2 * T)  # (P, 2T, r) shared basis for the left and right images
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
                         p_best=np.exp(lp[np.arange(len(df)), best]), codes=codes, labels=labels, skipped=skipped, fold=fold,
                         chosen_lambda=np.asarray(lams)[r["choice_idx"].numpy()], beta=r["theta"].numpy()[:, :, 0],
                         converged=r["converged"].numpy())
    return out


@with_behav_threads
def task_reward_learning(cfg):
    """Reward learning: online Bayesian linear regression per representation; McFadden R^2 against ln 2."""
    df = data.load_reward_learning(cfg["data"])
    csv = os.path.join(cfg["data"], "reward_learning.csv")
    both = np.r_[df["left_image"].to_numpy(), df["right_image"].to_numpy()]
    reps, row = image_representations(cfg, both, csv, "left_image/right_image")
    n = len(df)
    fits = fit_reward_learning(reps, (row[:n], row[n:]), df, _floats(cfg["reward_lambda"], "reward-lambda"),
                               cfg["behav_folds"], cfg["behav_l2"], cfg["seed"])
    pos = _trial_position(df)
    best = (df["right_reward"].to_numpy() > df["left_reward"].to_numpy()).astype(np.int64)
    human = (df["choice"].to_numpy() == best).astype(np.float64)
    T = pos.max() + 1
    curve = lambda v: (np.arange(1, T + 1), np.bincount(pos, weights=np.nan_to_num(v), minlength=T)  # noqa: E731
                       / np.bincount(pos, weights=np.isfinite(v).astype(float), minlength=T))
    curves = {"human": curve(human)}
    return _learning_task(cfg, fits, 2, "reward learning", curves, curve, lambda f: f["p_best"],
                          extra=lambda f: dict(lambda_median=float(np.median(f["chosen_lambda"])), beta_median=float(np.median(f["beta"]))),
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


def task_icl(cfg):
    """In-context learning curves of the meta-learner on held-out functions beside the human category-learning curve."""
    _, stem = out_paths(cfg)
    res, curves = {}, {}
    cat = os.path.join(cfg["data"], "category_learning.csv")
    if os.path.exists(cat):
        df = data.load_category_learning(cfg["data"])
        pos = _trial_position(df)
        human = (df["choice"].to_numpy() == df["true_category_binary"].to_numpy()).astype(np.float64)
        T = pos.max() + 1
        hc = np.bincount(pos, weights=human, minlength=T) / np.bincount(pos, minlength=T)
        res["human"] = dict(learning_curve=hc.tolist(), accuracy=float(human.mean()), n_participants=int(df["participant"].nunique()))
        curves["human category learning"] = (np.arange(1, T + 1), hc)
    paths = [p.strip() for p in (cfg.get("ckpt") or "").split(",") if p.strip()]
    if not paths:
        raise data.DataError("--ckpt: icl needs a meta checkpoint (train.py --stage meta); none given")
    for k, path in enumerate(paths):
        name = "model" if k == 0 else f"model{k + 1}"
        res[name] = _icl_one(cfg, path)
        r = res[name]
        curves[f"{name} (held-out functions)"] = (np.arange(1, r["length"] + 1), np.array(r["accuracy_by_position"]))
        print(f"\nicl {path}: held-out accuracy {r['accuracy']:.4f} (first position {r['accuracy_by_position'][0]:.3f}, "
              f"last {r['accuracy_by_position'][-1]:.3f})")
    res["files"] = dict(curves_figure=plot_curves(curves, stem + ".curves.png", xlabel="position / trial",
                                                  ylabel="accuracy", title="in-context learning vs humans"))
    return res


def _icl_one(cfg, path):
    """Per-position curves of one meta checkpoint on its held-out functions (see task_icl)."""
    if not os.path.exists(path):
        raise data.DataError(f"{path} not found; expected a meta checkpoint (train.py --stage meta)")
    from models import functions_from_codes, functions_from_neurons, load_meta, read_codes
    try:
        model, ck = load_meta(path)
    except (ValueError, RuntimeError) as e:
        raise data.DataError(f"{path}: {e}") from None
    mc = ck.get("config", {})
    feats = cfg.get("icl_features") or mc.get("eval_features") or cfg["features"]
    X, ids = data.read_features(feats)
    held = ck.get("eval_latents")
    held = None if held is None else np.asarray(held)
    L = int(mc.get("length", 120))
    if mc.get("functions", "sae") == "neurons":
        fns = functions_from_neurons(X, latents=held)
    else:
        idx, val = read_codes(mc.get("eval_codes") or feats, len(X), ids)
        fns = functions_from_codes(idx, val, L, latents=held)
    heads = None
    if mc.get("model") == "static_linear":
        heads = torch.from_numpy(np.searchsorted(np.asarray(ck["latents"]), fns["latents"].numpy()))
    r = icl_curves(model, torch.from_numpy(X), fns, L, cfg["icl_episodes"], heads=heads)
    return dict(accuracy=float(np.mean(r["accuracy"])), accuracy_by_position=r["accuracy"],
                magnitude_mse_by_position=r["magnitude_mse"], n_episodes=r["n_episodes"], length=L,
                n_functions=int(len(fns["latents"])), functions=mc.get("functions", "sae"), features=feats,
                held_out=held is not None, ckpt=path)


# ------------------------------------------------------------------------------------------------------ all

PRESENT = {  # task -> files that must exist for --task all to run it
    "things-ooo": lambda c: [os.path.join(c["data"], "THINGS_triplets.csv")],
    "cka": lambda c: [os.path.join(c["data"], "unique_id.txt")],
    "levels-ooo": lambda c: [os.path.join(c["data"], "levels.pkl"), c["levels_features"]],
    "category-learning": lambda c: [os.path.join(c["data"], "category_learning.csv")],
    "reward-learning": lambda c: [os.path.join(c["data"], "reward_learning.csv")],
    "icl": lambda c: [p.strip() for p in (c.get("ckpt") or "").split(",") if p.strip()] or ["<--ckpt not given>"],
    "fmri": lambda c: [os.path.join(c["data"], "brain_data")],
    "dwarp": lambda c: [f for p in (c.get("warp_runs") or "").split(",") if p.strip() for f in sorted(glob.glob(p.strip()))]
    or ["<--warp-runs not given, or matching no file>"],
}


def task_all(cfg):
    """Run every registered task whose data is present; each writes <folder>/<task>.json; one summary table."""
    import json
    import evaluate as ev
    json_path, stem = out_paths(cfg)
    folder = os.path.dirname(os.path.abspath(json_path))
    summary, panels, rows = {}, [], []
    wanted = [t.strip() for t in cfg.get("tasks", "").split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(ev.TASKS))
    if unknown:
        raise data.DataError(f"--tasks: unknown task(s) {unknown}; expected some of {sorted(ev.TASKS)}")
    for name, fn in ev.TASKS.items():
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
        except data.DataError as e:
            summary[name] = dict(status="error", reason=str(e))
            print(f"all: {name}: error: {e}")
            continue
        r["config"], r["versions"] = sub, data.versions()
        with data.atomic_path(sub["out"]) as tmp, open(tmp, "w") as fh:
            json.dump(r, fh, indent=2, default=_json_default)
        heads = {}
        for rep, v in r.items():  # headline: the report's first matching metric, plus the behavioural fit
            if not isinstance(v, dict) or rep in ("config", "versions", "files", "group_stats"):
                continue
            metric = next((m for m in ev.REPORT_METRICS if isinstance(v.get(m), (int, float))), None)
            fit = v.get("fit") if isinstance(v.get("fit"), dict) else {}
            r2 = v.get("mcfadden_r2", fit.get("mcfadden_r2"))
            if metric is not None or r2 is not None:
                heads[rep] = dict(metric=metric, value=float(v[metric]) if metric else None,
                                  mcfadden_r2=float(r2) if r2 is not None else None)
        summary[name] = dict(status="done", file=sub["out"], headline=heads)
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
        files["r2_figure"] = plot_r2_bars(bars, stem + ".r2.png")
    return dict(tasks=summary, files=files)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _print_fit_table(title, res, types=()):
    print(f"\n{title} (held-out, per-participant fits)\n{'representation':<16}{'McFadden R^2':>14}{'accuracy':>10}"
          + "".join(f"{t[:14]:>16}" for t in types))
    for name, v in res.items():
        if isinstance(v, dict) and "mcfadden_r2" in v:
            acc = v.get("accuracy", v.get("fit", {}).get("heldout_accuracy", float("nan")))
            extra = "".join(f"{v['by_triplet_type'][t]['mcfadden_r2']:>16.4f}" for t in types)
            print(f"{name:<16}{v['mcfadden_r2']:>14.4f}{acc:>10.4f}{extra}")
