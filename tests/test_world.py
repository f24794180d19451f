"""The embedded world: loaders read every file it writes, and its ground truth has the promised properties."""
import hashlib
import os

import h5py
import numpy as np
import pandas as pd
import pytest

from data import (concept_rows, load_category_learning, load_concepts, load_fmri, load_levels,
                  load_reward_learning, load_spose, load_triplets, read_features)
from world import ROIS_EARLY, ROIS_HIGH, SIZES, make_world


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


@pytest.fixture(scope="module")
def things(world):
    concepts = load_concepts(world["data"])
    h = load_spose(world["data"], len(concepts))
    X, ids = read_features(world["features/things"])
    t = load_triplets(world["data"], len(concepts))
    with h5py.File(world["truth"], "r") as f:
        truth = dict(codes=f["things/codes"][...], directions=f["directions"][...], h=f["h"][...])
    return dict(concepts=concepts, h=h, X=X, ids=ids, rows=concept_rows(ids, concepts, world["features/things"]),
                truth=truth, **t)


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
    with h5py.File(world["features/things"], "r") as f:
        assert f.attrs["backbone"] == "synthetic" and "config" in f.attrs and "versions" in f.attrs

    trials, keys = load_levels(world["data"])
    assert len(trials) == s["n_levels_participants"] * s["levels_trials"]  # catch trials dropped
    assert set(trials["triplet_type"]) == {"within_class", "between_class", "class_border"}
    assert trials["selected"].between(0, 2).all() and keys == sorted(keys) and keys[0].endswith(".JPEG")
    Xl, lids = read_features(world["features/levels"])
    assert lids == keys and Xl.shape == (len(keys), s["d"])
    Xc, cids = read_features(world["features/coco"])
    assert Xc.shape == (s["n_coco"], s["d"]) and cids[0] == "train2017/000000000001.jpg"

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


def test_deterministic(world, tmp_path):
    make_world(str(tmp_path / "a"), size="small", seed=0, verbose=False)
    assert _digest(str(tmp_path / "a")) == _digest(world["dir"])
    make_world(str(tmp_path / "b"), size="small", seed=1, verbose=False, n_coco=100)
    with h5py.File(world["truth"], "r") as fa, h5py.File(tmp_path / "b" / "world_truth.h5", "r") as fb:
        assert not np.allclose(fa["h"][...], fb["h"][...])


def test_h_near_ceiling_base_lower(things):
    ceiling, n_rep = noise_ceiling(things["triplets"], things["choice"])
    assert n_rep == SIZES["small"]["n_repeat"]  # only the designated triplets repeat
    acc_h = odd_one_out_accuracy(things["h"], things["triplets"], things["choice"])
    acc_base = odd_one_out_accuracy(things["X"][things["rows"]], things["triplets"], things["choice"])
    # measured (seed 0): ceiling 0.70, h 0.68, base 0.48, chance 1/3
    assert 0.6 < ceiling < 0.8
    assert abs(acc_h - ceiling) < 0.05
    assert acc_base < acc_h - 0.10
    assert acc_base > 0.40  # base still carries h: the aligned representation has something to find


def test_cka_base_below_h(things):
    h, Xc = things["h"].astype(np.float64), things["X"][things["rows"]].astype(np.float64)
    assert linear_cka(h, h) == pytest.approx(1.0)
    cka = linear_cka(Xc, h)
    assert 0.2 < cka < 0.7  # measured 0.29: the nuisance dims dominate the base geometry
    # the h part of the base features alone is far better aligned than the features themselves
    hpart = Xc @ things["truth"]["directions"].T
    assert linear_cka(hpart, h) > cka + 0.2


def test_directions_recoverable(things):
    D = things["truth"]["directions"]
    assert D.shape == (SIZES["small"]["k_h"], SIZES["small"]["d"])
    assert np.allclose(np.linalg.norm(D, axis=1), 1.0, atol=1e-6)
    X = np.c_[things["X"], np.ones(len(things["X"]))].astype(np.float64)
    C = things["truth"]["codes"]  # (n_images, k_h) per-image h codes
    coef = np.linalg.lstsq(X, C, rcond=None)[0]
    r2 = 1 - ((C - X @ coef) ** 2).sum(0) / ((C - C.mean(0)) ** 2).sum(0)
    assert r2.min() > 0.5  # measured min 0.82: every h dim is a (warped) linear direction
    # and the direction itself points at it: projecting on D_j correlates with code j
    proj = things["X"] @ D.T
    r = [np.corrcoef(proj[:, j], C[:, j])[0, 1] for j in range(C.shape[1])]
    assert min(r) > 0.7
    # the concept h the SPoSE file holds is the truth's h
    assert np.allclose(things["h"], things["truth"]["h"], atol=1e-5)


def test_learners_learn(world):
    cat = load_category_learning(world["data"])
    half = cat["trial"] > cat["trial"].max() / 2
    assert cat.loc[half, "correct"].mean() > cat.loc[~half, "correct"].mean() > 0.5  # measured 0.82 > 0.70
    rew = load_reward_learning(world["data"])
    better = (rew["right_reward"] > rew["left_reward"]).astype(int)
    assert (better == rew["choice"]).mean() > 0.6  # measured 0.72


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
