import numpy as np
import pytest

from deep_retrieval.layers import PCAWhitening
from tests import keras_utils


def test_shifted_projection(tmp_path):
    rng = np.random.RandomState(0)
    layer = PCAWhitening(3)
    layer.build((None, 5))
    mean, proj = rng.randn(5).astype("float32"), rng.randn(5, 3).astype("float32")
    layer.set_pca(mean, proj)
    x = rng.randn(4, 7, 5).astype("float32")
    np.testing.assert_allclose(np.asarray(layer(x)), (x - mean) @ proj, atol=1e-5)
    model = keras_utils.wrap(layer, (7, 5))
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    np.testing.assert_allclose(np.asarray(loaded.layers[-1].mean), mean)


def test_starts_as_identity_and_is_trainable():
    layer = PCAWhitening(4)
    layer.build((None, 4))
    x = np.arange(8, dtype="float32").reshape(2, 4)
    np.testing.assert_allclose(np.asarray(layer(x)), x)
    assert len(layer.trainable_weights) == 2


def test_more_units_than_channels_is_refused():
    with pytest.raises(ValueError, match="must not exceed"):
        PCAWhitening(8).build((None, 4))


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.randn(4, 7, 5).astype("float32")
    keras_utils.run_layer_test(PCAWhitening, dict(units=3), inputs, (4, 7, 3), tmp_path)


def test_bias_after_the_projection_as_caffe_shift_and_inner_product(tmp_path):
    """A Caffe Scale (w * x + b) then InnerProduct (W, c), by hand, equals
    the layer with mean 0, kernel diag(w) W^T and bias b W^T + c."""
    rng = np.random.RandomState(1)
    w, b = rng.uniform(0.5, 1.5, 6).astype("float32"), rng.randn(6).astype("float32")
    weight, c = rng.randn(4, 6).astype("float32"), rng.randn(4).astype("float32")
    layer = PCAWhitening(4, use_bias=True)
    layer.build((None, 6))
    layer.set_pca(np.zeros(6, "float32"), w[:, None] * weight.T, b @ weight.T + c)
    x = rng.randn(5, 6).astype("float32")
    np.testing.assert_allclose(np.asarray(layer(x)), (x * w + b) @ weight.T + c, atol=1e-5)
    loaded = keras_utils.keras_round_trip(keras_utils.wrap(layer, (6,)), x, tmp_path)
    np.testing.assert_allclose(np.asarray(loaded.layers[-1].bias), b @ weight.T + c, atol=1e-6)
    with pytest.raises(ValueError, match="has no bias"):
        PCAWhitening(4).set_pca(np.zeros(6), np.zeros((6, 4)), np.zeros(4))
