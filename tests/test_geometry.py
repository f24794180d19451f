"""Geometry: RDMs and their comparison against rsatoolbox and scipy, class separation against its
definition, the tiled model-similarity matrices against pairwise kernels.cka_ref / explicit RDMs, probes."""
import h5py
import numpy as np
import pytest
import rsatoolbox
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

import geometry
import kernels

rng = np.random.default_rng(0)


@pytest.mark.parametrize("n,d", [(2, 3), (7, 5), (60, 17)])
def test_rdm_matches_rsatoolbox_and_scipy(n, d):
    X = rng.normal(size=(n, d)) + 2
    ds = rsatoolbox.data.Dataset(X)
    np.testing.assert_allclose(geometry.rdm(X, "correlation"),
                               rsatoolbox.rdm.calc_rdm(ds, method="correlation").dissimilarities.ravel(), atol=1e-10)
    # rsatoolbox's 'euclidean' is the squared distance divided by the number of channels
    np.testing.assert_allclose(geometry.rdm(X, "euclidean") ** 2 / d,
                               rsatoolbox.rdm.calc_rdm(ds, method="euclidean").dissimilarities.ravel(), atol=1e-10)
    np.testing.assert_allclose(geometry.rdm(X, "cosine"), pdist(X, "cosine"), atol=1e-10)
    np.testing.assert_allclose(geometry.rdm(X, "euclidean"), pdist(X, "euclidean"), atol=1e-10)


def test_compare_rdms_matches_rsatoolbox():
    X, Y = rng.normal(size=(12, 6)), rng.normal(size=(12, 4))
    a = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method="correlation")
    b = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(Y), method="correlation")
    ra, rb = geometry.rdm(X), geometry.rdm(Y)
    for ours, theirs in [("pearson", "corr"), ("spearman", "spearman"), ("cosine", "cosine")]:
        want = float(rsatoolbox.rdm.compare(a, b, method=theirs)[0, 0])
        assert geometry.compare_rdms(ra, rb, ours) == pytest.approx(want, abs=1e-10)
    assert geometry.compare_rdms(ra, rb, "spearman") == pytest.approx(spearmanr(ra, rb)[0], abs=1e-12)
    with pytest.raises(ValueError, match="differ in length"):
        geometry.compare_rdms(ra, ra[:-1])


def test_class_separation_known_answers():
    labels = np.repeat(np.arange(5), 20)
    X = rng.normal(size=(100, 30)) + 3
    assert geometry.class_separation(X, labels) == pytest.approx(geometry.class_separation_ref(X, labels), abs=1e-12)
    # classes on orthogonal axes with no spread: within distance 0 -> R^2 = 1
    P = np.eye(5)[labels] * 4.0
    assert geometry.class_separation(P, labels) == pytest.approx(1.0)
    # labels independent of the geometry: R^2 ~ 0 (within = between in expectation)
    Z = rng.normal(size=(4000, 8))
    assert abs(geometry.class_separation(Z, rng.integers(0, 4, 4000))) < 0.01
    with pytest.raises(ValueError, match="at least 2 classes"):
        geometry.class_separation(X, np.zeros(100))


@pytest.mark.parametrize("n,tile", [(9, 4), (130, 64), (101, 1024)])
def test_similarity_matrices_match_pairwise(n, tile):
    base = rng.normal(size=(n, 6))
    models = [base, base @ rng.normal(size=(6, 9)), np.tanh(base[:, :3]) + 0.3 * rng.normal(size=(n, 3)),
              rng.normal(size=(n, 4))]
    S = geometry.similarity_matrices(models, ("cka_linear", "cka_rbf_1.0", "cka_rbf_0.5", "rsa_correlation",
                                              "rsa_euclidean"), tile=tile)
    for a in range(4):
        for b in range(4):
            A, B = models[a], models[b]
            assert S["cka_linear"][a, b] == pytest.approx(kernels.cka_ref(A, B).item(), abs=1e-9)
            assert S["cka_rbf_1.0"][a, b] == pytest.approx(kernels.cka_ref(A, B, kernel="rbf").item(), abs=1e-9)
            want = kernels.cka_ref(A, B, kernel="rbf", sigma_frac=0.5).item()
            assert S["cka_rbf_0.5"][a, b] == pytest.approx(want, abs=1e-9)
            for metric in ("correlation", "euclidean"):
                want = geometry.compare_rdms(geometry.rdm(A, metric), geometry.rdm(B, metric))
                assert S[f"rsa_{metric}"][a, b] == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="share one image set"):
        geometry.similarity_matrices([base, base[:-1]])


def test_consistency_and_procrustes():
    M1 = np.array([[1, .5, .2], [.5, 1, .1], [.2, .1, 1]])
    C = geometry.consistency([M1, M1 * 0.5 + 0.5 * np.eye(3), M1.T[::-1, ::-1]])
    assert C[0, 1] == pytest.approx(1.0) and C.shape == (3, 3)
    A = rng.normal(size=(50, 2))
    th = 0.7
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    np.testing.assert_allclose(geometry.procrustes_to(A, 3 * A @ R + 5), A, atol=1e-10)


def test_few_shot_probe_learns_separable_classes():
    centres = rng.normal(size=(4, 10)) * 3
    y = rng.integers(0, 4, 600)
    X = centres[y] + rng.normal(size=(600, 10))
    noise = rng.normal(size=(600, 10))
    acc_sig = geometry.few_shot_probe(X[:400], y[:400], X[400:], y[400:], shots=5, seeds=[0, 1])
    acc_noise = geometry.few_shot_probe(noise[:400], y[:400], noise[400:], y[400:], shots=None, seeds=[0])
    assert acc_sig.min() > 0.9 and acc_noise.max() < 0.4  # 4 classes: chance 0.25
    with pytest.raises(ValueError, match="needs 200"):
        geometry.few_shot_probe(X[:400], y[:400], X[400:], y[400:], shots=100, seeds=[0])


# ------------------------------------------------------------------------------------ tasks on the world
import json  # noqa: E402

import evaluate  # noqa: E402


def _task(world, task, tmp_path, *extra):
    out = tmp_path / f"{task}.json"
    evaluate.main(["--task", task, "--features", world["dir"] + "/features/things.h5", "--data", world["data"],
                   "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_rsa_task(world, tmp_path):
    r = _task(world, "rsa", tmp_path, "--spose-dims", "0,1,2")
    assert r["spose"]["rsa"] == pytest.approx(1.0)
    assert 0.2 < r["base"]["rsa"] < 0.8  # worse than h by construction (measured 0.47)
    assert "rsa_spose_dims" in r["base"] and r["config"]["rdm_compare"] == "spearman"


def test_class_separation_task(world, tmp_path):
    r = _task(world, "class-separation", tmp_path)
    # categories are h's superclasses: h separates them far better than the nuisance-laden base (0.48 vs 0.18)
    assert r["spose"]["class_separation_coarse"] > r["base"]["class_separation_coarse"] + 0.15
    assert 0 < r["base"]["class_separation_fine"] < 1


def test_tsne_task(world, tmp_path):
    r = _task(world, "tsne", tmp_path)
    assert r["spose"]["trustworthiness"] > r["base"]["trustworthiness"] > 0.5
    assert (tmp_path / "tsne.png").stat().st_size > 10_000


def test_similarity_task(world, tmp_path):
    f = world["dir"] + "/features/{dataset}"
    r = _task(world, "similarity", tmp_path, "--models", f"{f}.h5,{f}_b1.h5,{f}_b2.h5,{f}_b3.h5",
              "--datasets", "things,levels,coco", "--max-images", "500", "--measures", "cka_linear,rsa_correlation")
    assert r["models"] == ["synthetic", "synthetic-b1", "synthetic-b2", "synthetic-b3"]
    for ds in ("things", "levels", "coco"):
        S = np.array(r["matrices"][ds]["cka_linear"])
        np.testing.assert_allclose(S, S.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(S), 1.0)
        # ground truth: nuisance weights 0.5, 1, 2 for b1..b3: the two extremes are the least similar pair
        assert S[1, 3] == S[np.triu_indices(4, 1)].min()
        with h5py.File(f.format(dataset=ds) + ".h5") as fh:
            n_images = len(fh["image_ids"])
        assert len(r["indices"][ds]) == min(500, n_images)
    C = np.array(r["consistency"]["cka_linear"])
    assert C[np.triu_indices(3, 1)].min() > 0.9  # the same structure on every image set
    with pytest.raises(SystemExit, match="image_ids differ"):
        _task(world, "similarity", tmp_path, "--models", f"{f}.h5,{world['dir']}/features/coco.h5",
              "--datasets", "things")


def test_probe_task(world, tmp_path):
    r = _task(world, "probe", tmp_path, "--shots", "1,2", "--probe-seeds", "2")
    b = r["base"]
    assert b["probe_full"] > b["chance"] + 0.2 and b["probe_full"] >= b["probe_1shot"] - 0.05


def test_similarity_constant_model_is_nan_with_warning():
    X = rng.normal(size=(40, 5))
    with pytest.warns(UserWarning, match=r"model\(s\) \[1\] have a constant representation"):
        S = geometry.similarity_matrices([X, np.ones((40, 3)), X[:, :2]], ("cka_linear",))["cka_linear"]
    assert np.isnan(S[1]).all() and np.isnan(S[:, 1]).all() and np.isfinite(S[np.ix_([0, 2], [0, 2])]).all()


def test_similarity_features_list_cli(world, tmp_path):
    """`--task similarity --features A.h5 B.h5 ... --datasets ...` (the documented form) equals --models."""
    f = world["dir"] + "/features/{dataset}"
    out = tmp_path / "s.json"
    evaluate.main(["--task", "similarity", "--features", f"{f}.h5", f"{f}_b1.h5", f"{f}_b2.h5",
                   "--datasets", "things,coco",
                   "--data", world["data"], "--max-images", "300", "--measures", "cka_linear", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["models"] == ["synthetic", "synthetic-b1", "synthetic-b2"] and set(r["matrices"]) == {"things", "coco"}
    with pytest.raises(SystemExit):
        evaluate.parse(["--task", "cka", "--features", "a.h5", "b.h5"])
