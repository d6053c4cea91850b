import numpy as np

from deep_retrieval.layers import BoxMaxPooling
from tests import keras_utils


def test_pools_each_box_over_the_cells_it_covers():
    x = np.random.RandomState(0).rand(1, 4, 6, 3).astype("float32")
    boxes = np.array([[[0, 0, 6, 4], [1.5, 0.2, 3.0, 1.0], [5.9, 3.9, 9.0, 9.0]]], "float32")
    got = np.asarray(BoxMaxPooling()(x, boxes))
    want = np.stack([x[0].max((0, 1)), x[0, 0:1, 1:3].max((0, 1)), x[0, 3:4, 5:6].max((0, 1))])
    np.testing.assert_array_equal(got[0], want)
    assert BoxMaxPooling().compute_output_shape((1, 4, 6, 3), (1, 3, 4)) == (1, 3, 3)


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = [rng.rand(1, 4, 6, 3).astype("float32"), np.array([[[0, 0, 6, 4], [1.5, 0.2, 3.0, 1.0]]], "float32")]
    keras_utils.run_layer_test(BoxMaxPooling, {}, inputs, (1, 2, 3), tmp_path)
