"""Real-image extraction (extract.py, backbones.py, images.py): readers, decoding, the libraries' preprocessing,
hooks and pooling, determinism, resume after a kill, shards, PCA, SAE codes, local-only weights, SLURM plumbing.

Backbones are built without pretrained weights (--weights random, seeded) at their smallest configs: timm's
test_vit (160 px, d = 64), torchvision resnet18, and a two-block open_clip ViT from a JSON config.
"""
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import backbones
import extract
import images

ROOT = Path(__file__).resolve().parents[1]
TIMM = "timm:test_vit.r160_in1k"
N_GOOD = 27  # images in the tree below that decode (3 concepts x 7, plus 6 odd modes)


def _img(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """THINGS-like tree: JPEG and PNG of odd sizes, grey / CMYK / RGBA / palette+alpha / 16-bit grey / 1-pixel
    tall images, a corrupt JPEG, a truncated JPEG, a non-image file and a stray top-level image."""
    root = tmp_path_factory.mktemp("things") / "THINGS"
    rng = np.random.default_rng(0)
    for c in ["aardvark", "banana", "cat"]:
        (root / c).mkdir(parents=True)
        for k in range(7):
            img = _img(rng, int(rng.integers(30, 120)), int(rng.integers(30, 120)))
            img.save(root / c / f"{c}_{k:02d}.{'jpg' if k % 2 == 0 else 'png'}")
    Image.new("L", (50, 70), 128).save(root / "cat" / "cat_gray.jpg")
    Image.new("CMYK", (64, 40), (10, 200, 30, 40)).save(root / "cat" / "cat_cmyk.jpg")
    Image.new("RGBA", (40, 64), (10, 20, 200, 90)).save(root / "banana" / "banana_rgba.png")
    p = Image.new("P", (33, 33), 3)
    p.info["transparency"] = 3
    p.save(root / "banana" / "banana_palette.png")
    Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(root / "aardvark" / "aardvark_16bit.png")
    _img(rng, 1, 90).save(root / "aardvark" / "aardvark_thin.png")
    (root / "banana" / "banana_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    buf = io.BytesIO()
    _img(rng, 80, 80).save(buf, "JPEG")
    (root / "cat" / "cat_truncated.jpg").write_bytes(buf.getvalue()[:300])
    (root / "cat" / "notes.txt").write_text("not an image")
    _img(rng, 20, 20).save(root / "stray.jpg")
    return root


def run(tmp, tree, *flags, out="f.h5", on_batch=None):
    out = str(tmp / out)
    argv = ["--dataset", "things", "--images", str(tree), "--backbone", TIMM, "--weights", "random",
            "--batch", "4", "--workers", "0", "--threads", "1", "--no-progress", "--out", out, *flags]
    return extract.main(argv, on_batch=on_batch), out


def same(a, b):
    """Equal bytes (numbers) or equal strings (HDF5 string datasets come back as object arrays)."""
    return a.tolist() == b.tolist() if a.dtype == object else a.dtype == b.dtype and a.tobytes() == b.tobytes()


def arrays(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
        return out


# ------------------------------------------------------------------------------------------ readers, decoding

def test_readers_list_ids_in_their_order(tree, tmp_path, world):
    items = images.things_items(str(tree))
    ids = [it.id for it in items]
    assert ids == sorted(ids) and len(ids) == N_GOOD + 2 and "stray.jpg" not in ids
    assert all(i.count("/") == 1 for i in ids) and "cat/notes.txt" not in ids

    coco = tmp_path / "coco"
    for split in ["train2017", "val2017"]:
        (coco / split).mkdir(parents=True)
        for k in (3, 1, 2):
            Image.new("RGB", (8, 8)).save(coco / split / f"{k:012d}.jpg")
    assert [i.id for i in images.coco_items(str(coco))] == [f"train2017/{k:012d}.jpg" for k in (1, 2, 3)]
    assert len(images.coco_items(str(coco), "train2017,val2017")) == 6
    with pytest.raises(images.ImageError, match="test2017"):
        images.coco_items(str(coco), "test2017")

    lst = tmp_path / "list.txt"
    lst.write_text("cat/cat_02.jpg\n# comment\n\naardvark/aardvark_00.jpg\n")
    got = images.list_items(str(lst), str(tree))
    assert [i.id for i in got] == ["cat/cat_02.jpg", "aardvark/aardvark_00.jpg"]  # file order, not sorted
    lst.write_text("a.jpg\na.jpg\n")
    with pytest.raises(images.ImageError, match="twice"):
        images.list_items(str(lst), str(tree))

    shards = []  # webdataset: <key>.jpg + <key>.cls per sample, read back byte for byte
    for s in range(2):
        shards.append(tmp_path / f"shard-{s:03d}.tar")
        with tarfile.open(shards[-1], "w") as tf:
            for k in range(3):
                for name, payload in [(f"s{s}k{k}.jpg",
                                       (tree / "cat" / f"cat_0{k}.{'jpg' if k % 2 == 0 else 'png'}").read_bytes()),
                                      (f"s{s}k{k}.cls", b"7")]:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    w = images.wds_items(str(tmp_path / "shard-{000..001}.tar"))
    assert [i.id for i in w] == [f"shard-{s:03d}.tar/s{s}k{k}.jpg" for s in range(2) for k in range(3)]
    assert images.read_bytes(w[4]) == (tree / "cat" / "cat_01.png").read_bytes()
    assert images.load_rgb(w[4]).size == Image.open(tree / "cat" / "cat_01.png").size
    assert len(images.wds_items(str(tmp_path / "shard-*.tar"))) == 6

    # Levels: the sorted keys of levels.pkl, found in an ImageNet train tree <wnid>/<key>
    import data
    _, keys = data.load_levels(world["data"])
    inet = tmp_path / "imagenet" / "train"
    for k in keys:
        (inet / k.split("_")[0]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(inet / k.split("_")[0] / k, "JPEG")
    lv = images.levels_items(str(inet), world["data"])
    assert [i.id for i in lv] == keys and all(os.path.exists(i.path) for i in lv)
    with pytest.raises(images.ImageError, match="ImageNet train tree"):
        images.levels_items(str(coco), world["data"])


def test_decoding_modes_and_bad_files(tree):
    item = lambda rel: images.Item(rel, str(tree / rel))  # noqa: E731
    g = np.asarray(images.load_rgb(item("cat/cat_gray.jpg")))
    assert g.shape == (70, 50, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    cmyk = images.load_rgb(item("cat/cat_cmyk.jpg"))
    assert cmyk.mode == "RGB" and np.array_equal(np.asarray(cmyk),
                                                 np.asarray(Image.open(tree / "cat/cat_cmyk.jpg").convert("RGB")))
    assert images.load_rgb(item("banana/banana_rgba.png")).getpixel((0, 0)) == (10, 20, 200)
    assert images.load_rgb(item("banana/banana_palette.png")).mode == "RGB"
    assert images.load_rgb(item("aardvark/aardvark_16bit.png")).getpixel((3, 3)) == (156, 156, 156)  # 40000/65535*255
    for rel, why in [("banana/banana_corrupt.jpg", "not a decodable image"), ("cat/cat_truncated.jpg",
                                                                              "not a decodable")]:
        with pytest.raises(images.ImageError, match=why):
            images.load_rgb(item(rel))
    with pytest.raises(images.ImageError, match="unreadable"):
        images.load_rgb(images.Item("x", str(tree / "missing.jpg")))
    with pytest.raises(images.ImageError, match="folder not found"):
        images.index("things", str(tree / "nope"))


# ------------------------------------------------------------------------------- preprocessing, hooks, pooling

def test_preprocessing_matches_the_libraries(tree, tmp_path, monkeypatch):
    import open_clip
    import timm
    import torch
    import torchvision
    from timm.data import create_transform, resolve_data_config
    paths = [tree / "cat" / "cat_cmyk.jpg", tree / "banana" / "banana_01.png", tree / "aardvark" / "aardvark_16bit.png"]
    ours = lambda bb, p: bb.transform(images.load_rgb(images.Item("", str(p))))  # noqa: E731

    bb = backbones.build(TIMM, "random")
    ref = create_transform(**resolve_data_config(model=timm.create_model("test_vit.r160_in1k")))
    for p in paths[:2]:
        assert torch.equal(ours(bb, p), ref(Image.open(p).convert("RGB")))
    assert ours(bb, paths[0]).shape == (3, 160, 160)

    cfg = tmp_path / "tiny-clip.json"
    cfg.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 48, "layers": 2, "width": 32,
                                                                "patch_size": 16, "head_width": 16},
                               "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2,
                                            "layers": 1}}))
    bo = backbones.build(f"open_clip:{cfg}", "random")
    _, _, pre = open_clip.create_model_and_transforms("tiny-clip", pretrained=None)
    for p in paths[:2]:
        assert torch.equal(ours(bo, p), pre(Image.open(p).convert("RGB")))
    f, used = bo.features(torch.stack([ours(bo, p) for p in paths]), ["output", "transformer.resblocks.1"])
    assert f["output"].shape == (3, 16) and f["transformer.resblocks.1"].shape == (3, 32)
    assert used["transformer.resblocks.1"] == "cls" and bo.num_prefix_tokens == 1
    # the image embedding is ln_post(CLS of the last block) @ proj: the hook and the pooling see the same tensor
    assert torch.allclose(bo.model.ln_post(f["transformer.resblocks.1"]) @ bo.model.proj, f["output"], atol=1e-5)

    # a pretrained tag's preprocessing and activation are carried over (open_clip skips its tag lookup when
    # handed a weights file): against open_clip's own transform builder for that tag's settings
    from open_clip.transform import PreprocessCfg, image_transform_v2
    tag = dict(hf_hub="x/y/", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
               resize_mode="squash", quick_gelu=True)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda arch, t: tag if t == "fake" else {})
    bq = backbones.build(f"open_clip:{cfg}@fake", "random")
    ref = image_transform_v2(PreprocessCfg(size=48, mean=tag["mean"], std=tag["std"], interpolation="bilinear",
                                           resize_mode="squash"), is_train=False)
    for p in paths[:2]:
        assert torch.equal(ours(bq, p), ref(Image.open(p).convert("RGB")))
    assert type(bq.model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"

    bt = backbones.build("torchvision:resnet18", "random")
    ref = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert torch.equal(ours(bt, paths[1]), ref(Image.open(paths[1]).convert("RGB")))


def test_hooks_and_pooling_agree_with_direct_computation():
    import torch
    torch.manual_seed(0)
    bb = backbones.build(TIMM, "random")
    x = torch.randn(3, 3, 160, 160)
    f, used = bb.features(x, ["output", "norm", "blocks.1"], "auto")
    # timm ViT with global_pool=token: the output is the CLS token of the final norm
    assert torch.equal(f["output"], f["norm"]) and used["norm"] == "cls"
    with torch.inference_mode():
        tokens = bb.model.forward_features(x)  # (3, 1 + 100, 64)
    g, _ = bb.features(x, ["norm"], "mean")
    assert torch.allclose(g["norm"], tokens[:, 1:].mean(1), atol=1e-6)  # mean skips the class token
    h, _ = bb.features(x, ["blocks.1"], "flatten")
    assert h["blocks.1"].shape == (3, 101 * 64)
    bt = backbones.build("torchvision:resnet18", "random")
    y = torch.randn(2, 3, 64, 64)
    f, used = bt.features(y, ["output", "layer4", "avgpool"])
    assert torch.equal(f["output"], f["layer4"]) and torch.equal(f["avgpool"], f["output"])  # fc input = mean of layer4
    with pytest.raises(backbones.WeightsError,
                       match=r"no layer named 'blocks.9'; near ones: \['blocks.5', .*'blocks.0'\]"):
        bb.features(x, ["blocks.9"])
    f, used = bb.features(x, ["output", "blocks.1"], "head")  # head: the library's pooling; hooks fall back to auto
    assert used == {"output": "timm global_pool=token", "blocks.1": "cls"}
    with pytest.raises(backbones.WeightsError, match="feature map"):
        bt.features(y, ["layer4"], "cls")


# --------------------------------------------------------------------------------- extract.py end to end

@pytest.fixture(scope="module")
def full(tree, tmp_path_factory):
    """One uninterrupted run: /features (output), /layers/blocks.1 (CLS), the bad files reported."""
    tmp = tmp_path_factory.mktemp("full")
    res, out = run(tmp, tree, "--layers", "blocks.1")
    return out, res


def test_extract_rows_ids_bad_files_and_values(tree, full):
    import torch
    out, res = full
    a = arrays(out)
    good = [i.id for i in images.things_items(str(tree)) if "corrupt" not in i.id and "truncated" not in i.id]
    assert [s.decode() for s in a["image_ids"]] == good and res["n"] == N_GOOD and res["n_bad"] == 2
    assert a["features"].shape == (N_GOOD, 64) and a["layers/blocks.1"].shape == (N_GOOD, 64)
    assert sorted(s.decode() for s in a["bad/image_ids"]) == ["banana/banana_corrupt.jpg", "cat/cat_truncated.jpg"]
    assert all(b"not a decodable image" in e for e in a["bad/errors"])
    with h5py.File(out) as f:
        assert f.attrs["backbone"] == TIMM and f.attrs["weights"] == "random" and f.attrs["n_bad"] == 2
        assert json.loads(f.attrs["pooling"]) == {"output": "timm global_pool=token", "blocks.1": "cls"}
        assert json.loads(f.attrs["config"])["batch"] == 4 and "timm" in json.loads(f.attrs["versions"])
    # the rows are the network's outputs for those images (same seed -> same untrained weights)
    torch.manual_seed(0)
    bb = backbones.build(TIMM, "random")
    x = torch.stack([bb.transform(images.load_rgb(images.Item(i, str(tree / i)))) for i in good[:5]])
    ref, _ = bb.features(x, ["output", "blocks.1"])
    np.testing.assert_allclose(a["features"][:5], ref["output"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["layers/blocks.1"][:5], ref["blocks.1"].numpy(), rtol=1e-5, atol=1e-5)
    import data
    X, ids = data.read_features(out)  # the next stages read it as they read every features file
    assert X.shape == (N_GOOD, 64) and ids == good


def test_two_runs_identical_and_a_killed_run_resumes_byte_for_byte(tree, full, tmp_path):
    ref = arrays(full[0])
    _, again = run(tmp_path, tree, "--layers", "blocks.1", out="again.h5")
    assert all(same(ref[k], v) for k, v in arrays(again).items())

    def crash(k):  # after batch 2's rows are written but before they are committed
        if k == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, tree, "--layers", "blocks.1", out="r.h5", on_batch=crash)
    partial = tmp_path / "r.h5.partial"
    assert partial.exists() and not (tmp_path / "r.h5").exists()
    with h5py.File(partial) as f:
        assert f.attrs["done"] == 8  # batches 0 and 1 committed
    res, out = run(tmp_path, tree, "--layers", "blocks.1", "--max-batches", "2", out="r.h5")
    assert res["stopped"] and res["done"] == 16 and partial.exists()
    res, out = run(tmp_path, tree, "--layers", "blocks.1", out="r.h5")
    assert not partial.exists()
    got = arrays(out)
    for k in ("features", "image_ids", "layers/blocks.1", "bad/image_ids"):
        assert same(got[k], ref[k]), k
    # a resumed run with other settings is refused, naming what differs, unless --overwrite
    run(tmp_path, tree, "--max-batches", "1", out="s.h5")
    with pytest.raises(SystemExit, match="pooling differ"):
        run(tmp_path, tree, "--pooling", "mean", out="s.h5")
    assert run(tmp_path, tree, "--pooling", "mean", "--overwrite", "--max-batches", "1", out="s.h5")[0]["done"] == 4
    assert run(tmp_path, tree, "--pooling", "mean", "--overwrite", "--max-batches", "1", out="s.h5")[0]["done"] == 8
    # a finished file: the same settings -> nothing to do; another backbone or config -> refused, --overwrite redoes it
    assert run(tmp_path, tree, "--layers", "blocks.1", out="r.h5")[0]["skipped"]
    with pytest.raises(SystemExit, match=r"r.h5: exists and was made with other settings \(layers 'blocks.1' vs ''"):
        run(tmp_path, tree, out="r.h5")
    res, out = run(tmp_path, tree, "--overwrite", "--dtype", "float16", out="r.h5")
    got = arrays(out)
    assert got["features"].dtype == np.float16 and "layers/blocks.1" not in got
    np.testing.assert_allclose(got["features"], ref["features"], rtol=2e-3, atol=2e-3)


def test_shards_then_merge_equal_the_unsharded_file(tree, full, tmp_path):
    for i in range(3):
        res, _ = run(tmp_path, tree, "--layers", "blocks.1", "--shard", f"{i}/3", out="m.h5")
        assert os.path.exists(res["out"]) and res["out"].endswith(f"m.shard-{i:05d}-of-00003.h5")
    with h5py.File(tmp_path / "m.shard-00001-of-00003.h5") as f:
        assert json.loads(f.attrs["item_range"]) == [8, 20]  # 29 items = 8 batches of 4, cut 2 + 3 + 3
    run(tmp_path, tree, "--layers", "blocks.1", "--merge", out="m.h5")
    ref, got = arrays(full[0]), arrays(tmp_path / "m.h5")
    for k in ("features", "image_ids", "layers/blocks.1", "bad/image_ids"):
        assert same(got[k], ref[k]), k
    os.remove(tmp_path / "m.h5")
    os.remove(tmp_path / "m.shard-00002-of-00003.h5")
    with pytest.raises(SystemExit, match=r"1 of 3 shards missing \(e.g. --shard 2/3"):
        extract.main(["--dataset", "things", "--backbone", TIMM, "--out", str(tmp_path / "m.h5"), "--merge"])


def test_pca_is_incremental_pca_over_the_extracted_rows(tree, full, tmp_path):
    from sklearn.decomposition import IncrementalPCA
    _, out = run(tmp_path, tree, "--layers", "blocks.1", "--pca", "5", "--pca-batch", "8", out="p.h5")
    raw, got = arrays(full[0]), arrays(out)
    for name in ("features", "layers/blocks.1"):
        assert same(got[name], raw[name])  # the full representation stays; the compressed one is added
        assert got[f"pca/{name}/scores"].shape == (N_GOOD, 5)
        X = raw[name].astype(np.float64)
        ipca = IncrementalPCA(5, batch_size=8).fit(X)  # batches of 8, the last 3 rows merged into the one before
        np.testing.assert_allclose(got[f"pca/{name}/components"], ipca.components_, atol=1e-6)
        np.testing.assert_allclose(got[f"pca/{name}/explained_variance_ratio"], ipca.explained_variance_ratio_,
                                   rtol=1e-6)
        np.testing.assert_allclose(got[f"pca/{name}/scores"], ipca.transform(X), atol=1e-4)
    assert same(got["image_ids"], raw["image_ids"])


def test_streamed_pca_finds_the_pca_subspace(tmp_path):
    """write_final's streamed IncrementalPCA against sklearn PCA on the same rows (two sources, bad rows
    dropped): the same subspace and explained variance."""
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(1)
    n, d, k = 3000, 40, 6
    basis = np.linalg.qr(rng.normal(size=(d, k)))[0]
    X = (rng.normal(size=(n, k)) * np.linspace(10, 3, k)) @ basis.T + 0.3 * rng.normal(size=(n, d)) + 2.0
    keep = rng.random(n) > 0.05
    files = []
    for j, (a, b) in enumerate([(0, 1700), (1700, n)]):
        with h5py.File(tmp_path / f"src{j}.h5", "w") as f:
            f["features"] = X[a:b].astype(np.float32)
            f["image_ids"] = np.array([f"img{i:05d}" for i in range(a, b)], dtype=object)
        files.append(h5py.File(tmp_path / f"src{j}.h5", "r"))
    cfg = dict(pca=k, pca_batch=500, dtype="float32", sae="")
    extract.write_final(str(tmp_path / "out.h5"), files, [keep[:1700], keep[1700:]], [], {}, cfg)
    got = arrays(tmp_path / "out.h5")
    Xk = X[keep].astype(np.float32).astype(np.float64)
    pca = PCA(k).fit(Xk)
    C = got["pca/features/components"]
    cos = np.linalg.svd(C @ pca.components_.T, compute_uv=False)  # cosines of the principal angles
    assert cos.min() > 0.999
    np.testing.assert_allclose(got["pca/features/explained_variance_ratio"], pca.explained_variance_ratio_, rtol=2e-3)
    np.testing.assert_allclose(np.abs(got["pca/features/scores"]), np.abs(pca.transform(Xk)), atol=0.05)
    assert same(got["features"], X[keep].astype(np.float32))
    assert [s.decode() for s in got["image_ids"]] == [f"img{i:05d}" for i in np.flatnonzero(keep)]


def test_sae_codes_use_train_py_encoder(tree, full, tmp_path):
    import train
    ckpt = str(tmp_path / "sae.pt")
    train.main(["--stage", "sae", "--features", full[0], "--n-latents", "2x", "--k", "4", "--epochs", "2",
                "--batch", "8", "--no-progress", "--out", ckpt])
    _, out = run(tmp_path, tree, "--sae", ckpt, out="c.h5")
    ref = str(tmp_path / "codes.h5")
    train.main(["--stage", "sae", "--encode", "--ckpt", ckpt, "--features", full[0], "--codes-out", ref])
    got, want = arrays(out), arrays(ref)
    assert got["sae/indices"].shape == (N_GOOD, 4)
    assert np.array_equal(got["sae/indices"], want["sae/indices"]) and np.array_equal(got["sae/values"],
                                                                                      want["sae/values"])
    assert np.array_equal(got["features"], arrays(full[0])["features"])


# ------------------------------------------------------------------------------------------------ weights

def test_weights_from_a_file_the_weights_dir_and_the_hub_cache(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(3)
    src = backbones.build(TIMM, "random")
    sd = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    x = torch.randn(2, 3, 160, 160)
    want, _ = src.features(x, ["output"])
    path = tmp_path / "w.safetensors"
    save_file(sd, path)
    for weights, wdir in [(str(path), "nowhere"), ("", str(tmp_path / "wd"))]:
        (tmp_path / "wd").mkdir(exist_ok=True)
        save_file(sd, tmp_path / "wd" / f"{backbones.safe_name(TIMM)}.safetensors")
        bb = backbones.build(TIMM, weights, wdir)
        assert torch.equal(bb.features(x, ["output"])[0]["output"], want["output"])
    # the Hugging Face cache layout, revision from refs/main
    cache = tmp_path / "hf"
    snap = cache / "models--timm--test_vit.r160_in1k" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (cache / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("abc123")
    save_file(sd, snap / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    p, source = backbones.resolve_weights(TIMM, "", str(tmp_path / "empty"))
    assert p == str(snap / "model.safetensors") and "Hugging Face cache" in source
    bb = backbones.build(TIMM, "", str(tmp_path / "empty"))
    assert torch.equal(bb.features(x, ["output"])[0]["output"], want["output"])
    with pytest.raises(backbones.WeightsError, match="could not load"):
        torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
        backbones.build(TIMM, str(tmp_path / "bad.pt"))


def test_no_network_while_building():
    import socket
    with backbones.no_network("building x"):
        s = socket.socket()
        with pytest.raises(backbones.WeightsError, match="never downloads"):
            s.connect(("127.0.0.1", 9))
        s.close()


@pytest.mark.parametrize("weights, names", [("/nonexistent/dinov2.safetensors", ["/nonexistent/dinov2.safetensors"]),
                                            ("", ["dinov2.safetensors", "model.safetensors",
                                                  "models--timm--vit_base_patch14_reg4_dinov2.lvd142m"])])
def test_missing_weights_fail_fast_naming_the_file(tree, tmp_path, weights, names):
    """No torch, timm or network before the weights are found: the error comes back in about half a second
    (torch's import alone takes longer than the bound asserted here)."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE="", TORCH_HOME=str(tmp_path / "torch"))
    argv = ["--dataset", "things", "--images", str(tree), "--backbone", "dinov2", "--weights-dir", str(tmp_path / "w"),
            "--out", str(tmp_path / "x.h5")] + (["--weights", weights] if weights else [])
    code = ("import sys, extract\ntry:\n    extract.main(%r)\nexcept SystemExit as e:\n    print(e, file=sys.stderr)\n"
            "print(sorted(m for m in ('torch', 'timm', 'open_clip', 'huggingface_hub') if m in sys.modules))" % argv)
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t
    assert r.stdout.strip() == "[]" and elapsed < 3.0, (elapsed, r.stdout, r.stderr)
    assert all(n in r.stderr for n in names), r.stderr
    assert "--weights random" in r.stderr and not (tmp_path / "x.h5").exists()


# ----------------------------------------------------------------------------------------------- plumbing

def test_cli_errors_and_list_layers(tree, tmp_path, capsys):
    with pytest.raises(SystemExit, match="folder not found"):
        extract.main(["--dataset", "things", "--images", str(tmp_path / "none"), "--weights", "random"])
    with pytest.raises(SystemExit, match="unknown backbone"):
        extract.main(["--dataset", "things", "--images", str(tree), "--backbone", "alexnet9"])
    with pytest.raises(SystemExit, match="expected i/N"):
        run(tmp_path, tree, "--shard", "3/3")
    extract.main(["--dataset", "things", "--backbone", TIMM, "--list-layers"])
    out = capsys.readouterr().out
    assert "blocks.1.attn" in out and "default layer 'output'" in out
