import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval.ops import functional, regions
from tests import reference
from tests.reference import random_boxes


def test_l2_normalize_matches_reference_and_keeps_zero():
    x = np.random.RandomState(0).randn(5, 7).astype("float32")
    x[2] = 0
    got = np.asarray(functional.l2_normalize(x))
    np.testing.assert_allclose(got, reference.l2n(x), atol=1e-7)
    assert np.all(got[2] == 0)


def test_l2_normalize_zero_vector_has_finite_gradient():
    x = tf.zeros((2, 4))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(functional.l2_normalize(x))
    assert np.all(np.isfinite(tape.gradient(y, x).numpy()))


@pytest.mark.parametrize("size", [(7, 7), (7, 10), (10, 7), (1, 5), (24, 32), (3, 11)])
@pytest.mark.parametrize("include_global", [False, True])
def test_grid_max_pool_is_exact_region_max(size, include_global):
    features = np.random.RandomState(1).randn(2, *size, 6).astype("float32")
    pooled, valid = functional.grid_max_pool(features, 3, include_global)
    assert valid is None
    want = [
        [features[n, y : y + h, x : x + w].max(axis=(0, 1)) for x, y, w, h in
         reference.grid_regions(*size, 3, include_global)]
        for n in range(2)
    ]
    np.testing.assert_array_equal(np.asarray(pooled), np.asarray(want))


def test_dynamic_pooling_selects_exactly_the_grid_regions():
    fn = tf.function(
        lambda f: functional.grid_max_pool(f, 3, True),
        input_signature=[tf.TensorSpec([None, None, None, 5], tf.float32)],
    )
    for size in [(7, 10), (10, 7), (24, 32), (1, 5), (6, 6)]:
        features = np.random.RandomState(2).randn(3, *size, 5).astype("float32")
        pooled, valid = fn(features)
        real = pooled.numpy()[:, valid.numpy()]
        want = [
            [features[n, y : y + h, x : x + w].max(axis=(0, 1)) for x, y, w, h in
             reference.grid_regions(*size, 3, True)]
            for n in range(3)
        ]
        def key(rows):  # order may differ
            return sorted(map(tuple, rows))

        for n in range(3):
            assert key(real[n]) == key(np.asarray(want[n]))
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("out_size", [(9, 24), (26, 34), (13, 17), (1, 1), (40, 5)])
def test_resize_bilinear_matches_loop_reference_and_tf(out_size):
    image = np.random.RandomState(4).rand(1, 13, 17, 3).astype("float32")
    got = np.asarray(functional.resize_bilinear(image, *out_size))
    np.testing.assert_allclose(got[0], reference.bilinear_resize(image[0], *out_size), atol=1e-5)
    tf_out = tf.image.resize(image, out_size, method="bilinear", antialias=False)
    np.testing.assert_allclose(got, tf_out.numpy(), atol=1e-5)


def test_resize_with_run_time_size():
    fn = tf.function(
        lambda x, h, w: functional.resize_bilinear(x, h, w),
        input_signature=[tf.TensorSpec([None, None, None, 3]), tf.TensorSpec([], tf.int32),
                         tf.TensorSpec([], tf.int32)],
    )
    image = np.random.RandomState(5).rand(2, 11, 8, 3).astype("float32")
    np.testing.assert_allclose(
        fn(image, 7, 15).numpy(), tf.image.resize(image, (7, 15)).numpy(), atol=1e-5
    )


def test_scaled_size_rounds_half_up_for_ints_and_tensors():
    assert functional.scaled_size(800, 600, 550 / 800) == (550, 413)  # 412.5 -> 413
    assert functional.scaled_size(3, 3, 0.01) == (1, 1)
    h, w = functional.scaled_size(tf.constant(800), tf.constant(600), 550 / 800)
    assert (int(h), int(w)) == (550, 413)


def np_box_max_pool(fmap, boxes):
    h, w, _ = fmap.shape
    return np.stack([fmap[y:y + hh, x:x + ww].max(axis=(0, 1))
                     for x, y, ww, hh in reference.box_cells(boxes, h, w)])


def test_box_pooling_of_grid_boxes_equals_grid_pooling():
    rng = np.random.RandomState(4)
    for height, width in [(7, 10), (24, 32), (13, 13), (1, 5)]:
        x = rng.randn(2, height, width, 6).astype("float32")
        grid = regions.rmac_regions(height, width, 3, include_global=True)
        boxes = np.concatenate([grid[:, :2], grid[:, :2] + grid[:, 2:]], 1).astype("float32")
        boxes = np.broadcast_to(boxes, (2,) + boxes.shape)
        got = np.asarray(functional.box_max_pool(x, boxes))
        want, _ = functional.grid_max_pool(x, 3, include_global=True)
        np.testing.assert_array_equal(got, np.asarray(want))



def test_box_pooling_matches_numpy_on_fractional_boxes():
    rng = np.random.RandomState(5)
    x = rng.randn(2, 9, 13, 4).astype("float32")
    boxes = np.stack([random_boxes(rng, 40, extent=14.0) - 1 for _ in range(2)])
    got = np.asarray(functional.box_max_pool(x, boxes))
    want = np.stack([np_box_max_pool(f, b) for f, b in zip(x, boxes)])
    np.testing.assert_array_equal(got, want)



def test_box_pooling_with_size_known_at_run_time():
    rng = np.random.RandomState(6)
    fn = tf.function(functional.box_max_pool, input_signature=[
        tf.TensorSpec([None, None, None, 3]), tf.TensorSpec([None, None, 4])])
    for h, w in [(5, 8), (17, 11)]:
        x = rng.randn(1, h, w, 3).astype("float32")
        boxes = random_boxes(rng, 10, extent=float(min(h, w)))[None]
        np.testing.assert_array_equal(fn(x, boxes).numpy(), np_box_max_pool(x[0], boxes[0])[None])



def test_box_pooling_gradient_reaches_the_maxima():
    x = tf.Variable(np.arange(12, dtype="float32").reshape(1, 3, 4, 1))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(functional.box_max_pool(x, np.array([[[0, 0, 2, 2]]], "float32")))
    grad = tape.gradient(y, x).numpy()[0, :, :, 0]
    want = np.zeros((3, 4))
    want[1, 1] = 1  # the max of rows 0-1, columns 0-1
    np.testing.assert_array_equal(grad, want)
