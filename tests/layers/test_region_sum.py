import numpy as np

from deep_retrieval.layers import RegionSum
from tests import keras_utils


def test_sum_with_and_without_mask():
    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    np.testing.assert_allclose(np.asarray(RegionSum()(x)), x.sum(axis=1))
    valid = np.array([True, False, True])
    np.testing.assert_allclose(np.asarray(RegionSum()(x, valid)), x[:, 0] + x[:, 2])
    assert RegionSum().compute_output_shape((2, 3, 4)) == (2, 4)


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.randn(2, 3, 4).astype("float32")
    keras_utils.run_layer_test(RegionSum, {}, inputs, (2, 4), tmp_path)
