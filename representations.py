"""The representations evaluate.py compares, their controls, paired gains, and how results are printed.

`base` (backbone features of each concept's first sorted image), `spose` (the human embedding), and for each
meta checkpoint (--ckpt) `aligned` = encode(features) plus its controls:

    base_pca        the checkpoint's own input projection (standardised features on the pool's principal
                    subspace), when it was trained with --input-pca: what the embedding reads before learning
    base_z          the base features z-scored with the training pool's mean and sd
    base_white      the base features PCA-whitened with the training pool's covariance
    base_minus_pcs  the base features minus the training pool's mean and top k principal components,
                    k = --remove-pcs, or geometry.top_pcs_rule(d) = max(1, round(d / 100)) when 0
    sae_codes       the SAE's latent activations (dense, n_latents wide; latents silent on every evaluated
                    image dropped, which changes no measure here), from the SAE that wrote the codes the
                    checkpoint trained on, or --sae
    static_linear,  encode(features) of the control models passed with --controls-ckpt (named by their kind:
    noembed, ...    static_linear, noembed, lstm, transformer)

The training pool is the checkpoint's --features (or --pool): its statistics never come from the evaluated images
and never from human data. Used by the eval_*.py tasks.
"""
import functools
import math
import os
import re

import numpy as np
import torch

import data

CONTROLS = ("base_pca", "base_z", "base_white", "base_minus_pcs", "sae_codes", "static_linear", "noembed", "lstm",
            "transformer")
POOL_CONTROLS = ("base_z", "base_white", "base_minus_pcs", "sae_codes")  # what --controls may name


def kind(name):
    """A representation's kind: its name without the checkpoint number (aligned2 -> aligned, base_z3 -> base_z)."""
    return re.sub(r"\d+$", "", name)


def is_control(name):
    return kind(name) in CONTROLS


def comparisons(names):
    """(aligned, other) pairs whose paired gain a task reports: every aligned* against base and every control."""
    names = list(names)
    return [(a, b) for a in names if kind(a) == "aligned" for b in names
            if b != a and kind(b) != "aligned" and b != "spose"]


def device(cfg):
    """--device: 'auto' is cuda when torch sees a GPU, else cpu (the same numbers as before on a CPU machine)."""
    d = str(cfg.get("device") or "auto")
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(d)
    except RuntimeError:
        raise data.DataError(f"--device {d!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise data.DataError(f"--device {d}: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
    return dev


# ------------------------------------------------------------------------------------------ the checkpoints

def _load_meta(path, what="--ckpt"):
    if not os.path.exists(path):
        raise data.DataError(f"{path} not found; expected a meta checkpoint from train.py --stage meta ({what})")
    from models import load_meta
    try:
        return load_meta(path)
    except (ValueError, RuntimeError) as e:  # not a meta checkpoint / weights that do not fit its model_args
        raise data.DataError(f"{path}: {e}") from None


def _encode(model, X, dev, path, chunk=8192):
    d_in = model.embedding.in_features - 1
    if X.shape[1] != d_in:
        raise data.DataError(f"{path}: the checkpoint embeds {d_in}-d features, --features has {X.shape[1]} columns")
    model = model.to(dev)
    with torch.no_grad():
        Z = torch.cat([model.encode(torch.as_tensor(X[i:i + chunk]).to(dev)).cpu() for i in range(0, len(X), chunk)])
    return Z.float().numpy()


@functools.lru_cache(maxsize=2)
def _pool(path, field, stamp):
    """The training pool (n, d) float32 and its PCA (geometry.pool_pca), read once per process and file version."""
    import geometry
    P, _ = data.read_features(path, field=field)
    return P, geometry.pool_pca(P)


def _pool_path(cfg, ck, ckpt_path):
    """The training pool a checkpoint names (its --features), or --pool; None when neither is known."""
    path = cfg.get("pool") or (ck.get("config") or {}).get("features")
    if not path:
        return None
    if not os.path.exists(path):
        raise data.DataError(f"{ckpt_path}: its training pool {path} (config 'features') not found; the pool-based "
                             "controls are fitted on it: pass --pool FILE, or --controls '' to skip them")
    return path


def _sae_path(cfg, ck, ckpt_path):
    """The SAE whose codes the checkpoint trained on: --sae, else the /sae 'checkpoint' attr of its codes file."""
    if cfg.get("sae"):
        if not os.path.exists(cfg["sae"]):
            raise data.DataError(f"--sae {cfg['sae']}: not found; expected an SAE checkpoint (train.py --stage sae)")
        return cfg["sae"]
    mc = ck.get("config") or {}
    if mc.get("functions", "sae") != "sae":
        return None
    codes = mc.get("codes") or mc.get("features")
    if not codes:
        return None
    import h5py
    try:
        with h5py.File(codes, "r") as f:
            sae = f["sae"].attrs.get("checkpoint") if "sae" in f else None
    except OSError:
        raise data.DataError(f"{ckpt_path}: its codes file {codes} (config 'codes') cannot be read; sae_codes needs "
                             "the SAE that wrote them: pass --sae FILE, or leave sae_codes out of --controls") from None
    if sae is None:
        raise data.DataError(f"{codes}: no /sae group with a 'checkpoint' attribute (written by train.py --stage sae "
                             "--encode); pass --sae FILE, or leave sae_codes out of --controls")
    sae = sae.decode() if isinstance(sae, bytes) else str(sae)
    if not os.path.exists(sae):
        raise data.DataError(f"{codes}: its SAE {sae} (/sae attribute 'checkpoint') not found; pass --sae FILE, or "
                             "leave sae_codes out of --controls")
    return sae


def sae_activations(sae_path, X, dev, chunk=8192):
    """Dense latent activations (n, n_latents) of the SAE on X, without the latents silent on every row (a column
    of zeros changes no similarity, CKA, ridge fit or probe) -> (Z (n, n_active) float32, kept latent ids)."""
    from models import load_sae
    sae, _ = load_sae(sae_path)
    if sae.d != X.shape[1]:
        raise data.DataError(f"{sae_path}: the SAE takes d = {sae.d} features, --features has {X.shape[1]} columns")
    sae = sae.to(dev)
    Z = torch.zeros(len(X), sae.n_latents)
    for i in range(0, len(X), chunk):
        v, idx = sae.encode(torch.as_tensor(X[i:i + chunk]).to(dev))
        Z[i:i + len(v)].scatter_(1, idx.cpu().long(), v.cpu().float())
    keep = torch.nonzero((Z != 0).any(0)).ravel()
    return Z[:, keep].numpy(), keep.numpy()


def control_settings(cfg):
    """--controls -> the pool-based controls to compute (DataError for unknown names)."""
    want = data.split_list(cfg.get("controls", ""))
    bad = [c for c in want if c not in POOL_CONTROLS]
    if bad:
        raise data.DataError(f"--controls: unknown {bad}; expected some of {list(POOL_CONTROLS)} ('' for none)")
    return want


def aligned_representations(cfg, X, chunk=8192):
    """{name: (n, d') float32} for every --ckpt (names aligned, aligned2, ...): the meta-learned embedding of [0, x]
    applied to image features X (n, d), in chunks on --device, without gradients; plus each checkpoint's controls
    (module docstring; names numbered like the checkpoint: base_z2 for the second) and the --controls-ckpt models.
    A control whose input the checkpoint does not name (no pool, no codes) is left out with a printed note.
    What each control was fitted on goes into cfg["_controls"] (evaluate.py writes it into the result file)."""
    import geometry
    out, seen, info = {}, set(), {}
    dev = device(cfg)
    wanted = control_settings(cfg)
    for k, path in enumerate(data.split_list(cfg.get("ckpt", ""))):
        sfx = "" if k == 0 else str(k + 1)
        model, ck = _load_meta(path)
        out["aligned" + sfx] = _encode(model, X, dev, path, chunk)
        e = model.embedding.cpu()
        if e.in_basis.shape[1]:  # coordinates in the subspace: ((x - shift) * scale) @ basis
            Xt = torch.as_tensor(X, dtype=e.in_shift.dtype)
            out["base_pca" + sfx] = ((Xt - e.in_shift[1:]) * e.in_scale[1:] @ e.in_basis).numpy()
        pool = _pool_path(cfg, ck, path) if set(wanted) - {"sae_codes"} else None
        if set(wanted) - {"sae_codes"} and pool is None:
            print(f"controls: {path} names no training pool (config 'features'); pass --pool FILE for "
                  f"{sorted(set(wanted) - {'sae_codes'})}")
        key = (os.path.abspath(pool) if pool else None, cfg.get("sae") or (ck.get("config") or {}).get("codes"))
        if key in seen:
            continue  # the same pool and SAE as an earlier checkpoint: the same controls
        seen.add(key)
        if pool is not None:
            field = "features"  # train.py --stage meta reads the pool's /features
            st = os.stat(pool)
            P, pca = _pool(os.path.abspath(pool), field, (st.st_mtime_ns, st.st_size))
            if P.shape[1] != X.shape[1]:
                raise data.DataError(f"{pool}: training pool of width {P.shape[1]}, --features has {X.shape[1]}")
            rule = int(cfg.get("remove_pcs") or 0) or geometry.top_pcs_rule(X.shape[1])
            info["pool" + sfx] = dict(path=pool, field=field, n_images=int(P.shape[0]), remove_pcs=rule,
                                      remove_pcs_rule="--remove-pcs" if cfg.get("remove_pcs") else
                                      "max(1, round(d / 100)) (Mu & Viswanath 2018), d = feature width",
                                      whitening="all d components, eigenvalues + 1e-6 mean eigenvalue")
            try:
                if "base_z" in wanted:
                    out["base_z" + sfx] = geometry.zscore(X, P).astype(np.float32)
                if "base_white" in wanted:
                    out["base_white" + sfx] = geometry.pca_whiten(X, P, pca=pca).astype(np.float32)
                if "base_minus_pcs" in wanted:
                    out["base_minus_pcs" + sfx] = geometry.remove_top_pcs(X, P, k=rule, pca=pca).astype(np.float32)
            except ValueError as err:
                raise data.DataError(f"--remove-pcs {cfg.get('remove_pcs')}: {err}") from None
        if "sae_codes" in wanted:
            sae = _sae_path(cfg, ck, path)
            if sae is None:
                print(f"controls: {path} names no SAE codes file (config 'codes'); pass --sae FILE for sae_codes")
            else:
                out["sae_codes" + sfx], kept = sae_activations(sae, X, dev, chunk)
                info["sae" + sfx] = dict(path=sae, active_latents=int(len(kept)))
    names = {}
    for path in data.split_list(cfg.get("controls_ckpt", "")):
        model, ck = _load_meta(path, "--controls-ckpt")
        name = "noembed" if (ck.get("model_args") or {}).get("no_embed") else model.kind
        names[name] = names.get(name, 0) + 1
        name += "" if names[name] == 1 else str(names[name])
        out[name] = _encode(model, X, dev, path, chunk)
        info[name] = dict(path=path)
    if out:
        cfg["_controls"] = info
    return out


def load_representations(cfg):
    """The concept-level representations to compare: {'base': (n_concepts, d), 'spose': (n_concepts, k)}, plus
    `aligned` (and `aligned2`, ...) and the controls for each --ckpt."""
    concepts = data.load_concepts(cfg["data"])
    X, ids = data.read_features(cfg["features"], field=cfg["field"])
    rows = data.concept_rows(ids, concepts, path=cfg["features"])
    spose = data.load_spose(cfg["data"], n_concepts=len(concepts))
    reps = {"base": X[rows], "spose": spose}
    reps.update(aligned_representations(cfg, X[rows]))
    return concepts, reps


# ------------------------------------------------------------------------------------------- paired gains

def _quantile(ci, df):
    from scipy.stats import t
    return float(t.ppf(0.5 + ci / 2, df)) if df >= 1 else float("nan")


def paired_gain(d, w=None, ci=0.95, unit="", method=None):
    """A gain that is a ratio of sums over paired units: delta = sum(d) / sum(w) (w = 1: the mean difference),
    with the linearised (delta-method) standard error sqrt(P / (P - 1) sum (d - delta w)^2) / sum(w) over the P
    units and a t interval on P - 1 degrees of freedom -> JSON-ready dict(delta, ci, se, n_units, unit, method)."""
    d = np.asarray(d, dtype=np.float64).ravel()
    w = np.ones_like(d) if w is None else np.asarray(w, dtype=np.float64).ravel()
    keep = w > 0
    d, w = d[keep], w[keep]
    P, W = len(d), w.sum()
    delta = float(d.sum() / W) if W > 0 else float("nan")
    se = float(np.sqrt(P / (P - 1) * ((d - delta * w) ** 2).sum()) / W) if P > 1 else float("nan")
    h = _quantile(ci, P - 1) * se
    return dict(delta=delta, ci=[delta - h, delta + h], se=se, n_units=int(P), unit=unit,
                method=method or f"paired over {unit}: linearised standard error, t interval")


def jackknife_gain(delta, loo, ci=0.95, unit="", method=None):
    """delta = the full-data difference; loo (G,) the differences with each unit (or group of units) left out ->
    jackknife standard error sqrt((G - 1) / G sum (loo - mean)^2) and a t interval on G - 1 degrees of freedom."""
    loo = np.asarray(loo, dtype=np.float64)
    G = len(loo)
    se = float(np.sqrt((G - 1) / G * ((loo - loo.mean()) ** 2).sum())) if G > 1 else float("nan")
    h = _quantile(ci, G - 1) * se
    return dict(delta=float(delta), ci=[float(delta) - h, float(delta) + h], se=se, n_units=int(G), unit=unit,
                method=method or f"jackknife over {unit} (paired), t interval")


def combine_strata(gains, ci=0.95, unit="", method=""):
    """Mean of per-stratum gains (e.g. subjects) with se = sqrt(sum se_s^2) / S and a t interval on the summed
    degrees of freedom (units treated as independent within and across strata)."""
    S = len(gains)
    delta = float(np.mean([g["delta"] for g in gains]))
    se = float(np.sqrt(sum(g["se"] ** 2 for g in gains)) / S)
    df = sum(g["n_units"] - 1 for g in gains)
    h = _quantile(ci, df) * se
    return dict(delta=delta, ci=[delta - h, delta + h], se=se, n_units=int(sum(g["n_units"] for g in gains)),
                unit=unit, method=method)


def block_jackknife_gains(stat, names, n, ci=0.95, n_blocks=20, unit="concepts"):
    """Paired gains of a statistic of n units that has no closed-form leave-one-out (RSA, class separation):
    stat(keep (n,) bool) -> {name: value}; units are split into G = min(n_blocks, n) blocks (unit i in block i % G),
    each left out once -> {(a, b): jackknife_gain}."""
    G = min(n_blocks, n)
    full = stat(np.ones(n, bool))
    loo = []
    for g in range(G):
        keep = np.arange(n) % G != g
        loo.append(stat(keep))
    out = {}
    for a, b in comparisons(names):
        out[(a, b)] = jackknife_gain(full[a] - full[b], [v[a] - v[b] for v in loo], ci, unit,
                                     f"delete-a-group jackknife over {G} blocks of {unit} (paired), t interval")
    return out


def put_gains(res, metric, gains):
    """Store {(a, b): gain} as res[a]['vs'][metric][b] (the report reads them there)."""
    for (a, b), g in gains.items():
        res[a].setdefault("vs", {}).setdefault(metric, {})[b] = g


def fit_gains(per, n_options, ci=0.95):
    """Paired gains in pooled McFadden R^2 from per-participant fits (choice.summarise_fit's `per`: log_lik, n_trials,
    the same participants for every representation): R^2_a - R^2_b = sum (ll_a - ll_b) / (ln K sum n)."""
    return {(a, b): paired_gain((per[a]["log_lik"] - per[b]["log_lik"]) / math.log(n_options), per[a]["n_trials"],
                                ci, "participants") for a, b in comparisons(per)}


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
