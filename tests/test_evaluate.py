"""evaluate.py on the embedded world: values against independent computations and the world's ground truth."""
import collections
import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import cosine_similarity

import data
import eval_geometry as geometry_tasks
import evaluate
import kernels
from eval_behaviour import noise_ceiling, odd_one_out
from representations import cosine_similarity_matrix


def run(world, task, out, **kw):
    argv = ["--task", task, "--features", world["dir"] + "/features/things.h5", "--data", world["data"], "--out",
            str(out)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    evaluate.main(argv)
    with open(out) as fh:
        return json.load(fh)


def test_odd_one_out_matches_loop():
    rng = np.random.default_rng(0)
    R = rng.normal(size=(30, 5))
    trip = np.array(list(itertools.permutations(range(6), 3)) + [tuple(rng.choice(30, 3,
                                                                                  replace=False)) for _ in range(200)])
    S = cosine_similarity(R)
    want = []
    for i, j, k in trip:  # the odd one out is the item outside the most similar pair
        pairs = {0: S[j, k], 1: S[i, k], 2: S[i, j]}
        want.append(max(pairs, key=pairs.get))
    got = odd_one_out(cosine_similarity_matrix(R), trip)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(cosine_similarity_matrix(R), S, atol=1e-12)


def test_noise_ceiling_matches_counter():
    rng = np.random.default_rng(1)
    base = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [1, 5, 9]])
    rows, choices = [], []
    for t in range(len(base)):
        for _ in range(rng.integers(1, 7)):
            perm = rng.permutation(3)  # the same set shown in other orders
            rows.append(base[t][perm])
            choices.append(rng.integers(0, 3))
    trip, choice = np.array(rows), np.array(choices)
    groups = collections.defaultdict(list)
    for r, c in zip(trip, choice):
        groups[tuple(sorted(r))].append(r[c])
    shares = [collections.Counter(v).most_common(1)[0][1] / len(v) for v in groups.values() if len(v) > 1]
    value, n_sets, n_trials = noise_ceiling(trip, choice)
    assert value == pytest.approx(np.mean(shares)) and n_sets == len(shares)
    assert n_trials == sum(len(v) for v in groups.values() if len(v) > 1)


def test_things_ooo_on_world(world, tmp_path):
    r = run(world, "things-ooo", tmp_path / "ooo.json")
    assert set(r) >= {"base", "spose", "noise_ceiling", "config", "versions"}
    ceiling, h, base = r["noise_ceiling"], r["spose"]["accuracy"], r["base"]["accuracy"]
    # ground truth of the world: humans choose from h, so h sits near the ceiling; the backbone's
    # nuisance-dominated geometry is clearly worse (measured: ceiling 0.70, h 0.68, base 0.48)
    assert 0.6 < ceiling < 0.8
    assert h > ceiling - 0.05
    assert base < h - 0.10 and base > 1 / 3
    assert r["base"]["ci"][0] < base < r["base"]["ci"][1]
    assert r["config"]["task"] == "things-ooo"
    # the accuracy is the fraction of human choices reproduced: recompute it from the raw files
    concepts = data.load_concepts(world["data"])
    t = data.load_triplets(world["data"], len(concepts))
    E = data.load_spose(world["data"])
    cos = lambda a, b: cosine_similarity(E[[a]], E[[b]])[0, 0]  # noqa: E731
    pred = np.array([np.argmax([cos(j, k), cos(i, k), cos(i, j)]) for i, j, k in t["triplets"][:500]])
    full = odd_one_out(cosine_similarity_matrix(E), t["triplets"])
    np.testing.assert_array_equal(full[:500], pred)
    assert np.mean(full == t["choice"]) == pytest.approx(h)


def test_cka_on_world(world, tmp_path):
    r = run(world, "cka", tmp_path / "cka.json", n_boot=50)
    concepts = data.load_concepts(world["data"])
    X, ids = data.read_features(world["dir"] + "/features/things.h5")
    base = X[data.concept_rows(ids, concepts)]
    E = data.load_spose(world["data"])
    assert r["base"]["cka"] == pytest.approx(kernels.cka_ref(base, E).item(), abs=1e-6)  # Gram oracle
    assert r["base"]["cka_debiased"] == pytest.approx(kernels.cka_ref(base, E, debiased=True).item(), abs=1e-6)
    assert r["spose"]["cka"] == pytest.approx(1.0) and r["noise_ceiling"] == pytest.approx(1.0)
    assert 0.2 < r["base"]["cka"] < 0.7  # worse aligned than h by construction (measured 0.47)
    lo, hi = r["base"]["ci"]
    assert lo < r["base"]["cka"] < hi and hi - lo < 0.3


def test_report(world, tmp_path):
    run(world, "things-ooo", tmp_path / "ooo.json")
    run(world, "cka", tmp_path / "cka.json", n_boot=10)
    evaluate.main(["--task", "report", "--results", str(tmp_path), "--out", str(tmp_path / "report.md")])
    text = (tmp_path / "report.md").read_text()
    assert "| things-ooo | spose | accuracy |" in text and "| cka | base | cka |" in text


def _corrupt_world(world, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(world["data"], d)
    return d


@pytest.mark.parametrize("case", ["missing_features", "triplet_out_of_range", "row_mismatch", "nan", "missing_spose"])
def test_bad_input(world, tmp_path, case):
    d = _corrupt_world(world, tmp_path)
    feats = tmp_path / "things.h5"
    X, ids = data.read_features(world["dir"] + "/features/things.h5")
    data.write_features(feats, X, ids)
    expect = {"missing_features": "nope.h5", "triplet_out_of_range": "THINGS_triplets.csv",
              "row_mismatch": "things.h5", "nan": "things.h5", "missing_spose": "spose_embedding"}[case]
    if case == "missing_features":
        feats = tmp_path / "nope.h5"
    elif case == "triplet_out_of_range":
        lines = (d / "THINGS_triplets.csv").read_text().splitlines()
        cols = lines[3].split("\t")
        cols[1] = "99999"
        lines[3] = "\t".join(cols)
        (d / "THINGS_triplets.csv").write_text("\n".join(lines) + "\n")
    elif case == "row_mismatch":  # drop every image of the last concept
        last = ids[-1].split("/")[0]
        keep = [i for i, s in enumerate(ids) if not s.startswith(last + "/")]
        data.write_features(feats, X[keep], [ids[i] for i in keep])
    elif case == "nan":
        X = X.copy()
        X[5, 2] = np.nan
        data.write_features(feats, X, ids)
    elif case == "missing_spose":
        os.remove(d / "spose_embedding_66d_sorted.txt")
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "things-ooo", "--features", str(feats), "--data", str(d), "--out", str(out)])
    assert expect in str(e.value)
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_unknown_flag_is_an_error():
    with pytest.raises(SystemExit):
        evaluate.parse(["--taks", "cka"])
    assert evaluate.parse(["--task=cka"])["task"] == "cka"


def _meta_ckpt(world, tmp_path, seed, n_layers):
    """An untrained MetaLearner for the world's features, saved in train.py's checkpoint layout."""
    from models import MetaLearner
    X, ids = data.read_features(world["dir"] + "/features/things.h5")
    torch.manual_seed(seed)
    args = dict(d=X.shape[1], d_model=16, n_layers=n_layers, n_heads=2)
    model = MetaLearner(**args)
    ck = tmp_path / "meta.pt"
    torch.save(dict(model=model.state_dict(), model_args=args, config={}, versions={}), ck)
    return model, args, ck, X, ids


def test_ckpt_gives_aligned_representation(world, tmp_path):
    """--ckpt: encode(features) of a meta checkpoint is scored as `aligned`, identical to scoring it by hand."""
    from models import MetaLearner
    model, args, ck, X, ids = _meta_ckpt(world, tmp_path, seed=0, n_layers=1)
    r = run(world, "things-ooo", tmp_path / "ooo.json", ckpt=str(ck))
    concepts = data.load_concepts(world["data"])
    t = data.load_triplets(world["data"], len(concepts))
    with torch.no_grad():
        Z = model.encode(torch.as_tensor(X[data.concept_rows(ids, concepts)])).numpy()
    want = np.mean(odd_one_out(cosine_similarity_matrix(Z), t["triplets"]) == t["choice"])
    assert r["aligned"]["accuracy"] == pytest.approx(want) and r["aligned"]["dims"] == 16
    bad = tmp_path / "bad.pt"
    wide = dict(args, d=X.shape[1] + 1)
    torch.save(dict(model=MetaLearner(**wide).state_dict(), model_args=wide, config={}), bad)
    with pytest.raises(SystemExit, match=f"bad.pt: the checkpoint embeds {X.shape[1] + 1}-d features"):
        run(world, "things-ooo", tmp_path / "x.json", ckpt=str(bad))


def test_cka_layers_traced_by_hooks(world, tmp_path):
    """--task cka --ckpt: per-layer CKA from forward hooks on `embedding` and `layers`; layer 0 is encode."""
    model, args, ck, X, ids = _meta_ckpt(world, tmp_path, seed=1, n_layers=2)
    r = run(world, "cka", tmp_path / "cka.json", ckpt=str(ck), n_boot=5, spose_dims="0,1,2")
    layers = r["aligned"]["layers"]
    assert len(layers["all"]) == 3 and len(layers["dims"]) == 3  # embedding + 2 blocks
    assert layers["all"][0] == pytest.approx(r["aligned"]["cka_biased"], abs=1e-9)  # the embedding is encode
    concepts = data.load_concepts(world["data"])
    Xc = X[data.concept_rows(ids, concepts)]
    E = data.load_spose(world["data"])
    with torch.no_grad():  # oracle for block 1: run the blocks by hand on [0, x]
        h = model.embedding(torch.nn.functional.pad(torch.as_tensor(Xc), (1, 0)).unsqueeze(1))
        h1 = model.layers[0](h).squeeze(1).numpy()
    assert layers["all"][1] == pytest.approx(kernels.cka_ref(h1, E).item(), abs=1e-6)
    assert (tmp_path / "cka_layers.png").exists()


@pytest.mark.parametrize("debiased", [False, True])
def test_jackknife_cka_matches_explicit_leave_one_out(debiased):
    rng = np.random.default_rng(3)
    A = rng.normal(size=(23, 6)) + 1
    B = A[:, :3] @ rng.normal(size=(3, 4)) + rng.normal(size=(23, 4))
    want = [kernels.cka_ref(np.delete(A, i, 0), np.delete(B, i, 0), debiased=debiased).item() for i in range(23)]
    np.testing.assert_allclose(geometry_tasks.jackknife_cka(A, B, debiased), want, atol=1e-10)


def test_cka_ci_contains_estimate(world, tmp_path):
    r = run(world, "cka", tmp_path / "cka.json")
    lo, hi = r["base"]["ci"]
    assert lo < r["base"]["cka"] < hi and r["base"]["ci_method"].startswith("jackknife")
    rb = run(world, "cka", tmp_path / "cka_b.json", ci_method="bootstrap", n_boot=30)
    assert rb["base"]["ci_method"] == "basic bootstrap over concepts"
