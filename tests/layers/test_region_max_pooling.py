import numpy as np

from deep_retrieval.layers import RegionMaxPooling
from tests import keras_utils, reference


def test_pools_every_grid_region_exactly(tmp_path):
    layer = RegionMaxPooling(levels=3, include_global=True)
    x = np.random.RandomState(0).randn(2, 24, 32, 4).astype("float32")
    pooled, valid = layer(x)
    assert tuple(pooled.shape) == (2, 21, 4) and np.asarray(valid).all()
    assert layer.compute_output_shape((2, 24, 32, 4))[0] == (2, 21, 4)
    want = [[x[n, y : y + h, xx : xx + w].max(axis=(0, 1))
             for xx, y, w, h in reference.grid_regions(24, 32, 3, True)] for n in range(2)]
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(want))
    model = keras_utils.wrap(layer, (24, 32, 4), output_index=0)
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    config = loaded.layers[-1].get_config()
    assert config["levels"] == 3 and config["include_global"] is True


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.randn(2, 12, 16, 4).astype("float32")
    keras_utils.run_layer_test(RegionMaxPooling, dict(levels=2, include_global=True), inputs,
                               [(2, 9, 4), (9,)], tmp_path)
