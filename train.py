"""Features -> checkpoints.

    python train.py --stage sae  --features F.h5 --out sae/NAME.pt     # top-k sparse autoencoder (issue 3)
    python train.py --stage meta --features F.h5 --out meta/NAME.pt    # meta-learned Transformer (issue 4)

Neither stage has landed yet: each exits with status 2 and says so, rather than pretending to train.
"""
import argparse
import sys

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    stage="sae",                                # sae | meta
    features="data/world/features/coco.h5",     # training features (HDF5, /features + /image_ids)
    out="",                                     # checkpoint path
    seed=0,                                     # random seed
)
STAGES = {"sae": "issue 3 (top-k sparse autoencoders)", "meta": "issue 4 (meta-learning)"}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for k, v in defaults.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    return vars(p.parse_args(argv))


def main(argv=None):
    cfg = parse(argv)
    if cfg["stage"] not in STAGES:
        sys.exit(f"train.py: error: --stage {cfg['stage']!r}; expected one of {sorted(STAGES)}")
    print(f"train.py: stage {cfg['stage']!r} not implemented yet (arrives with {STAGES[cfg['stage']]})", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
