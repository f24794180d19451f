"""The embedded world: a synthetic THINGS/COCO/Levels/fMRI universe with a known ground truth.

    python extract.py --dataset synthetic --out data/world --size small     # < 10 s, used by the tests
    python extract.py --dataset synthetic --out data/world --size full      # 1,854 concepts, 26,107 images

    from world import make_world
    paths = make_world("data/world", size="small", seed=0, n_triplets=5000)

Generative story (DESIGN.md "The embedded world"):
  h        (n_concepts, k_h)  sparse non-negative concept space: superclass prototype (shared dims, scaled)
                              + 1..3 concept-specific dims. Written as the SPoSE file.
  codes    (n_images, k_h)    per image: concept h with multiplicative jitter + an occasional extra dim.
  features (n_images, d)      g(codes) @ directions + u @ nuisance_directions + noise + offset,
                              g(x) = x ** warp (monotone, keeps zeros), u dense Gaussian with more variance
                              than the h part, so cosine geometry is poorly aligned with h while every
                              h dim stays a recoverable (near-linear) direction.
  humans   odd-one-out and Levels choices = softmax over pairwise dot products / temperature; category and
           reward learners run on image codes; fMRI voxels = linear read-outs of the concept's h (high-level ROIs)
           or of u (early ROIs), noise set from a known per-voxel noise ceiling.
Everything is drawn from one numpy Generator seeded by `seed`, so the same seed gives identical arrays.
"""
import os
import pickle

import h5py
import numpy as np
import pandas as pd

from data import atomic_path, write_features, write_h5_attrs

# sizes: every key can be overridden through make_world(**overrides) / extract.py flags
SIZES = {
    "small": dict(
        n_concepts=150,            # THINGS concepts
        k_h=12,                    # dims of the human concept space h
        n_super=8,                 # superclasses of the two-level hierarchy
        d=64,                      # backbone feature width
        n_nuisance=2,              # dense nuisance dims: few, with high variance (global image statistics
                                   # such as lighting); an SAE spends few latents on them (README, World)
        n_images=600,              # THINGS images (uneven per concept)
        min_images=3,              # images per concept, at least
        n_coco=3000,               # unlabelled pool
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
        fmri_sessions=4,
        fmri_trials=100,           # trials per session (test images included)
        fmri_test=20,              # test images, shown once per session
        n_voxels=300,
        temperature=0.8,           # softmax temperature of odd-one-out choices over dot products
    ),
    "full": dict(
        n_concepts=1854, k_h=66, n_super=27, d=768, n_nuisance=4, n_images=26107, min_images=12,
        n_coco=20000, n_levels_concepts=200, levels_images=10, n_levels_participants=100, levels_trials=150,
        n_triplets=200000, n_repeat=1000, repeat_subjects=30, n_subjects=5000, n_cat_participants=100,
        cat_trials=120, n_reward_participants=100, reward_trials=120, fmri_sessions=12, fmri_trials=750,
        fmri_test=100, n_voxels=2000,
        temperature=0.3,  # sparser h (66 dims): random triplets share fewer dims, so choices need a sharper softmax
    ),
}
# knobs shared by both sizes
COMMON = dict(
    warp=0.8,                  # g(x) = x ** warp, the backbone's monotone nonlinearity
    nuisance_ratio=2.0,        # total nuisance variance / total variance of the h part
    noise_ratio=0.3,           # total isotropic noise variance / total variance of the h part
    offset_ratio=0.5,          # norm of the shared feature offset / rms norm of the h part
    levels_temperature=0.5,
    cat_lr=0.3,                # category learner: online logistic regression step
    cat_beta=3.0,              # category learner: inverse temperature of the choice
    reward_noise=0.5,          # sd of reward noise around the linear reward function
    reward_beta=3.0,           # reward learner: inverse temperature of the left/right choice
    fmri_subjects=3,
    n_backbones=3,             # extra synthetic backbones over the same images (model-similarity analyses)
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
    # norms held near 2 (+-15 %): choices use dot products, evaluations use cosines; with similar norms
    # the two rank pairs alike, so h itself scores near the noise ceiling under either
    h *= 2.0 * rng.lognormal(0.0, 0.15, size=(n, 1)) / np.linalg.norm(h, axis=1, keepdims=True)
    return h, sup


def sample_codes(rng, h_of_image):
    """Per-image codes (n, k_h): concept h with multiplicative jitter + an occasional small extra dim."""
    n, k_h = h_of_image.shape
    codes = h_of_image * rng.lognormal(0.0, 0.25, size=(n, k_h))
    extra = rng.random(n) < 0.3
    codes[np.nonzero(extra)[0], rng.integers(k_h, size=int(extra.sum()))] += rng.exponential(0.3, int(extra.sum()))
    return codes


def backbone(rng, codes, W):
    """Synthetic backbone: (n, k_h) codes -> (features (n, d) float32, nuisance u (n, n_nuisance))."""
    u = rng.normal(0.0, W["nuisance_sd"], size=(codes.shape[0], W["N"].shape[0]))
    X = (codes ** W["warp"]) @ W["D"] + u @ W["N"] + W["offset"]
    X += rng.normal(0.0, W["noise_sd"], size=X.shape)
    return X.astype(np.float32), u


def write_backbones(out_dir, rng, sets, W, n_backbones, cfg):
    """Extra synthetic backbones b1..bK over the same images (same codes and nuisance u), each with its own
    random directions and nuisance weight a_k = 2^(k - K/2): a graded model-similarity structure (nearby
    a_k -> more similar geometry) that is the same on every image set. Writes features/<set>_b<k>.h5."""
    paths = {}
    d = W["D"].shape[1]
    for k in range(1, n_backbones + 1):
        Q = np.linalg.qr(rng.normal(size=(d, W["D"].shape[0] + W["N"].shape[0])))[0].T
        Dk, Nk = Q[:W["D"].shape[0]], Q[W["D"].shape[0]:]
        a_k = 2.0 ** (k - (n_backbones + 1) / 2)
        for name, (ids, codes, u) in sets.items():
            X = (codes ** W["warp"]) @ Dk + a_k * u @ Nk + rng.normal(0.0, W["noise_sd"], size=(len(ids), d))
            p = os.path.join(out_dir, "features", f"{name}_b{k}.h5")
            write_features(p, X.astype(np.float32), ids,
                           attrs=dict(backbone=f"synthetic-b{k}", synthetic=True, weights=f"world seed {cfg['seed']}",
                                      pooling="n/a", dataset=name, nuisance_weight=a_k, config=cfg))
            paths[f"features/{name}_b{k}"] = p
    return paths


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
    key = lambda a: (np.sort(a, 1) * np.array([n * n, n, 1])).sum(1)
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


# ------------------------------------------------------------------------------------------------ the world
def make_world(out_dir, size="small", seed=0, verbose=True, **overrides):
    """Write the embedded world under out_dir; returns a dict name -> path of every file written."""
    cfg = config_for(size, seed, **overrides)
    rng = np.random.default_rng(seed)
    c = cfg
    k_h, d = c["k_h"], c["d"]
    if k_h + c["n_nuisance"] > d:
        raise ValueError(f"k_h + n_nuisance = {k_h + c['n_nuisance']} must be <= d = {d}")
    feat_dir, data_dir = os.path.join(out_dir, "features"), os.path.join(out_dir, "data")
    brain_dir = os.path.join(data_dir, "brain_data")
    for p in (feat_dir, brain_dir):
        os.makedirs(p, exist_ok=True)
    paths = {}
    say = print if verbose else (lambda *a, **k: None)

    # --- concepts and THINGS images
    n_c = c["n_concepts"]
    concepts = [f"c{i + 1:04d}" for i in range(n_c)]  # zero-padded so unique_id order == sorted order
    protos = sample_prototypes(rng, c["n_super"], k_h)
    h, superclass = sample_concepts(rng, n_c, protos)  # (n_concepts, k_h), (n_concepts,)
    if c["n_images"] < c["min_images"] * n_c:
        raise ValueError(f"n_images={c['n_images']} < min_images * n_concepts = {c['min_images'] * n_c}")
    counts = c["min_images"] + rng.multinomial(c["n_images"] - c["min_images"] * n_c, np.ones(n_c) / n_c)
    img_concept = np.repeat(np.arange(n_c), counts)  # (n_images,) sorted by concept
    img_num = np.concatenate([np.arange(k) for k in counts]) + 1
    letters = rng.choice(list("bsn"), size=len(img_concept))
    things_ids = [f"{concepts[ci]}/{concepts[ci]}_{j:02d}{l}.jpg" for ci, j, l in zip(img_concept, img_num, letters)]
    assert things_ids == sorted(things_ids)
    things_codes = sample_codes(rng, h[img_concept])  # (n_images, k_h)

    # --- the synthetic backbone, scaled so variance ratios hold on the THINGS images
    Q = np.linalg.qr(rng.normal(size=(d, k_h + c["n_nuisance"])))[0].T  # orthonormal rows, random rotation
    D, N = Q[:k_h], Q[k_h:]  # (k_h, d) unit h directions, (n_nuisance, d) nuisance directions
    hv = (things_codes ** c["warp"]).var(0).sum()  # total variance of the h part
    hrms = np.sqrt(((things_codes ** c["warp"]) ** 2).sum(1).mean())
    offset = rng.normal(size=d)
    W = dict(D=D, N=N, warp=c["warp"], nuisance_sd=np.sqrt(c["nuisance_ratio"] * hv / c["n_nuisance"]),
             noise_sd=np.sqrt(c["noise_ratio"] * hv / d), offset=offset / np.linalg.norm(offset) * c["offset_ratio"] * hrms)
    things_X, things_u = backbone(rng, things_codes, W)

    # --- COCO pool: fresh concepts from the same generator, one image each
    coco_h, coco_sup = sample_concepts(rng, c["n_coco"], protos)
    coco_codes = sample_codes(rng, coco_h)
    coco_X, coco_u = backbone(rng, coco_codes, W)
    coco_ids = [f"train2017/{i + 1:012d}.jpg" for i in range(c["n_coco"])]

    # --- Levels images: new images of a subset of concepts, ImageNet-like names
    lv_concepts = np.sort(rng.choice(n_c, size=min(c["n_levels_concepts"], n_c), replace=False))
    lv_concept = np.repeat(lv_concepts, c["levels_images"])  # (n_levels_images,)
    wnid = {ci: f"n{1440764 + 7919 * ci:08d}" for ci in lv_concepts}
    nums = rng.choice(100000, size=len(lv_concept), replace=False) + 1000
    lv_ids = np.array([f"{wnid[ci]}_{k}.JPEG" for ci, k in zip(lv_concept, nums)])
    order = np.argsort(lv_ids)  # image order = sorted unique keys
    lv_ids, lv_concept = lv_ids[order].tolist(), lv_concept[order]
    lv_codes = sample_codes(rng, h[lv_concept])
    lv_X, lv_u = backbone(rng, lv_codes, W)

    # --- concepts and SPoSE
    paths["unique_id"] = os.path.join(data_dir, "unique_id.txt")
    with atomic_path(paths["unique_id"]) as tmp, open(tmp, "w") as fh:
        fh.write("\n".join(concepts) + "\n")
    paths["spose"] = os.path.join(data_dir, "spose_embedding_66d_sorted.txt")
    with atomic_path(paths["spose"]) as tmp:
        np.savetxt(tmp, h, fmt="%.6f", delimiter=" ")

    # --- THINGS odd-one-out: random triplets + repeated ones answered by several subjects
    G = h @ h.T  # (n_concepts, n_concepts) dot-product similarities that humans use
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
    lv_concept, lv_codes, lv_X, lv_u = lv_concept[used], lv_codes[used], lv_X[used], lv_u[used]
    lv_odd, _ = softmax_odd_one_out(rng, pair_sims(lv_codes @ lv_codes.T, lv_t), c["levels_temperature"])
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

    attrs = dict(backbone="synthetic", synthetic=True, weights=f"world seed {seed}", pooling="none", config=cfg)
    for name, X, ids in [("things", things_X, things_ids), ("levels", lv_X, lv_ids), ("coco", coco_X, coco_ids)]:
        paths[f"features/{name}"] = write_features(os.path.join(feat_dir, f"{name}.h5"), X, ids,
                                                   attrs=dict(attrs, image_root=name))

    # --- category learning: category = one h dim above its median over THINGS images, balanced sampling
    n_p, T = c["n_cat_participants"], c["cat_trials"]
    med = np.median(things_codes, 0)
    above = things_codes > med  # (n_images, k_h)
    ok = np.nonzero((above.sum(0) >= T // 2) & ((~above).sum(0) >= T - T // 2))[0]
    if not len(ok):
        raise ValueError(f"no h dim has {T // 2} THINGS images above and below its median; lower cat_trials")
    cat_dim = rng.choice(ok, size=n_p)
    cat_img = np.stack([rng.permutation(np.r_[rng.choice(np.nonzero(above[:, j])[0], T // 2, replace=False),
                                              rng.choice(np.nonzero(~above[:, j])[0], T - T // 2, replace=False)])
                        for j in cat_dim])  # (n_p, T)
    y = above[cat_img, cat_dim[:, None]].astype(np.int64)  # (n_p, T) true category
    w = np.zeros((n_p, k_h + 1))
    cat_choice = np.zeros((n_p, T), np.int64)
    for t in range(T):  # online logistic regression, vectorised over participants
        x = np.c_[things_codes[cat_img[:, t]], np.ones(n_p)]  # (n_p, k_h + 1), bias last
        z = (w * x).sum(1)
        cat_choice[:, t] = rng.random(n_p) < 1 / (1 + np.exp(-c["cat_beta"] * z))
        w += c["cat_lr"] * (y[:, t] - 1 / (1 + np.exp(-z)))[:, None] * x
    things_arr = np.array(things_ids)
    cat = pd.DataFrame(dict(participant=np.repeat(np.arange(n_p) + 1, T), trial=np.tile(np.arange(T) + 1, n_p),
                            image=things_arr[cat_img.ravel()], dimension=np.repeat(cat_dim, T),
                            choice=cat_choice.ravel(), true_category_binary=y.ravel(),
                            correct=(cat_choice == y).ravel().astype(np.int64)))
    paths["category_learning"] = os.path.join(data_dir, "category_learning.csv")
    with atomic_path(paths["category_learning"]) as tmp:
        cat.to_csv(tmp, index=False)

    # --- reward learning: reward = codes @ sparse weights + noise; Bayesian linear regression learner that
    # sees both rewards after each choice (choice coding: 0 = left, 1 = right)
    n_p, T = c["n_reward_participants"], c["reward_trials"]
    rw = np.zeros((n_p, k_h))
    for i in range(n_p):
        j = rng.choice(k_h, 3, replace=False)
        rw[i, j] = rng.normal(0, 2, 3)
    pair = np.stack([rng.choice(len(things_ids), 2, replace=False) for _ in range(n_p * T)]).reshape(n_p, T, 2)
    Xp = things_codes[pair]  # (n_p, T, 2, k_h)
    R = np.einsum("ptsk,pk->pts", Xp, rw) + rng.normal(0, c["reward_noise"], (n_p, T, 2))
    mu, S = np.zeros((n_p, k_h)), np.tile(np.eye(k_h), (n_p, 1, 1))  # prior N(0, I)
    rchoice = np.zeros((n_p, T), np.int64)
    for t in range(T):
        v = np.einsum("psk,pk->ps", Xp[:, t], mu)  # (n_p, 2) predicted rewards
        rchoice[:, t] = rng.random(n_p) < 1 / (1 + np.exp(-c["reward_beta"] * (v[:, 1] - v[:, 0])))
        for s in (0, 1):  # Sherman-Morrison rank-1 posterior update per observed reward
            x = Xp[:, t, s]
            Sx = np.einsum("pkl,pl->pk", S, x)
            den = c["reward_noise"] ** 2 + (x * Sx).sum(1)
            mu += Sx * ((R[:, t, s] - (x * mu).sum(1)) / den)[:, None]
            S -= Sx[:, :, None] * Sx[:, None, :] / den[:, None, None]
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
    # what voxels read out (n_images, k_h + n_nuisance): high-level ROIs the human representation h of the
    # image's concept, early ROIs the nuisance part of the image (which the backbone carries and h lacks)
    Z = np.c_[h[img_concept], things_u]
    rois = ROIS_EARLY + ROIS_HIGH
    truth_fmri = {}
    for sub in range(1, c["fmri_subjects"] + 1):
        tag = f"sub-{sub:02d}"
        tr_perm = rng.permutation(train_img).reshape(n_ses, -1)
        sess_img = np.concatenate([rng.permutation(np.r_[test_img, tr_perm[s]]) for s in range(n_ses)])  # (n_trials,)
        session = np.repeat(np.arange(n_ses) + 1, n_tr)
        nv = c["n_voxels"]
        roi = rng.choice(len(rois) + 1, size=nv, p=np.r_[np.full(4, 0.4 / 4), np.full(8, 0.4 / 8), 0.2])
        Wv = np.zeros((nv, k_h + c["n_nuisance"]))
        for v in range(nv):
            if roi[v] < 4:  # early ROIs: dense read-out of the nuisance / low-level part
                Wv[v, k_h:] = rng.normal(size=c["n_nuisance"])
            elif roi[v] < len(rois):  # high-level ROIs: sparse read-out of the concept's h
                Wv[v, rng.choice(k_h, 3, replace=False)] = rng.gamma(2.0, 0.5, 3)
            else:  # outside every ROI: a weak mix of both
                Wv[v] = rng.normal(size=k_h + c["n_nuisance"]) * 0.5
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
            with h5py.File(tmp, "a") as f:
                f.attrs["synthetic"] = 1  # readers tell the world's files by this attr (an int: pytables reads it)
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
        sm = pd.DataFrame(dict(subject_id=sub, session=session, run=(np.arange(len(session)) % n_tr) // max(1, n_tr // 10) + 1,
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

    # --- ground truth
    paths["truth"] = os.path.join(out_dir, "world_truth.h5")
    with atomic_path(paths["truth"]) as tmp, h5py.File(tmp, "w") as f:
        f["h"], f["superclass"], f["prototypes"] = h, superclass, protos
        f["concepts"] = np.array(concepts, dtype="S")
        f["directions"], f["nuisance_directions"], f["offset"] = D, N, W["offset"]
        f.attrs["warp"], f.attrs["nuisance_sd"], f.attrs["noise_sd"] = c["warp"], W["nuisance_sd"], W["noise_sd"]
        for name, codes, u, extra in [("things", things_codes, things_u, dict(concept=img_concept)),
                                      ("levels", lv_codes, lv_u, dict(concept=lv_concept)),
                                      ("coco", coco_codes, coco_u, dict(superclass=coco_sup))]:
            f[f"{name}/codes"], f[f"{name}/nuisance"] = codes, u
            for k, v in extra.items():
                f[f"{name}/{k}"] = v
        f["triplets/repeated"] = rep
        f["category_learning/dimension"], f["category_learning/threshold"] = cat_dim, med
        f["reward_learning/weights"] = rw
        f["reward_learning"].attrs["noise_sd"] = c["reward_noise"]
        for tag, tf in truth_fmri.items():
            for k, v in tf.items():
                f[f"fmri/{tag}/{k}"] = v
        write_h5_attrs(f, dict(config=cfg, rois_early=ROIS_EARLY, rois_high=ROIS_HIGH, synthetic=True))

    # --- model zoo + category table, from their own generator so every file above is unchanged by them
    zoo_rng = np.random.default_rng([seed, 1000])
    sets = dict(things=(things_ids, things_codes, things_u), levels=(lv_ids, lv_codes, lv_u),
                coco=(coco_ids, coco_codes, coco_u))
    paths.update(write_backbones(out_dir, zoo_rng, sets, W, c["n_backbones"], cfg))
    paths["categories"] = os.path.join(data_dir, "categories.tsv")
    labels = np.eye(c["n_super"], dtype=int)[superclass]  # (n_concepts, n_super) one label each ...
    second = np.nonzero(zoo_rng.random(n_c) < 0.1)[0]    # ... and a second label for 10% of concepts
    labels[second, zoo_rng.integers(c["n_super"], size=len(second))] = 1
    cat = pd.DataFrame(labels, columns=[f"category{k:02d}" for k in range(c["n_super"])])
    cat.insert(0, "uniqueID", concepts)
    with atomic_path(paths["categories"]) as tmp:
        cat.to_csv(tmp, sep="\t", index=False)

    say(f"world ({size}, seed {seed}) -> {out_dir}: {n_c} concepts x {k_h} dims, {len(things_ids)} THINGS / "
        f"{len(lv_ids)} Levels / {len(coco_ids)} COCO images, d={d}, {len(trip)} triplets, "
        f"{n_lv} Levels trials, {c['fmri_subjects']} fMRI subjects x {c['n_voxels']} voxels x {n_ses * n_tr} trials")
    return paths
