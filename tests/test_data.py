"""Bad input: every loader fails with a DataError that names the file and the field."""
import json
import os
import pickle
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from data import (DataError, atomic_path, concept_rows, flag_parser, load_category_learning, load_concepts, load_fmri,
                  load_levels, load_reward_learning, load_spose, load_triplets, read_features, write_features)


def raises(fn, *needles):
    """Call fn, expect a DataError whose message contains every needle; return the message."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    for s in needles:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


@pytest.fixture
def data_copy(world, tmp_path):
    """A private copy of the world's human-data folder, safe to corrupt."""
    dst = tmp_path / "data"
    shutil.copytree(world["data"], dst)
    return str(dst)


def test_roundtrip_and_attrs(tmp_path):
    p = str(tmp_path / "f.h5")
    X = np.random.default_rng(0).normal(size=(7, 5))
    write_features(p, X, [f"a/{i}.jpg" for i in range(7)], attrs=dict(backbone="x", config={"k": 1}, dims=[1, 2]),
                   layers={"block3": np.ones((7, 3))}, chunk_rows=4)
    Y, ids = read_features(p)
    assert Y.dtype == np.float32 and np.allclose(Y, X, atol=1e-6) and ids[3] == "a/3.jpg"
    assert read_features(p, field="layers/block3")[0].shape == (7, 3)
    with h5py.File(p, "r") as f:
        assert f.attrs["config"] == '{"k": 1}' and f.attrs["dims"] == "[1, 2]" and "numpy" in f.attrs["versions"]
        assert f["features"].chunks == (4, 5) and "created" in f.attrs
    assert os.listdir(tmp_path) == ["f.h5"]


def test_versions_without_importing():
    """data.versions() reads scikit-learn's and tables' versions without importing them (seconds per output
    written), and records the strings their modules' __version__ give (in a fresh interpreter)."""
    import subprocess
    import sys
    code = ("import sys, json, data; v = data.versions(); print(json.dumps([v, 'sklearn' in sys.modules, "
            "'tables' in sys.modules])); import sklearn, tables, scipy, torch, numpy, h5py, pandas; "
            "print(json.dumps({m: sys.modules[m].__version__ for m in v if m != 'python'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(__file__)),
                         capture_output=True, text=True, timeout=300, check=True).stdout.splitlines()
    (v, sk, tb), want = json.loads(out[0]), json.loads(out[1])
    assert not sk and not tb
    assert {k: x for k, x in v.items() if k != "python"} == want
    assert set(want) == {"numpy", "scipy", "torch", "h5py", "pandas", "tables", "sklearn"}


def test_missing_files(tmp_path):
    raises(lambda: read_features(str(tmp_path / "nope.h5")), "nope.h5", "/features", "/image_ids")
    for fn, name in [(load_concepts, "unique_id.txt"), (lambda d: load_spose(d), "spose_embedding_66d"),
                     (lambda d: load_triplets(d, 10), "THINGS_triplets.csv"), (load_levels, "levels.pkl"),
                     (load_category_learning, "category_learning.csv"),
                     (load_reward_learning, "reward_learning.csv"), (lambda d: load_fmri(d, 1),
                                                                     "sub-01_ResponseData.h5")]:
        raises(lambda: fn(str(tmp_path)), name, "not found")


def test_missing_field(tmp_path):
    p = str(tmp_path / "f.h5")
    write_features(p, np.zeros((3, 2)), ["a", "b", "c"])
    raises(lambda: read_features(p, field="pca"), "f.h5", "'/pca'", "features")  # lists what is present
    with h5py.File(p, "a") as f:
        del f["image_ids"]
    raises(lambda: read_features(p), "f.h5", "/image_ids")


def test_nan_features(tmp_path):
    p = str(tmp_path / "nan.h5")
    X = np.ones((20, 4))
    X[12, 1] = np.nan
    X[15, :3] = np.inf
    write_features(p, X, [str(i) for i in range(20)])
    raises(lambda: read_features(p), "nan.h5", "/features", "4 non-finite", "row 12")
    assert np.isnan(read_features(p, check_finite=False)[0]).sum() == 1


def test_triplet_index_out_of_range(world, data_copy):
    n = len(load_concepts(data_copy))
    p = os.path.join(data_copy, "THINGS_triplets.csv")
    df = pd.read_csv(p, sep="\t")
    df.loc[16, "image2"] = n + 1
    df.to_csv(p, sep="\t", index=False)
    raises(lambda: load_triplets(data_copy, n), "THINGS_triplets.csv", "'image2'", str(n + 1), f"1..{n}", "row 17")
    df.loc[16, "image2"] = 1
    df.loc[3, "choice"] = 4
    df.to_csv(p, sep="\t", index=False)
    raises(lambda: load_triplets(data_copy, n), "THINGS_triplets.csv", "'choice'", "1..3")
    df.drop(columns=["subject_id"]).to_csv(p, sep="\t", index=False)
    raises(lambda: load_triplets(data_copy, n), "THINGS_triplets.csv", "subject_id")


def test_concept_rows_mismatch(world):
    concepts = load_concepts(world["data"])
    X, ids = read_features(world["features/things"])
    rows = concept_rows(ids, concepts)
    assert len(rows) == len(concepts) and all(ids[r].startswith(c + "/") for r, c in zip(rows, concepts))
    assert all(ids[r].split("/")[1][6:8] == "01" for r in rows)  # the first sorted image of each concept
    keep = [i for i in ids if not i.startswith("c0007/")]  # features for fewer concepts than unique_id.txt
    raises(lambda: concept_rows(keep, concepts, path="things.h5"), "things.h5", "c0007", "1 of 150")


def test_missing_columns(data_copy):
    for name, col, fn in [("category_learning.csv", "choice", load_category_learning),
                          ("reward_learning.csv", "right_reward", load_reward_learning)]:
        p = os.path.join(data_copy, name)
        pd.read_csv(p).drop(columns=[col]).to_csv(p, index=False)
        raises(lambda: fn(data_copy), name, col)
    p = os.path.join(data_copy, "brain_data", "sub-02_StimulusMetadata.csv")
    pd.read_csv(p).drop(columns=["concept"]).to_csv(p, index=False)
    raises(lambda: load_fmri(data_copy, 2), "sub-02_StimulusMetadata.csv", "concept")
    p = os.path.join(data_copy, "brain_data", "sub-01_VoxelMetadata.csv")
    pd.read_csv(p).iloc[1:].to_csv(p, index=False)
    raises(lambda: load_fmri(data_copy, 1), "sub-01_VoxelMetadata.csv", "voxel_id")


def test_spose_and_levels_errors(data_copy):
    n = len(load_concepts(data_copy))
    raises(lambda: load_spose(data_copy, n + 1), "spose_embedding_66d_sorted.txt", f"expected {n + 1}")
    os.rename(os.path.join(data_copy, "spose_embedding_66d_sorted.txt"),
              os.path.join(data_copy, "spose_embedding_49d_sorted.txt"))
    assert load_spose(data_copy, n).shape[0] == n  # falls back to the 49-d file
    p = os.path.join(data_copy, "levels.pkl")
    with open(p, "rb") as fh:
        lv = pickle.load(fh)
    first = next(iter(lv))
    exp = [t for t in lv[first] if t["exp_trial_type"] == "exp_trial"]
    exp[0]["selected_image"] = "elsewhere.JPEG"
    with open(p, "wb") as fh:
        pickle.dump(lv, fh)
    raises(lambda: load_levels(data_copy), "levels.pkl", "selected_image", "elsewhere.JPEG")
    for t in lv[first]:
        del t["triplet_type"]
    with open(p, "wb") as fh:
        pickle.dump(lv, fh)
    raises(lambda: load_levels(data_copy), "levels.pkl", "triplet_type")


def test_atomic_path_leaves_nothing(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            with h5py.File(tmp, "w") as f:
                f["x"] = np.arange(3)
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []
    with pytest.raises(DataError):  # a bad row count is caught before anything is renamed into place
        write_features(str(target), np.zeros((3, 2)), ["a", "b"])
    assert os.listdir(tmp_path) == []
    with atomic_path(str(target)) as tmp:
        with open(tmp, "w") as fh:
            fh.write("ok")
    assert os.listdir(tmp_path) == ["out.h5"]


def test_flag_parser_types_bools_lists_and_unknown_flags():
    """flag_parser, the flat scripts' argparse: type from the default, --x/--no-x, lists, errors."""
    p = flag_parser("doc", dict(n_steps=3, lr=1e-3, name="a", mlp=True), dict(rois=["V1"], features="f.h5"),
                         nargs=("features",))
    cfg = vars(p.parse_args(["--n-steps=7", "--lr", "0.5", "--no-mlp", "--rois", "V1", "LOC", "--features", "a", "b"]))
    assert cfg == dict(n_steps=7, lr=0.5, name="a", mlp=False, rois=["V1", "LOC"], features=["a", "b"])
    assert vars(p.parse_args([]))["features"] == ["f.h5"]
    q = flag_parser("doc", dict(no_embed=False))  # a negative name: --no-embed turns it on, --embed off
    assert vars(q.parse_args(["--no-embed"])) == dict(no_embed=True)
    assert vars(q.parse_args(["--embed"])) == dict(no_embed=False)
    assert vars(q.parse_args([])) == dict(no_embed=False)
    for bad in (["--n-steps", "x"], ["--unknown", "1"], ["--n-st", "2"]):  # wrong type, unknown, abbreviated
        with pytest.raises(SystemExit):
            p.parse_args(bad)
