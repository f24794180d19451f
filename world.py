"""The embedded world: a synthetic THINGS/COCO/Levels/fMRI universe with a known ground truth.

    python extract.py --dataset synthetic --out data/world --size small     # seconds, used by the tests
    python extract.py --dataset synthetic --out data/world --size full      # 1,854 concepts, 26,107 images
    python extract.py --dataset synthetic --out data/control --control True # the negative-control world

    from world import make_world, factor_recovery
    paths = make_world("data/world", size="small", seed=0, n_triplets=5000)
    factor_recovery("runs/sae/world.pt", "data/world")      # SAE decoder rows vs the planted factors

Generative story (DESIGN.md "The embedded world"; README "The embedded world"):
  h        (n_concepts, k_h)  sparse non-negative factors people use: superclass prototype (shared dims) + 1..3
                              concept-specific dims. Written as the SPoSE file.
  g        (n_concepts, k_g)  sparse non-negative factors people ignore (texture-, background-like), drawn by the
                              same generator from an independent hierarchy. h and g are exchangeable in the
                              features: no unsupervised method can tell them apart, an SAE recovers both alike.
  codes    (n_images, k)      per image: the concept's h (g) with multiplicative jitter + an occasional extra dim.
  u        (n_images, n_nuisance)  dense Gaussian nuisance, part shared by the images of a concept (context), part
                              per image; its power-law spectrum starts at the h part's top eigenvalue and spreads
                              over many directions, so it overlaps h's spectrum and no few-PC step removes it.
  features (n_images, d)      w(h codes) @ D_h + s_g w(g codes) @ D_g + (u * sqrt(spectrum)) @ N + noise + offset,
                              w(x) = x ** warp (monotone, keeps zeros); D_h, D_g, N orthonormal rows.
  humans   odd-one-out and Levels choices: softmax over dot products of h / temperature; category learning: an
           exemplar model with learned attention (GCM-like); reward learning: kernel (exemplar) regression, both
           unlike the evaluations' L2-logistic and Bayesian-linear learners; fMRI voxels: linear read-outs of the
           concept's h (high-level ROIs) or of u (early ROIs), noise set from a known per-voxel noise ceiling.
  control  (control=True) the same features, bit for bit; the human space is instead a sparse non-negative code
           of each concept's dense context nuisance (thresholded random projections), unrelated to the sparse
           factors h, g that an SAE picks up. Every human file is simulated from that space.
Everything is drawn from numpy Generators seeded by `seed`, so the same seed gives identical arrays. The features
are drawn before anything human, from the main stream, so control and positive worlds share them.
Diagnostics (diagnostics=True): variance shares and every task's score of the h oracle, base and the unsupervised
controls (geometry.py) go into world_truth.h5's attrs (`diagnostics`, JSON); diagnostics_table() prints them.
"""
import json
import os
import pickle
import time

import h5py
import numpy as np
import pandas as pd

from data import atomic_path, write_features, write_h5_attrs

# sizes: every key can be overridden through make_world(**overrides) / extract.py flags
SIZES = {
    "small": dict(
        n_concepts=150,            # THINGS concepts
        k_h=24,                    # dims of the human concept space h (a concept has ~4.5 active: as sparse per
                                   # dim as the full world's 66, so an SAE can tell h from the dense nuisance)
        k_g=24,                    # sparse factors people ignore (g), generated like h
        n_super=8,                 # superclasses of h's two-level hierarchy (g has its own, as many)
        d=64,                      # backbone feature width
        n_nuisance=16,             # dense nuisance directions (spectrum: COMMON nuisance_*)
        n_images=600,              # THINGS images (uneven per concept)
        min_images=3,              # images per concept, at least
        n_coco=3000,               # unlabelled training pool ("COCO train")
        n_coco_eval=1000,          # held-out unlabelled pool for model selection ("COCO val+test")
        n_levels_concepts=40,      # concepts with Levels images
        levels_images=8,           # Levels images per concept
        n_levels_participants=10,
        levels_trials=60,          # exp trials per Levels participant
        n_triplets=20000,          # THINGS odd-one-out rows, repeats included
        n_repeat=300,              # triplets answered by several subjects (noise ceiling)
        repeat_subjects=20,        # subjects per repeated triplet
        n_subjects=200,            # THINGS triplet subjects
        n_cat_participants=20,
        cat_trials=120,
        n_reward_participants=20,
        reward_trials=80,
        reward_dims=3,             # human dims the reward function weighs (its weights: N(0, 12 / reward_dims))
        fmri_sessions=4,
        fmri_trials=100,           # trials per session (test images included)
        fmri_test=20,              # test images, shown once per session
        n_voxels=300,
        temperature=0.8,           # softmax temperature of odd-one-out choices over dot products
        diag_participants=20,      # diagnostics: category / reward learners fitted on the first this many people
    ),
    "full": dict(
        n_concepts=1854, k_h=66, k_g=66, n_super=27, d=768, n_nuisance=256, n_images=26107, min_images=12,
        n_coco=20000, n_coco_eval=5000, n_levels_concepts=200, levels_images=10, n_levels_participants=100,
        levels_trials=150, n_triplets=200000, n_repeat=1000, repeat_subjects=30, n_subjects=5000,
        n_cat_participants=100, cat_trials=120, n_reward_participants=100, reward_trials=120, reward_dims=12,
        fmri_sessions=12, fmri_trials=750, fmri_test=100, n_voxels=2000,
        temperature=0.3,  # sparser h (66 dims): random triplets share fewer dims, so choices need a sharper softmax
        # reward_dims 12: with 3 of 66 sparse dims, 62 % of image pairs carry no reward signal at all
        diag_participants=30,  # the evaluations' online learners cost ~1 min per representation per 30 people
    ),
}
# knobs shared by both sizes
COMMON = dict(
    warp=0.8,                  # w(x) = x ** warp, the backbone's monotone nonlinearity
    g_ratio=1.0,               # total variance of the g part / total variance of the h part
    nuisance_ratio=1.5,        # total nuisance variance / total variance of the h part
    nuisance_top=1.0,          # largest nuisance eigenvalue / largest eigenvalue of the h part's covariance
    nuisance_context=0.8,      # share of the nuisance shared by the images of a concept (context, background);
                               # what the negative control's people use, so more of it makes base less of a floor there
    noise_ratio=0.5,           # total isotropic noise variance / total variance of the h part
    offset_ratio=0.5,          # norm of the shared feature offset / rms norm of the h part
    levels_temperature=0.5,
    cat_sensitivity=4.0,       # category learner (exemplar model): similarity exp(-s * distance / typical distance)
    cat_gamma=2.0,             # category learner: response determinism P(1) = S1^gamma / (S1^gamma + S0^gamma)
    cat_attention=0.2,         # category learner: attention step towards the dims that separate the classes
    reward_noise=0.5,          # sd of reward noise around the linear reward function
    reward_width=0.5,          # reward learner (kernel regression): kernel width / typical distance
    reward_prior=0.3,          # reward learner: pseudo-count of the prior value 0
    reward_attention=0.2,      # reward learner: attention step towards the dims that correlate with reward
    reward_beta=3.0,           # reward learner: inverse temperature of the left/right choice
    fmri_subjects=3,
    n_backbones=3,             # extra synthetic backbones over the same images (model-similarity analyses)
    control=False,             # negative-control world: people use a code of the dense nuisance, not h
    diagnostics=True,          # score the h oracle, base and the unsupervised controls (world_truth.h5 attrs)
)
ROIS_EARLY = ["V1", "V2", "V3", "hV4"]
ROIS_HIGH = ["LOC", "FFA", "PPA", "EBA", "OFA", "STS", "RSC", "TOS"]


def config_for(size="small", seed=0, **overrides):
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    cfg = dict(SIZES[size], **COMMON, size=size, seed=seed)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown world settings {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


# ---------------------------------------------------------------------------------------------- h and images
def sample_prototypes(rng, n_super, k_h):
    """Superclass prototypes (n_super, k_h): 2-3 active dims each, every dim kept in play."""
    protos = np.zeros((n_super, k_h))
    for s in range(n_super):
        dims = rng.choice(k_h, size=rng.integers(2, 4), replace=False)
        protos[s, dims] = rng.uniform(0.8, 1.6, size=len(dims))
    return protos


def sample_concepts(rng, n, protos):
    """n concepts from the two-level generator -> (h (n, k_h) >= 0 sparse, superclass (n,))."""
    n_super, k_h = protos.shape
    sup = rng.integers(n_super, size=n)
    h = protos[sup] * rng.lognormal(0.0, 0.3, size=(n, k_h))  # shared dims, concept-specific strength
    n_own = rng.integers(1, 4, size=n)
    own = rng.random((n, k_h)).argsort(1) < n_own[:, None]     # 1..3 random own dims per concept
    h += own * rng.exponential(1.0, size=(n, k_h))
    return h * _norm_near_2(rng, h), sup


def _norm_near_2(rng, h):
    """Per-row factor holding norms near 2 (+-15 %): choices use dot products, evaluations use cosines; with
    similar norms the two rank pairs alike, so h itself scores near the noise ceiling under either."""
    return 2.0 * rng.lognormal(0.0, 0.15, size=(len(h), 1)) / np.linalg.norm(h, axis=1, keepdims=True)


def sample_codes(rng, h_of_image):
    """Per-image codes (n, k_h): concept h with multiplicative jitter + an occasional small extra dim."""
    n, k_h = h_of_image.shape
    codes = h_of_image * rng.lognormal(0.0, 0.25, size=(n, k_h))
    extra = rng.random(n) < 0.3
    codes[np.nonzero(extra)[0], rng.integers(k_h, size=int(extra.sum()))] += rng.exponential(0.3, int(extra.sum()))
    return codes


def sample_nuisance(rng, context, share):
    """Dense nuisance u (n, n_nuisance), unit variance per dim: sqrt(share) * the concept's context row
    (context (n, n_nuisance), shared by a concept's images) + sqrt(1 - share) * fresh per-image Gaussian."""
    return np.sqrt(share) * context + np.sqrt(1 - share) * rng.normal(size=context.shape)


def nuisance_spectrum(n, top, total):
    """Power-law variances top * j^-alpha, j = 1..n, with alpha >= 0 solved (bisection) so that they sum to total."""
    if total < top or total > n * top:
        raise ValueError(f"nuisance spectrum: total variance {total:.4g} must lie in [top, n * top] = "
                         f"[{top:.4g}, {n * top:.4g}]; change nuisance_ratio, nuisance_top or n_nuisance")
    j = np.arange(1, n + 1, dtype=np.float64)
    lo, hi = 0.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if top * (j ** -mid).sum() > total else (lo, mid)
    return top * j ** -((lo + hi) / 2)


def backbone(rng, hc, gc, u, W):
    """Synthetic backbone: h codes (n, k_h), g codes (n, k_g), nuisance u (n, n_nuisance) -> (n, d) float32."""
    X = (hc ** W["warp"]) @ W["D"] + W["g_scale"] * (gc ** W["warp"]) @ W["Dg"] + (u * W["nuis_sd"]) @ W["N"]
    X += W["offset"] + rng.normal(0.0, W["noise_sd"], size=X.shape)
    return X.astype(np.float32)


def write_backbones(out_dir, rng, sets, W, n_backbones, cfg):
    """Extra synthetic backbones b1..bK over the same images (same codes and nuisance u), each with its own
    random directions and nuisance weight a_k = 2^(k - K/2): a graded model-similarity structure (nearby
    a_k -> more similar geometry) that is the same on every image set. Writes features/<set>_b<k>.h5."""
    paths = {}
    d = W["D"].shape[1]
    sizes = [W["D"].shape[0], W["Dg"].shape[0], W["N"].shape[0]]
    for k in range(1, n_backbones + 1):
        Q = np.linalg.qr(rng.normal(size=(d, sum(sizes))))[0].T
        Dk, Dgk, Nk = np.split(Q, np.cumsum(sizes)[:2])
        a_k = 2.0 ** (k - (n_backbones + 1) / 2)
        for name, (ids, hc, gc, u) in sets.items():
            X = (hc ** W["warp"]) @ Dk + W["g_scale"] * (gc ** W["warp"]) @ Dgk + a_k * (u * W["nuis_sd"]) @ Nk
            X += rng.normal(0.0, W["noise_sd"], size=(len(ids), d))
            p = os.path.join(out_dir, "features", f"{name}_b{k}.h5")
            write_features(p, X.astype(np.float32), ids, attrs=dict(
                backbone=f"synthetic-b{k}", weights=f"world seed {cfg['seed']}", pooling="n/a", dataset=name,
                nuisance_weight=a_k, synthetic=True, config=cfg))
            paths[f"features/{name}_b{k}"] = p
    return paths


def control_space(rng, context, k_h, n_active):
    """Negative-control human space from the concepts' dense context nuisance: (n, n_nuisance) -> h (n, k_h).

    context: each concept's context as it enters the features (scaled by the nuisance sd per direction), so the
    code leans on the directions that dominate the feature geometry. Each dim is a random unit projection of it,
    thresholded so that on average n_active dims of a concept are positive (the positive world's sparsity), then
    rows scaled like sample_concepts. The context is Gaussian, so no feature direction carries sparse structure:
    an SAE has nothing of this code to find."""
    M = rng.normal(size=(context.shape[1], k_h))
    Z = context @ (M / np.linalg.norm(M, axis=0))  # (n, k_h) standard normal
    t = np.quantile(Z, 1 - n_active / k_h)
    h = np.maximum(Z - t, 0.0)
    empty = ~(h > 0).any(1)  # every concept keeps at least its strongest dim
    h[empty, Z[empty].argmax(1)] = 0.1
    return h * _norm_near_2(rng, h), M


def softmax_odd_one_out(rng, S, temperature):
    """S (M, 3) similarities of pairs (0,1), (0,2), (1,2) -> sampled odd-one-out position (M,) and p (M, 3)."""
    z = S / temperature
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pair = (rng.random((len(S), 1)) > p.cumsum(1)).sum(1).clip(0, 2)
    return np.array([2, 1, 0])[pair], p  # the item outside the chosen pair


def distinct_triplets(rng, n, m, taken=None):
    """(m, 3) rows of three distinct indices in [0, n), no unordered set twice nor in `taken` (k, 3).

    Unique sets keep the noise ceiling clean: only the designated repeated triplets are ever re-asked.
    Resamples only the clashing rows, so it stays vectorised.
    """
    taken = np.zeros((0, 3), np.int64) if taken is None else taken
    if m + len(taken) > n * (n - 1) * (n - 2) // 6:
        raise ValueError(f"cannot draw {m} distinct triplets of {n} concepts")
    t = rng.integers(n, size=(m, 3))
    key = lambda a: (np.sort(a, 1) * np.array([n * n, n, 1])).sum(1)  # noqa: E731
    while True:
        bad = (t[:, 0] == t[:, 1]) | (t[:, 0] == t[:, 2]) | (t[:, 1] == t[:, 2])
        k = key(np.r_[taken, t])
        first = np.zeros(len(k), bool)
        first[np.unique(k, return_index=True)[1]] = True
        bad |= ~first[len(taken):]
        if not bad.any():
            return t
        t[bad] = rng.integers(n, size=(int(bad.sum()), 3))


def pair_sims(G, t):
    """Pairwise similarities (m, 3) of rows t (m, 3) of a Gram matrix G: pairs (0,1), (0,2), (1,2)."""
    return np.stack([G[t[:, 0], t[:, 1]], G[t[:, 0], t[:, 2]], G[t[:, 1], t[:, 2]]], 1)


# ------------------------------------------------------------------------------------------ simulated learners
def typical_distance(X, metric, rng, n_pairs=20000):
    """Median distance between random pairs of rows of X: city-block mean |x - y| or squared Euclidean."""
    i, j = rng.integers(len(X), size=(2, n_pairs))
    D = X[i] - X[j]
    v = np.abs(D).mean(1) if metric == "cityblock" else (D ** 2).sum(1)
    return float(np.median(v[v > 0])) if (v > 0).any() else 1.0


def exemplar_category_learner(rng, X, y, sensitivity, gamma, attention_rate, scale):
    """Exemplar model with learned attention (GCM, Nosofsky 1986; attention as in ALCOVE, Kruschke 1992).

    X (P, T, k) what each participant sees on each trial, y (P, T) true category 0/1. Trial t: similarity to every
    stored exemplar s_i = exp(-sensitivity * sum_k a_k |x_k - x_ik| / scale) (attention a sums to 1), evidence
    S_c = sum of s_i over exemplars of class c, P(choose 1) = S1^gamma / (S1^gamma + S0^gamma) (0.5 until both
    classes were seen). After feedback, attention moves by attention_rate towards the dims' discriminability
    (m1 - m0)^2 / (pooled variance + eps) over the exemplars so far, normalised. -> choices (P, T) int64."""
    P, T, k = X.shape
    a = np.full((P, k), 1.0 / k)
    choice = np.zeros((P, T), np.int64)
    for t in range(T):
        x = X[:, t]
        if t == 0:
            p1 = np.full(P, 0.5)
        else:
            dist = (np.abs(X[:, :t] - x[:, None]) * a[:, None]).sum(2) / (scale / k)  # (P, t), a sums to 1
            s = np.exp(-sensitivity * dist)
            S1 = (s * y[:, :t]).sum(1) ** gamma
            S0 = (s * (1 - y[:, :t])).sum(1) ** gamma
            both = (y[:, :t].sum(1) > 0) & ((1 - y[:, :t]).sum(1) > 0)
            p1 = np.where(both, (S1 + 1e-300) / (S1 + S0 + 2e-300), 0.5)
        choice[:, t] = rng.random(P) < p1
        n1, n0 = y[:, :t + 1].sum(1), (1 - y[:, :t + 1]).sum(1)
        ok = (n1 > 0) & (n0 > 0)
        if ok.any():
            w1 = y[:, :t + 1, None]
            m1 = (X[:, :t + 1] * w1).sum(1) / np.maximum(n1, 1)[:, None]
            m0 = (X[:, :t + 1] * (1 - w1)).sum(1) / np.maximum(n0, 1)[:, None]
            var = (((X[:, :t + 1] - np.where(w1 > 0, m1[:, None], m0[:, None])) ** 2).sum(1) / (t + 1))
            disc = (m1 - m0) ** 2 / (var + 0.05 * X.var((0, 1)) + 1e-12)
            target = disc / np.maximum(disc.sum(1, keepdims=True), 1e-300)
            a[ok] = (1 - attention_rate) * a[ok] + attention_rate * target[ok]
    return choice


def kernel_reward_learner(rng, XL, XR, RL, RR, width, prior, beta, attention_rate, scale):
    """Kernel (exemplar) regression of rewards with learned attention (Nadaraya-Watson with a prior pseudo-count).

    The value of an option is sum_i k(x, x_i) r_i / (prior + sum_i k(x, x_i)) over every rewarded option seen
    before, k = exp(-sum_j a_j (x_j - x_ij)^2 / (2 width^2 scale / dims)) (attention a sums to 1; uniform a gives
    the plain squared distance / scale); P(right) = sigmoid(beta (V_R - V_L)); both rewards are observed after the
    choice, and attention then moves by attention_rate towards each dim's squared correlation with reward so far.
    XL, XR (P, T, k), RL, RR (P, T) -> choices (P, T) int64 (0 = left, 1 = right)."""
    P, T, k = XL.shape
    mem = np.zeros((P, 2 * T, k))
    rew = np.zeros((P, 2 * T))
    a = np.full((P, k), 1.0 / k)
    choice = np.zeros((P, T), np.int64)

    def value(x, n):
        if n == 0:
            return np.zeros(P)
        d2 = (((mem[:, :n] - x[:, None]) ** 2) * a[:, None]).sum(2) * k / scale
        w = np.exp(-d2 / (2 * width ** 2))
        return (w * rew[:, :n]).sum(1) / (prior + w.sum(1))

    for t in range(T):
        vl, vr = value(XL[:, t], 2 * t), value(XR[:, t], 2 * t)
        choice[:, t] = rng.random(P) < 1 / (1 + np.exp(-beta * (vr - vl)))
        mem[:, 2 * t], mem[:, 2 * t + 1] = XL[:, t], XR[:, t]
        rew[:, 2 * t], rew[:, 2 * t + 1] = RL[:, t], RR[:, t]
        m, r = mem[:, :2 * t + 2], rew[:, :2 * t + 2]
        xc, rc = m - m.mean(1, keepdims=True), r - r.mean(1, keepdims=True)
        cov = (xc * rc[:, :, None]).sum(1)
        corr2 = cov ** 2 / ((xc ** 2).sum(1) * (rc ** 2).sum(1)[:, None] + 1e-12)
        a = (1 - attention_rate) * a + attention_rate * corr2 / np.maximum(corr2.sum(1, keepdims=True), 1e-300)
    return choice


# ------------------------------------------------------------------------------------------------ the world
def make_world(out_dir, size="small", seed=0, verbose=True, **overrides):
    """Write the embedded world under out_dir; returns a dict name -> path of every file written."""
    t_start = time.perf_counter()
    cfg = config_for(size, seed, **overrides)
    rng = np.random.default_rng(seed)
    c = cfg
    k_h, k_g, d, n_nu = c["k_h"], c["k_g"], c["d"], c["n_nuisance"]
    if k_h + k_g + n_nu > d:
        raise ValueError(f"k_h + k_g + n_nuisance = {k_h + k_g + n_nu} must be <= d = {d}")
    feat_dir, data_dir = os.path.join(out_dir, "features"), os.path.join(out_dir, "data")
    brain_dir = os.path.join(data_dir, "brain_data")
    for p in (feat_dir, brain_dir):
        os.makedirs(p, exist_ok=True)
    paths = {}
    say = print if verbose else (lambda *a, **k: None)

    # --- concepts and THINGS images: h, g and the context nuisance of each concept
    n_c = c["n_concepts"]
    concepts = [f"c{i + 1:04d}" for i in range(n_c)]  # zero-padded so unique_id order == sorted order
    protos, protos_g = sample_prototypes(rng, c["n_super"], k_h), sample_prototypes(rng, c["n_super"], k_g)
    h, superclass = sample_concepts(rng, n_c, protos)  # (n_concepts, k_h), (n_concepts,)
    g, superclass_g = sample_concepts(rng, n_c, protos_g)  # (n_concepts, k_g), an independent hierarchy
    context = rng.normal(size=(n_c, n_nu))  # (n_concepts, n_nuisance) shared by a concept's images
    if c["n_images"] < c["min_images"] * n_c:
        raise ValueError(f"n_images={c['n_images']} < min_images * n_concepts = {c['min_images'] * n_c}")
    counts = c["min_images"] + rng.multinomial(c["n_images"] - c["min_images"] * n_c, np.ones(n_c) / n_c)
    img_concept = np.repeat(np.arange(n_c), counts)  # (n_images,) sorted by concept
    img_num = np.concatenate([np.arange(k) for k in counts]) + 1
    letters = rng.choice(list("bsn"), size=len(img_concept))
    things_ids = [f"{concepts[ci]}/{concepts[ci]}_{j:02d}{l}.jpg" for ci, j, l in zip(img_concept, img_num, letters)]
    assert things_ids == sorted(things_ids)
    things_codes, things_g = sample_codes(rng, h[img_concept]), sample_codes(rng, g[img_concept])
    things_u = sample_nuisance(rng, context[img_concept], c["nuisance_context"])

    # --- the synthetic backbone, scaled so the variance ratios hold on the THINGS images
    Q = np.linalg.qr(rng.normal(size=(d, k_h + k_g + n_nu)))[0].T  # orthonormal rows, random rotation
    D, Dg, N = Q[:k_h], Q[k_h:k_h + k_g], Q[k_h + k_g:]  # unit h, g and nuisance directions
    wh, wg = things_codes ** c["warp"], things_g ** c["warp"]
    hv = wh.var(0).sum()  # total variance of the h part
    hrms = np.sqrt((wh ** 2).sum(1).mean())
    top_h = float(np.linalg.eigvalsh(np.cov(wh.T))[-1])  # largest eigenvalue of the h part
    spectrum = nuisance_spectrum(n_nu, c["nuisance_top"] * top_h, c["nuisance_ratio"] * hv)  # (n_nuisance,)
    offset = rng.normal(size=d)
    W = dict(D=D, Dg=Dg, N=N, warp=c["warp"], g_scale=np.sqrt(c["g_ratio"] * hv / wg.var(0).sum()),
             nuis_sd=np.sqrt(spectrum), noise_sd=np.sqrt(c["noise_ratio"] * hv / d),
             offset=offset / np.linalg.norm(offset) * c["offset_ratio"] * hrms)
    things_X = backbone(rng, things_codes, things_g, things_u, W)

    # --- COCO pools: fresh concepts from the same generators, one image each; the eval pool ("val+test") is
    # drawn after the training pool, so it never shares a concept or an image with it or with THINGS / Levels
    pools = {}
    for name, n, split in (("coco", c["n_coco"], "train2017"), ("coco_eval", c["n_coco_eval"], "val2017")):
        ph, psup = sample_concepts(rng, n, protos)
        pg, _ = sample_concepts(rng, n, protos_g)
        hc, gc, u = sample_codes(rng, ph), sample_codes(rng, pg), sample_nuisance(rng, rng.normal(size=(n, n_nu)),
                                                                                 c["nuisance_context"])
        offset_id = 0 if name == "coco" else c["n_coco"]  # ids never repeat across the two pools
        ids = [f"{split}/{offset_id + i + 1:012d}.jpg" for i in range(n)]
        pools[name] = dict(ids=ids, codes=hc, g=gc, u=u, superclass=psup, X=backbone(rng, hc, gc, u, W))

    # --- Levels images: new images of a subset of concepts, ImageNet-like names
    lv_concepts = np.sort(rng.choice(n_c, size=min(c["n_levels_concepts"], n_c), replace=False))
    lv_concept = np.repeat(lv_concepts, c["levels_images"])  # (n_levels_images,)
    wnid = {ci: f"n{1440764 + 7919 * ci:08d}" for ci in lv_concepts}
    nums = rng.choice(100000, size=len(lv_concept), replace=False) + 1000
    lv_ids = np.array([f"{wnid[ci]}_{k}.JPEG" for ci, k in zip(lv_concept, nums)])
    order = np.argsort(lv_ids)  # image order = sorted unique keys
    lv_ids, lv_concept = lv_ids[order].tolist(), lv_concept[order]
    lv_codes, lv_g = sample_codes(rng, h[lv_concept]), sample_codes(rng, g[lv_concept])
    lv_u = sample_nuisance(rng, context[lv_concept], c["nuisance_context"])
    lv_X = backbone(rng, lv_codes, lv_g, lv_u, W)

    # --- the space people use: h (positive world) or a code of the context nuisance (control). Its own stream,
    # so that the features above, and every draw below, do not depend on which world this is
    hum_rng = np.random.default_rng([seed, 2000])
    if c["control"]:
        active = float((h > 0).sum(1).mean())
        hum_h, ctrl_proj = control_space(hum_rng, context * W["nuis_sd"], k_h, active)
        hum_things, hum_lv = sample_codes(hum_rng, hum_h[img_concept]), sample_codes(hum_rng, hum_h[lv_concept])
    else:
        hum_h, hum_things, hum_lv, ctrl_proj = h, things_codes, lv_codes, None

    # --- concepts and SPoSE
    paths["unique_id"] = os.path.join(data_dir, "unique_id.txt")
    with atomic_path(paths["unique_id"]) as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(concepts) + "\n")
    paths["spose"] = os.path.join(data_dir, "spose_embedding_66d_sorted.txt")
    with atomic_path(paths["spose"]) as tmp:
        np.savetxt(tmp, hum_h, fmt="%.6f", delimiter=" ")

    # --- THINGS odd-one-out: random triplets + repeated ones answered by several subjects
    G = hum_h @ hum_h.T  # (n_concepts, n_concepts) dot-product similarities that humans use
    n_rep_rows = c["n_repeat"] * c["repeat_subjects"]
    n_single = c["n_triplets"] - n_rep_rows
    if n_single < 0 or c["repeat_subjects"] > c["n_subjects"]:
        raise ValueError("n_triplets must exceed n_repeat * repeat_subjects, and n_subjects >= repeat_subjects")
    rep = distinct_triplets(rng, n_c, c["n_repeat"])
    t_rep = np.repeat(rep, c["repeat_subjects"], 0)
    t_rep = np.take_along_axis(t_rep, rng.random(t_rep.shape).argsort(1), 1)  # new presentation order per repeat
    s_rep = rng.random((c["n_repeat"], c["n_subjects"])).argsort(1)[:, :c["repeat_subjects"]].ravel()
    t_all = np.concatenate([distinct_triplets(rng, n_c, n_single, taken=rep), t_rep])
    s_all = np.concatenate([rng.integers(c["n_subjects"], size=n_single), s_rep])
    odd, _ = softmax_odd_one_out(rng, pair_sims(G, t_all), c["temperature"])
    perm = rng.permutation(len(t_all))
    trip = pd.DataFrame(dict(image1=t_all[perm, 0] + 1, image2=t_all[perm, 1] + 1, image3=t_all[perm, 2] + 1,
                             choice=odd[perm] + 1, RT=rng.integers(800, 6000, size=len(perm)),
                             subject_id=s_all[perm] + 1))
    paths["triplets"] = os.path.join(data_dir, "THINGS_triplets.csv")
    with atomic_path(paths["triplets"]) as tmp:
        trip.to_csv(tmp, sep="\t", index=False)

    # --- Levels: within_class (one concept), class_border (2 + 1 of a sibling), between_class (3 concepts)
    by_concept = {ci: np.nonzero(lv_concept == ci)[0] for ci in lv_concepts}
    sup_of = superclass[lv_concepts]
    types = ["within_class", "between_class", "class_border"]
    lv_rows, n_lv = [], c["n_levels_participants"] * c["levels_trials"]
    tt = np.array(types)[rng.integers(3, size=n_lv)]
    for ty in tt:  # a few thousand trials at most: a plain loop reads clearest
        a = rng.choice(lv_concepts)
        if ty == "within_class":
            lv_rows.append(rng.choice(by_concept[a], 3, replace=False))
            continue
        sib = lv_concepts[(sup_of == superclass[a]) & (lv_concepts != a)]
        if ty == "class_border":
            b = rng.choice(sib) if len(sib) else rng.choice(lv_concepts[lv_concepts != a])
            row = np.r_[rng.choice(by_concept[a], 2, replace=False), rng.choice(by_concept[b])]
        else:
            b, e = rng.choice(lv_concepts[lv_concepts != a], 2, replace=False)
            row = np.r_[rng.choice(by_concept[a]), rng.choice(by_concept[b]), rng.choice(by_concept[e])]
        lv_rows.append(rng.permutation(row))
    lv_t = np.array(lv_rows)  # (n_lv, 3) Levels image indices
    # keep only images some trial shows: levels.h5 rows must equal the loader's sorted unique image keys
    used = np.unique(lv_t)
    lv_t = np.searchsorted(used, lv_t)
    lv_ids = [lv_ids[i] for i in used]
    lv_concept, lv_codes, lv_g, lv_u, lv_X, hum_lv = (a[used] for a in (lv_concept, lv_codes, lv_g, lv_u, lv_X, hum_lv))
    lv_odd, _ = softmax_odd_one_out(rng, pair_sims(hum_lv @ hum_lv.T, lv_t), c["levels_temperature"])
    levels = {}
    for i in range(n_lv):
        p = f"P{i // c['levels_trials'] + 1:03d}"
        trial = dict(image1Path=lv_ids[lv_t[i, 0]], image2Path=lv_ids[lv_t[i, 1]], image3Path=lv_ids[lv_t[i, 2]],
                     selected_image=lv_ids[lv_t[i, lv_odd[i]]], triplet_type=str(tt[i]),
                     exp_trial_type="exp_trial", rt=int(rng.integers(500, 4000)))
        levels.setdefault(p, []).append(trial)
    for p in levels:  # catch trials: the loader must drop them (their "selected" is not one of the images)
        for _ in range(3):
            j = rng.choice(len(lv_ids), 3, replace=False)
            levels[p].insert(int(rng.integers(len(levels[p]))),
                             dict(image1Path=lv_ids[j[0]], image2Path=lv_ids[j[1]], image3Path=lv_ids[j[2]],
                                  selected_image="catch.JPEG", triplet_type="catch", exp_trial_type="catch_trial",
                                  rt=int(rng.integers(500, 4000))))
    paths["levels"] = os.path.join(data_dir, "levels.pkl")
    with atomic_path(paths["levels"]) as tmp, open(tmp, "wb") as fh:
        pickle.dump(levels, fh)

    attrs = dict(backbone="synthetic", weights=f"world seed {seed}", pooling="none", synthetic=True, config=cfg)
    sets = [("things", things_X, things_ids), ("levels", lv_X, lv_ids)]
    sets += [(name, pl["X"], pl["ids"]) for name, pl in pools.items()]
    for name, X, ids in sets:
        paths[f"features/{name}"] = write_features(os.path.join(feat_dir, f"{name}.h5"), X, ids,
                                                   attrs=dict(attrs, image_root=name))

    # --- category learning: category = one human dim above its median over THINGS images, balanced sampling;
    # the simulated people are exemplar learners with learned attention (not the evaluation's logistic learner)
    n_p, T = c["n_cat_participants"], c["cat_trials"]
    med = np.median(hum_things, 0)
    above = hum_things > med  # (n_images, k_h)
    ok = np.nonzero((above.sum(0) >= T // 2) & ((~above).sum(0) >= T - T // 2))[0]
    if not len(ok):
        raise ValueError(f"no h dim has {T // 2} THINGS images above and below its median; lower cat_trials")
    cat_dim = rng.choice(ok, size=n_p)
    cat_img = np.stack([rng.permutation(np.r_[rng.choice(np.nonzero(above[:, j])[0], T // 2, replace=False),
                                              rng.choice(np.nonzero(~above[:, j])[0], T - T // 2, replace=False)])
                        for j in cat_dim])  # (n_p, T)
    y = above[cat_img, cat_dim[:, None]].astype(np.int64)  # (n_p, T) true category
    cat_scale = typical_distance(hum_things, "cityblock", rng) * k_h
    cat_choice = exemplar_category_learner(rng, hum_things[cat_img], y, c["cat_sensitivity"], c["cat_gamma"],
                                           c["cat_attention"], cat_scale)
    things_arr = np.array(things_ids)
    cat = pd.DataFrame(dict(participant=np.repeat(np.arange(n_p) + 1, T), trial=np.tile(np.arange(T) + 1, n_p),
                            image=things_arr[cat_img.ravel()], dimension=np.repeat(cat_dim, T),
                            choice=cat_choice.ravel(), true_category_binary=y.ravel(),
                            correct=(cat_choice == y).ravel().astype(np.int64)))
    paths["category_learning"] = os.path.join(data_dir, "category_learning.csv")
    with atomic_path(paths["category_learning"]) as tmp:
        cat.to_csv(tmp, index=False)

    # --- reward learning: reward = human codes @ sparse weights + noise; a kernel-regression learner with learned
    # attention that sees both rewards after each choice (choice coding: 0 = left, 1 = right)
    n_p, T = c["n_reward_participants"], c["reward_trials"]
    rw, nd = np.zeros((n_p, k_h)), c["reward_dims"]
    for i in range(n_p):
        j = rng.choice(k_h, nd, replace=False)
        rw[i, j] = rng.normal(0, np.sqrt(12 / nd), nd)
    pair = np.stack([rng.choice(len(things_ids), 2, replace=False) for _ in range(n_p * T)]).reshape(n_p, T, 2)
    Xp = hum_things[pair]  # (n_p, T, 2, k_h)
    R = np.einsum("ptsk,pk->pts", Xp, rw) + rng.normal(0, c["reward_noise"], (n_p, T, 2))
    rchoice = kernel_reward_learner(rng, Xp[:, :, 0], Xp[:, :, 1], R[:, :, 0], R[:, :, 1], c["reward_width"],
                                    c["reward_prior"], c["reward_beta"], c["reward_attention"],
                                    typical_distance(hum_things, "sq", rng))
    rew = pd.DataFrame(dict(participant=np.repeat(np.arange(n_p) + 1, T), trial=np.tile(np.arange(T) + 1, n_p),
                            left_image=things_arr[pair[:, :, 0].ravel()], right_image=things_arr[pair[:, :, 1].ravel()],
                            left_reward=R[:, :, 0].ravel().round(4), right_reward=R[:, :, 1].ravel().round(4),
                            choice=rchoice.ravel()))
    paths["reward_learning"] = os.path.join(data_dir, "reward_learning.csv")
    with atomic_path(paths["reward_learning"]) as tmp:
        rew.to_csv(tmp, index=False)

    # --- THINGS-fMRI: test images repeated once per session, the rest unique train images
    n_ses, n_tr, n_test = c["fmri_sessions"], c["fmri_trials"], c["fmri_test"]
    n_train = n_ses * (n_tr - n_test)
    if n_test + n_train > len(things_ids):
        raise ValueError(f"fMRI needs {n_test + n_train} distinct THINGS images, the world has {len(things_ids)}")
    pick = rng.choice(len(things_ids), n_test + n_train, replace=False)
    test_img, train_img = pick[:n_test], pick[n_test:]
    # what voxels read out (n_images, k_h + n_nuisance): high-level ROIs the human representation of the image's
    # concept, early ROIs the nuisance part of the image (which the backbone carries and h lacks)
    Z = np.c_[hum_h[img_concept], things_u]
    rois = ROIS_EARLY + ROIS_HIGH
    truth_fmri = {}
    for sub in range(1, c["fmri_subjects"] + 1):
        tag = f"sub-{sub:02d}"
        tr_perm = rng.permutation(train_img).reshape(n_ses, -1)
        sess_img = np.concatenate([rng.permutation(np.r_[test_img, tr_perm[s]]) for s in range(n_ses)])  # (n_trials,)
        session = np.repeat(np.arange(n_ses) + 1, n_tr)
        nv = c["n_voxels"]
        roi = rng.choice(len(rois) + 1, size=nv, p=np.r_[np.full(4, 0.4 / 4), np.full(8, 0.4 / 8), 0.2])
        Wv = np.zeros((nv, k_h + n_nu))
        for v in range(nv):
            if roi[v] < 4:  # early ROIs: dense read-out of the nuisance / low-level part
                Wv[v, k_h:] = rng.normal(size=n_nu)
            elif roi[v] < len(rois):  # high-level ROIs: sparse read-out of the concept's h
                Wv[v, rng.choice(k_h, 3, replace=False)] = rng.gamma(2.0, 0.5, 3)
            else:  # outside every ROI: a weak mix of both
                Wv[v] = rng.normal(size=k_h + n_nu) * 0.5
        sig = Z[sess_img] @ Wv.T  # (n_trials, n_voxels)
        sd = sig.std(0)
        Wv /= sd[:, None]  # unit signal variance, so the noise sd follows from the noise ceiling alone
        sig = Z[sess_img] @ Wv.T
        nc = 100 * rng.beta(2.0, 4.0, nv) * 0.7 + 6  # percent, 6..76
        low = rng.random(nv) < 0.1
        nc[low] = rng.uniform(0.5, 5.0, int(low.sum()))  # voxels the evaluation drops (nc <= 5)
        noise_sd = np.sqrt((1 - nc / 100) / (nc / 100))
        resp = (sig + rng.normal(size=sig.shape) * noise_sd).T.astype(np.float32)  # (n_voxels, n_trials)
        voxel_id = np.sort(rng.choice(nv * 50, nv, replace=False))
        rd = pd.DataFrame(resp, columns=[str(t) for t in range(resp.shape[1])])
        rd.insert(0, "voxel_id", voxel_id)
        p = os.path.join(brain_dir, f"{tag}_ResponseData.h5")
        with atomic_path(p) as tmp:
            rd.to_hdf(tmp, key="ResponseData", mode="w", format="fixed")
            with h5py.File(tmp, "r+") as f:  # pandas' layout is kept; the root attr marks the file as made up
                f.attrs["synthetic"] = np.int8(1)  # an integer: PyTables cannot read h5py's boolean (enum) attrs
        paths[f"fmri/{tag}/responses"] = p
        vm = pd.DataFrame(dict(voxel_id=voxel_id, subject_id=sub, nc_singletrial=nc.round(3),
                               nc_testset=(100 * (nc / 100) / (nc / 100 + (1 - nc / 100) / n_ses)).round(3),
                               splithalf_uncorrected=np.nan, voxel_x=rng.integers(0, 72, nv),
                               voxel_y=rng.integers(0, 91, nv), voxel_z=rng.integers(0, 75, nv)))
        for r, name in enumerate(rois):
            vm[name] = roi == r
        p = os.path.join(brain_dir, f"{tag}_VoxelMetadata.csv")
        with atomic_path(p) as tmp:
            vm.to_csv(tmp, index=False)
        paths[f"fmri/{tag}/voxels"] = p
        is_test = np.isin(sess_img, test_img)
        run = (np.arange(len(session)) % n_tr) // max(1, n_tr // 10) + 1
        sm = pd.DataFrame(dict(subject_id=sub, session=session, run=run,
                               trial_type=np.where(is_test, "test", "train"),
                               concept=[concepts[ci] for ci in img_concept[sess_img]],
                               stimulus=[things_ids[i].split("/", 1)[1] for i in sess_img]))
        p = os.path.join(brain_dir, f"{tag}_StimulusMetadata.csv")
        with atomic_path(p) as tmp:
            sm.to_csv(tmp, index=False)
        paths[f"fmri/{tag}/stimuli"] = p
        roi_names = np.array(rois + ["none"])[roi]
        truth_fmri[tag] = dict(weights=Wv, roi=roi_names.astype("S"), nc_singletrial=nc, noise_sd=noise_sd,
                               image_rows=sess_img, is_test=is_test)

    # --- model zoo + category table, from their own generator so every file above is unchanged by them
    zoo_rng = np.random.default_rng([seed, 1000])
    sets = dict(things=(things_ids, things_codes, things_g, things_u), levels=(lv_ids, lv_codes, lv_g, lv_u))
    sets.update({name: (pl["ids"], pl["codes"], pl["g"], pl["u"]) for name, pl in pools.items()})
    paths.update(write_backbones(out_dir, zoo_rng, sets, W, c["n_backbones"], cfg))
    paths["categories"] = os.path.join(data_dir, "categories.tsv")
    labels = np.eye(c["n_super"], dtype=int)[superclass]  # (n_concepts, n_super) one label each ...
    second = np.nonzero(zoo_rng.random(n_c) < 0.1)[0]    # ... and a second label for 10% of concepts
    labels[second, zoo_rng.integers(c["n_super"], size=len(second))] = 1
    cat = pd.DataFrame(labels, columns=[f"category{k:02d}" for k in range(c["n_super"])])
    cat.insert(0, "uniqueID", concepts)
    with atomic_path(paths["categories"]) as tmp:
        cat.to_csv(tmp, sep="\t", index=False)

    # --- ground truth, last (the Makefile's target): a killed run leaves no truth file, so make reruns it
    paths["truth"] = os.path.join(out_dir, "world_truth.h5")
    with atomic_path(paths["truth"]) as tmp:
        with h5py.File(tmp, "w") as f:
            f["h"], f["superclass"], f["prototypes"] = hum_h, superclass, protos
            f["sparse/h"], f["sparse/g"] = h, g  # the planted factors (in the control world h is not people's space)
            f["sparse/g_superclass"], f["sparse/g_prototypes"] = superclass_g, protos_g
            f["context"] = context
            f["concepts"] = np.array(concepts, dtype="S")
            f["directions"], f["g_directions"], f["nuisance_directions"] = D, Dg, N
            f["nuisance_spectrum"], f["offset"] = spectrum, W["offset"]
            if ctrl_proj is not None:
                f["control_projections"] = ctrl_proj
            f.attrs["warp"], f.attrs["g_scale"], f.attrs["noise_sd"] = c["warp"], W["g_scale"], W["noise_sd"]
            f.attrs["control"] = bool(c["control"])
            parts = [("things", things_codes, things_g, things_u, dict(concept=img_concept, human=hum_things)),
                     ("levels", lv_codes, lv_g, lv_u, dict(concept=lv_concept, human=hum_lv))]
            parts += [(name, pl["codes"], pl["g"], pl["u"], dict(superclass=pl["superclass"]))
                      for name, pl in pools.items()]
            for name, codes, gc, u, extra in parts:
                f[f"{name}/codes"], f[f"{name}/g_codes"], f[f"{name}/nuisance"] = codes, gc, u
                for k, v in extra.items():
                    f[f"{name}/{k}"] = v
            f["triplets/repeated"] = rep
            f["category_learning/dimension"], f["category_learning/threshold"] = cat_dim, med
            f["reward_learning/weights"] = rw
            f["reward_learning"].attrs["noise_sd"] = c["reward_noise"]
            for tag, tf in truth_fmri.items():
                for k, v in tf.items():
                    f[f"fmri/{tag}/{k}"] = v
            write_h5_attrs(f, dict(config=cfg, rois_early=ROIS_EARLY, rois_high=ROIS_HIGH, synthetic=True,
                                   generation_seconds=round(time.perf_counter() - t_start, 2)))
        if c["diagnostics"]:
            diag = diagnose(out_dir, truth=tmp, verbose=verbose)
            with h5py.File(tmp, "r+") as f:
                f.attrs["diagnostics"] = json.dumps(diag, default=float)

    say(f"world ({size}, seed {seed}{', negative control' if c['control'] else ''}) -> {out_dir}: {n_c} concepts x "
        f"{k_h} dims, {len(things_ids)} THINGS / {len(lv_ids)} Levels / {c['n_coco']} + {c['n_coco_eval']} COCO "
        f"images, "
        f"d={d}, {len(trip)} triplets, {n_lv} Levels trials, {c['fmri_subjects']} fMRI subjects x {c['n_voxels']} "
        f"voxels x {n_ses * n_tr} trials ({time.perf_counter() - t_start:.1f} s)")
    return paths


# ----------------------------------------------------------------------------------------------- diagnostics
CONTROLS = ("base", "base_z", "base_white", "base_minus_pcs", "sae_codes")  # the unsupervised controls of h
TASKS = ("things_ooo", "levels_ooo", "category_learning", "reward_learning", "cka", "rsa")


def _read_truth(truth):
    with h5py.File(truth, "r") as f:
        out = {k: f[k][...] for k in ("h", "directions", "g_directions", "nuisance_directions", "nuisance_spectrum",
                                      "offset")}
        for s in ("things", "levels", "coco"):
            out[s] = {k: f[f"{s}/{k}"][...] for k in f[s].keys()}
        out["attrs"] = {k: f.attrs[k] for k in f.attrs.keys()}
    out["config"] = json.loads(out["attrs"]["config"])
    return out


def _parts(T, s, X):
    """The additive parts of the features of image set s: dict h, g, nuisance, noise (n, d) float64."""
    c, a = T["config"], T["attrs"]
    hp = (T[s]["codes"] ** c["warp"]) @ T["directions"]
    gp = a["g_scale"] * (T[s]["g_codes"] ** c["warp"]) @ T["g_directions"]
    nu = (T[s]["nuisance"] * np.sqrt(T["nuisance_spectrum"])) @ T["nuisance_directions"]
    return dict(h=hp, g=gp, nuisance=nu, noise=X.astype(np.float64) - hp - gp - nu - T["offset"])


def variance_diagnostics(T, X, pca):
    """Variance shares of the THINGS features' parts, and how the nuisance spectrum sits against h's;
    pca = geometry.pool_pca of the training pool."""
    import geometry
    parts = _parts(T, "things", X)
    total = X.astype(np.float64).var(0).sum()
    out = {f"share_{k}": float(v.var(0).sum() / total) for k, v in parts.items()}
    lam_h = np.linalg.eigvalsh(np.cov(parts["h"].T))[::-1]
    lam_h = lam_h[lam_h > 1e-9 * lam_h[0]]
    spec = T["nuisance_spectrum"]
    out.update(h_top_eigenvalue=float(lam_h[0]), h_min_eigenvalue=float(lam_h[-1]), nuisance_top=float(spec[0]),
               nuisance_min=float(spec[-1]), n_nuisance=int(len(spec)),
               nuisance_in_h_range=float(((spec >= lam_h[-1]) & (spec <= lam_h[0])).mean()))
    # what the pool's top principal components hold: share of each part's variance in the top k PCs
    V = pca[2]
    pp = _parts(T, "coco", T["pool"])
    for k in sorted({geometry.top_pcs_rule(X.shape[1]), 8, 32}):
        Vk = V[:, :k]
        out[f"top{k}_pcs_share"] = {name: float(((p - p.mean(0)) @ Vk).var(0).sum() / p.var(0).sum())
                                    for name, p in pp.items()}
    return out


def control_representations(X, pool, sparse_codes, pca=None):
    """The unsupervised controls of base features X (n, d): pool = the training pool's features (their statistics
    only; pca = geometry.pool_pca(pool) if computed), sparse_codes = the ideal SAE codes of X's rows
    [w(h), s_g w(g)]. -> {name: (n, .) float64}."""
    import geometry
    pca = geometry.pool_pca(pool) if pca is None else pca
    return dict(base=X.astype(np.float64), base_z=geometry.zscore(X, pool),
                base_white=geometry.pca_whiten(X, pool, pca=pca),
                base_minus_pcs=geometry.remove_top_pcs(X, pool, pca=pca), sae_codes=sparse_codes)


def _ooo(R, t, choice):
    """Zero-shot odd-one-out correctness (N,) bool: the item outside the most cosine-similar pair."""
    from representations import cosine_similarity_matrix
    S = cosine_similarity_matrix(R)
    return np.array([2, 1, 0])[pair_sims(S, t).argmax(1)] == choice, S


def _fit_summary(fit, ci, seed, n_options):
    """McFadden R^2 of a choice fit as a diagnostics entry: score, ci (bootstrap over participants)."""
    from choice import summarise_fit
    s, _ = summarise_fit(fit["nll"], fit["correct"], fit["codes"], len(fit["labels"]), n_options, fit["labels"], ci,
                         seed)
    return dict(score=s["mcfadden_r2"], ci=s["r2_ci"])


def diagnose(world_dir, truth=None, ci=0.95, seed=0, verbose=True):
    """Score the h oracle, base and every unsupervised control on every task of a written world.

    Reads the files as the evaluations do (data.py loaders) and uses the evaluations' numerics: zero-shot
    odd-one-out and the per-participant choice fits (choice.py), the online category / reward learners
    (eval_behaviour.py), linear CKA (kernels.cka, jackknife CI) and RSA (geometry.py). Controls (geometry.py) use the
    training pool's statistics only. The h oracle is the space the simulated people used: the SPoSE file for
    concept-level tasks, each image's own human code for image-level ones. -> JSON-ready dict."""
    from data import torch_threads
    with torch_threads(1):  # the choice fits are chains of small ops: one thread is fastest (data.torch_threads)
        return _diagnose(world_dir, truth, ci, seed, verbose)


def _diagnose(world_dir, truth, ci, seed, verbose):
    import torch

    import eval_behaviour
    import data
    import geometry
    import kernels
    from choice import fit_odd_one_out
    from eval_geometry import jackknife_cka
    from representations import z_value
    t0 = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    T = _read_truth(truth or os.path.join(world_dir, "world_truth.h5"))
    c, z = T["config"], z_value(ci)
    dd = os.path.join(world_dir, "data")
    X, ids = data.read_features(os.path.join(world_dir, "features", "things.h5"))
    Xl, lids = data.read_features(os.path.join(world_dir, "features", "levels.h5"))
    pool, _ = data.read_features(os.path.join(world_dir, "features", "coco.h5"))
    T["pool"], pca = pool, geometry.pool_pca(pool)
    g_scale = T["attrs"]["g_scale"]
    sparse = lambda s: np.c_[T[s]["codes"] ** c["warp"], g_scale * T[s]["g_codes"] ** c["warp"]]  # noqa: E731
    out = dict(variance=variance_diagnostics(T, X, pca), control=bool(c["control"]), ci=ci,
               controls=dict(base_z="z-scored with the pool's mean and sd",
                             base_white="PCA-whitened with the pool's covariance (all components, shrinkage 1e-6)",
                             base_minus_pcs=f"pool mean and top {geometry.top_pcs_rule(X.shape[1])} pool principal "
                                            "components removed (k = max(1, round(d / 100)), Mu & Viswanath 2018)",
                             sae_codes="the ideal SAE codes [w(h codes), s_g w(g codes)] of each image"))
    concepts = data.load_concepts(dd)
    spose = data.load_spose(dd, len(concepts)).astype(np.float64)
    rows = data.concept_rows(ids, concepts)
    reps_c = dict(h=spose, **control_representations(X[rows], pool, sparse("things")[rows], pca))
    reps_i = dict(h=T["things"]["human"], **control_representations(X, pool, sparse("things"), pca))
    reps_l = dict(h=T["levels"]["human"], **control_representations(Xl, pool, sparse("levels"), pca))
    res = {}

    # THINGS odd-one-out: zero-shot accuracy (binomial CI), paired difference to h, per-participant fit
    t = data.load_triplets(dd, len(concepts))
    r, correct = {}, {}
    for name, R in reps_c.items():
        correct[name], S = _ooo(R, t["triplets"], t["choice"])
        acc = float(correct[name].mean())
        half = z * np.sqrt(acc * (1 - acc) / len(t["choice"]))
        fit = fit_odd_one_out(S, t["triplets"], t["choice"], t["subject"], seed=seed)
        f = _fit_summary(fit, ci, seed, 3)
        r[name] = dict(score=acc, ci=[acc - half, acc + half], mcfadden_r2=f["score"], r2_ci=f["ci"])
    for name in CONTROLS:  # paired over triplets: both representations answer the same human choices
        diff = correct["h"].astype(np.float64) - correct[name]
        half = z * diff.std() / np.sqrt(len(diff))
        r[name]["h_minus"] = float(diff.mean())
        r[name]["h_minus_ci"] = [float(diff.mean() - half), float(diff.mean() + half)]
    sweep, acc = {}, lambda R: float(_ooo(R, t["triplets"], t["choice"])[0].mean())  # noqa: E731
    for k in (0, 1, 2, 4, 8, 16, 32, 64, 128):  # every k: no choice of k (even with hindsight) reaches h
        if k < X.shape[1]:
            sweep[f"minus_pcs_{k}"] = acc(geometry.remove_top_pcs(X[rows], pool, k, pca))
    for rank in (4, 8, 16, 32, 64, 128, 256):  # whitening of the top components only
        if rank < X.shape[1]:
            sweep[f"white_rank_{rank}"] = acc(geometry.pca_whiten(X[rows], pool, rank, pca=pca))
    res["things_ooo"] = dict(r, sweep=sweep, n_trials=int(len(t["choice"])), metric="zero-shot accuracy")
    say(f"diagnostics: THINGS odd-one-out done ({time.perf_counter() - t0:.1f} s)")

    # Levels odd-one-out (image level)
    trials, keys = data.load_levels(dd)
    if keys != lids:
        raise data.DataError(f"{world_dir}: levels.h5 /image_ids differ from the images levels.pkl shows")
    kidx = {k: i for i, k in enumerate(keys)}
    lt = np.stack([trials[f"image{j}"].map(kidx).to_numpy() for j in (1, 2, 3)], 1).astype(np.int64)
    lch = trials["selected"].to_numpy(np.int64)
    r = {}
    for name, R in reps_l.items():
        ok, S = _ooo(R, lt, lch)
        acc = float(ok.mean())
        half = z * np.sqrt(acc * (1 - acc) / len(lch))
        fit = fit_odd_one_out(S, lt, lch, trials["participant"].to_numpy(), seed=seed)
        f = _fit_summary(fit, ci, seed, 3)
        r[name] = dict(score=acc, ci=[acc - half, acc + half], mcfadden_r2=f["score"], r2_ci=f["ci"])
    res["levels_ooo"] = dict(r, n_trials=int(len(lch)), metric="zero-shot accuracy")
    say(f"diagnostics: Levels odd-one-out done ({time.perf_counter() - t0:.1f} s)")

    # category and reward learning: the evaluations' online learners, McFadden R^2 of the people's choices, on
    # the first diag_participants people (the learners cost O(people x trials^2 x dims) per representation)
    index = {s: i for i, s in enumerate(ids)}
    n_keep = c.get("diag_participants") or SIZES[c["size"]]["diag_participants"]
    keep = lambda df: df[df["participant"].isin(np.unique(df["participant"])[:n_keep])]  # noqa: E731
    cdf = keep(data.load_category_learning(dd)).reset_index(drop=True)
    crow = np.array([index[s] for s in cdf["image"]])
    Cs = [0.01, 0.1, 1.0, 10.0, 100.0]  # evaluate.py's --cat-c / --reward-lambda defaults
    fits = eval_behaviour.fit_category_learning(reps_i, crow, cdf, Cs, 5, 0.1, seed)
    res["category_learning"] = {name: _fit_summary(f, ci, seed, 2) for name, f in fits.items()}
    say(f"diagnostics: category learning done ({time.perf_counter() - t0:.1f} s)")
    rdf = keep(data.load_reward_learning(dd)).reset_index(drop=True)
    rows_lr = (np.array([index[s] for s in rdf["left_image"]]), np.array([index[s] for s in rdf["right_image"]]))
    fits = eval_behaviour.fit_reward_learning(reps_i, rows_lr, rdf, Cs, 5, 0.1, seed)
    res["reward_learning"] = {name: _fit_summary(f, ci, seed, 2) for name, f in fits.items()}
    for task, df in (("category_learning", cdf), ("reward_learning", rdf)):
        res[task].update(metric="McFadden R^2 (held-out)", n_participants=int(df["participant"].nunique()))
    say(f"diagnostics: reward learning done ({time.perf_counter() - t0:.1f} s)")

    # CKA (jackknife CI over concepts) and RSA (correlation RDMs, Spearman) with the SPoSE space
    res["cka"], res["rsa"] = dict(metric="linear CKA with SPoSE"), dict(metric="RSA with SPoSE (Spearman)")
    target = torch.as_tensor(spose)
    rdm_h = geometry.rdm(spose, "correlation")
    for name, R in reps_c.items():
        v = kernels.cka(torch.as_tensor(R), target).item()
        loo = jackknife_cka(R, spose)
        se = float(np.sqrt((len(loo) - 1) / len(loo) * ((loo - loo.mean()) ** 2).sum()))
        res["cka"][name] = dict(score=v, ci=[v - z * se, v + z * se])
        res["rsa"][name] = dict(score=geometry.compare_rdms(geometry.rdm(R, "correlation"), rdm_h, "spearman"))
    say(f"diagnostics: CKA and RSA done ({time.perf_counter() - t0:.1f} s)")

    # the guarantees: h above every control on every task; on THINGS odd-one-out by more than the CIs
    checks = {}
    for task in TASKS:
        best = max(CONTROLS, key=lambda n: res[task][n]["score"])
        checks[task] = dict(best_control=best, margin=float(res[task]["h"]["score"] - res[task][best]["score"]))
    th = res["things_ooo"]
    half = max((v["ci"][1] - v["ci"][0]) / 2 for k, v in th.items() if k in ("h",) + CONTROLS)
    checks["things_ooo"].update(ci_half_width=float(half),
                                paired_ci_low=float(min(th[n]["h_minus_ci"][0] for n in CONTROLS)),
                                beyond_ci=bool(checks["things_ooo"]["margin"] > half and
                                               min(th[n]["h_minus_ci"][0] for n in CONTROLS) > 0))
    out.update(tasks=res, checks=checks, h_beats_every_control=bool(all(v["margin"] > 0 for v in checks.values())),
               seconds=round(time.perf_counter() - t0, 1))
    return out


def read_diagnostics(world_dir_or_truth):
    """The diagnostics dict stored in a world's world_truth.h5 attrs (None if it was written without)."""
    p = world_dir_or_truth
    p = os.path.join(p, "world_truth.h5") if os.path.isdir(p) else p
    with h5py.File(p, "r") as f:
        return json.loads(f.attrs["diagnostics"]) if "diagnostics" in f.attrs else None


def diagnostics_table(diag, title=""):
    """Markdown table of a diagnostics dict: one row per task, h and every control (score [CI])."""
    names = ("h",) + CONTROLS
    fmt = lambda v: "" if v is None else (f"{v['score']:.3f}" + (f" ±{(v['ci'][1] - v['ci'][0]) / 2:.3f}"  # noqa: E731
                                                                 if "ci" in v else ""))
    lines = [f"| {title or 'task'} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for task in TASKS:
        r = diag["tasks"][task]
        lines.append(f"| {task.replace('_', ' ')} ({r['metric']}) | " + " | ".join(fmt(r.get(n)) for n in names) + " |")
    v = diag["variance"]
    lines.append("")
    lines.append(f"variance shares: h {v['share_h']:.2f}, g {v['share_g']:.2f}, nuisance {v['share_nuisance']:.2f}, "
                 f"noise {v['share_noise']:.2f}; nuisance eigenvalues {v['nuisance_top']:.3g}..{v['nuisance_min']:.3g} "
                 f"over {v['n_nuisance']} directions against h's {v['h_top_eigenvalue']:.3g}.."
                 f"{v['h_min_eigenvalue']:.3g} "
                 f"({100 * v['nuisance_in_h_range']:.0f} % inside h's range)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- factor recovery
def factor_directions(W_dec, world_dir, threshold=0.8, name="the SAE"):
    """The direction part of factor_recovery (train.py --stage sae reports it on a world's pool): W_dec
    (n_latents, d) decoder rows -> dict threshold, {h,g}_recovered (share of the planted directions with a row at
    cosine > threshold), {h,g}_best_cosine_median and {h,g}_best_cosine (the best row per direction)."""
    import torch

    import data
    with h5py.File(os.path.join(world_dir, "world_truth.h5"), "r") as f:
        dirs = dict(h=f["directions"][...], g=f["g_directions"][...])
    Wd = torch.as_tensor(W_dec).detach().cpu().double()
    Wd = Wd / Wd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = dict(threshold=threshold)
    for key, Dm in dirs.items():
        if Dm.shape[1] != Wd.shape[1]:
            raise data.DataError(f"{name}: the SAE takes d = {Wd.shape[1]} features, the world's directions have "
                                 f"d = {Dm.shape[1]} ({world_dir}/world_truth.h5)")
        best = (torch.from_numpy(Dm) @ Wd.T).max(1).values.numpy()  # (k,) best cosine per planted direction
        out[f"{key}_recovered"] = float((best > threshold).mean())
        out[f"{key}_best_cosine_median"] = float(np.median(best))
        out[f"{key}_best_cosine"] = best.round(4).tolist()
    return out


def factor_recovery(ckpt, world_dir, features=None, threshold=0.8, min_nonzero=120, chunk=8192):
    """How well an SAE checkpoint recovers the world's planted sparse factors, and how much of it is used.

    h and g recovered: share of their feature directions with a decoder row at cosine > threshold (the best
    row per direction; the rows are unit vectors, and the expected_average normalisation is one scalar, so
    cosines in the SAE's space equal those in feature space). Dead latents: never active on `features`
    (default the world's training pool). Functions: latents active on >= min_nonzero of those images, as
    models.functions_from_codes counts them. -> dict of shares, counts and the per-direction best cosines."""
    import torch

    import data
    from models import functions_from_codes, load_sae
    sae, _ = load_sae(ckpt)
    out = dict(ckpt=ckpt, n_latents=int(sae.n_latents), k=int(sae.k),
               **factor_directions(sae.W_dec, world_dir, threshold, ckpt))
    X, _ = data.read_features(features or os.path.join(world_dir, "features", "coco.h5"))
    vals, idxs = [], []
    for i in range(0, len(X), chunk):
        v, ix = sae.encode(torch.from_numpy(X[i:i + chunk]))
        vals.append(v.float().numpy())
        idxs.append(ix.numpy())
    v, ix = np.concatenate(vals), np.concatenate(idxs)
    fired = np.zeros(sae.n_latents, bool)
    fired[ix[v > 0]] = True
    out["dead_fraction"] = float(1 - fired.mean())
    try:
        out["n_functions"] = int(len(functions_from_codes(ix, v, min_nonzero)["latents"]))
    except ValueError:
        out["n_functions"] = 0
    out["min_nonzero"], out["n_images"] = min_nonzero, int(len(X))
    return out
