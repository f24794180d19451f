"""Speed of extract.py's pipeline (DataLoader workers decoding while the model runs, rows into one resumable HDF5
file) against the plain loop most extraction scripts use (thingsvision style: decode a batch, forward, np.save
one .npy per batch), on the same untrained model and ~200 generated JPEGs. Measured, never asserted:
    .venv/bin/python -m pytest tests/test_bench_extract.py --benchmark-only
Both write the same numbers (checked), and an interrupted-then-resumed run writes the same file as an
uninterrupted one (checked here and in tests/test_extract.py)."""
import os

import h5py
import numpy as np
import pytest
from PIL import Image

import backbones
import extract

MODEL = "timm:test_vit.r160_in1k"  # 160 px, d = 64: small enough that decoding and writing show
N_IMAGES, BATCH = 200, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """200 photo-like JPEGs (smooth colour fields, 240-400 px a side, ~20 kB each)."""
    root = tmp_path_factory.mktemp("bench_images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        w, h = int(rng.integers(240, 400)), int(rng.integers(240, 400))
        small.resize((w, h), Image.BICUBIC).save(root / f"img_{i:04d}.jpg", quality=90)
    return root


def plain_loop(folder, out_dir):
    """The baseline: sorted paths, per batch decode + preprocess in the main process, forward, np.save."""
    import torch
    torch.manual_seed(0)
    bb = backbones.build(MODEL, "random")
    paths = sorted(p for p in os.listdir(folder) if p.endswith(".jpg"))
    os.makedirs(out_dir, exist_ok=True)
    for b in range(0, len(paths), BATCH):
        x = torch.stack([bb.transform(Image.open(os.path.join(folder, p)).convert("RGB")) for p in paths[b:b + BATCH]])
        with torch.inference_mode():
            f = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        np.save(os.path.join(out_dir, f"batch_{b // BATCH:05d}.npy"), f.numpy())
    return out_dir


def ours(folder, out, *flags):
    return extract.main(["--dataset", "folder", "--images", str(folder), "--backbone", MODEL, "--weights", "random",
                         "--batch", str(BATCH), "--no-progress", "--overwrite", "--out", str(out), *flags])


def features(path):
    with h5py.File(path) as f:
        return f["features"][...], f["image_ids"][...].tolist()


@pytest.mark.benchmark(group="extract: 200 JPEGs, timm test_vit (random), batch 16")
def test_bench_plain_npy_loop(benchmark, folder, tmp_path):
    out = benchmark.pedantic(plain_loop, args=(folder, tmp_path / "npy"), rounds=3, iterations=1)
    X = np.concatenate([np.load(os.path.join(out, f)) for f in sorted(os.listdir(out))])
    ref = tmp_path / "ref.h5"
    ours(folder, ref)
    np.testing.assert_allclose(X, features(ref)[0], rtol=1e-5, atol=1e-5)  # the same work, the same numbers
    benchmark.extra_info["images_per_s"] = N_IMAGES / benchmark.stats.stats.min


@pytest.mark.benchmark(group="extract: 200 JPEGs, timm test_vit (random), batch 16")
def test_bench_extract_pipeline(benchmark, folder, tmp_path):
    res = benchmark.pedantic(ours, args=(folder, tmp_path / "f.h5"), rounds=3, iterations=1)
    assert res["n"] == N_IMAGES
    benchmark.extra_info["images_per_s"] = N_IMAGES / benchmark.stats.stats.min


@pytest.mark.benchmark(group="extract: 200 JPEGs, timm test_vit (random), batch 16")
def test_bench_extract_interrupted_then_resumed(benchmark, folder, tmp_path):
    """Half the batches, stop (as a killed or time-limited job would), then the same command again."""
    def two_runs():
        out = tmp_path / "r.h5"
        if out.exists():
            os.remove(out)
        ours(folder, out, "--max-batches", "7")
        extract.main(["--dataset", "folder", "--images", str(folder), "--backbone", MODEL, "--weights", "random",
                      "--batch", str(BATCH), "--no-progress", "--out", str(out)])
        return out
    out = benchmark.pedantic(two_runs, rounds=3, iterations=1)
    ref = tmp_path / "ref.h5"
    ours(folder, ref)
    (X, ids), (Y, ref_ids) = features(out), features(ref)
    assert X.tobytes() == Y.tobytes() and ids == ref_ids  # resumed == uninterrupted, byte for byte
