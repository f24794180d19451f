"""evaluate.py --task fmri on the embedded world: values against sklearn, the world's ground truth (voxel
read-outs of h vs the nuisance part, known noise ceilings), the statistics against scipy, and bad input."""
import itertools
import json
import os
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

import data
import eval_fmri as fmri
import evaluate


pytestmark = pytest.mark.usefixtures("one_thread")  # small ops (conftest.py)


@pytest.fixture(scope="module")
def result(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("fmri") / "fmri.json"
    evaluate.main(["--task", "fmri", "--features", world["dir"] + "/features/things.h5", "--data", world["data"],
                   "--out", str(out), "--n-perm", "500"])
    with open(out) as fh:
        return json.load(fh), out


def test_fmri_task_on_world(result, world):
    r, out = result
    assert set(r) >= {"base", "spose", "per_subject", "noise_ceiling", "config", "versions", "voxel_file"}
    assert set(r["per_subject"]) == {"sub-01", "sub-02", "sub-03"}
    base, h = r["base"]["rois"], r["spose"]["rois"]
    # ground truth: high-level ROIs read out the concept's h, early ROIs the nuisance part the backbone carries
    # and h lacks (measured: high-level base 0.65 vs h 0.71; early base 0.78 vs h -0.06)
    for roi in fmri.HIGH:
        assert h[roi] > base[roi], roi
    for roi in fmri.EARLY:
        assert base[roi] > 0.5 and h[roi] < 0.1, roi
    assert r["spose"]["r2_high"] > r["base"]["r2_high"] + 0.03
    # every subject shows it, and the sign-flip / Fisher / BH chain calls h better in the high-level ROIs
    for sub in r["per_subject"].values():
        assert sub["spose"]["r2_high"] > sub["base"]["r2_high"]
        assert sub["n_voxels_kept"] < sub["n_voxels"]  # nc <= 5 voxels dropped
    assert np.mean([r["spose"]["vs_base"][roi]["p_bh"] < 0.05 for roi in fmri.HIGH]) >= 0.75
    assert all(r["spose"]["vs_base"][roi]["p_bh"] > 0.5 for roi in fmri.EARLY)
    # per-voxel file: config + versions, ROI labels and nc as in VoxelMetadata
    with h5py.File(r["voxel_file"]) as f:
        assert json.loads(f.attrs["config"])["task"] == "fmri" and "torch" in json.loads(f.attrs["versions"])
        vm = pd.read_csv(os.path.join(world["data"], "brain_data", "sub-01_VoxelMetadata.csv"))
        kept = vm[vm["nc_singletrial"] > 5]
        np.testing.assert_array_equal(f["sub-01/voxel_ids"][:], kept["voxel_id"].to_numpy())
        assert f["sub-01/base"].shape == (len(kept),) and f["sub-01/base_alphas"].shape == (4, len(kept))
    for png in r["figures"]:
        assert os.path.getsize(png) > 1000
    evaluate.main(["--task", "report", "--results", str(out.parent), "--out", str(out.parent / "report.md")])
    text = (out.parent / "report.md").read_text()
    assert "| fmri | spose | r2 |" in text and "| spose |" in text and "LOC" in text


def test_fmri_recovers_noise_ceilings(world):
    """The generating features themselves (the concept's h per image + nuisance, from world_truth.h5) reach the noise
    ceiling where estimation noise is small, and their R^2 tracks the known per-voxel ceilings."""
    with h5py.File(os.path.join(world["dir"], "world_truth.h5")) as f:
        Z = np.c_[f["h"][:][f["things/concept"][:]], f["things/nuisance"][:]]
        rows = f["fmri/sub-01/image_rows"][:]
        nc_true = f["fmri/sub-01/nc_singletrial"][:]
    sub = fmri.load_subject(world["data"], "sub-01", 5)
    np.testing.assert_allclose(sub["nc"], nc_true[nc_true > 5], atol=1e-3)
    sess = sub["stimuli"]["session"].to_numpy()
    r2 = fmri.encode({"truth": Z[rows]}, sub["Y"], sess, np.logspace(-6, 3, 100))["truth"]["r2"].mean(0)
    norm = r2 / (sub["nc"] / 100)
    high = sub["nc"] > 40  # measured 0.84: ~300 training trials for 40 weights (24 h + 16 nuisance) cost some
    assert 0.80 < norm[high].mean() < 1.05
    assert np.corrcoef(r2, sub["nc"])[0, 1] > 0.9
    assert norm.mean() < 1.0  # never above the ceiling on average


def test_fmri_encode_matches_sklearn(world):
    from sklearn.linear_model import RidgeCV
    sub = fmri.load_subject(world["data"], "sub-02", 5)
    E = data.load_spose(world["data"])
    concepts = data.load_concepts(world["data"])
    _, ids = data.read_features(world["dir"] + "/features/things.h5")
    _, crow = fmri.trial_rows(sub["stimuli"], ids, concepts, "stimuli")
    X, Y = E[crow].astype(np.float64), sub["Y"][:, :40].astype(np.float64)
    sess = sub["stimuli"]["session"].to_numpy()
    alphas = np.logspace(-6, 3, 100)
    got = fmri.encode({"spose": X}, Y, sess, alphas)["spose"]
    for k, s in enumerate(np.unique(sess)):
        tr, te = sess != s, sess == s
        mu, sd = X[tr].mean(0), X[tr].std(0, ddof=1)
        sd[sd == 0] = 1
        m = RidgeCV(alphas=alphas, alpha_per_target=True).fit((X[tr] - mu) / sd, Y[tr])
        pred = m.predict((X[te] - mu) / sd)
        r2 = 1 - ((Y[te] - pred) ** 2).sum(0) / ((Y[te] - Y[te].mean(0)) ** 2).sum(0)
        assert np.mean(np.isclose(got["alphas"][k], m.alpha_, rtol=1e-6)) >= 0.95
        np.testing.assert_allclose(got["r2"][k], r2, atol=1e-4)


def test_statistics_against_exact_and_scipy():
    from scipy.stats import combine_pvalues, false_discovery_control
    diff = np.array([0.3, -0.1, 0.25, 0.4, 0.05, -0.2, 0.15, 0.35])
    exact = np.mean([np.mean(np.array(s) * diff) >= diff.mean() - 1e-15
                     for s in itertools.product([-1, 1], repeat=len(diff))])  # all 256 sign patterns
    assert fmri.sign_flip_test(diff, n_perm=20000) == pytest.approx(exact, abs=0.01)
    p = [0.01, 0.2, 0.03, 0.5]
    assert fmri.fisher_combine(p) == pytest.approx(combine_pvalues(p, method="fisher").pvalue)
    q = [0.001, 0.04, 0.03, 0.2, 0.8, np.nan]
    adj = fmri.benjamini_hochberg(q)
    np.testing.assert_allclose(adj[:5], false_discovery_control(q[:5], method="bh"))
    assert np.isnan(adj[5])


def _copy(world, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(world["data"], d)
    return d


@pytest.mark.parametrize("case", ["missing_image", "all_nan_voxel", "columns_vs_stimuli"])
def test_fmri_bad_input(world, tmp_path, case):
    d = _copy(world, tmp_path)
    bd = d / "brain_data"
    if case == "missing_image":
        sm = pd.read_csv(bd / "sub-01_StimulusMetadata.csv")
        sm.loc[[3, 7], "stimulus"] = "no_such_image.jpg"
        sm.to_csv(bd / "sub-01_StimulusMetadata.csv", index=False)
        expect = "sub-01_StimulusMetadata.csv: 2 of 400 trials show images missing"
    elif case == "all_nan_voxel":
        rd = pd.read_hdf(bd / "sub-02_ResponseData.h5")
        rd.iloc[5, 1:] = np.nan
        rd.to_hdf(bd / "sub-02_ResponseData.h5", key="ResponseData", mode="w")
        expect = "sub-02_ResponseData.h5: 1 of 300 voxels are all-NaN"
    else:
        sm = pd.read_csv(bd / "sub-03_StimulusMetadata.csv")
        sm.iloc[:-5].to_csv(bd / "sub-03_StimulusMetadata.csv", index=False)
        expect = "sub-03_StimulusMetadata.csv: 395 rows (trials) but"
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "fmri", "--features", world["dir"] + "/features/things.h5", "--data", str(d),
                       "--out", str(out), "--n-alphas", "5", "--no-figures"])
    assert expect in str(e.value)
    assert not out.exists()


def test_fmri_aligned_slot(world, tmp_path):
    """An aligned representation drops in through --aligned (features files, same format): here the base
    features again, so it must reproduce base exactly and never test better than it."""
    feats = world["dir"] + "/features/things.h5"
    out = tmp_path / "f.json"
    evaluate.main(["--task", "fmri", "--features", feats, "--data", world["data"], "--out", str(out),
                   "--aligned", f"{feats},{feats}", "--subjects", "1", "--n-alphas", "10", "--n-perm", "200",
                   "--no-figures"])
    r = json.loads(out.read_text())
    assert set(r) >= {"base", "spose", "aligned", "aligned2"} and list(r["per_subject"]) == ["sub-01"]
    for name in ("aligned", "aligned2"):
        assert r[name]["rois"] == pytest.approx(r["base"]["rois"], abs=1e-12)
        assert all(v["p_fisher"] > 0.9 for v in r[name]["vs_base"].values())


def test_fmri_ckpt_slot(world, tmp_path):
    """--ckpt: encode(features) of a meta checkpoint is the aligned representation. A --no-embed model's
    encode is the identity, so it must reproduce base exactly."""
    from models import MetaLearner
    feats = world["dir"] + "/features/things.h5"
    X, _ = data.read_features(feats)
    args = dict(d=X.shape[1], no_embed=True, n_layers=1, n_heads=2)
    ck = tmp_path / "meta.pt"
    torch.save(dict(model=MetaLearner(**args).state_dict(), model_args=args, config={}), ck)
    out = tmp_path / "f.json"
    evaluate.main(["--task", "fmri", "--features", feats, "--data", world["data"], "--out", str(out), "--ckpt", str(ck),
                   "--subjects", "1", "--n-alphas", "10", "--n-perm", "200", "--no-figures"])
    r = json.loads(out.read_text())
    assert r["aligned"]["rois"] == pytest.approx(r["base"]["rois"], abs=1e-6)


def test_load_subject_roi_subset(world):
    """--rois (one ROI per job in slurm/evaluate_array.sbatch): exactly the kept voxels of those ROIs."""
    every = fmri.load_subject(world["data"], "sub-01", 5)
    sub = fmri.load_subject(world["data"], "sub-01", 5, "FFA,V1")
    want = every["rois"]["FFA"] | every["rois"]["V1"]
    assert np.array_equal(sub["voxel_ids"], every["voxel_ids"][want]) and np.array_equal(sub["Y"], every["Y"][:, want])
    assert sorted(sub["rois"]) == ["FFA", "V1"] and (sub["rois"]["FFA"] | sub["rois"]["V1"]).all()
    with pytest.raises(data.DataError, match=r"no ROI column\(s\) \['XYZ'\]"):
        fmri.load_subject(world["data"], "sub-01", 5, "XYZ")
