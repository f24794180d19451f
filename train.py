r"""Features -> checkpoints: every training stage (--stage sae | meta | warp), one parser per stage.

    python train.py --stage sae  --features F.h5 --out runs/sae/NAME.pt                 # top-k sparse autoencoder
    python train.py --stage sae --encode --ckpt runs/sae/NAME.pt --features F.h5 [--codes-out C.h5]   # its codes
    python train.py --stage meta --features coco.h5 --codes C.h5 --eval-features coco_eval.h5 --eval-codes EC.h5 \
        --out runs/meta/NAME.pt                                                          # meta-learned Transformer
    python train.py --stage meta --config configs/paper/main.toml --features ... --out ...  # the original's recipe
    python train.py --stage warp --features F.h5 --targets brain|spose --d 1,10,100 --out runs/warp/NAME.json
    python train.py --stage sae --help                                                   # that stage's flags only
    python train.py --stage meta --config configs/demo.toml --features ... --out ...    # a preset's [meta] table
    torchrun --nproc_per_node=2 train.py --stage meta ...     # DDP: gloo on CPU, NCCL on GPU; same global batch
    sbatch slurm/train_meta.sbatch                            # SLURM: one node, torchrun inside

The same idea has the same flag in every stage: --lr, --batch, --steps (sae: --epochs), --device, --threads,
--resume, --progress; --config FILE.toml reads the file's table for the stage ([sae], [meta], [warp]) and
flags given on the command line override it. Feature paths default to data/features/clip/ (extract.py's
output); the demo passes the world's (Makefile, configs/demo.toml).

sae: top-k SAE (Gao et al. 2024) on rows streamed from HDF5; writes --out (config + versions) and
<out>.last.pt (for --resume). --ckpt also reads ViT-Prisma top-k SAEs; --encode writes /sae/indices and
/sae/values (models.sae_encode). meta: writes the best checkpoint by --select on the held-out split
--eval-features (--out, with config + versions), <out>.last.pt (for --resume), <out>.csv (with the online-ridge
bound), <out>.png, and with --tensorboard DIR event files; refuses selection pools that share images with the
human-evaluation sets (--forbid). warp: the performance-vs-d curve of encoder warping
(eval_warp.py) as a result JSON, resumed d by d.
"""
import argparse
import os
import sys

import torch

import data
from data import atomic_path

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(  # every stage
    stage="sae",                                # sae | meta | warp
    config="",                                  # TOML preset: its [sae] / [meta] / [warp] table sets this stage's flags
    out="",                                     # output: checkpoint (sae, meta) or result JSON (warp)
    seed=0,                                     # random seed
    device="auto",                              # auto | cpu | cuda
    threads=0,                                  # torch threads (0 = torch default)
    progress=True,                              # tqdm progress bar
)


# ------------------------------------------------------------------------------------------------ sae stage
defaults_sae = dict(
    features="data/features/clip/coco.h5",      # training features (HDF5, /features + /image_ids); --encode: its input
    n_latents="auto",                           # SAE latents: auto (models.sae_size), a count ("12288") or a multiple
                                                # of d ("16x")
    k=0,                                        # active latents per row (top-k; 0 = models.sae_size's)
    min_nonzero=120,                            # a latent is a function if active on >= this many rows (as in --stage
                                                # meta): sets the auto width and the report's function count
    normalize="expected_average",               # expected_average (E|x|^2 = d) | none | layer_norm |
                                                # constant_norm_rescale (ViT-Prisma's options)
    aux_k=0,                                    # AuxK: dead latents used to model the residual (0 = d / 2, Gao et al.)
    aux_coef=1 / 32,                            # weight of the AuxK loss
    dead_rows=0,                                # a latent is dead after this many rows without firing (0 = one epoch)
    epochs=0,                                   # passes over the features (0 = models.sae_size's: ~800k rows in all)
    batch=256,                                  # rows per Adam step (as the sizing rule was measured)
    lr=0.0,                                     # Adam learning rate (0 = 2e-4 / sqrt(n_latents / 2^14), Gao et al.)
    chunk_rows=65536,                           # rows read from HDF5 at once (rows shuffled within chunks, chunks too)
    log_every=50,                               # steps between log lines (FVU, L0, dead fraction)
    ckpt_every=500,                             # steps between resumable checkpoints <out>.last.pt
    resume=False,                               # continue from <out>.last.pt
    overwrite=False,                            # start over: replace --out and its resume state <out>.last.pt
    encode=False,                               # encode --features with --ckpt into /sae/indices, /sae/values
    ckpt="",                                    # SAE checkpoint to encode with (own or ViT-Prisma format)
    codes_out="",                               # write the codes here ('' = into --features itself)
    codes_dtype="float16",                      # dtype of /sae/values: float16 | float32
)


def _sae_epoch_batches(n, chunk, batch, seed, epoch):
    """The batches of one epoch, deterministic in (seed, epoch): chunk order shuffled, rows shuffled within
    each chunk -> list of (chunk_start, chunk_stop, permutation of the chunk, [(b0, b1), ...])."""
    import numpy as np
    rng = np.random.default_rng([seed, epoch])
    out = []
    for c in rng.permutation((n + chunk - 1) // chunk):
        c0, c1 = c * chunk, min(n, (c + 1) * chunk)
        out.append((c0, c1, rng.permutation(c1 - c0), [(b, min(b + batch, c1 - c0)) for b in range(0, c1 - c0, batch)]))
    return out


def _sae_loss(sae, xn, rows_since_fired, dead_rows, aux_k, aux_coef):
    """Normalised MSE + aux_coef * AuxK (Gao et al. 2024) -> (loss, fvu, values, indices)."""
    recon, values, indices, pre = sae(xn)
    err = xn - recon
    denom = ((xn - xn.mean(0)) ** 2).sum().clamp_min(1e-12)
    fvu = (err ** 2).sum() / denom
    loss = fvu
    dead = rows_since_fired > dead_rows
    if aux_coef > 0 and bool(dead.any()):
        ka = min(aux_k, int(dead.sum()))
        av, ai = torch.relu(pre.masked_fill(~dead.to(pre.device), float("-inf"))).topk(ka, dim=1)
        e_hat = torch.nn.functional.embedding_bag(ai, sae.W_dec, per_sample_weights=av, mode="sum")
        e = err.detach()
        loss = loss + aux_coef * ((e - e_hat) ** 2).sum() / ((e - e.mean(0)) ** 2).sum().clamp_min(1e-12)
    return loss, fvu, values, indices


def _sae_save(path, sae, cfg, step, epoch, opt=None, rows_since_fired=None, metrics=None):
    state = {k: v.detach().cpu() for k, v in sae.state_dict().items()}
    ckpt = dict(kind="metalign.sae", sae_args=sae.args(), state_dict=state,
                config=cfg, versions=data.versions(), step=step, epoch=epoch, metrics=metrics or {},
                optimizer=opt.state_dict() if opt is not None else None,
                rows_since_fired=rows_since_fired.cpu() if rows_since_fired is not None else None)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def _resume_or_start_over(cfg, last):
    """Whether this run continues `last` (<out>.last.pt). An earlier run's files are never replaced silently: without
    --resume or --overwrite they stop the run with a message saying how to do either; --overwrite removes them."""
    out = cfg["out"]
    if cfg["resume"] and cfg["overwrite"]:
        sys.exit("train.py: error: --resume continues <out>.last.pt and --overwrite starts over; pass one of them")
    if cfg["resume"]:
        if os.path.exists(last):
            return True
        print(f"train.py: --resume: no resume state {last}; starting at step 0")
        return False
    if cfg["overwrite"]:
        for p in (last, out):
            if os.path.exists(p):
                os.remove(p)
                print(f"train.py: --overwrite: removed {p}")
        return False
    if os.path.exists(last):
        step = data.load_checkpoint(last, "resume state").get("step")
        sys.exit(f"train.py: error: {last} holds the resume state of an earlier run to {out} (step {step}); pass "
                 "--resume to continue it, or --overwrite to start over")
    if os.path.exists(out):
        sys.exit(f"train.py: error: {out} exists; pass --overwrite to replace it, or another --out")
    return False


def stage_sae(cfg):
    """Train a top-k SAE on --features (streamed from HDF5), or with --encode write its codes; returns metrics."""
    import math
    import numpy as np
    from tqdm import tqdm
    from models import TopKSAE, feature_rows, geometric_median, open_features
    if cfg["encode"]:
        return sae_encode(cfg)
    if not cfg["out"]:
        sys.exit("train.py: error: --stage sae needs --out sae/NAME.pt (or --encode --ckpt CKPT)")
    f, dset = open_features(cfg["features"])
    n, d = dset.shape
    if n == 0:
        raise data.DataError(f"{cfg['features']}: /features has 0 rows; nothing to train on")
    cfg = resolve_sae_size(cfg, n, d)  # auto / 0 values resolved by the sizing rule (models.sae_size)
    n_latents = int(cfg["n_latents"])
    dev = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available() else
                       ("cpu" if cfg["device"] == "auto" else cfg["device"]))
    torch.manual_seed(cfg["seed"])
    B, chunk = cfg["batch"], max(cfg["chunk_rows"], cfg["batch"])
    aux_k = cfg["aux_k"] or max(1, d // 2)
    dead_rows = cfg["dead_rows"] or n
    lr = cfg["lr"] or 2e-4 / math.sqrt(n_latents / 2 ** 14)
    sae = TopKSAE(d, n_latents, cfg["k"], cfg["normalize"]).to(dev)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)  # Gao et al.: a small eps
    rows_since_fired = torch.zeros(n_latents, dtype=torch.int64, device=dev)
    last = cfg["out"] + ".last.pt"
    step, epoch0 = 0, 0
    if _resume_or_start_over(cfg, last):
        ck = data.load_checkpoint(last, "SAE resume state", map_location=dev)
        if ck.get("sae_args") != sae.args():
            sys.exit(f"train.py: error: {last}: checkpoint of another shape {ck.get('sae_args')}; these flags give "
                     f"{sae.args()} (match the flags, or --overwrite to start over)")
        sae.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        rows_since_fired = ck["rows_since_fired"].to(dev)
        step, epoch0 = ck["step"], ck["epoch"]
        print(f"train.py: resuming {last} at step {step} (epoch {epoch0})")
    else:  # init: normalisation scale and b_dec (geometric median) from a random sample of rows
        rows = np.sort(np.random.default_rng(cfg["seed"]).choice(n, size=min(n, 8192), replace=False))
        sample = torch.from_numpy(np.asarray(dset[rows], dtype=np.float32)).to(dev)
        if not bool(torch.isfinite(sample).all()):
            raise data.DataError(f"{cfg['features']}: /features has NaN/inf values (in the initialisation sample)")
        sae.fit_normalization(sample)
        with torch.no_grad():
            sae.b_dec.copy_(geometric_median(sae.normalize_in(sample)[0]))
    steps_per_epoch = sum(len(b[3]) for b in _sae_epoch_batches(n, chunk, B, cfg["seed"], 0))
    total = cfg["epochs"] * steps_per_epoch
    rule = cfg["sizing"]["from_rule"]
    print(f"train.py: SAE d={d} n_latents={n_latents} k={cfg['k']} normalize={cfg['normalize']} lr={lr:.2e} on "
          f"{n} rows of {cfg['features']}: {cfg['epochs']} epochs x {steps_per_epoch} steps of {B} rows ({dev})"
          + (f"; {', '.join(rule)} by the sizing rule (models.sae_size, min_nonzero {cfg['min_nonzero']})"
             if rule else ""))
    bar = tqdm(total=total, initial=step, disable=not cfg["progress"], desc="sae", leave=False)
    hist, win = [], dict(fvu=0.0, l0=0.0, m=0)
    for epoch in range(epoch0, cfg["epochs"]):
        skip = step - epoch * steps_per_epoch  # batches of this epoch already done (a resumed run)
        for c0, c1, perm, batches in _sae_epoch_batches(n, chunk, B, cfg["seed"], epoch):
            if skip >= len(batches):
                skip -= len(batches)
                continue
            X = feature_rows(cfg["features"], dset, c0, c1)[torch.from_numpy(perm)].to(dev)
            for b0, b1 in batches[skip:]:
                xn, _ = sae.normalize_in(X[b0:b1])
                loss, fvu, values, indices = _sae_loss(sae, xn, rows_since_fired, dead_rows, aux_k, cfg["aux_coef"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sae.remove_parallel_grad()
                opt.step()
                sae.renorm_decoder()
                with torch.no_grad():
                    rows_since_fired += b1 - b0
                    rows_since_fired[indices[values > 0]] = 0
                step += 1
                bar.update(1)
                win["fvu"] += fvu.item()
                win["l0"] += float((values > 0).sum(1).float().mean())
                win["m"] += 1
                if step % cfg["log_every"] == 0 or step == total:
                    row = dict(step=step, epoch=epoch, fvu=win["fvu"] / win["m"], l0=win["l0"] / win["m"],
                               dead=float((rows_since_fired > dead_rows).float().mean()))
                    hist.append(row)
                    win = dict(fvu=0.0, l0=0.0, m=0)
                    bar.write(f"step {step:6d}/{total}  fvu {row['fvu']:.4f}  L0 {row['l0']:.1f}  "
                              f"dead {row['dead']:.3f}")
                if step % cfg["ckpt_every"] == 0:
                    _sae_save(last, sae, cfg, step, epoch, opt, rows_since_fired)
            skip = 0
        _sae_save(last, sae, cfg, step, epoch + 1, opt, rows_since_fired)
    bar.close()
    # final metrics over every row, with the fused encode (the path --encode takes)
    sse = sst = 0.0
    mean = None
    positives = torch.zeros(n_latents, dtype=torch.int64)  # rows each latent is active on (value > 0)
    with torch.no_grad():
        for c0 in range(0, n, chunk):  # two streamed passes: the mean, then the residual and total sums
            x = feature_rows(cfg["features"], dset, c0, min(n, c0 + chunk)).to(dev)
            mean = x.sum(0) if mean is None else mean + x.sum(0)
        mean = mean / n
        for c0 in range(0, n, chunk):
            x = feature_rows(cfg["features"], dset, c0, min(n, c0 + chunk)).to(dev)
            v, i = sae.encode(x)
            xr = sae.decode(x, v, i)
            sse += float(((x - xr) ** 2).sum())
            sst += float(((x - mean) ** 2).sum())
            positives += torch.bincount(i[v > 0].cpu(), minlength=n_latents)
    world_dir = _world_of(cfg["features"], f)
    f.close()
    metrics = dict(fvu=sse / sst, steps=step, **_sae_usage(positives.numpy(), cfg["min_nonzero"]), history=hist)
    if world_dir:  # a synthetic world's pool: the decoder rows against its planted factors
        from world import factor_directions
        metrics["factor_recovery"] = dict(factor_directions(sae.W_dec, world_dir, name=cfg["out"]), world=world_dir)
    _sae_save(cfg["out"], sae.cpu(), cfg, step, cfg["epochs"], metrics=metrics)
    print(f"train.py: SAE -> {cfg['out']}: FVU {metrics['fvu']:.4f} over all {n} rows; {metrics['n_dead']} of "
          f"{n_latents} latents never active ({metrics['dead_fraction']:.3f}); {metrics['n_functions']} functions "
          f"(latents active on >= {cfg['min_nonzero']} rows; median {metrics['function_positives_median']:.0f} "
          f"positives) (resume state in {last})")
    if world_dir:
        r = metrics["factor_recovery"]
        print(f"train.py: factor recovery on the world {world_dir}: h {r['h_recovered']:.2f}, "
              f"g {r['g_recovered']:.2f} of the planted directions have a decoder row at cosine > {r['threshold']} "
              f"(median best cosine {r['h_best_cosine_median']:.3f} / {r['g_best_cosine_median']:.3f})")
    return metrics


def resolve_sae_size(cfg, n_rows, d):
    """cfg with --n-latents auto, --k 0 and --epochs 0 resolved by the sizing rule models.sae_size (on the pool's
    n_rows and d, --min-nonzero, and a --k given explicitly) and '16x' as a count; `sizing` records the flags
    as given and which came from the rule."""
    from models import sae_size
    nl = cfg["n_latents"]
    rule = sae_size(n_rows, d, cfg["min_nonzero"], k=cfg["k"] or None)
    try:
        n_latents = rule["n_latents"] if nl == "auto" else int(float(nl[:-1]) * d) if nl.endswith("x") else int(nl)
    except ValueError:
        sys.exit(f"train.py: error: --n-latents {nl!r}; expected auto, a count (12288) or a multiple of d (16x)")
    k = cfg["k"] or min(rule["k"], n_latents)
    if not 1 <= k <= n_latents:
        sys.exit(f"train.py: error: --k {k} must be in 1..n_latents = {n_latents}")
    auto = dict(n_latents=nl == "auto", k=not cfg["k"], epochs=not cfg["epochs"])
    from_rule = [name for name, a in auto.items() if a]
    sizing = dict(rule="models.sae_size", n_rows=n_rows, d=d, min_nonzero=cfg["min_nonzero"], from_rule=from_rule,
                  given={key: cfg[key] for key in ("n_latents", "k", "epochs")})
    return dict(cfg, n_latents=str(n_latents), k=k, epochs=cfg["epochs"] or rule["epochs"], sizing=sizing)


def _sae_usage(positives, min_nonzero):
    """positives (n_latents,): rows each latent is active on -> dead latents (never active) and functions (latents
    active on >= min_nonzero rows, as models.functions_from_codes selects them)."""
    import numpy as np
    fn = positives[positives >= min_nonzero]
    return dict(dead_fraction=float((positives == 0).mean()), n_dead=int((positives == 0).sum()),
                n_functions=int(len(fn)), min_nonzero=int(min_nonzero),
                function_positives_median=float(np.median(fn)) if len(fn) else 0.0)


def _world_of(features, f):
    """The root of the embedded world whose pool `features` is (open h5py file f with attr synthetic, and
    world_truth.h5 two folders up: WORLD/features/coco.h5), else ''."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(features)))
    ok = bool(f.attrs.get("synthetic", False)) and os.path.isfile(os.path.join(root, "world_truth.h5"))
    return root if ok else ""


def sae_encode(cfg):
    """--encode: the codes of --features by the SAE --ckpt (models.sae_encode) into --codes-out or --features."""
    from models import sae_encode as encode
    if not cfg["ckpt"]:
        sys.exit("train.py: error: --encode needs --ckpt (an SAE checkpoint: train.py --stage sae --out, or "
                 "ViT-Prisma)")
    if cfg["codes_dtype"] not in ("float16", "float32"):
        sys.exit(f"train.py: error: --codes-dtype {cfg['codes_dtype']!r}; expected float16 | float32")
    return encode(cfg["features"], cfg["ckpt"], cfg["codes_out"], cfg["codes_dtype"], cfg["chunk_rows"], config=cfg)


# ----------------------------------------------------------------------------------------------- meta stage
defaults_meta = dict(
    features="data/features/clip/coco.h5",      # training image pool (HDF5, /features + /image_ids)
    codes="",                                   # where the functions come from, rows matched to --features by
                                                # /image_ids ('' = --features): /sae/indices + /sae/values (sae) or
                                                # /features (neurons), e.g. the CLIP SAE's codes for any backbone
    eval_features="",                           # selection pool ('' = coco_eval.h5 beside --features): a held-out
                                                # split of the training pool's source (COCO val+test), never an
                                                # image set the evaluations score
    eval_codes="",                              # its functions ('' = --eval-features), matched by /image_ids
    forbid="",                                  # feature files whose images neither pool may share, comma-separated
                                                # ('' = things.h5, levels.h5 beside --features; none = no check)
    functions="sae",                            # sae (latents of the codes) | neurons (feature dims split at median)
    min_nonzero=120,                            # a latent is a function if active on at least this many training images
    holdout=0.0,                                # share of functions held out of training (0: all, on the eval pool)
    model="transformer",                        # transformer | lstm | static_linear (non-meta multitask baseline)
    no_embed=False,                             # ablation: frozen identity embedding (encode(x) = x)
    standardize=True,                           # z-score features by the pool's mean/std inside the embedding
    input_pca=0.0,                              # embedding reads the pool's top principal subspace (of standardised
                                                # features): r >= 1 directions, or the share of variance in (0, 1);
                                                # 0 = all
    embed_init="orthogonal",                    # orthogonal (encode starts as an isometry) | default (nn.Linear)
    embed_gain=1.0,                             # gain of the orthogonal embedding init
    d_model=0,                                  # model width (0 = feature width d)
    n_layers=2,                                 # Transformer blocks / LSTM layers
    n_heads=4,                                  # attention heads (head size must be even: RoPE)
    mlp=True,                                   # MLP in each block
    dropout=0.0,                                # attention dropout
    smear=True,                                 # smeared keys: each key mixes in the previous position's (ours;
                                                # the original has none: the paper presets set false)
    length=120,                                 # episode length L
    length_start=0,                             # curriculum: training L grows linearly from this to --length (0 = off)
    length_ramp=1000,                           # steps over which the curriculum reaches --length
    functions_start=0,                          # function curriculum: train first on this many densest functions,
                                                # widening geometrically to all (0 = all from the start; ours)
    functions_ramp=3000,                        # steps over which the function curriculum reaches every function
    batch=64,                                   # episodes per step (global: split over torchrun ranks)
    steps=3000,                                 # optimisation steps
    lr=3e-4,                                    # peak learning rate
    weight_decay=0.05,                          # AdamW decoupled weight decay
    embed_decay=True,                           # weight decay on the embedding too (the original keeps it out)
    decay_vectors=False,                        # weight decay on biases, LayerNorms and loss weights too (original: on)
    warmup=100,                                 # linear warm-up steps
    clip=1.0,                                   # gradient-norm clipping (0 = off)
    optimizer="adamw",                          # adamw (warm-up + cosine) | schedulefree (schedule-free AdamW)
    mag_scale="function",                       # magnitudes divided by: function (each function's std) | global
                                                # (one std of every magnitude of the training functions)
    mag_target="scaled",                        # magnitude head's target: scaled (as in the input) | raw
    eval_every=100,                             # steps between held-out evaluations
    eval_episodes=256,                          # held-out episodes per evaluation (fixed seed)
    eval_per_function=0,                        # instead: this many held-out episodes per evaluated function (0 = off)
    select="accuracy",                          # checkpoint score: accuracy | paper (0.5 accuracy + 0.5 magnitude R^2)
    patience=10,                                # early stopping: evaluations without improvement (0 = off)
    min_steps=1000,                             # early stopping counts only from this step on
    min_accuracy=0.0,                           # ... and only once held-out accuracy reaches this
    min_delta=0.0,                              # ... where a better score must beat the best by more than this
    icl_bound=256,                              # online-ridge ICL bound on the first held-out episodes (0 = off)
    tensorboard="",                             # also write TensorBoard event files into this folder
    compile=False,                              # torch.compile the model
    max_minutes=0.0,                            # stop at the first evaluation after this many minutes (0 = off)
    resume=False,                               # continue from <out>.last.pt
    overwrite=False,                            # start over: replace --out, its resume state and its log
)
# the settings a --resume must share with the run it continues (besides the model's shape)
META_RESUME_KEYS = ("functions", "min_nonzero", "holdout", "length", "seed", "optimizer", "standardize", "input_pca",
                    "mag_scale", "mag_target",
                    "length_start", "length_ramp", "functions_start", "functions_ramp")

SELECT = ("accuracy", "paper")


def _forbidden_overlap(cfg, pools):
    """Refuse pools that share images with a human-evaluation image set: selecting (or training) on the images the
    evaluations then score leaks them. pools: {flag: (path, image_ids)}. --forbid lists the sets ('' = the THINGS
    and Levels features beside the training pool, skipped where absent; none = no check)."""
    import h5py
    if cfg["forbid"].strip().lower() == "none":
        return
    named = data.split_list(cfg["forbid"])
    files = named or [os.path.join(os.path.dirname(cfg["features"]), f) for f in ("things.h5", "levels.h5")]
    for path in files:
        if not os.path.exists(path):
            if named:
                sys.exit(f"train.py: error: --forbid {path}: not found; expected a features file with /image_ids")
            continue
        with h5py.File(path, "r") as f:
            if "image_ids" not in f:
                sys.exit(f"train.py: error: --forbid {path}: field '/image_ids' missing")
            banned = set(data.decode_strings(f["image_ids"][...]))
        for flag, (pool, ids) in pools.items():
            if os.path.abspath(pool) == os.path.abspath(path):
                n = len(ids)
            else:
                n = len(banned.intersection(ids))
            if n:
                sys.exit(f"train.py: error: {flag} {pool} shares {n} image ids with {path}, an image set the "
                         "human evaluations score: model selection (and training) must never see those images. "
                         "Select on a held-out split of the training pool (COCO val+test: coco_eval.h5), or pass "
                         "--forbid none to skip this check")


def _meta_functions(cfg, X, ids, Xe, ide):
    """Training and held-out functions: (train_fns, eval_fns, heads of eval fns for static_linear or None)."""
    import numpy as np
    from models import functions_from_codes, functions_from_neurons, match_rows, read_codes
    L, kind = cfg["length"], cfg["functions"]
    if kind not in ("sae", "neurons"):
        sys.exit(f"train.py: error: --functions {kind!r}; expected sae | neurons")
    if kind == "sae" and cfg["min_nonzero"] < L:
        sys.exit(f"train.py: error: --min-nonzero {cfg['min_nonzero']} < --length {L}: every function needs at "
                 f"least L positives per episode")

    def source(features_key, codes_key, Xp, idp):  # one pool's codes (sae) or neuron matrix, rows as its features
        path = cfg[codes_key] or cfg[features_key]
        if kind == "sae":
            return read_codes(path, len(Xp), idp, cfg[features_key])
        if not cfg[codes_key]:
            return Xp
        N, nid = data.read_features(path)
        return N[match_rows(path, nid, idp, cfg[features_key])]

    def build(src, min_nonzero, latents=None):
        if kind == "sae":
            return functions_from_codes(*src, min_nonzero, latents=latents)
        return functions_from_neurons(src, latents=latents)

    src = source("features", "codes", X, ids)
    try:
        every = build(src, cfg["min_nonzero"])
    except ValueError as e:
        raise data.DataError(f"{cfg['codes'] or cfg['features']}: /sae/values: {e}") from None
    latents = every["latents"].numpy()
    n_hold = 0 if cfg["model"] == "static_linear" or cfg["holdout"] <= 0 else \
        min(len(latents) - 1, max(1, round(cfg["holdout"] * len(latents))))
    held = np.sort(np.random.default_rng(cfg["seed"]).permutation(latents)[:n_hold])
    train_lat = np.setdiff1d(latents, held)
    if len(train_lat) == 0:
        sys.exit("train.py: error: no training function left after the hold-out; lower --holdout")
    train = build(src, cfg["min_nonzero"], train_lat)
    # selection scores a function where the selection pool holds L positives and L negatives of it
    want, esrc, n_eval = held if n_hold else train_lat, source("eval_features", "eval_codes", Xe, ide), len(Xe)
    try:
        eval_fns = build(esrc, L, want)
    except ValueError:
        eval_fns = None
    if eval_fns is not None:
        pos = eval_fns["pos_ptr"].diff()
        neg = n_eval - pos if kind == "sae" else eval_fns["neg_ptr"].diff()
        ok = ((pos >= L) & (neg >= L)).numpy()
        eval_fns = None if not ok.any() else eval_fns if ok.all() else build(esrc, L, eval_fns["latents"].numpy()[ok])
    if eval_fns is None:
        sys.exit(f"train.py: error: none of the {len(want)} {'held-out' if n_hold else 'training'} functions has "
                 f"L = {L} positives and negatives among the {n_eval} images of {cfg['eval_features']}; "
                 "shorten --length or use a larger selection pool")
    if len(eval_fns["latents"]) < len(want):
        print(f"train.py: {len(want) - len(eval_fns['latents'])} of {len(want)} functions have fewer than L = {L} "
              f"positives or negatives in {cfg['eval_features']}; selection scores the other "
              f"{len(eval_fns['latents'])}")
    if cfg["mag_scale"] == "global":  # one scale for every function: 1 / std of all training magnitudes
        vals = torch.cat([train["pos_val"], train["neg_val"]]).double()  # SAE: active values; neurons: x - median
        g = 1.0 / max(float(vals.std()), 1e-6)
        for fns in (train, eval_fns):
            fns["mag_scale"] = torch.full_like(fns["mag_scale"], g)
    heads = None
    if cfg["model"] == "static_linear":
        heads = torch.from_numpy(np.searchsorted(train_lat, eval_fns["latents"].numpy()))
    return train, eval_fns, heads


def _plot_curve(csv_path, png_path):
    plt = data.pyplot()
    import pandas as pd
    df = pd.read_csv(csv_path)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(df["step"], df["loss"], lw=0.8)
    ax[0].set(xlabel="step", ylabel="training loss (uncertainty-weighted)")
    ev = df.dropna(subset=["eval_accuracy"])
    ax[1].plot(ev["step"], ev["eval_accuracy"], marker="o", ms=3, label="held-out accuracy")
    ax[1].plot(ev["step"], ev["eval_magnitude_r2"], marker="s", ms=3, label="held-out magnitude R$^2$")
    if "icl_ridge_bound" in ev and ev["icl_ridge_bound"].notna().any():
        ax[1].axhline(float(ev["icl_ridge_bound"].dropna().iloc[0]), color="C3", lw=0.8, ls=":",
                      label="online ridge (no meta-learning)")
    ax[1].axhline(0.5, color="grey", lw=0.6, ls="--")
    ax[1].set(xlabel="step", ylim=(min(0.0, ev["eval_magnitude_r2"].min() if len(ev) else 0), 1))
    ax[1].legend(fontsize=8)
    data.save_figure(fig, png_path, tight=True)


def _meta_device(cfg):
    """--device auto | cpu | cuda | cuda:N -> (torch.device of this process, use_cuda); torchrun ranks take
    LOCAL_RANK's GPU."""
    name = cfg["device"]
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not (name == "cuda" or name.startswith("cuda:")):
        sys.exit(f"train.py: error: --device {cfg['device']!r}; expected auto | cpu | cuda | cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"train.py: error: --device {cfg['device']}: no CUDA device is visible to torch")
    if name.startswith("cuda") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return torch.device(name), name.startswith("cuda")


def stage_meta(cfg):
    """Meta-train the in-context learner on episodes of SAE (or neuron) functions; returns the best metrics."""
    import json
    import math
    import time
    import numpy as np
    import torch.distributed as dist
    from tqdm import tqdm
    from models import (MetaLearner, densest_first, evaluate_meta, function_prefix, functions_at, functions_to,
                        make_episodes, principal_basis, ridge_icl_bound)
    for key, allowed in (("select", SELECT), ("mag_scale", ("function", "global")), ("mag_target", ("scaled", "raw")),
                         ("optimizer", ("adamw", "schedulefree"))):
        if cfg[key] not in allowed:
            sys.exit(f"train.py: error: --{key.replace('_', '-')} {cfg[key]!r}; expected {' | '.join(allowed)}")
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device, use_cuda = _meta_device(cfg)
    rank, world = 0, 1
    if ddp:  # torchrun: NCCL on GPU, gloo on CPU
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if cfg["batch"] % world:
        sys.exit(f"train.py: error: --batch {cfg['batch']} must be divisible by the {world} ranks")
    out = cfg["out"] or os.path.join("runs", "meta", os.path.splitext(os.path.basename(cfg["features"]))[0] + ".pt")
    stem = os.path.splitext(out)[0]
    last, csv_path, png_path = stem + ".last.pt", stem + ".csv", stem + ".png"
    torch.manual_seed(cfg["seed"])

    X, ids = data.read_features(cfg["features"])
    Xe, ide = data.read_features(cfg["eval_features"])
    if Xe.shape[1] != X.shape[1]:
        sys.exit(f"train.py: error: {cfg['eval_features']} has d = {Xe.shape[1]}, {cfg['features']} has {X.shape[1]}")
    _forbidden_overlap(cfg, {"--features": (cfg["features"], ids), "--eval-features": (cfg["eval_features"], ide)})
    shared = len(set(ids).intersection(ide))
    if shared and rank == 0:
        print(f"train.py: note: the selection pool {cfg['eval_features']} shares {shared} of its {len(ide)} images "
              f"with the training pool {cfg['features']}; a held-out split scores generalisation to new images")
    train_fns, eval_fns, heads = _meta_functions(cfg, X, ids, Xe, ide)
    bound_fns = train_fns
    X, Xe = torch.from_numpy(X), torch.from_numpy(Xe)
    F, L = len(train_fns["latents"]), cfg["length"]
    if cfg["functions_start"]:  # densest first, so that the curriculum's first k functions are a CSR prefix
        if cfg["model"] == "static_linear":
            sys.exit("train.py: error: --functions-start is a curriculum for in-context learners; static_linear "
                     "has one head per function (use --functions-start 0)")
        train_fns = densest_first(train_fns)  # bound_fns keeps the usual order: the bound's alpha episodes
        if rank == 0:
            print(f"train.py: function curriculum: the {min(cfg['functions_start'], F)} densest of {F} functions "
                  f"first, all of them from step {cfg['functions_ramp']} on")
    if cfg["length_start"] > L:
        sys.exit(f"train.py: error: --length-start {cfg['length_start']} must be in 0..--length {L} (0 = no "
                 "curriculum)")
    n_eval = cfg["eval_per_function"] * len(eval_fns["latents"]) if cfg["eval_per_function"] > 0 else \
        cfg["eval_episodes"]
    eval_seed = cfg["seed"] + 777
    mean, std = X.mean(0), (X.std(0) if cfg["standardize"] else torch.ones(X.shape[1]))
    basis = None
    if cfg["input_pca"]:  # the pool's top principal subspace (standardised features), folded into the embedding
        if cfg["no_embed"]:
            sys.exit("train.py: error: --no-embed keeps the features as they are; it takes no --input-pca")
        try:
            basis, share = principal_basis(X, cfg["input_pca"], scale=1 / std.clamp_min(1e-6))
        except ValueError as e:
            sys.exit(f"train.py: error: --input-pca {cfg['input_pca']}: {e}")
        if rank == 0:
            print(f"train.py: embedding input = top {basis.shape[1]} of {X.shape[1]} principal directions of the "
                  f"{'standardised ' if cfg['standardize'] else ''}training pool "
                  f"({float(share[:basis.shape[1]].sum()):.1%} of its variance)")
    model_args = dict(d=X.shape[1], d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
                      mlp=cfg["mlp"], model=cfg["model"], n_functions=F, no_embed=cfg["no_embed"],
                      dropout=cfg["dropout"], input_rank=0 if basis is None else basis.shape[1],
                      smear=cfg["smear"])
    model = MetaLearner(**model_args).to(device)
    if not cfg["no_embed"]:
        if cfg["standardize"] or basis is not None:  # the training pool's feature mean/std, folded into the embedding
            model.embedding.set_input_stats(mean, std)
        if basis is not None:
            model.embedding.set_input_basis(basis)
        if cfg["embed_init"] == "orthogonal":
            model.embedding.orthogonal_init(cfg["embed_gain"])
        elif cfg["embed_init"] != "default":
            sys.exit(f"train.py: error: --embed-init {cfg['embed_init']!r}; expected orthogonal | default")
    params = [p for p in model.parameters() if p.requires_grad]
    embed = {id(p) for p in model.embedding.parameters()}
    decayed = [p for p in params if (cfg["embed_decay"] or id(p) not in embed)
               and (cfg["decay_vectors"] or p.dim() >= 2)]
    kept = [p for p in params if all(p is not q for q in decayed)]  # biases, LayerNorms, log_vars; the embedding
    groups = [g for g in (dict(params=decayed, weight_decay=cfg["weight_decay"]), dict(params=kept, weight_decay=0.0))
              if g["params"]]
    if cfg["optimizer"] == "schedulefree":
        import schedulefree
        opt = schedulefree.AdamWScheduleFree(groups, lr=cfg["lr"], warmup_steps=cfg["warmup"])
    else:
        opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=(0.9, 0.95))
    sf = cfg["optimizer"] == "schedulefree"

    def lr_at(step):  # warm-up, then cosine to 10 % (AdamW only; schedule-free needs no schedule)
        if step < cfg["warmup"]:
            return cfg["lr"] * (step + 1) / cfg["warmup"]
        t = (step - cfg["warmup"]) / max(1, cfg["steps"] - cfg["warmup"])
        return cfg["lr"] * (0.1 + 0.45 * (1 + np.cos(np.pi * min(1.0, t))))

    def score_of(ev):  # the checkpoint score (--select); an undefined R^2 counts as 0
        r2 = ev["magnitude_r2"] if math.isfinite(ev["magnitude_r2"]) else 0.0
        return ev["accuracy"] if cfg["select"] == "accuracy" else 0.5 * ev["accuracy"] + 0.5 * r2

    start, best, since_best, best_metrics = 0, -float("inf"), 0, {}
    resume = _resume_or_start_over(cfg, last) if rank == 0 else cfg["resume"] and os.path.exists(last)
    if resume:
        ck = data.load_checkpoint(last, "meta resume state", map_location=device)
        diff = [(k, ck.get("model_args", {}).get(k), v) for k, v in model_args.items()
                if ck.get("model_args", {}).get(k) != v]
        flags = stage_defaults("meta")
        was = {k: ck.get("config", {}).get(k, flags[k]) for k in META_RESUME_KEYS}  # older runs: the defaults
        diff += [(k, was[k], cfg[k]) for k in META_RESUME_KEYS if was[k] != cfg[k]]
        if diff:
            sys.exit(f"train.py: error: {last}: --resume with other settings than its run: "
                     + ", ".join(f"{k} {old!r} (checkpoint) vs {new!r} (these flags)" for k, old, new in diff)
                     + "; pass the checkpoint's settings, or --overwrite to start over")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start, best, since_best, best_metrics = ck["step"], ck["best"], ck["since_best"], ck["metrics"]
        torch.set_rng_state(ck["rng"])
        if rank == 0:
            print(f"train.py: resumed {last} at step {start} (best held-out {cfg['select']} score {best:.4f})")
    net = torch.compile(model) if cfg["compile"] else model
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if use_cuda else None)
    mse_pos = cfg["functions"] == "sae"
    raw = cfg["mag_target"] == "raw"
    per_rank = cfg["batch"] // world
    eval_batch = max(64, per_rank)  # held-out episodes per forward pass; the ridge bound draws the same episodes
    fields = ["step", "loss", "bce", "mse", "lr", "eval_accuracy", "eval_magnitude_r2", "eval_bce", "eval_score",
              "icl_ridge_bound", "length", "functions", "seconds"]
    # a resumed log is cut back to the checkpoint's step (later rows are redone) and its clock continues
    log = data.CsvLog(csv_path, fields, resume_step=start if resume else None) if rank == 0 else None
    mags = dict(scale=cfg["mag_scale"], target=cfg["mag_target"],
                train_scale=train_fns["mag_scale"][:1].tolist() if cfg["mag_scale"] == "global" else None)

    def save(path, step, metrics, with_opt):
        ck = dict(model=model.state_dict(), model_args=model_args, config=cfg, versions=data.versions(), step=step,
                  metrics=metrics, best=best, since_best=since_best, latents=train_fns["latents"],
                  eval_latents=eval_fns["latents"], magnitudes=mags, rng=torch.get_rng_state())
        if with_opt:
            ck["optimizer"] = opt.state_dict()
        with atomic_path(path) as tmp:
            torch.save(ck, tmp)

    bound = None
    if rank == 0:
        print(f"train.py: meta | {cfg['model']} on {F} training functions ({cfg['functions']}), "
              f"{len(eval_fns['latents'])} scored on {cfg['eval_features']} ({n_eval} episodes, select by "
              f"{cfg['select']}) | d={X.shape[1]}, L={L}, batch={cfg['batch']} x {world} rank(s) on {device}, "
              f"{sum(p.numel() for p in params):,} parameters")
        if cfg["icl_bound"] > 0:  # what a linear learner on the standardised features reaches without meta-learning
            nb = min(cfg["icl_bound"], n_eval)
            bound = ridge_icl_bound(X, bound_fns, Xe, eval_fns, L, nb, seed=eval_seed, shift=X.mean(0),
                                    scale=1 / X.std(0).clamp_min(1e-6), batch=eval_batch)
            bound["n_episodes"] = nb
            print(f"train.py: online ridge bound (no meta-learning; alpha {bound['alpha']:g} chosen on training "
                  f"episodes): held-out accuracy {bound['accuracy']:.4f} on the first {nb} held-out episodes; a "
                  "meta-learner below it does less in context than a linear read-out of the features")
    tb = None
    if cfg["tensorboard"] and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            sys.exit(f"train.py: error: --tensorboard {cfg['tensorboard']}: TensorBoard event files need the "
                     f"'tensorboard' package ({e}); pip install tensorboard, or drop --tensorboard (the CSV and PNG "
                     "are written either way)")
        tb = SummaryWriter(cfg["tensorboard"], purge_step=start + 1 if start else None)
        tb.add_text("config", json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, default=str), start)
    # the pools and their functions move to the device once; every step's episodes are built there
    Xd, train_d = X.to(device), functions_to(train_fns, device)
    host_ptr = {side: train_fns[f"{side}_ptr"] for side in ("pos", "neg")}  # the curriculum's prefixes, no sync
    Xe_d, eval_d = Xe.to(device), functions_to(eval_fns, device)
    t0, step = time.time() - (log.offset if log else 0.0), start
    bar = tqdm(range(start, cfg["steps"]), disable=rank != 0 or not cfg["progress"], mininterval=1.0)
    for step in bar:
        lr = cfg["lr"] if sf else lr_at(step)
        if not sf:
            for g in opt.param_groups:
                g["lr"] = lr
        if sf:
            opt.train()
        # each rank builds only its slice of the step's global batch: episodes rank * B/N .. of one counter-based
        # stream (seeded by step), so N ranks follow the trajectory of one process with the same global batch
        L_step = L if not cfg["length_start"] else int(min(L, cfg["length_start"] + (
            L - cfg["length_start"]) * step / cfg["length_ramp"]))  # the curriculum; the same on every rank
        F_step = functions_at(step, F, cfg["functions_start"], cfg["functions_ramp"])  # the same on every rank
        step_fns = train_d if F_step == F else function_prefix(train_d, F_step, host_ptr)
        x, y, mag, fn, _ = make_episodes(Xd, step_fns, per_rank, L_step, cfg["seed"] * 1_000_003 + step,
                                         first=rank * per_rank)
        if raw:  # the head predicts raw magnitudes; the input channel keeps the scaled ones
            mag = mag / train_d["mag_scale"][fn][:, None].to(mag.dtype)
        n_mse = None
        if ddp:  # the MSE is normalised by the global count, so the ranks' averaged gradients are one process's
            n_mse = (y.sum() if mse_pos else torch.tensor(float(y.numel()), device=device)).float()
            dist.all_reduce(n_mse)
            n_mse = n_mse / world
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda):
            logit, mpred = net(x, fn)
        loss, bce, mse = model.loss(logit, mpred, y, mag, mse_on_positives=mse_pos, n_mse=n_mse)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
        opt.step()
        stats = torch.stack([loss.detach(), bce.detach(), mse.detach()]).float()
        if ddp:
            dist.all_reduce(stats)  # on the device: NCCL reduces GPU tensors only
            stats /= world
        stats = stats.cpu()
        row = dict(step=step + 1, loss=float(stats[0]), bce=float(stats[1]), mse=float(stats[2]), lr=lr,
                   seconds=round(time.time() - t0, 3), length=L_step, functions=F_step)
        stop, why = False, f"no held-out improvement in {cfg['patience']} evaluations"
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == cfg["steps"]:
            if sf:
                opt.eval()  # schedule-free: evaluate (and save) the averaged weights
            if rank == 0:
                ev = evaluate_meta(model, Xe_d, eval_d, L, n_eval, seed=eval_seed, heads=heads,
                                   mse_on_positives=mse_pos, raw_targets=raw, batch=eval_batch)
                score = score_of(ev)
                row.update(eval_accuracy=ev["accuracy"], eval_magnitude_r2=ev["magnitude_r2"], eval_bce=ev["bce"],
                           eval_score=score, icl_ridge_bound=bound["accuracy"] if bound else "")
                log.append(row)  # before the checkpoints: a kill between the two redoes this step on resume
                # patience counts from --min-steps on, once accuracy reaches --min-accuracy; from then on a
                # better score must beat the best by more than --min-delta
                counting = step + 1 >= cfg["min_steps"] and ev["accuracy"] >= cfg["min_accuracy"]
                if score > best + (cfg["min_delta"] if counting else 0.0):
                    best, since_best = score, 0
                    best_metrics = dict(ev, step=step + 1, score=score, select=cfg["select"], icl_ridge_bound=bound)
                    save(out, step + 1, best_metrics, with_opt=False)
                elif counting:
                    since_best += 1
                save(last, step + 1, best_metrics, with_opt=True)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{ev['accuracy']:.3f}", best=f"{best:.3f}")
                stop = cfg["patience"] > 0 and since_best >= cfg["patience"]
                if cfg["max_minutes"] > 0 and time.time() - t0 > 60 * cfg["max_minutes"]:
                    stop, why = True, f"--max-minutes {cfg['max_minutes']:g} reached"  # ranks agree by the broadcast
            if ddp:
                flag = torch.tensor([float(stop)], device=device)
                dist.broadcast(flag, 0)
                stop = bool(flag.item())
        if rank == 0:
            if "eval_accuracy" not in row:
                log.append(row)
            if tb is not None:
                for k in fields[1:]:
                    if isinstance(row.get(k), (int, float)):
                        tb.add_scalar(("eval/" if k.startswith(("eval", "icl")) else "train/") + k, row[k], step + 1)
        if stop:
            if rank == 0:
                print(f"train.py: early stop at step {step + 1}: {why}")
            break
    if rank == 0:
        if tb is not None:
            tb.close()
        _plot_curve(csv_path, png_path)
        r2 = best_metrics.get("magnitude_r2", float("nan"))
        vs = f" (online ridge bound {bound['accuracy']:.4f})" if bound else ""
        print(f"train.py: best held-out {cfg['select']} score {best:.4f}: accuracy "
              f"{best_metrics.get('accuracy', float('nan')):.4f}{vs}, magnitude R^2 {r2:.3f}, "
              f"at step {best_metrics.get('step')} -> {out}; log {csv_path}, curve {png_path}")
    if ddp:
        dist.destroy_process_group()
    return best_metrics


# ------------------------------------------------------------------------------------------ warp stage
defaults_warp = dict(
    features="data/features/clip/things.h5",    # features of the THINGS images (HDF5, /features + /image_ids)
    targets="brain",                            # brain (THINGS-fMRI voxels of --rois) | spose (SPoSE embedding)
    d="1,10,100,1000",                          # subspace dimensions, comma-separated ('full' is always added)
    data="data/external",                       # folder with the human data files
    field="features",                           # dataset inside --features (e.g. layers/block6)
    subjects="1",                               # brain: the THINGS-fMRI subject (one per run)
    rois="LOC",                                 # brain: the ROI column of VoxelMetadata (one per run)
    nc_min=5.0,                                 # brain: keep voxels with nc_singletrial > nc_min
    projection="fastfood",                      # fastfood | dense (reference) | identity (d = D only)
    groups="",                                  # parameter groups with their own scale, regexes, e.g. 'body,readout'
    objective="ridge",                          # ridge (linear read-out, MSE) | rsa (differentiable RSA, no read-out)
    readout="ridge",                            # ridge (fit by ridge, then warped) | joint (trained beside theta_d)
    readout_penalty=True,                       # keep the ridge penalty of the read-out while training (see fit_one)
    hidden=0,                                   # MLP hidden width (0 = feature width)
    lr=0.05,                                    # Adam learning rate of theta_d and the scales
    full_lr=1e-3,                               # Adam learning rate of the full fit
    steps=1000,                                 # maximum Adam steps per d
    batch=256,                                  # rows per step
    eval_every=25,                              # steps between validation checks
    patience=8,                                 # validation checks without improvement before stopping
    val_frac=0.15,                              # share of the training rows held out for early stopping
    test_frac=0.2,                              # spose: share of concepts held out for the test score
    threads=1,                                  # torch threads (small ops: 1 is ~100x faster than 2 contended; 0 = all)
    name="",                                    # model name in the results ('' = the features' backbone or file stem)
)
RESUME_KEYS = ("features", "field", "targets", "data", "subjects", "rois", "nc_min", "projection", "groups",
               "objective", "readout", "readout_penalty", "hidden", "lr", "full_lr", "steps", "batch", "seed",
               "val_frac", "test_frac")


def parse_ds(text):
    ds = []
    for tok in str(text).split(","):
        tok = tok.strip()
        if not tok or tok == "full":
            continue
        try:
            v = int(float(tok))
        except ValueError:
            raise ValueError(f"--d {text!r}: {tok!r} is not an integer") from None
        if v < 1:
            raise ValueError(f"--d {text!r}: subspace dimensions must be >= 1, got {v}")
        ds.append(v)
    return sorted(set(ds))


def stage_warp(cfg):
    """train.py --stage warp: the performance-vs-d curve of one model (features file) on one target."""
    import json
    from eval_warp import WarpEncoder, brain_target, make_split, spose_target, summarise, warp_curve
    from models import param_group_index
    for key in ("subjects", "rois"):
        if len(data.split_list(cfg[key])) != 1:
            sys.exit(f"train.py: error: --{key} {cfg[key]!r}: the warp stage fits one subject and one ROI per run "
                     "(slurm/evaluate_array.sbatch shows how to spread runs over a job array)")
    try:
        ds = parse_ds(cfg["d"])
        X, ids = data.read_features(cfg["features"], field=cfg["field"])
        if cfg["targets"] == "brain":
            Xtr, Ytr, Xte, Yte, info = brain_target(cfg, X, ids)
        elif cfg["targets"] == "spose":
            Xtr, Ytr, Xte, Yte, info = spose_target(cfg, X, ids)
        else:
            raise data.DataError(f"--targets {cfg['targets']!r}: expected brain or spose")
    except ValueError as e:  # DataError is a ValueError
        sys.exit(f"train.py: error: {e}")
    dev = "cuda" if cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available()) else "cpu"
    split = make_split(Xtr, Ytr, None, cfg["val_frac"], cfg["seed"], dev, Xte, Yte)
    name = cfg["name"]
    if not name:
        with data.open_h5(cfg["features"], "features") as f:
            name = str(f.attrs.get("backbone", "")) or os.path.splitext(os.path.basename(cfg["features"]))[0]
    tgt = cfg["targets"] if cfg["targets"] == "spose" else f"{info['subject']} {info['roi']}"
    out = cfg["out"] or os.path.join("runs", "warp", f"{name}_{tgt.replace(' ', '_')}.json")
    done = {}
    if os.path.exists(out):  # resume: keep the d values already fitted under the same settings
        with open(out) as fh:
            old = json.load(fh)
        diff = [k for k in RESUME_KEYS if str(old.get("config", {}).get(k)) != str(cfg.get(k))]
        if diff:
            sys.exit(f"train.py: error: {out} was written with different settings ({', '.join(diff)}); "
                     "delete it or pass another --out")
        done = old.get("results", {})
        print(f"warp: resuming {out}: {len(done)} fits done ({', '.join(done)})")
    # D (warped parameters) is only known after the model is built: a too large d fails before any training
    p, t = split["Xtr"].shape[1], split["Ytr"].shape[1]
    joint = cfg["readout"] == "joint"
    probe = WarpEncoder(p, cfg["hidden"] or p, 0 if cfg["objective"] == "rsa" else t)
    warped = {n: q.numel() for n, q in probe.named_parameters() if not (joint and n.startswith("readout"))}
    D = int(sum(warped.values()))
    try:  # parameter groups that match nothing fail here, before any fit is written
        param_group_index(list(warped), [g for g in str(cfg["groups"]).split(",") if g])
    except ValueError as e:
        sys.exit(f"train.py: error: --groups {cfg['groups']!r}: {e}")
    if ds and max(ds) > D:
        sys.exit(f"train.py: error: --d {max(ds)} is larger than D = {D}, the number of warped parameters "
                 f"({', '.join(f'{n} {k}' for n, k in warped.items())}); pass smaller d values")
    cfg_json = {k: v for k, v in cfg.items() if not k.startswith("_")}

    def save(res):
        doc = dict(name=name, target=tgt, target_info=info, metric="rsa" if cfg["objective"] == "rsa" else "r2",
                   D=D, n_train=int(len(split["Xtr"])), n_val=int(len(split["Xva"])), n_test=int(len(split["Xte"])),
                   results=res, config=cfg_json, versions=data.versions())
        with data.atomic_path(out) as tmp, open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2)

    res = warp_curve(split, ds, cfg, seed=cfg["seed"], done=done, on_result=save, progress=cfg["progress"])
    save(res)
    s = summarise(dict(results=res, name=name), frac=0.9)
    print(f"\nwarp {name} -> {tgt} (D = {D}): held-out {'RSA' if cfg['objective'] == 'rsa' else 'R^2'}")
    print(f"{'d':>8}{'test':>10}{'val':>10}{'steps':>8}")
    for k in ["0"] + [str(d) for d in sorted(int(x) for x in res if x not in ("0", "full"))] + ["full"]:
        r = res[k]
        print(f"{k:>8}{r['test']:>10.4f}{r['val']:>10.4f}{r['steps']:>8}")
    print(f"d_warp (90% of the full fit): {s['d_warp']}; wrote {out}")
    return res


STAGES = {"sae": stage_sae, "meta": stage_meta, "warp": stage_warp}  # every --stage X: stage_X, in this file
STAGE_DEFAULTS = {"sae": defaults_sae, "meta": defaults_meta, "warp": defaults_warp}


def stage_defaults(stage):
    """The flags of one stage: the common ones, then the stage's own (which override, e.g. --threads for warp)."""
    return {**defaults, **STAGE_DEFAULTS[stage]}


CHECKS = {  # numeric flags checked at parse time (data.check_flags): a bad value is a usage error, exit 2
    "sae": dict(k=">= 0", min_nonzero=">= 1", aux_k=">= 0", aux_coef=">= 0", dead_rows=">= 0", epochs=">= 0",
                batch=">= 1", lr=">= 0", chunk_rows=">= 1", log_every=">= 1", ckpt_every=">= 1"),
    "meta": dict(min_nonzero=">= 1", holdout="in [0, 1)", input_pca=">= 0", embed_gain="> 0", d_model=">= 0",
                 n_layers=">= 1", n_heads=">= 1", dropout="in [0, 1)", length=">= 1", batch=">= 1", steps=">= 1",
                 lr="> 0", weight_decay=">= 0", warmup=">= 0", clip=">= 0", eval_every=">= 1",
                 eval_episodes=">= 1", patience=">= 0", length_start=">= 0", length_ramp=">= 1",
                 functions_start=">= 0", functions_ramp=">= 1",
                 max_minutes=">= 0"),
    "warp": dict(hidden=">= 0", lr="> 0", full_lr="> 0", steps=">= 1", batch=">= 1", eval_every=">= 1",
                 patience=">= 0", val_frac="in (0, 1)", test_frac="in (0, 1)"),
}


def parse(argv=None):
    """--stage picks the parser: `train.py --stage sae --help` lists the SAE's flags only. --config FILE.toml
    applies the file's table for that stage (every table is checked against its stage's flags)."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--stage", default=defaults["stage"])
    stage = pre.parse_known_args(argv)[0].stage
    if stage not in STAGES:
        sys.exit(f"train.py: error: --stage {stage!r}; expected one of {sorted(STAGES)}")
    d = stage_defaults(stage)
    p = data.flag_parser(__doc__, d, prog=f"train.py --stage {stage}")
    cfg = data.parse_flags(p, argv, d, stage, {s: stage_defaults(s) for s in STAGES})
    data.check_flags(p, cfg, dict(CHECKS[stage], threads=">= 0"))
    if stage == "sae":
        nl = cfg["n_latents"]
        try:
            ok = nl == "auto" or (float(nl[:-1]) > 0 if nl.endswith("x") else int(nl) >= 1)
        except ValueError:
            ok = False
        if not ok:
            p.error(f"--n-latents {nl}: expected a count >= 1 (12288), a positive multiple of d (16x) or auto (the "
                    "sizing rule, models.sae_size)")
    if stage == "meta" and not cfg["eval_features"]:  # the selection pool beside the training pool, never elsewhere
        cfg["eval_features"] = os.path.join(os.path.dirname(cfg["features"]), "coco_eval.h5")
    if stage == "meta" and not cfg["out"]:
        cfg["out"] = os.path.join("runs", "meta", os.path.splitext(os.path.basename(cfg["features"]))[0] + ".pt")
    return cfg


def files(cfg):
    """(outputs, inputs) of a run, {label: path}: what data.claim_outputs checks and locks before any work."""
    ins = {"--features": cfg["features"], "--config": cfg["config"]}
    if cfg["stage"] == "sae" and cfg["encode"]:
        dst = cfg["codes_out"] or cfg["features"]
        if os.path.realpath(dst) == os.path.realpath(cfg["features"]):
            del ins["--features"]  # codes written into the features file itself: a copy replaces it atomically
        return {"--codes-out": dst}, dict(ins, **{"--ckpt": cfg["ckpt"]})
    if cfg["stage"] == "sae":
        return {"--out": cfg["out"], "resume state (<out>.last.pt)": cfg["out"] and cfg["out"] + ".last.pt"}, ins
    if cfg["stage"] == "meta":
        stem = os.path.splitext(cfg["out"])[0]
        return ({"--out": cfg["out"], "resume state (<out>.last.pt)": stem + ".last.pt",
                 "log (<out>.csv)": stem + ".csv", "curve (<out>.png)": stem + ".png"},
                dict(ins, **{"--codes": cfg["codes"], "--eval-features": cfg["eval_features"],
                             "--eval-codes": cfg["eval_codes"]}))
    return {"--out": cfg["out"]}, ins


def main(argv=None):
    with data.script_errors("train.py"):
        cfg = parse(argv)
        outputs, inputs = files(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            outputs = {}  # torchrun: rank 0 writes, checks and locks the outputs
        with data.claim_outputs(outputs, inputs), data.torch_threads(cfg["threads"]):
            return STAGES[cfg["stage"]](cfg)


if __name__ == "__main__":
    main()
