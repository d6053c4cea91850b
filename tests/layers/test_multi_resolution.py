import keras
import numpy as np

from deep_retrieval.layers import RMAC, MultiResolution
from tests import keras_utils, reference


def test_sums_l2_descriptors_over_scales(tmp_path):
    x = np.random.RandomState(0).rand(2, 20, 26, 3).astype("float32")
    scales = (0.5, 1.0, 1.5)
    layer = MultiResolution(RMAC(levels=2), scales=scales)
    got = np.asarray(layer(x))
    want = []
    for image in x:
        total = 0
        for s in scales:
            h, w = int(np.floor(20 * s + 0.5)), int(np.floor(26 * s + 0.5))
            total = total + reference.rmac(reference.bilinear_resize(image, h, w), 2)
        want.append(reference.l2n(total))
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    model = keras_utils.wrap(layer, (None, None, 3))
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    assert loaded.layers[-1].get_config()["scales"] == [0.5, 1.0, 1.5]


def test_rejects_bad_scales():
    import pytest

    with pytest.raises(ValueError, match="positive"):
        MultiResolution(keras.layers.Identity(), scales=(1.0, 0.0))


def test_a_list_of_views_is_used_as_given():
    import pytest

    rng = np.random.RandomState(1)
    views = [rng.rand(2, 10, 13, 3).astype("float32"), rng.rand(2, 30, 39, 3).astype("float32")]
    layer = MultiResolution(RMAC(levels=2), scales=(0.5, 1.5))
    got = np.asarray(layer(views))
    want = [reference.l2n(reference.rmac(views[0][i], 2) + reference.rmac(views[1][i], 2)) for i in range(2)]
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="one per scale"):
        layer(views[:1])


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.rand(2, 20, 26, 3).astype("float32")
    keras_utils.run_layer_test(MultiResolution, dict(layer=RMAC(levels=2), scales=(0.5, 1.0)), inputs, (2, 3), tmp_path)


def test_generalised_mean_over_scales_matches_numpy():
    """cirtorch's rule (eps 0) and dirtorch's (eps 1e-6 clamps both powers)."""
    import keras

    from deep_retrieval.layers import MultiResolution

    rng = np.random.RandomState(5)
    table = rng.randn(3, 6).astype("float32")
    table[1, 2] = 1e-9  # a tiny component: the clamps tell the two rules apart
    views = [np.full((1, 4 + k, 4, 3), k, "float32") for k in range(3)]
    layer = keras.layers.Lambda(lambda x: keras.ops.take(table, keras.ops.cast(x[:, 0, 0, 0], "int32"), axis=0))
    for eps in (0.0, 1e-6):
        got = np.asarray(MultiResolution(layer, scales=(1.0, 0.5, 0.25), power=3.0, epsilon=eps)(views))
        g = lambda v, p: np.sign(v) * np.maximum(np.abs(v), eps) ** p  # noqa: E731
        mean = g(np.mean([g(table[k].astype(np.float64), 3.0) for k in range(3)], 0), 1 / 3.0)
        np.testing.assert_allclose(got[0], mean / np.linalg.norm(mean), atol=1e-5)
