import numpy as np
import pytest

from deep_retrieval.layers import PCAWhitening
from deep_retrieval.model import whitening


def _data(n=500, c=6, seed=0):
    rng = np.random.RandomState(seed)
    mixing = rng.randn(c, c)
    return rng.randn(n, c) @ mixing + rng.randn(c)


def test_whitened_data_has_identity_covariance():
    x = _data()
    mean, proj = whitening.fit_pca_whitening(x)
    y = (x - mean) @ proj
    np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(6), atol=1e-4)


def test_pca_matches_svd_reference_up_to_sign():
    x = _data(c=8, seed=1)
    mean, proj = whitening.fit_pca_whitening(x, dim=3, power=0.0)
    _, s, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(mean, x.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(np.abs(proj), np.abs(vt[:3].T), atol=1e-4)
    # Components ordered by decreasing variance.
    var = ((x - mean) @ proj).var(axis=0)
    np.testing.assert_allclose(var, s[:3] ** 2 / len(x), rtol=1e-4)


def test_init_whitening_writes_the_layer():
    x = _data().astype("float32")
    layer = PCAWhitening(4)
    layer.build((None, 6))
    mean, proj = whitening.init_whitening(layer, x)
    assert proj.shape == (6, 4)
    out = np.asarray(layer(x))
    np.testing.assert_allclose(np.cov(out.T, bias=True), np.eye(4), atol=1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n >= 2"):
        whitening.fit_pca_whitening(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="dim"):
        whitening.fit_pca_whitening(np.zeros((5, 4)), dim=5)
