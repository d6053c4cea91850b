import numpy as np

from deep_retrieval.layers import L2Normalization
from tests import keras_utils


def test_unit_norm_and_hand_worked_value():
    out = np.asarray(L2Normalization()(np.array([[3.0, 4.0], [0.0, 0.0]], "float32")))
    np.testing.assert_allclose(out, [[3 / (5 + 1e-6), 4 / (5 + 1e-6)], [0, 0]], rtol=1e-6)


def test_axis_and_round_trip(tmp_path):
    layer = L2Normalization(axis=1, epsilon=1e-3)
    model = keras_utils.wrap(layer, (4, 3))
    x = np.random.RandomState(0).randn(2, 4, 3).astype("float32")
    want = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-3)
    np.testing.assert_allclose(np.asarray(model(x)), want, atol=1e-6)
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    assert loaded.layers[-1].get_config()["axis"] == 1
    assert loaded.layers[-1].get_config()["epsilon"] == 1e-3


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.randn(2, 4, 3).astype("float32")
    keras_utils.run_layer_test(L2Normalization, dict(axis=1, epsilon=1e-3), inputs, (2, 4, 3), tmp_path)
