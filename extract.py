"""Images -> features/*.h5. For now: the embedded synthetic world (features + every human-data file).

    python extract.py --dataset synthetic --out data/world                    # small world, < 10 s
    python extract.py --dataset synthetic --out data/world --size full        # 1,854 concepts, < 2 min
    python extract.py --dataset synthetic --out data/world --n-triplets 4700000 --size full

World sizes default per --size (see world.SIZES); any of them can be set as a flag, e.g. --n-concepts 300.
Real-image extraction (--dataset things|coco|levels|folder|list|wds) arrives with the extraction issue.
"""
import argparse
import sys

import world

# ----------------------------------------------------------------------------------------------- defaults
defaults = dict(
    dataset="synthetic",   # synthetic | things | coco | levels | folder | list | wds
    out="data/world",      # output folder: features/, data/, world_truth.h5
    size="small",          # small | full world
    seed=0,                # world seed: same seed -> identical files
)
REAL = ["things", "coco", "levels", "folder", "list", "wds"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    for k, v in defaults.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    # world knobs: default None = the value of the chosen --size; type taken from the small world's value
    knobs = dict(world.SIZES["small"], **world.COMMON)
    for k, v in knobs.items():
        full = world.SIZES["full"].get(k, v)
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=None,
                       help=f"world setting (small: {v}, full: {full})")
    return p.parse_args(argv)  # unknown flags are an error


if __name__ == "__main__":
    args = parse()
    cfg = vars(args)
    if args.dataset in REAL:
        sys.exit(f"extract.py: --dataset {args.dataset} (real images) is not implemented yet; real-image "
                 f"extraction arrives with the extraction issue. Use --dataset synthetic for the embedded world.")
    if args.dataset != "synthetic":
        sys.exit(f"extract.py: unknown --dataset {args.dataset!r}; expected synthetic or one of {REAL}")
    overrides = {k: v for k, v in cfg.items() if k not in defaults and v is not None}
    paths = world.make_world(args.out, size=args.size, seed=args.seed, **overrides)
    for name, path in paths.items():
        print(f"  {name:28s} {path}")
