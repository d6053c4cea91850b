import keras
import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval.layers import RMAC
from tests import keras_utils, reference


def test_without_whitening_matches_numpy(tmp_path):
    x = np.random.RandomState(0).rand(2, 7, 10, 8).astype("float32")
    head = RMAC(levels=3, include_global=True)
    want = np.stack([reference.rmac(f, 3, True) for f in x])
    np.testing.assert_allclose(np.asarray(head(x)), want, atol=1e-5)
    model = keras_utils.wrap(head, (None, None, 8))
    keras_utils.keras_round_trip(model, x, tmp_path)


def test_with_whitening_matches_numpy_and_round_trips(tmp_path):
    rng = np.random.RandomState(1)
    x = rng.rand(3, 24, 32, 16).astype("float32")
    head = RMAC(levels=3, whitening=8)
    head.build((None, None, None, 16))
    mean, proj = rng.randn(16).astype("float32") * 0.1, rng.randn(16, 8).astype("float32")
    head.pca.set_pca(mean, proj)
    want = np.stack([reference.rmac(f, 3, False, mean, proj) for f in x])
    np.testing.assert_allclose(np.asarray(head(x)), want, atol=1e-5)
    assert head.compute_output_shape((3, 24, 32, 16)) == (3, 8)
    model = keras_utils.wrap(head, (None, None, 16))
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    assert loaded.layers[-1].get_config()["whitening"] == 8


@pytest.mark.parametrize("size", [(7, 10), (24, 32), (32, 24), (5, 5)])
def test_matches_numpy_with_sizes_static_and_known_at_run_time(size):
    rng = np.random.RandomState(3)
    features = rng.rand(2, *size, 16).astype("float32")
    mean, proj = rng.randn(16).astype("float32") * 0.1, rng.randn(16, 8).astype("float32")
    head = RMAC(levels=3, whitening=8)
    head.build((None, None, None, 16))
    head.pca.set_pca(mean, proj)
    want = np.stack([reference.rmac(f, 3, False, mean, proj) for f in features])
    np.testing.assert_allclose(np.asarray(head(features)), want, atol=1e-5)
    dynamic = tf.function(head, input_signature=[tf.TensorSpec([None, None, None, 16], tf.float32)])
    np.testing.assert_allclose(dynamic(features).numpy(), want, atol=1e-5)


def test_gradients_are_finite_with_sizes_known_at_run_time():
    features = tf.random.uniform((1, 7, 10, 4))
    head = RMAC(levels=3, include_global=True)
    fn = tf.function(head, input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32)])
    with tf.GradientTape() as tape:
        tape.watch(features)
        loss = tf.reduce_sum(fn(features) * tf.range(4, dtype=tf.float32))
    grad = tape.gradient(loss, features).numpy()
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)


def test_one_traced_graph_for_all_sizes():
    rng = np.random.RandomState(2)
    head = RMAC(levels=3, include_global=True, whitening=4)
    head.build((None, None, None, 6))
    fn = tf.function(head, input_signature=[tf.TensorSpec([None, None, None, 6])])
    for size in [(7, 10), (24, 32), (9, 9), (1, 5)]:
        x = rng.rand(2, *size, 6).astype("float32")
        np.testing.assert_allclose(fn(x).numpy(), np.asarray(head(x)), atol=1e-6)
    assert fn.experimental_get_tracing_count() == 1


def test_computes_in_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        head = RMAC(levels=2)
        out = head(np.random.rand(1, 8, 8, 4).astype("float32"))
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_rpn_regions_match_numpy_over_the_proposals(tmp_path):
    rng = np.random.RandomState(5)
    x = rng.rand(2, 9, 12, 16).astype("float32")
    head = RMAC(include_global=True, whitening=8, regions="rpn",
                rpn={"num_proposals": 12, "pre_nms_proposals": 50, "channels": 8})
    head.build((None, None, None, 16))
    mean, proj = rng.randn(16).astype("float32") * 0.1, rng.randn(16, 8).astype("float32")
    head.pca.set_pca(mean, proj)
    boxes, _, valid = (np.asarray(t) for t in head.rpn(x))
    want = []
    for f, b, v in zip(x, boxes, valid):
        windows = [(0, 0, 12, 9)] + reference.box_cells(b[v], 9, 12)
        want.append(reference.rmac(f, mean=mean, projection=proj, regions=windows))
    np.testing.assert_allclose(np.asarray(head(x)), np.stack(want), atol=1e-5)
    model = keras_utils.wrap(head, (None, None, 16))
    loaded = keras_utils.keras_round_trip(model, x, tmp_path)
    assert loaded.layers[-1].rpn.num_proposals == 12


def test_layer_contract(tmp_path):
    """Shapes, config round trip, .keras round trip and mixed bfloat16."""
    rng = np.random.RandomState(0)
    inputs = rng.rand(2, 7, 10, 8).astype("float32")
    keras_utils.run_layer_test(RMAC, dict(levels=2, whitening=4), inputs, (2, 4), tmp_path)
