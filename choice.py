"""Choice models for the behavioural evaluations, vectorised with torch; eval_behaviour.py builds the tasks on them.

Every fit is a conditional (multinomial) logit per participant: P(option k) = softmax_k(x_nk . theta_p), fitted by
batched Newton steps on all participants at once (one (n_participants, p) parameter tensor; trials are
scatter-added into per-participant gradients and p x p Hessians), with stratified 5-fold cross-validation
and held-out per-trial NLL, summarised as McFadden R^2 = 1 - NLL / ln K. Also here: the odd-one-out option
features and noise ceiling, the online learners whose trial-by-trial predictions feed the learning tasks
(L2 logistic for category learning, Bayesian linear regression for reward learning), and the group
statistics over participants (Wilcoxon signed-rank, random-effects group BMS with protected exceedance
probabilities).
"""
import functools
import math

import numpy as np
import torch

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
    theta = (torch.zeros(G, p, dtype=torch.float64) if theta0 is None
             else torch.as_tensor(theta0, dtype=torch.float64).clone())
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
    summary = dict(mcfadden_r2=float(pooled), r2_ci=[float(lo), float(hi)],
                   r2_ci_method="percentile bootstrap over participants",
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

def span_project(X, max_rank):
    """(P, T, d) -> (P, T, r) coordinates in each participant's own row span, r = min(d, rank bound).

    L2-penalised linear models are rotation invariant and their solutions lie in the span of the training
    rows, so projecting onto the span of every row the participant ever sees changes no prediction while
    shrinking d (768 for a real backbone) to at most the number of distinct trials."""
    P, T, d = X.shape
    if d <= max_rank:
        return X
    U, Sv, _ = torch.linalg.svd(X, full_matrices=False)  # (P, T, min(T, d))
    return U * Sv[:, None, :]


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


# =========================================================== the original study's learners (--learner paper)

def paper_category_learner(X, y, n_cs=10, cv=5, max_iter=200):
    """One participant's category learner as the original study ran it: C from sklearn's LogisticRegressionCV
    (L2, lbfgs, n_cs values, `cv` stratified folds; fitted on ALL the participant's trials, as the original does),
    then for every trial t the probability of class 1 from LogisticRegression(C) on the raw features of trials
    < t (0.5 until both classes were seen). With fewer than 2 trials of a class for the folds, C = 1.

    X (T, d), y (T,) 0/1 -> (p1 (T,) float64, C)."""
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    X, y = np.asarray(X, np.float64), np.asarray(y).astype(np.int64)
    folds = min(cv, int(np.bincount(y, minlength=2).min()))
    C = 1.0
    if folds >= 2:
        kw = dict(Cs=n_cs, cv=folds, max_iter=max_iter, scoring="accuracy")  # accuracy: the original's default
        try:  # scikit-learn >= 1.8 spells the plain L2 fit this way (and warns otherwise)
            cv_fit = LogisticRegressionCV(**kw, l1_ratios=(0.0,), use_legacy_attributes=False)
        except TypeError:
            cv_fit = LogisticRegressionCV(**kw)
        C = float(np.ravel(cv_fit.fit(X, y).C_)[0])
    est = LogisticRegression(C=C, max_iter=max_iter, warm_start=True)  # warm start: the same optimum, sooner
    p1 = np.full(len(y), 0.5)
    for t in range(1, len(y)):
        if y[:t].min() != y[:t].max():
            p1[t] = est.fit(X[:t], y[:t]).predict_proba(X[t:t + 1])[0, 1]
    return p1, C


def paper_reward_learner(XL, XR, RL, RR):
    """One participant's reward learner as the original study ran it: for every trial t > 0, the value of each
    option is the prediction of sklearn's BayesianRidge (defaults) fitted on the raw features and rewards of both
    options of trials < t; values at t = 0 are 0. XL, XR (T, d), RL, RR (T,) -> values (T, 2) float64."""
    from sklearn.linear_model import BayesianRidge
    XL, XR = np.asarray(XL, np.float64), np.asarray(XR, np.float64)
    values = np.zeros((len(XL), 2))
    est = BayesianRidge()
    for t in range(1, len(XL)):
        est.fit(np.concatenate([XL[:t], XR[:t]]), np.concatenate([RL[:t], RR[:t]]))
        values[t] = est.predict(np.stack([XL[t], XR[t]]))
    return values


def fit_temperature(values, choice, bounds=(-4.6, 4.6)):
    """The original study's choice rule: P(option k) = softmax_k(values / T), with T fitted IN SAMPLE to one
    participant's choices (L-BFGS-B on log T from 0 within `bounds`, probabilities clipped at 1e-15).

    values (T, K), choice (T,) -> (T, per-trial NLL (T,), converged)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax
    values, choice = np.asarray(values, np.float64), np.asarray(choice).astype(np.int64)
    rows = np.arange(len(choice))

    def nll(log_t):
        lp = log_softmax(values / np.exp(log_t[0]), axis=1)[rows, choice]
        return -np.maximum(lp, math.log(1e-15))

    r = minimize(lambda v: nll(v).mean(), x0=[0.0], method="L-BFGS-B", bounds=[bounds])
    return float(np.exp(r.x[0])), nll(r.x), bool(r.success)


def to_panels(df):
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
        return dict(statistic=float("nan"), p=float("nan"), n=int(len(d)),
                    median_difference=float(np.median(d)) if len(d) else float("nan"))
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
