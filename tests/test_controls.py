"""The unsupervised controls of geometry.py (z-scoring, PCA whitening, top principal components removed), each
fitted on a training pool, against sklearn's StandardScaler and PCA."""
import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

import geometry

rng = np.random.default_rng(0)


def _data(n_pool=500, n=37, d=11):
    A = rng.normal(size=(d, d)) * rng.uniform(0.1, 3, size=d)  # anisotropic, so every PC is distinct
    pool = rng.normal(size=(n_pool, d)) @ A + rng.normal(size=d) * 4
    return rng.normal(size=(n, d)) @ A + 1.0, pool


def test_zscore_matches_standard_scaler():
    X, pool = _data()
    pool[:, 3] = 2.5  # a feature constant on the pool maps to 0, never to inf/nan
    np.testing.assert_allclose(np.delete(geometry.zscore(X, pool), 3, 1),
                               np.delete(StandardScaler().fit(pool).transform(X), 3, 1), atol=1e-10)
    assert (geometry.zscore(X, pool)[:, 3] == 0).all()


@pytest.mark.parametrize("rank", [None, 1, 4])
def test_pca_whiten_matches_sklearn(rank):
    X, pool = _data()
    got = geometry.pca_whiten(X, pool, rank=rank, shrinkage=0.0)
    ref = PCA(n_components=rank or X.shape[1], whiten=True, svd_solver="full").fit(pool).transform(X)
    sign = np.sign((got * ref).sum(0))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(got * sign, ref, atol=1e-8)
    white_pool = geometry.pca_whiten(pool, pool, rank=rank, shrinkage=0.0)
    np.testing.assert_allclose(np.cov(white_pool, rowvar=False), np.eye(white_pool.shape[1]), atol=1e-8)
    pca = geometry.pool_pca(pool)  # a precomputed decomposition gives the same answer
    np.testing.assert_allclose(geometry.pca_whiten(X, pool, rank=rank, shrinkage=0.0, pca=pca), got)


@pytest.mark.parametrize("k", [0, 1, 3, None])
def test_remove_top_pcs_matches_sklearn(k):
    X, pool = _data()
    got = geometry.remove_top_pcs(X, pool, k=k)
    kk = geometry.top_pcs_rule(X.shape[1]) if k is None else k
    Xc = X - pool.mean(0)
    if kk:
        comp = PCA(n_components=kk, svd_solver="full").fit(pool).components_  # (k, d)
        ref = Xc - (Xc @ comp.T) @ comp
        assert np.abs(got @ comp.T).max() < 1e-8  # nothing left along the removed directions
    else:
        ref = Xc
    np.testing.assert_allclose(got, ref, atol=1e-8)


def test_top_pcs_rule_and_bad_input():
    assert [geometry.top_pcs_rule(d) for d in (3, 64, 149, 151, 768, 1024)] == [1, 1, 1, 2, 8, 10]
    X, pool = _data()
    with pytest.raises(ValueError, match="same width"):
        geometry.zscore(X[:, :5], pool)
    with pytest.raises(ValueError, match="whitening rank"):
        geometry.pca_whiten(X, pool, rank=0)
    with pytest.raises(ValueError, match="k = 11"):
        geometry.remove_top_pcs(X, pool, k=11)
    with pytest.raises(ValueError, match="training pool"):
        geometry.pool_pca(pool[:1])
