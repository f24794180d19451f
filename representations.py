"""The representations evaluate.py compares, and how their results are printed.

`base` (backbone features of each concept's first sorted image), `spose` (the human embedding), and for each
meta checkpoint (--ckpt) `aligned` = encode(features) plus, when it was trained with --input-pca, the control
`base_pca`. Used by the eval_*.py tasks.
"""
import os

import torch

import data


def aligned_representations(cfg, X, chunk=8192):
    """{name: encode(X)} for every --ckpt (names aligned, aligned2, ...): the meta-learned embedding of [0, x]
    applied to image features X (n, d), in chunks, without gradients -> (n, d_model) float32 arrays.
    A checkpoint trained with --input-pca adds its control, base_pca (base_pca2, ...): the base features
    standardised and projected onto the same principal subspace, i.e. what the embedding reads before learning."""
    out = {}
    for k, path in enumerate(p.strip() for p in cfg["ckpt"].split(",") if p.strip()):
        if not os.path.exists(path):
            raise data.DataError(f"{path} not found; expected a meta checkpoint from train.py --stage meta (--ckpt)")
        from models import load_meta
        try:
            model, _ = load_meta(path)
        except (ValueError, RuntimeError) as e:  # not a meta checkpoint / weights that do not fit its model_args
            raise data.DataError(f"{path}: {e}") from None
        d_in = model.embedding.in_features - 1
        if X.shape[1] != d_in:
            raise data.DataError(f"{path}: the checkpoint embeds {d_in}-d features, --features has {X.shape[1]} "
                                 "columns")
        with torch.no_grad():
            Z = torch.cat([model.encode(torch.as_tensor(X[i:i + chunk])) for i in range(0, len(X), chunk)])
        out["aligned" if k == 0 else f"aligned{k + 1}"] = Z.float().numpy()
        e = model.embedding
        if e.in_basis.shape[1]:  # coordinates in the subspace: ((x - shift) * scale) @ basis
            Xt = torch.as_tensor(X, dtype=e.in_shift.dtype)
            Zp = ((Xt - e.in_shift[1:]) * e.in_scale[1:] @ e.in_basis).numpy()
            out["base_pca" if k == 0 else f"base_pca{k + 1}"] = Zp
    return out


def load_representations(cfg):
    """The concept-level representations to compare: {'base': (n_concepts, d), 'spose': (n_concepts, k)}, plus
    `aligned` (and `aligned2`, ...) for each --ckpt."""
    concepts = data.load_concepts(cfg["data"])
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    rows = data.concept_rows(ids, concepts, path=cfg["features"])
    spose = data.load_spose(cfg["data"], n_concepts=len(concepts))
    reps = {"base": X[rows], "spose": spose}
    reps.update(aligned_representations(cfg, X[rows]))
    return concepts, reps


def cosine_similarity_matrix(R):
    """(n, d) -> (n, n) cosine similarities; zero rows get similarity 0 to everything."""
    R = torch.as_tensor(R, dtype=torch.float64)
    norms = R.norm(dim=1, keepdim=True)
    Rn = R / torch.where(norms > 0, norms, torch.ones_like(norms))
    return (Rn @ Rn.T).numpy()


def z_value(ci):
    """Two-sided normal quantile of a confidence level, e.g. 0.95 -> 1.96."""
    from scipy.stats import norm
    return float(norm.ppf(0.5 + ci / 2))


def print_table(title, metric, rows, ceiling):
    print(f"\n{title}\n{'representation':<16}{metric:>10}   {'CI':<20}")
    for name, value, ci in rows:
        print(f"{name:<16}{value:>10.4f}   {'' if not ci else f'[{ci[0]:.4f}, {ci[1]:.4f}]'}")
    print(f"{'noise ceiling':<16}{ceiling:>10.4f}")
