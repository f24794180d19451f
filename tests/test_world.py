"""The embedded world: loaders read every file it writes, and its ground truth has the promised properties:
h beats every unsupervised control on every task (world_truth.h5 diagnostics, cross-checked here), the negative
control's people use nothing an SAE can find, the model-selection pool is disjoint, the same seed gives the same
files."""
import hashlib
import json
import os

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from data import (concept_rows, load_category_learning, load_concepts, load_fmri, load_levels,
                  load_reward_learning, load_spose, load_triplets, read_features)
from world import (CONTROLS, ROIS_EARLY, ROIS_HIGH, SIZES, TASKS, diagnose, diagnostics_table, factor_recovery,
                   make_world, read_diagnostics)


def linear_cka(A, B):
    """Gram-matrix linear CKA (Kornblith et al. 2019), the oracle: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))."""
    n = len(A)
    H = np.eye(n) - 1.0 / n
    K, L = H @ (A @ A.T) @ H, H @ (B @ B.T) @ H
    return (K * L).sum() / np.sqrt((K * K).sum() * (L * L).sum())


def odd_one_out_accuracy(E, triplets, choice):
    """Cosine predictor: the odd one out is the item outside the most cosine-similar pair."""
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    G = E @ E.T
    t = triplets
    S = np.stack([G[t[:, 0], t[:, 1]], G[t[:, 0], t[:, 2]], G[t[:, 1], t[:, 2]]], 1)
    return float((np.array([2, 1, 0])[S.argmax(1)] == choice).mean())


def noise_ceiling(triplets, choice):
    """Mean share of the majority answer over triplets asked more than once (same unordered concept set)."""
    odd = np.take_along_axis(triplets, choice[:, None], 1)[:, 0]  # concept chosen as odd one out
    s = np.sort(triplets, 1)
    df = pd.DataFrame(dict(a=s[:, 0], b=s[:, 1], c=s[:, 2], odd=odd))
    counts = df.groupby(["a", "b", "c", "odd"]).size()
    per = counts.groupby(level=[0, 1, 2]).agg(["max", "sum"])
    per = per[per["sum"] > 1]
    return float((per["max"] / per["sum"]).mean()), len(per)


def cv_r2(A, B, folds=5):
    """Cross-validated R^2 of predicting B (n, q) from A (n, p) by least squares with an intercept (pooled over q)."""
    n = len(A)
    fold = np.arange(n) % folds
    A1 = np.c_[A, np.ones(n)]
    err = np.zeros_like(B)
    for f in range(folds):
        tr, te = fold != f, fold == f
        coef = np.linalg.lstsq(A1[tr], B[tr], rcond=None)[0]
        err[te] = B[te] - A1[te] @ coef
    return 1 - (err ** 2).sum() / ((B - B.mean(0)) ** 2).sum()


@pytest.fixture(scope="module")
def things(world):
    concepts = load_concepts(world["data"])
    h = load_spose(world["data"], len(concepts))
    X, ids = read_features(world["features/things"])
    t = load_triplets(world["data"], len(concepts))
    with h5py.File(world["truth"], "r") as f:
        truth = {k: f[k][...] for k in ("h", "directions", "g_directions", "context", "sparse/h", "sparse/g")}
        truth.update(codes=f["things/codes"][...], g_codes=f["things/g_codes"][...], g_scale=f.attrs["g_scale"])
    return dict(concepts=concepts, h=h, X=X, ids=ids, rows=concept_rows(ids, concepts, world["features/things"]),
                truth=truth, **t)


@pytest.fixture(scope="module")
def diag(world):
    """The diagnostics make_world stores in world_truth.h5 (the session's world is written without them)."""
    return diagnose(world["dir"], verbose=False)


def test_loaders_shapes(world, things):
    s = SIZES["small"]
    n_c, k_h = s["n_concepts"], s["k_h"]
    assert things["concepts"] == sorted(things["concepts"]) and len(things["concepts"]) == n_c
    assert things["h"].shape == (n_c, k_h) and things["h"].dtype == np.float32 and (things["h"] >= 0).all()
    assert things["X"].shape == (s["n_images"], s["d"]) and things["X"].dtype == np.float32
    assert things["ids"] == sorted(things["ids"]) and things["ids"][0].startswith("c0001/c0001_01")
    assert things["triplets"].shape == (s["n_triplets"], 3) and things["triplets"].dtype == np.int64
    assert things["triplets"].min() == 0 and things["triplets"].max() == n_c - 1
    assert set(np.unique(things["choice"])) == {0, 1, 2} and things["subject"].shape == (s["n_triplets"],)
    for name in ("things", "levels", "coco", "coco_eval", "things_b1", "coco_eval_b3"):
        with h5py.File(world[f"features/{name}"], "r") as f:
            assert f.attrs["backbone"].startswith("synthetic") and "config" in f.attrs and "versions" in f.attrs
            assert f.attrs["synthetic"]
    for p in (world["truth"], world["fmri/sub-01/responses"]):
        with h5py.File(p, "r") as f:
            assert f.attrs["synthetic"]

    trials, keys = load_levels(world["data"])
    assert len(trials) == s["n_levels_participants"] * s["levels_trials"]  # catch trials dropped
    assert set(trials["triplet_type"]) == {"within_class", "between_class", "class_border"}
    assert trials["selected"].between(0, 2).all() and keys == sorted(keys) and keys[0].endswith(".JPEG")
    Xl, lids = read_features(world["features/levels"])
    assert lids == keys and Xl.shape == (len(keys), s["d"])
    Xc, cids = read_features(world["features/coco"])
    assert Xc.shape == (s["n_coco"], s["d"]) and cids[0] == "train2017/000000000001.jpg"
    Xe, eids = read_features(world["features/coco_eval"])
    assert Xe.shape == (s["n_coco_eval"], s["d"]) and eids[0] == f"val2017/{s['n_coco'] + 1:012d}.jpg"

    cat = load_category_learning(world["data"])
    assert len(cat) == s["n_cat_participants"] * s["cat_trials"]
    assert set(cat["true_category_binary"]) == {0, 1} and cat["image"].isin(things["ids"]).all()
    rew = load_reward_learning(world["data"])
    assert len(rew) == s["n_reward_participants"] * s["reward_trials"] and set(rew["choice"]) == {0, 1}

    for sub in (1, "02", "sub-03"):
        fm = load_fmri(world["data"], sub)
        n_trials = s["fmri_sessions"] * s["fmri_trials"]
        assert fm["responses"].shape == (s["n_voxels"], n_trials) and fm["responses"].dtype == np.float32
        assert (fm["voxels"]["voxel_id"].to_numpy() == fm["voxel_ids"]).all()
        assert set(ROIS_EARLY + ROIS_HIGH) <= set(fm["voxels"].columns)
        assert len(fm["stimuli"]) == n_trials and fm["stimuli"]["session"].nunique() == s["fmri_sessions"]
        assert (fm["voxels"]["nc_singletrial"] <= 5).any() and fm["voxels"]["nc_singletrial"].between(0, 100).all()
        stim = set(i.split("/", 1)[1] for i in things["ids"])
        assert fm["stimuli"]["stimulus"].isin(stim).all()


def test_coco_eval_disjoint(world):
    """The model-selection pool shares no image id, no feature row and no concept with the training pool or with
    any evaluated image set (THINGS, Levels)."""
    sets = {n: read_features(world[f"features/{n}"]) for n in ("coco", "coco_eval", "things", "levels")}
    ev_ids = set(sets["coco_eval"][1])
    rows = {r.tobytes() for r in sets["coco_eval"][0]}
    for name in ("coco", "things", "levels"):
        assert not ev_ids & set(sets[name][1]), name
        assert not rows & {r.tobytes() for r in sets[name][0]}, name
    with h5py.File(world["truth"], "r") as f:  # fresh concepts: no h code row of the eval pool appears elsewhere
        ev = {r.tobytes() for r in f["coco_eval/codes"][...]}
        assert not ev & {r.tobytes() for r in f["coco/codes"][...]}
        assert not ev & {r.tobytes() for r in f["sparse/h"][...]}


def _digest(folder):
    """Hash of every array and text file the world wrote (HDF5 by content, so `created` attrs don't count)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            p = os.path.join(root, name)
            if name.endswith(".h5") and "brain_data" not in root:
                with h5py.File(p, "r") as f:
                    f.visititems(lambda k, v: h.update(k.encode() + (str(v[...].tolist()).encode()
                                 if v.dtype.kind == "O" else v[...].tobytes()))
                                 if isinstance(v, h5py.Dataset) else None)
            elif name.endswith(".h5"):
                h.update(pd.read_hdf(p).to_numpy().tobytes())
            else:
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def test_deterministic(world, diag, tmp_path):
    """Same seed, same files (diagnostics on or off); the stored diagnostics are diagnose()'s."""
    make_world(str(tmp_path / "a"), size="small", seed=0, verbose=False, diag_participants=4)
    assert _digest(str(tmp_path / "a")) == _digest(world["dir"])
    stored = read_diagnostics(str(tmp_path / "a"))
    assert stored["tasks"]["things_ooo"] == json.loads(json.dumps(diag["tasks"]["things_ooo"]))
    assert stored["tasks"]["category_learning"]["n_participants"] == 4 and read_diagnostics(world["dir"]) is None
    make_world(str(tmp_path / "b"), size="small", seed=1, verbose=False, n_coco=100, diagnostics=False)
    with h5py.File(world["truth"], "r") as fa, h5py.File(tmp_path / "b" / "world_truth.h5", "r") as fb:
        assert not np.allclose(fa["h"][...], fb["h"][...])


def test_h_near_ceiling_base_lower(things):
    ceiling, n_rep = noise_ceiling(things["triplets"], things["choice"])
    assert n_rep == SIZES["small"]["n_repeat"]  # only the designated repeated triplets repeat
    acc_h = odd_one_out_accuracy(things["h"], things["triplets"], things["choice"])
    acc_base = odd_one_out_accuracy(things["X"][things["rows"]], things["triplets"], things["choice"])
    # measured (seed 0): ceiling 0.69, h 0.68, base 0.47, chance 1/3
    assert 0.6 < ceiling < 0.8
    assert abs(acc_h - ceiling) < 0.05
    assert acc_base < acc_h - 0.10
    assert acc_base > 0.40  # base still carries h: the aligned representation has something to find


def test_cka_base_below_h(things):
    h, Xc = things["h"].astype(np.float64), things["X"][things["rows"]].astype(np.float64)
    assert linear_cka(h, h) == pytest.approx(1.0)
    cka = linear_cka(Xc, h)
    assert 0.2 < cka < 0.7  # measured 0.51: g, the nuisance and the noise share the base geometry with h
    # the h part of the base features alone is far better aligned than the features themselves
    hpart = Xc @ things["truth"]["directions"].T
    assert linear_cka(hpart, h) > cka + 0.2


def test_directions_recoverable(things):
    """Every planted sparse factor, h and g alike, is a (warped) linear direction of the features."""
    tr = things["truth"]
    for D, C in ((tr["directions"], tr["codes"]), (tr["g_directions"], tr["g_codes"])):
        assert D.shape == (SIZES["small"]["k_h"], SIZES["small"]["d"])
        assert np.allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-6)
        X = np.c_[things["X"], np.ones(len(things["X"]))].astype(np.float64)
        coef = np.linalg.lstsq(X, C, rcond=None)[0]
        r2 = 1 - ((C - X @ coef) ** 2).sum(0) / ((C - C.mean(0)) ** 2).sum(0)
        assert r2.min() > 0.5  # measured min 0.62
        proj = things["X"] @ D.T  # and the direction itself points at it: projecting on D_j correlates with code j
        assert min(np.corrcoef(proj[:, j], C[:, j])[0, 1] for j in range(C.shape[1])) > 0.7
    D = np.r_[tr["directions"], tr["g_directions"]]
    assert np.abs(D @ D.T - np.eye(len(D))).max() < 1e-9  # h and g directions: one orthonormal set
    # the concept h the SPoSE file holds is the truth's h
    assert np.allclose(things["h"], tr["h"], atol=1e-5) and np.array_equal(tr["h"], tr["sparse/h"])


def test_variance_and_spectrum(diag):
    """Variance shares as configured; the nuisance is dense, spread over many directions inside h's eigenvalue
    range; the training pool's top principal components hold no more of the nuisance than of h and g."""
    v = diag["variance"]
    c = dict(SIZES["small"], g_ratio=1.0, nuisance_ratio=1.5, noise_ratio=0.5)
    total = 1 + c["g_ratio"] + c["nuisance_ratio"] + c["noise_ratio"]
    for part, ratio in (("h", 1), ("g", c["g_ratio"]), ("nuisance", c["nuisance_ratio"]), ("noise", c["noise_ratio"])):
        assert abs(v[f"share_{part}"] - ratio / total) < 0.02, (part, v)
    assert v["n_nuisance"] == c["n_nuisance"] and v["nuisance_in_h_range"] > 0.9
    assert v["nuisance_top"] <= v["h_top_eigenvalue"] * 1.001
    top = v["top1_pcs_share"]  # the all-but-the-top rule's k = 1 at d = 64
    assert top["nuisance"] < 0.25 and top["h"] < 0.1  # measured 0.13 and 0.007: no dominant direction


def test_diagnostics_h_beats_every_control(diag, things):
    """On every task the h oracle scores above base and every unsupervised control; on THINGS odd-one-out by more
    than the CIs. The stored numbers are cross-checked against this file's own odd-one-out and CKA oracles."""
    assert diag["h_beats_every_control"] and not diag["control"]
    for task in TASKS:
        r = diag["tasks"][task]
        for name in CONTROLS:
            assert r["h"]["score"] > r[name]["score"], (task, name, r)
    th = diag["tasks"]["things_ooo"]
    half = max((th[n]["ci"][1] - th[n]["ci"][0]) / 2 for n in ("h",) + CONTROLS)
    for name in CONTROLS:
        assert th["h"]["score"] - th[name]["score"] > half, name
        assert th[name]["h_minus_ci"][0] > 0, name  # paired over triplets
        assert th["h"]["mcfadden_r2"] > th[name]["mcfadden_r2"], name
    assert diag["checks"]["things_ooo"]["beyond_ci"]
    # measured (seed 0): h 0.679, best control the ideal SAE codes 0.559, base 0.474; no k of removed PCs helps
    assert th["h"]["score"] - th["sae_codes"]["score"] > 0.08
    assert max(v for k, v in th["sweep"].items()) < th["h"]["score"] - 0.15
    tr = things["truth"]
    X = things["X"][things["rows"]]
    sparse = np.c_[tr["codes"] ** 0.8, tr["g_scale"] * tr["g_codes"] ** 0.8][things["rows"]]
    for name, R in (("h", things["h"]), ("base", X), ("sae_codes", sparse)):
        acc = odd_one_out_accuracy(R, things["triplets"], things["choice"])
        assert th[name]["score"] == pytest.approx(acc, abs=1e-12)
        cka = linear_cka(R.astype(np.float64), things["h"])
        assert diag["tasks"]["cka"][name]["score"] == pytest.approx(cka, abs=1e-5)
    table = diagnostics_table(diag)
    assert table.count("\n| ") == len(TASKS) and "sae_codes" in table


def test_learners_learn(world):
    cat = load_category_learning(world["data"])
    half = cat["trial"] > cat["trial"].max() / 2
    assert cat.loc[half, "correct"].mean() > cat.loc[~half, "correct"].mean() > 0.5
    rew = load_reward_learning(world["data"])
    better = (rew["right_reward"] > rew["left_reward"]).astype(int)
    late = rew["trial"] > rew["trial"].max() / 2
    assert (better == rew["choice"])[late].mean() > (better == rew["choice"])[~late].mean() > 0.5


@pytest.fixture(scope="module")
def control(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("control")
    paths = make_world(str(out), size="small", seed=0, verbose=False, control=True, diagnostics=False)
    return dict(paths, dir=str(out), data=str(out / "data"))


def test_control_world(world, control, things):
    """Negative control: the same features, bit for bit; the people's space is a sparse code of the concepts'
    dense context nuisance, so the sparse factors an SAE recovers (h, g) carry none of it, while the base
    features do."""
    for name in ("things", "levels", "coco", "coco_eval"):
        a, b = read_features(world[f"features/{name}"])[0], read_features(control[f"features/{name}"])[0]
        assert np.array_equal(a, b), name
    concepts = load_concepts(control["data"])
    hc = load_spose(control["data"], len(concepts)).astype(np.float64)
    assert hc.shape == things["h"].shape and (hc >= 0).all() and not np.allclose(hc, things["h"])
    assert abs((hc > 0).sum(1).mean() - (things["h"] > 0).sum(1).mean()) < 0.5  # the positive world's sparsity
    with h5py.File(control["truth"], "r") as f:
        assert f.attrs["control"] and np.allclose(f["h"][...], hc, atol=1e-5)
        sparse_c = np.c_[f["sparse/h"][...], f["sparse/g"][...]]  # (n_concepts, k_h + k_g) what an SAE can find
        context = f["context"][...]
    r2_sparse, r2_context = cv_r2(sparse_c, hc), cv_r2(context, hc)
    assert r2_sparse < 0.05  # the sparse factors predict nothing of the people's space (measured -0.81)
    assert r2_context > r2_sparse + 0.3  # while the dense context does: a thresholded linear code of it (0.25)
    t = load_triplets(control["data"], len(concepts))
    X = read_features(control["features/things"])[0][things["rows"]]
    tr = things["truth"]
    sparse = np.c_[tr["codes"] ** 0.8, tr["g_scale"] * tr["g_codes"] ** 0.8][things["rows"]]
    acc = {name: odd_one_out_accuracy(R, t["triplets"], t["choice"]) for name, R in
           (("h", hc), ("base", X), ("sae_codes", sparse))}
    half = 1.96 * np.sqrt(0.25 / len(t["choice"]))
    # measured (seed 0): h 0.57, base 0.39, ideal SAE codes 0.34 (chance 1/3)
    assert abs(acc["sae_codes"] - 1 / 3) < 3 * half
    assert acc["base"] > acc["sae_codes"] + 3 * half and acc["h"] > acc["base"] + 0.1


def _sae_ckpt(path, W_dec, k=4):
    from models import TopKSAE
    sae = TopKSAE(W_dec.shape[1], W_dec.shape[0], k, normalize="none")
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(W_dec).float())
        sae.W_enc.copy_(sae.W_dec.T)
    torch.save(dict(kind="metalign.sae", sae_args=sae.args(), state_dict=sae.state_dict()), path)
    return sae


def test_factor_recovery_oracle(world, tmp_path):
    """factor_recovery on SAEs with known decoders: rows at the planted directions (cosine 1), tilted to cosine
    0.9 / 0.7, random rows; dead latents and functions against a plain torch top-k count."""
    with h5py.File(world["truth"], "r") as f:
        Dh, Dg = f["directions"][...], f["g_directions"][...]
    rng = np.random.default_rng(0)
    d = Dh.shape[1]

    def tilt(D, cos):  # unit rows at the given cosine to D's rows
        E = rng.normal(size=D.shape)
        E -= (E @ D.T @ D)  # orthogonal to every planted direction
        E /= np.linalg.norm(E, axis=1, keepdims=True)
        return cos * D + np.sqrt(1 - cos ** 2) * E
    rand = rng.normal(size=(40, d))
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    W = np.r_[Dh, tilt(Dg, 0.9), rand]
    sae = _sae_ckpt(tmp_path / "a.pt", W)
    r = factor_recovery(str(tmp_path / "a.pt"), world["dir"], min_nonzero=50)
    assert r["h_recovered"] == 1.0 and r["g_recovered"] == 1.0
    assert r["h_best_cosine_median"] == pytest.approx(1.0, abs=1e-6)
    assert r["g_best_cosine_median"] == pytest.approx(0.9, abs=1e-5)
    X = torch.from_numpy(read_features(world["features/coco"])[0])
    v, i = torch.relu(X @ sae.W_enc + sae.b_enc).topk(sae.k, dim=1)  # the definition, not the fused kernel
    counts = np.bincount(i[v > 0].numpy(), minlength=sae.n_latents)
    assert r["dead_fraction"] == pytest.approx((counts == 0).mean())
    assert r["n_functions"] == int((counts >= 50).sum())
    _sae_ckpt(tmp_path / "b.pt", np.r_[tilt(Dh, 0.7), rand])
    r = factor_recovery(str(tmp_path / "b.pt"), world["dir"])
    assert r["h_recovered"] == 0.0 and r["g_recovered"] == 0.0 and max(r["g_best_cosine"]) < 0.8


def test_fmri_noise_ceiling_matches_truth(world):
    """Test images repeat once per session: the split-half reliability of the averaged response follows nc."""
    fm = load_fmri(world["data"], 1)
    st = fm["stimuli"]
    test = st["trial_type"] == "test"
    Y = fm["responses"][:, test.to_numpy()]  # (n_voxels, n_test * n_sessions)
    stim = st.loc[test, "stimulus"].to_numpy()
    ses = st.loc[test, "session"].to_numpy()
    uniq = np.unique(stim)
    odd = np.stack([Y[:, (stim == s) & (ses % 2 == 1)].mean(1) for s in uniq], 1)
    even = np.stack([Y[:, (stim == s) & (ses % 2 == 0)].mean(1) for s in uniq], 1)
    r = np.array([np.corrcoef(o, e)[0, 1] for o, e in zip(odd, even)])
    nc = fm["voxels"]["nc_singletrial"].to_numpy()
    assert np.corrcoef(r, nc)[0, 1] > 0.5  # reliable voxels are the ones with a high ceiling
    assert r[nc <= 5].mean() < r[nc > 40].mean() - 0.3


def test_boolean_world_flags_read_false_as_false():
    """extract.py's boolean world knobs: 'False' is False (argparse's type=bool reads any non-empty string as True,
    so `--diagnostics False` used to run the diagnostics), and a word that is no truth value is a usage error."""
    import extract
    a = extract.parse(["--dataset", "synthetic", "--diagnostics", "False", "--control", "yes"])
    assert a.diagnostics is False and a.control is True
    assert extract.parse(["--dataset", "synthetic", "--control", "0"]).control is False
    with pytest.raises(SystemExit):
        extract.parse(["--dataset", "synthetic", "--control", "maybe"])
