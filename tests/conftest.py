"""Shared fixtures: the small embedded world, built once per test session."""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """dict: every path make_world wrote, plus dir (world root) and data (the human-data folder)."""
    from world import make_world
    out = tmp_path_factory.mktemp("world")
    paths = make_world(str(out), size="small", seed=0, verbose=False, diagnostics=False)  # test_world runs them
    return dict(paths, dir=str(out), data=str(out / "data"))


@pytest.fixture(scope="module")
def one_thread():
    """Small ops: one torch thread for the module (on shared, busy cores the thread pools' spin-waits cost
    several x). Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _devices():
    """Every device an op test runs on: cpu always, cuda as a skipped case (with the reason) when absent."""
    import torch
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: the CUDA kernels run in make gpu-check"))
    return ["cpu", cuda]


DEVICES = _devices()


@pytest.fixture(params=DEVICES)
def device(request):
    """Parametrise a test over DEVICES: `def test_x(device): ...` runs once per device."""
    return request.param


@pytest.fixture(scope="session")
def coco_pools(world, tmp_path_factory):
    """The world's training pool and its held-out split for checkpoint selection (the role of COCO train and
    val+test): coco.h5 / coco_eval.h5 when the world writes both, else the last fifth of coco.h5's rows moved into
    a separate file. Also the same split of the second stand-in backbone's features (coco_b1.h5)."""
    import h5py
    import data
    tmp = tmp_path_factory.mktemp("coco_pools")

    def split(src, a, b):
        X, ids = data.read_features(src)
        with h5py.File(src) as f:
            attrs = {k: f.attrs[k] for k in f.attrs}
        cut = len(ids) * 4 // 5
        data.write_features(a, X[:cut], ids[:cut], attrs=attrs)
        data.write_features(b, X[cut:], ids[cut:], attrs=attrs)
        return str(a), str(b)

    out = {}
    if "features/coco_eval" in world:
        out["train"], out["eval"] = world["features/coco"], world["features/coco_eval"]
    else:
        out["train"], out["eval"] = split(world["features/coco"], tmp / "coco.h5", tmp / "coco_eval.h5")
    out["train_b1"], out["eval_b1"] = split(os.path.join(world["dir"], "features", "coco_b1.h5"), tmp / "coco_b1.h5",
                                            tmp / "coco_b1_eval.h5")
    return out
