"""Representational geometry and model similarity (flat shared module used by evaluate.py).

    rdm(X, metric)                   condensed RDM (upper triangle, scipy pdist order)
    compare_rdms(a, b, method)       pearson | spearman | cosine between RDMs (rsatoolbox semantics)
    class_separation(X, labels)      Kornblith et al. 2021 class separation R^2 on L2-normalised rows
    similarity_matrices(models, ...) M x M CKA (linear, RBF at several bandwidths) and RSA matrices from
                                     one tiled pass per tile pair over all M models at once
    procrustes_to(A, B)              rotate/scale B's 2-D embedding onto A's (t-SNE panels)
    few_shot_probe(...)              k-shot / full multinomial logistic probes with a validation grid

Everything heavy is float64-accumulated torch; nothing stores an (n, n) matrix whole.
"""
import warnings

import numpy as np
import torch
from scipy.stats import rankdata

import kernels

# ------------------------------------------------------------------------------------------------------ RSA

RDM_METRICS = ("correlation", "cosine", "euclidean")


def _rows_for(X, metric):
    """Rows transformed so that the RDM is a function of inner products: correlation -> z-scored rows,
    cosine -> unit rows, euclidean -> centred rows (distances are translation invariant)."""
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    if metric == "correlation":
        X = X - X.mean(1, keepdim=True)
        return X / X.norm(dim=1, keepdim=True).clamp_min(1e-300)
    if metric == "cosine":
        return X / X.norm(dim=1, keepdim=True).clamp_min(1e-300)
    if metric == "euclidean":
        return X - X.mean(0)
    raise ValueError(f"RDM metric {metric!r}: expected one of {RDM_METRICS}")


def _rdm_tile(Z, norms, metric, i0, i1, j0, j1):
    G = Z[i0:i1] @ Z[j0:j1].T
    if metric in ("correlation", "cosine"):
        return 1.0 - G
    return (norms[i0:i1, None] + norms[None, j0:j1] - 2 * G).clamp_min(0).sqrt()


def rdm(X, metric="correlation"):
    """(n, d) -> (n (n - 1) / 2,) float64 dissimilarities for pairs i < j in scipy.spatial.distance.pdist
    order: correlation = 1 - Pearson r of rows, cosine = 1 - cosine, euclidean = Euclidean distance."""
    Z = _rows_for(X, metric)
    n = Z.shape[0]
    D = _rdm_tile(Z, (Z ** 2).sum(1), metric, 0, n, 0, n)
    return D[tuple(torch.triu_indices(n, n, offset=1))].numpy()


def compare_rdms(a, b, method="pearson"):
    """Similarity of two condensed RDMs: pearson (rsatoolbox 'corr'), spearman, or cosine."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"RDMs differ in length: {a.shape} vs {b.shape} (different image sets?)")
    if method == "spearman":
        a, b = rankdata(a), rankdata(b)
        method = "pearson"
    if method == "pearson":
        a, b = a - a.mean(), b - b.mean()
    elif method != "cosine":
        raise ValueError(f"RDM comparison {method!r}: expected pearson | spearman | cosine")
    den = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else float("nan")


# --------------------------------------------------------------------------------------- class separation

def class_separation(X, labels):
    """Class separation R^2 = 1 - d_within / d_total with cosine distance on L2-normalised rows (Kornblith et
    al. 2021, "Why do better loss functions lead to less transferable features?"), d_within the mean over
    classes of the mean within-class distance, d_total the mean over class pairs of the mean distance
    between them. Because mean cosine similarity over pairs = dot product of mean unit vectors, both are
    O(n d): d_within = 1 - mean_k |mu_k|^2, d_total = 1 - |mean_k mu_k|^2."""
    X = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    U = X / X.norm(dim=1, keepdim=True).clamp_min(1e-300)
    classes, idx = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"class separation needs at least 2 classes, got {len(classes)}")
    idx = torch.as_tensor(idx)
    mu = torch.zeros(len(classes), U.shape[1], dtype=torch.float64).index_add_(0, idx, U)
    mu /= torch.bincount(idx, minlength=len(classes)).unsqueeze(1)
    d_within = 1 - (mu ** 2).sum(1).mean()
    d_total = 1 - (mu.mean(0) ** 2).sum()
    return float(1 - d_within / d_total)


def class_separation_ref(X, labels):
    """The definition with explicit pairwise cosine distances (the oracle of class_separation)."""
    X = np.asarray(X, dtype=np.float64)
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    D = 1 - U @ U.T
    within = np.mean([D[np.ix_(labels == c, labels == c)].mean() for c in classes])
    total = np.mean([[D[np.ix_(labels == a, labels == b)].mean() for b in classes] for a in classes])
    return 1 - within / total


# ------------------------------------------------------------------------------------- model similarity

def _tile_sums(Zs, tile_fn, n, tile):
    """One pass over upper-triangle tile pairs for all M models at once. For model m's (n, n) matrix A_m
    (tile_fn(m, Z, i0, i1, j0, j1) gives any tile of it): full row sums (M, n), U[m, l] = sum_{i<j} A_m A_l,
    D[m, l] = sum_i A_m[i, i] A_l[i, i], u[m] = sum_{i<j} A_m. The pair products are one small GEMM
    of the stacked, flattened tiles per tile pair (M^2 tile^2 flops), so cost is O(M) kernel tiles, not O(M^2)."""
    M = len(Zs)
    f64 = dict(dtype=torch.float64)
    rows, U, D, u = torch.zeros(M, n, **f64), torch.zeros(M, M, **f64), torch.zeros(M, M, **f64), torch.zeros(M, **f64)
    for i0, i1, j0, j1 in kernels._tile_pairs(n, tile):
        T = torch.stack([tile_fn(m, Zs[m], i0, i1, j0, j1) for m in range(M)])  # (M, ti, tj)
        rows[:, i0:i1] += T.sum(2)
        if i0 == j0:
            iu = torch.triu_indices(i1 - i0, j1 - j0, offset=1)
            F = T[:, iu[0], iu[1]]
            dg = torch.diagonal(T, dim1=1, dim2=2)
            D += dg @ dg.T
        else:
            F = T.reshape(M, -1)
            rows[:, j0:j1] += T.sum(1)
        U += F @ F.T
        u += F.sum(1)
    return rows, U, D, u


def _normalise(H, what):
    """H / sqrt(diag H diag H'), NaN (with a warning naming the models) where a model is degenerate."""
    d = torch.sqrt(torch.diagonal(H).clamp_min(0))
    bad = (d <= 1e-12 * d.max().clamp_min(1e-300)).nonzero().ravel().tolist()
    if bad:
        warnings.warn(f"{what}: model(s) {bad} have a constant representation (0/0): their similarities are NaN")
        d[bad] = float("nan")
    return (H / torch.outer(d, d)).numpy()


def _cka_from_tile_sums(rows, U, D, n):
    P = 2 * U + D  # sum over the full matrix: both triangles and the diagonal
    s = rows.sum(1)
    return _normalise(P - 2 / n * rows @ rows.T + torch.outer(s, s) / n ** 2, "CKA")


def _pearson_from_tile_sums(U, u, N):
    return _normalise(U / N - torch.outer(u, u) / N ** 2, "RSA")


def similarity_matrices(models, measures=("cka_linear", "cka_rbf_1.0", "rsa_correlation"), tile=1024):
    """M x M similarity matrices of models over the same n images (models: list of (n, d_m) arrays).

    measures: cka_linear, cka_rbf_<sigma_frac> (median heuristic per model, computed once per model),
    rsa_<metric> (Pearson correlation of condensed RDMs, metric correlation|cosine|euclidean). Each measure
    is one tiled pass over all models together; memory O(M (n + tile^2))."""
    n = models[0].shape[0]
    for m, X in enumerate(models):
        if X.shape[0] != n:
            raise ValueError(f"model {m} has {X.shape[0]} rows, model 0 has {n}: models must share one image set")
    out = {}
    for meas in measures:
        if meas == "cka_linear":
            Zs = [kernels._centred(torch.as_tensor(np.asarray(X)).double())[0] for X in models]
            fn = lambda m, Z, i0, i1, j0, j1: Z[i0:i1] @ Z[j0:j1].T  # noqa: E731
            rows, U, D, _ = _tile_sums(Zs, fn, n, tile)
            out[meas] = _cka_from_tile_sums(rows, U, D, n)
        elif meas.startswith("cka_rbf_"):
            frac = float(meas[len("cka_rbf_"):])
            cz = [kernels._centred(torch.as_tensor(np.asarray(X)).double()) for X in models]
            gammas = [1 / (2 * (frac ** 2) * max(kernels.median_sq_dist(Z, tile=tile), 1e-300)) for Z, _ in cz]
            Zs = [Z for Z, _ in cz]

            def fn(m, Z, i0, i1, j0, j1, cz=cz, gammas=gammas):
                nrm = cz[m][1]
                d2 = (nrm[i0:i1, None] + nrm[None, j0:j1] - 2 * Z[i0:i1] @ Z[j0:j1].T).clamp_min(0)
                if i0 == j0:
                    d2.fill_diagonal_(0)
                return torch.exp(-gammas[m] * d2)
            rows, U, D, _ = _tile_sums(Zs, fn, n, tile)
            out[meas] = _cka_from_tile_sums(rows, U, D, n)
        elif meas.startswith("rsa_"):
            metric = meas[len("rsa_"):]
            Zs = [_rows_for(X, metric) for X in models]
            norms = [(Z ** 2).sum(1) for Z in Zs]
            fn = lambda m, Z, i0, i1, j0, j1: _rdm_tile(Z, norms[m], metric, i0, i1, j0, j1)  # noqa: E731
            _, U, _, u = _tile_sums(Zs, fn, n, tile)
            out[meas] = _pearson_from_tile_sums(U, u, n * (n - 1) / 2)
        else:
            raise ValueError(f"similarity measure {meas!r}: expected cka_linear, cka_rbf_<frac> or rsa_<metric>")
    return out


def upper(M):
    """Upper triangle (k = 1) of a square matrix as a vector."""
    return M[np.triu_indices(M.shape[0], 1)]


def consistency(mats):
    """Pearson correlation between datasets' model-similarity matrices (their upper triangles): (S, S)."""
    V = np.stack([upper(m) for m in mats])
    return np.corrcoef(V) if len(V) > 1 else np.ones((1, 1))


# ---------------------------------------------------------------------------------------------------- t-SNE

def procrustes_to(A, B):
    """B (n, 2) rotated, reflected, scaled and translated onto A (n, 2) by orthogonal Procrustes."""
    from scipy.linalg import orthogonal_procrustes
    A0, B0 = A - A.mean(0), B - B.mean(0)
    R, scale = orthogonal_procrustes(B0, A0)
    return B0 @ R * (scale / (B0 ** 2).sum()) + A.mean(0)


# --------------------------------------------------------------------------------------------------- probes

def few_shot_probe(Xtr, ytr, Xte, yte, shots, seeds, Cs=(0.01, 0.1, 1.0, 10.0), val_frac=0.2):
    """Multinomial logistic-regression probes on standardised features -> test accuracy per seed (n_seeds,).

    shots = k examples per class, or None for the full training set. The regularisation C is chosen from
    Cs on a validation set: for full probes a random val_frac split of the training data, for k-shot probes
    a disjoint draw of k further examples per class; the probe with the chosen C is fit on the fitting rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    Xtr, Xte, ytr, yte = map(np.asarray, (Xtr, Xte, ytr, yte))
    classes = np.unique(ytr)
    accs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        if shots is None:
            perm = rng.permutation(len(ytr))
            n_val = max(len(classes), int(val_frac * len(ytr)))
            val, fit = perm[:n_val], perm[n_val:]
        else:
            fit, val = [], []
            for c in classes:
                members = rng.permutation(np.nonzero(ytr == c)[0])
                if len(members) < 2 * shots:
                    raise ValueError(f"class {c!r} has {len(members)} training examples, {shots}-shot probing "
                                     f"with a validation draw needs {2 * shots}")
                fit += list(members[:shots])
                val += list(members[shots:2 * shots])
            fit, val = np.array(fit), np.array(val)
        scaler = StandardScaler().fit(Xtr[fit])

        def fitted(C, rows):
            return LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(Xtr[rows]), ytr[rows])
        best = max(Cs, key=lambda C: fitted(C, fit).score(scaler.transform(Xtr[val]), ytr[val]))
        accs.append(fitted(best, fit).score(scaler.transform(Xte), yte))
    return np.array(accs)


# ---------------------------------------------------------------------------------- unsupervised controls
# Post-hoc transforms of base features that a reviewer would try before crediting meta-learning: each is
# fitted on the training pool only (never on an evaluated image set, never on human data). Arrays in,
# float64 arrays out.

def pool_pca(pool):
    """The pool's (n, d) mean (d,), covariance eigenvalues (d,) in descending order and eigenvectors (d, d) as
    columns, float64 (one d x d eigendecomposition: d is a feature width, at most a few thousand)."""
    P = np.asarray(pool, dtype=np.float64)
    if P.ndim != 2 or len(P) < 2:
        raise ValueError(f"training pool must be (n >= 2, d), got shape {P.shape}")
    mu = P.mean(0)
    C = np.cov(P - mu, rowvar=False).reshape(P.shape[1], P.shape[1])
    lam, V = np.linalg.eigh(C)
    return mu, lam[::-1].clip(min=0), V[:, ::-1]


def _check_width(X, pool):
    X, P = np.asarray(X, dtype=np.float64), np.asarray(pool)
    if X.ndim != 2 or P.ndim != 2 or X.shape[1] != P.shape[1]:
        raise ValueError(f"features {X.shape} and training pool {P.shape} must be 2-d with the same width")
    return X


def zscore(X, pool):
    """(X - pool mean) / pool sd per feature; features constant on the pool map to 0."""
    X, P = _check_width(X, pool), np.asarray(pool, dtype=np.float64)
    sd = P.std(0)
    return np.where(sd > 0, (X - P.mean(0)) / np.where(sd > 0, sd, 1.0), 0.0)


def pca_whiten(X, pool, rank=None, shrinkage=1e-6, pca=None):
    """PCA whitening with the pool's covariance: (X - mu) @ V_r / sqrt(lam_r + shrinkage * mean(lam)), the top
    `rank` components (None = all d). The shrinkage keeps directions the pool barely spans finite.
    pca: pool_pca(pool) when already computed (several transforms of one pool)."""
    X = _check_width(X, pool)
    mu, lam, V = pool_pca(pool) if pca is None else pca
    r = X.shape[1] if rank is None else int(rank)
    if not 1 <= r <= X.shape[1]:
        raise ValueError(f"whitening rank {rank} must be in 1..{X.shape[1]}")
    return (X - mu) @ V[:, :r] / np.sqrt(lam[:r] + shrinkage * lam.mean() + 1e-300)


def top_pcs_rule(d):
    """How many principal components remove_top_pcs removes by default: max(1, round(d / 100)), the
    "all-but-the-top" rule of Mu & Viswanath (2018). It depends on the feature width only, never on human data."""
    return max(1, int(round(d / 100)))


def remove_top_pcs(X, pool, k=None, pca=None):
    """X minus the pool mean and its projection on the pool's top k principal components (k = top_pcs_rule(d)
    when None; 0 only centres). pca: pool_pca(pool) when already computed."""
    X = _check_width(X, pool)
    k = top_pcs_rule(X.shape[1]) if k is None else int(k)
    if not 0 <= k < X.shape[1]:
        raise ValueError(f"number of removed components k = {k} must be in 0..{X.shape[1] - 1}")
    mu, _, V = pool_pca(pool) if pca is None else pca
    Xc = X - mu
    return Xc - (Xc @ V[:, :k]) @ V[:, :k].T
