import numpy as np
import pytest

from deep_retrieval.layers import GeMPooling
from tests import keras_utils


def test_matches_numpy_and_limits():
    rng = np.random.RandomState(0)
    x = rng.rand(2, 5, 7, 4).astype("float32")
    x[0, 0, 0, 0] = 0.0  # a ReLU zero: clamped, not a NaN
    want = np.mean(np.maximum(x, 1e-6) ** 3.0, axis=(1, 2)) ** (1 / 3.0)
    np.testing.assert_allclose(np.asarray(GeMPooling(3.0)(x)), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(GeMPooling(1.0)(x)), x.mean(axis=(1, 2)), rtol=1e-5)  # average
    assert np.allclose(np.asarray(GeMPooling(200.0)(x)), x.max(axis=(1, 2)), rtol=0.05)  # towards max


def test_power_is_a_weight_that_round_trips(tmp_path):
    layer = GeMPooling(2.5)
    model = keras_utils.wrap(layer, (None, None, 3))
    assert [w.name for w in layer.weights] == ["p"] and float(layer.p) == pytest.approx(2.5)
    layer.p.assign(4.0)
    x = np.random.RandomState(1).rand(1, 4, 4, 3).astype("float32")
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    assert float(loaded.layers[-1].p) == pytest.approx(4.0)


def test_layer_contract(tmp_path):
    inputs = np.random.RandomState(2).rand(2, 6, 5, 8).astype("float32")
    keras_utils.run_layer_test(GeMPooling, dict(p=3.0), inputs, (2, 8), tmp_path, atol=1e-5)
