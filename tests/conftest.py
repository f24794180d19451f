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
def coco_pools(world):
    """The world's training pool and its held-out split for checkpoint selection (the role of COCO train and
    val+test): coco.h5 / coco_eval.h5, and the same two pools in the second stand-in backbone (coco_b1)."""
    return dict(train=world["features/coco"], eval=world["features/coco_eval"], train_b1=world["features/coco_b1"],
                eval_b1=world["features/coco_eval_b1"])
