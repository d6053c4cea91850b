import numpy as np

from deep_retrieval.layers import GeM
from tests import keras_utils


def _l2(v):
    return v / (np.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)


def test_cirtorch_and_dirtorch_forms_match_numpy():
    rng = np.random.RandomState(0)
    x = rng.rand(2, 6, 8, 16).astype("float32")
    pooled = np.mean(np.maximum(x, 1e-6) ** 3.0, axis=(1, 2)) ** (1 / 3.0)
    head = GeM(3.0, normalize_pooled=True, fc_units=8)
    head.build(x.shape)
    kernel, bias = rng.randn(16, 8).astype("float32"), rng.randn(8).astype("float32")
    head.fc.set_weights([kernel, bias])
    np.testing.assert_allclose(np.asarray(head(x)), _l2(_l2(pooled) @ kernel + bias), atol=1e-5)  # cirtorch
    plain = GeM(3.0, normalize_pooled=False, fc_units=8)
    plain.build(x.shape)
    plain.fc.set_weights([kernel, bias])
    np.testing.assert_allclose(np.asarray(plain(x)), _l2(pooled @ kernel + bias), atol=1e-5)  # dirtorch
    np.testing.assert_allclose(np.asarray(GeM(3.0)(x)), _l2(pooled), atol=1e-5)  # no fc
    assert GeM().rpn is None and GeM().pca is None


def test_layer_contract(tmp_path):
    inputs = np.random.RandomState(1).rand(2, 5, 6, 16).astype("float32")
    keras_utils.run_layer_test(GeM, dict(p=3.0, fc_units=4), inputs, (2, 4), tmp_path, atol=1e-5)
