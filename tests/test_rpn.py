import math

import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval import functional, regions, rpn
from tests import reference


def np_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def np_greedy_nms(boxes, valid, threshold):
    """Textbook greedy NMS over score-sorted boxes: a Python loop."""
    kept = []
    for i in range(len(boxes)):
        if valid[i] and all(np_iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    mask = np.zeros(len(boxes), bool)
    mask[kept] = True
    return mask


def random_boxes(rng, n, extent=20.0):
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(0.5, extent / 2, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype("float32")


def test_anchors_hand_worked():
    shapes = rpn.anchor_shapes(scales=(0.5,), ratios=(1.0, 4.0))
    np.testing.assert_allclose(shapes, [[0.5, 0.5], [1.0, 0.25]])
    got = np.asarray(rpn.anchors(2, 3, shapes))
    assert got.shape == (2 * 3 * 2, 4)
    # Short side 2 -> anchor sides 1x1 and 2x0.5, centred on each cell.
    np.testing.assert_allclose(got[0], [0, 0, 1, 1])
    np.testing.assert_allclose(got[1], [-0.5, 0.25, 1.5, 0.75])
    np.testing.assert_allclose(got[10], [2, 1, 3, 2])  # row 1, column 2
    np.testing.assert_allclose(got[11], [1.5, 1.25, 3.5, 1.75])


def test_default_anchor_set_size():
    assert len(rpn.anchor_shapes()) == len(rpn.DEFAULT_ANCHOR_SCALES) * len(rpn.DEFAULT_ANCHOR_RATIOS)


def test_encode_hand_worked_and_round_trip():
    anchor = np.array([[0, 0, 4, 2]], "float32")
    box = np.array([[1, 1, 9, 3]], "float32")
    # Centres (2, 1) and (5, 2); sizes 4x2 and 8x2.
    np.testing.assert_allclose(
        np.asarray(rpn.encode(box, anchor)), [[0.75, 0.5, math.log(2), 0.0]], atol=1e-6
    )
    rng = np.random.RandomState(0)
    boxes, anchors = random_boxes(rng, 50), random_boxes(rng, 50)
    back = np.asarray(rpn.decode(rpn.encode(boxes, anchors), anchors))
    np.testing.assert_allclose(back, boxes, atol=1e-4)


def test_decode_clamps_scale():
    anchor = np.array([[0, 0, 2, 2]], "float32")
    out = np.asarray(rpn.decode(np.array([[0, 0, 50.0, 0]], "float32"), anchor))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 2 * 1000 / 16, rtol=1e-5)


def test_box_iou_matches_numpy():
    rng = np.random.RandomState(1)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    want = np.array([[np_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(np.asarray(rpn.box_iou(a, b)), want, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_numpy_greedy(threshold):
    rng = np.random.RandomState(int(threshold * 10))
    # Clustered boxes make long suppression chains.
    boxes = np.stack([random_boxes(rng, 60, extent=8.0) for _ in range(3)])
    valid = rng.rand(3, 60) > 0.1
    got = np.asarray(rpn.non_max_suppression(boxes, valid, threshold))
    want = np.stack([np_greedy_nms(b, v, threshold) for b, v in zip(boxes, valid)])
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < valid.sum()  # the case is not trivial


def test_nms_chain():
    # A suppresses B, B would suppress C: greedy keeps A and C.
    boxes = np.array([[[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]]], "float32")
    got = np.asarray(rpn.non_max_suppression(boxes, np.ones((1, 3), bool), 0.4))
    np.testing.assert_array_equal(got, [[True, False, True]])


def np_propose(logits, deltas, anchors, height, width, k, p, threshold):
    out = []
    for lg, dl in zip(logits, deltas):
        xa, ya = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
        wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
        x, y = xa + dl[:, 0] * wa, ya + dl[:, 1] * ha
        w, h = wa * np.exp(dl[:, 2]), ha * np.exp(dl[:, 3])
        boxes = np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)
        boxes = np.clip(boxes, 0, [width, height, width, height])
        order = np.argsort(-lg, kind="stable")[:p]
        boxes, scores = boxes[order], lg[order]
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np_greedy_nms(boxes, area > 0, threshold)
        out.append((boxes[keep][:k], scores[keep][:k]))
    return out


def test_propose_matches_numpy():
    rng = np.random.RandomState(3)
    height, width = 5, 7
    anchors = np.asarray(rpn.anchors(height, width, rpn.anchor_shapes()))
    m = len(anchors)
    logits = rng.randn(2, m).astype("float32")
    deltas = (rng.randn(2, m, 4) * 0.2).astype("float32")
    boxes, scores, valid = rpn.propose(logits, deltas, anchors, height, width, 30, 200, 0.6)
    boxes, scores, valid = (np.asarray(t) for t in (boxes, scores, valid))
    for i, (want_boxes, want_scores) in enumerate(np_propose(logits, deltas, anchors, height, width, 30, 200, 0.6)):
        n = len(want_boxes)
        assert valid[i].sum() == n
        np.testing.assert_allclose(boxes[i, :n], want_boxes, atol=1e-4)
        np.testing.assert_allclose(scores[i, :n], 1 / (1 + np.exp(-want_scores)), atol=1e-5)


def test_propose_pads_when_few_anchors():
    anchors = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], "float32")
    boxes, scores, valid = rpn.propose(
        np.zeros((1, 2), "float32"), np.zeros((1, 2, 4), "float32"), anchors, 3, 3, 4, 8, 0.9
    )
    assert np.asarray(boxes).shape == (1, 4, 4)
    np.testing.assert_array_equal(np.asarray(valid), [[True, True, False, False]])


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
        got = np.asarray(rpn.box_max_pool(x, boxes))
        want, _ = functional.grid_max_pool(x, 3, include_global=True)
        np.testing.assert_array_equal(got, np.asarray(want))


def test_box_pooling_matches_numpy_on_fractional_boxes():
    rng = np.random.RandomState(5)
    x = rng.randn(2, 9, 13, 4).astype("float32")
    boxes = np.stack([random_boxes(rng, 40, extent=14.0) - 1 for _ in range(2)])
    got = np.asarray(rpn.box_max_pool(x, boxes))
    want = np.stack([np_box_max_pool(f, b) for f, b in zip(x, boxes)])
    np.testing.assert_array_equal(got, want)


def test_box_pooling_with_size_known_at_run_time():
    rng = np.random.RandomState(6)
    fn = tf.function(rpn.box_max_pool, input_signature=[
        tf.TensorSpec([None, None, None, 3]), tf.TensorSpec([None, None, 4])])
    for h, w in [(5, 8), (17, 11)]:
        x = rng.randn(1, h, w, 3).astype("float32")
        boxes = random_boxes(rng, 10, extent=float(min(h, w)))[None]
        np.testing.assert_array_equal(fn(x, boxes).numpy(), np_box_max_pool(x[0], boxes[0])[None])


def test_box_pooling_gradient_reaches_the_maxima():
    x = tf.Variable(np.arange(12, dtype="float32").reshape(1, 3, 4, 1))
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(rpn.box_max_pool(x, np.array([[[0, 0, 2, 2]]], "float32")))
    grad = tape.gradient(y, x).numpy()[0, :, :, 0]
    want = np.zeros((3, 4))
    want[1, 1] = 1  # the max of rows 0-1, columns 0-1
    np.testing.assert_array_equal(grad, want)


def test_assign_targets_hand_worked():
    anchors = np.array(
        [[0, 0, 10, 10],   # IoU 1 with the box: positive
         [1, 1, 10, 10],   # IoU 0.81: positive
         [5, 0, 15, 10],   # IoU 1/3: neither
         [20, 20, 30, 30],  # IoU 0: negative
         [30, 30, 40, 40]],  # IoU 0: negative
        "float32")
    gt = np.array([[0, 0, 10, 10], [0, 0, 1, 1]], "float32")
    has_box = np.array([True, False])
    keys = np.tile(np.linspace(0.1, 0.5, 5, dtype="float32"), (2, 1))
    labels, targets = rpn.assign_targets(anchors, gt, has_box, keys, anchors_per_image=4,
                                         positive_fraction=0.25)
    # At most one positive (the smaller key), then three negatives; the
    # image without a box gets nothing.
    np.testing.assert_array_equal(np.asarray(labels), [[1, -1, -1, 0, 0], [-1] * 5])
    np.testing.assert_allclose(np.asarray(targets)[0, 0], [0, 0, 0, 0], atol=1e-6)


def test_assign_targets_best_anchor_is_positive():
    anchors = np.array([[0, 0, 4, 4], [0, 0, 8, 8], [20, 20, 24, 24]], "float32")
    gt = np.array([[0, 0, 6, 6]], "float32")  # IoUs 0.44, 0.56, 0: none >= 0.7
    labels, _ = rpn.assign_targets(anchors, gt, np.array([True]),
                                   np.array([[0.1, 0.2, 0.3]], "float32"))
    np.testing.assert_array_equal(np.asarray(labels), [[-1, 1, 0]])


def test_rpn_loss_matches_numpy():
    rng = np.random.RandomState(7)
    logits = rng.randn(2, 6).astype("float32")
    deltas = rng.randn(2, 6, 4).astype("float32")
    targets = rng.randn(2, 6, 4).astype("float32")
    labels = np.array([[1, 0, -1, 0, 1, -1], [-1, -1, 0, 0, 0, 1]], "int32")
    total, obj, box = (float(v) for v in rpn.rpn_loss(logits, deltas, labels, targets))
    sampled = labels >= 0
    p = 1 / (1 + np.exp(-logits))
    t = (labels == 1).astype("float64")
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    want_obj = bce[sampled].sum() / sampled.sum()
    d = np.abs(deltas - targets)
    beta = 1 / 9
    sl1 = np.where(d < beta, 0.5 * d ** 2 / beta, d - beta / 2).sum(-1)
    want_box = sl1[labels == 1].sum() / sampled.sum()
    np.testing.assert_allclose([obj, box, total], [want_obj, want_box, want_obj + want_box], rtol=1e-5)
