"""rsatoolbox's RDM tests with missing pairs, ported onto geometry.rdm / geometry.compare_rdms: its
tests/test_compare_rdm.py TestCompareRDMNaN (RDMs with NaN-marked pairs from a pattern sampled twice; cosine,
correlation and Spearman comparisons; different NaN positions are an error) and calc_rdm's NaN pairs for a row
with a missing value. The inputs are rsatoolbox's, the expected values rsatoolbox's own results (to 1e-10,
tighter than its decimal=6), the code ours."""
import numpy as np
import pytest

import geometry

rsatoolbox = pytest.importorskip("rsatoolbox")

METHODS = [("cosine", "cosine"), ("pearson", "corr"), ("spearman", "spearman")]  # ours, rsatoolbox's


def _nan_rdms():
    """TestCompareRDMNaN.setUp: random 6-pattern RDMs (1 and 3 of them) resampled with pattern 1 twice and
    pattern 2 left out, which marks the pair of the two copies (and nothing else) as missing."""
    rng = np.random.default_rng(0)
    out = []
    for k in (1, 3):
        rdms = rsatoolbox.rdm.RDMs(dissimilarities=rng.random((k, 15)), dissimilarity_measure="test",
                                   descriptors={"session": 0, "subj": 0})
        out.append(rdms.subsample_pattern("index", [0, 1, 1, 3, 4, 5]))
    return out


@pytest.mark.parametrize("ours,theirs", METHODS)
def test_compare_with_nan_pairs(ours, theirs):
    rdm1, rdm2 = _nan_rdms()
    v1, v2 = rdm1.get_vectors(), rdm2.get_vectors()
    assert np.isnan(v1).any() and np.array_equal(np.isnan(v1[0]), np.isnan(v2[0]))
    assert geometry.compare_rdms(v1[0], v1[0], ours) == pytest.approx(1.0, abs=1e-12)
    want = rsatoolbox.rdm.compare(rdm1, rdm2, method=theirs)[0]
    got = np.array([geometry.compare_rdms(v1[0], v, ours) for v in v2])
    assert np.all(np.isfinite(got)) and np.all(got < 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_different_nan_positions_are_an_error():
    """rsatoolbox test_nan_errors: a pair missing in one RDM only cannot be compared."""
    for a, b in [([1, np.nan, 3], [np.nan, 2, 3]), ([np.nan, 2, 3], [1, 2, 3]), ([1, np.nan, 3], [1, 2, 3])]:
        with pytest.raises(ValueError, match="mark different pairs as missing"):
            geometry.compare_rdms(np.array(a, float), np.array(b, float))


@pytest.mark.parametrize("metric", ["correlation", "euclidean"])
def test_rdm_marks_pairs_it_cannot_make(metric):
    """rdm() makes NaN where rsatoolbox's calc_rdm does for a row with a missing value (only that row's pairs;
    a column mean no longer spreads it to every pair); the rest equal its values (euclidean: ours^2 / d is its
    squared distance per feature), and compare_rdms on them equals rsatoolbox's compare."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(7, 5))
    X[4, 1] = np.nan
    theirs = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(X), method=metric)
    want = theirs.dissimilarities.ravel()
    got = geometry.rdm(X, metric)
    got = got ** 2 / X.shape[1] if metric == "euclidean" else got
    assert np.isnan(got).sum() == 6
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10, equal_nan=True)
    Y = rng.normal(size=X.shape)
    Y[4] = np.nan  # the same missing pairs
    other = rsatoolbox.rdm.calc_rdm(rsatoolbox.data.Dataset(Y), method=metric)
    ov = geometry.rdm(Y, metric)
    ov = ov ** 2 / X.shape[1] if metric == "euclidean" else ov
    for ours, method in METHODS:
        expected = rsatoolbox.rdm.compare(theirs, other, method=method)[0, 0]
        assert np.isfinite(expected)
        assert geometry.compare_rdms(got, ov, ours) == pytest.approx(expected, abs=1e-10)


def test_rdm_degenerate_rows():
    """The documented convention for rows without a correlation / cosine: dissimilarity 1 to every other row
    (scipy and rsatoolbox give NaN there); the other pairs as scipy's pdist."""
    from scipy.spatial.distance import pdist
    X = np.random.default_rng(2).normal(size=(9, 4))
    for metric in geometry.RDM_METRICS:
        assert np.isfinite(geometry.rdm(X, metric)).all()
    X[3] = 0.0
    for metric in ("correlation", "cosine"):
        got, want = geometry.rdm(X, metric), pdist(X, metric)
        assert np.isnan(want).sum() == 8
        np.testing.assert_allclose(got[np.isnan(want)], 1.0)
        np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], atol=1e-12)
