"""The function curriculum of the meta stage: models.densest_first / function_prefix / functions_at against
functions built directly from the codes, and train.py --functions-start end to end (the CSV's functions column,
the episodes each step draws from)."""
import numpy as np
import pytest
import torch

import models

pytestmark = pytest.mark.usefixtures("one_thread")  # small ops on shared cores


def _codes(n=400, n_latents=12, k=3, seed=0):
    """Top-k codes with latents of very different densities (latent j is favoured with weight ~ 1 / (j + 1))."""
    g = np.random.default_rng(seed)
    s = g.gumbel(size=(n, n_latents)) + np.log(1.0 / (np.arange(n_latents) + 1))
    idx = np.argsort(-s, 1)[:, :k]
    val = g.uniform(0.1, 2.0, size=(n, k)).astype(np.float32)
    return idx, val


def _positives(fns, f):
    ptr = fns["pos_ptr"]
    return fns["pos_idx"][ptr[f]:ptr[f + 1]].numpy(), fns["pos_val"][ptr[f]:ptr[f + 1]].numpy()


def test_densest_first_prefix_is_the_densest_functions():
    """function_prefix(densest_first(fns), k) holds exactly the k latents with the most positives, each with the
    same positive rows, values and magnitude scale as functions_from_codes builds for that latent alone."""
    idx, val = _codes()
    fns = models.functions_from_codes(idx, val, min_nonzero=5)
    counts = fns["pos_ptr"].diff().numpy()
    order = models.densest_first(fns)
    assert sorted(order["latents"].tolist()) == sorted(fns["latents"].tolist())
    assert (np.diff(order["pos_ptr"].diff().numpy()) <= 0).all()  # most positives first
    for k in (1, 3, len(counts)):
        pre = models.function_prefix(order, k)
        want = fns["latents"].numpy()[np.lexsort((fns["latents"].numpy(), -counts))[:k]]
        np.testing.assert_array_equal(pre["latents"].numpy(), want)
        assert len(pre["pos_ptr"]) == k + 1 and len(pre["pos_idx"]) == int(pre["pos_ptr"][-1])
        for f, lat in enumerate(want):
            one = models.functions_from_codes(idx, val, min_nonzero=5, latents=[lat])
            for got, ref in zip(_positives(pre, f), _positives(one, 0)):
                np.testing.assert_array_equal(got, ref)
            assert float(pre["mag_scale"][f]) == pytest.approx(float(one["mag_scale"][0]))
    # episodes of a prefix only ever use its functions' rows as positives
    pre = models.function_prefix(order, 2)
    x, y, _, fn, rows = models.make_episodes(torch.randn(400, 5), pre, 16, 10, seed=3)
    assert int(fn.max()) < 2
    for b in range(16):
        pos = set(_positives(pre, int(fn[b]))[0].tolist())
        assert all((int(r) in pos) == bool(t) for r, t in zip(rows[b], y[b]))


def test_densest_first_keeps_explicit_negatives():
    """Neuron functions list their negatives: both CSR sides are reordered together."""
    X = np.random.default_rng(1).normal(size=(50, 4)).astype(np.float32) * [1, 2, 3, 4]
    fns = models.functions_from_neurons(X)
    order = models.densest_first(fns)
    for f, lat in enumerate(order["latents"].tolist()):
        j = fns["latents"].tolist().index(lat)
        for side in ("pos", "neg"):
            a, b = order[f"{side}_ptr"], fns[f"{side}_ptr"]
            np.testing.assert_array_equal(order[f"{side}_idx"][a[f]:a[f + 1]], fns[f"{side}_idx"][b[j]:b[j + 1]])


def test_functions_at_grows_geometrically():
    assert models.functions_at(0, 1000, 10, 100) == 10
    assert models.functions_at(50, 1000, 10, 100) == 100  # halfway: the geometric mean
    assert models.functions_at(100, 1000, 10, 100) == 1000 == models.functions_at(10 ** 6, 1000, 10, 100)
    assert models.functions_at(0, 1000, 0, 100) == 1000 == models.functions_at(0, 1000, 5000, 100)
    steps = [models.functions_at(s, 1000, 10, 100) for s in range(101)]
    assert steps == sorted(steps)


def test_train_function_curriculum(world, coco_pools, tmp_path):
    """train.py --functions-start K --functions-ramp S: step s trains on functions_at(s, F, K, S) densest
    functions (the CSV's functions column); the checkpoint lists every training latent; static_linear refuses."""
    import pandas as pd
    import train
    from test_meta import write_truth_codes
    from test_paper import meta_args
    pools = dict(coco_pools, codes=write_truth_codes(world, "coco", tmp_path / "codes.h5"))
    train.main(meta_args(pools, tmp_path / "c.pt", steps=12, eval_every=6, functions_start=2, functions_ramp=8,
                         icl_bound=16))
    log = pd.read_csv(tmp_path / "c.csv")
    ck = torch.load(tmp_path / "c.pt", weights_only=False)
    F = len(ck["latents"])
    assert F > 2 and log["functions"].tolist() == [models.functions_at(s, F, 2, 8) for s in range(12)]
    assert log["functions"].iloc[0] == 2 and log["functions"].iloc[-1] == F
    # the ridge bound does not depend on the curriculum (its alpha is chosen on the same training episodes)
    train.main(meta_args(pools, tmp_path / "n.pt", steps=6, eval_every=6, icl_bound=16))
    plain_ck = torch.load(tmp_path / "n.pt", weights_only=False)
    plain = plain_ck["metrics"]["icl_ridge_bound"]
    assert ck["metrics"]["icl_ridge_bound"]["accuracy"] == plain["accuracy"]
    assert ck["metrics"]["icl_ridge_bound"]["alpha"] == plain["alpha"]
    with pytest.raises(SystemExit, match="--functions-start is a curriculum for in-context learners"):
        train.main(meta_args(pools, tmp_path / "s.pt", model="static_linear", functions_start=2))
    # the identifier bound (evaluate.py --task icl) reads the training functions in the checkpoint's own order,
    # densest first under the curriculum, not sorted: its members matrix must follow that order (a bug once made
    # it a random one, and the identifier chance, at full size)
    import scipy.sparse as sp

    import data
    from eval_behaviour import function_members, identifier_icl_curve
    assert np.any(np.diff(np.asarray(ck["latents"])) < 0)  # the curriculum's order is not the sorted one
    X, ids = data.read_features(coco_pools["eval"])
    codes = pools["codes"]
    idx, val = (np.asarray(a) for a in models.read_codes(codes, len(X), ids))  # this pool's rows, by image id
    oracle = np.stack([((idx == lat) & (val > 0)).any(1) for lat in ck["latents"]])
    M = function_members(ck["config"], ck, X, ids, codes)
    assert M.shape == oracle.shape and (M.toarray() == oracle).all()
    fns = models.functions_from_codes(idx, val, 16, latents=np.asarray(ck["latents"]))
    Mp = function_members(plain_ck["config"], plain_ck, X, ids, codes)
    a = identifier_icl_curve(torch.from_numpy(X), fns, M, 16, n_episodes=32)
    b = identifier_icl_curve(torch.from_numpy(X), fns, sp.csr_matrix(Mp), 16, n_episodes=32)
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-12) and a["accuracy"] > 0.8, (a, b)


@pytest.mark.parametrize("name", ["icl_full_cpu", "icl_full_gpu"])
def test_icl_presets_parse_with_the_curriculum(name):
    """The ICL presets are train.py [meta] tables whose every key is a meta flag, with the function curriculum on."""
    import tomllib
    from pathlib import Path
    import train
    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
    table = tomllib.loads(path.read_text())["meta"]
    cfg = train.parse(["--stage", "meta", "--config", str(path)])
    assert all(cfg[k] == v for k, v in table.items()), {k: (cfg[k], v) for k, v in table.items() if cfg[k] != v}
    assert cfg["functions_start"] == 35 and cfg["length"] == 120 and cfg["d_model"] // cfg["n_heads"] == 128


def test_resume_a_run_from_before_the_curriculum(world, coco_pools, tmp_path):
    """A resume state written before --functions-start existed (no such keys in its config) resumes with the
    defaults; one written with another curriculum is refused, naming the setting."""
    import train
    from test_meta import write_truth_codes
    from test_paper import meta_args
    pools = dict(coco_pools, codes=write_truth_codes(world, "coco", tmp_path / "codes.h5"))
    train.main(meta_args(pools, tmp_path / "r.pt", steps=6, eval_every=3))
    last = tmp_path / "r.last.pt"
    ck = torch.load(last, weights_only=False)
    for k in ("functions_start", "functions_ramp"):
        del ck["config"][k]
    torch.save(ck, last)
    train.main(meta_args(pools, tmp_path / "r.pt", steps=9, eval_every=3, resume=True))
    assert torch.load(last, weights_only=False)["step"] == 9
    with pytest.raises(SystemExit, match="functions_start 0 \\(checkpoint\\) vs 4"):
        train.main(meta_args(pools, tmp_path / "r.pt", steps=12, eval_every=3, resume=True, functions_start=4))


def test_latent_positions_in_any_order():
    lat = np.array([7, 2, 9, 4])  # a checkpoint's latents in curriculum order
    assert models.latent_positions(lat, np.array([9, 7, 4, 2, 5, 10])).tolist() == [2, 0, 3, 1, -1, -1]
    assert models.latent_positions(np.array([], np.int64), np.array([3])).tolist() == [-1]
