
import numpy as np
import pytest

from deep_retrieval.ops import proposals
from tests.reference import np_greedy_nms, random_boxes


def test_anchors_hand_worked():
    shapes = proposals.anchor_shapes(scales=(0.5,), ratios=(1.0, 4.0))
    np.testing.assert_allclose(shapes, [[0.5, 0.5], [1.0, 0.25]])
    got = np.asarray(proposals.anchors(2, 3, shapes))
    assert got.shape == (2 * 3 * 2, 4)
    # Short side 2 -> anchor sides 1x1 and 2x0.5, centred on each cell.
    np.testing.assert_allclose(got[0], [0, 0, 1, 1])
    np.testing.assert_allclose(got[1], [-0.5, 0.25, 1.5, 0.75])
    np.testing.assert_allclose(got[10], [2, 1, 3, 2])  # row 1, column 2
    np.testing.assert_allclose(got[11], [1.5, 1.25, 3.5, 1.75])


def test_default_anchor_set_size():
    assert len(proposals.anchor_shapes()) == len(proposals.DEFAULT_ANCHOR_SCALES) * len(proposals.DEFAULT_ANCHOR_RATIOS)


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_numpy_greedy(threshold):
    rng = np.random.RandomState(int(threshold * 10))
    # Clustered boxes make long suppression chains.
    boxes = np.stack([random_boxes(rng, 60, extent=8.0) for _ in range(3)])
    valid = rng.rand(3, 60) > 0.1
    got = np.asarray(proposals.non_max_suppression(boxes, valid, threshold))
    want = np.stack([np_greedy_nms(b, v, threshold) for b, v in zip(boxes, valid)])
    np.testing.assert_array_equal(got, want)
    assert 0 < want.sum() < valid.sum()  # the case is not trivial


def test_nms_chain():
    # A suppresses B, B would suppress C: greedy keeps A and C.
    boxes = np.array([[[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]]], "float32")
    got = np.asarray(proposals.non_max_suppression(boxes, np.ones((1, 3), bool), 0.4))
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
    anchors = np.asarray(proposals.anchors(height, width, proposals.anchor_shapes()))
    m = len(anchors)
    logits = rng.randn(2, m).astype("float32")
    deltas = (rng.randn(2, m, 4) * 0.2).astype("float32")
    boxes, scores, valid = proposals.propose(logits, deltas, anchors, height, width, 30, 200, 0.6)
    boxes, scores, valid = (np.asarray(t) for t in (boxes, scores, valid))
    for i, (want_boxes, want_scores) in enumerate(np_propose(logits, deltas, anchors, height, width, 30, 200, 0.6)):
        n = len(want_boxes)
        assert valid[i].sum() == n
        np.testing.assert_allclose(boxes[i, :n], want_boxes, atol=1e-4)
        np.testing.assert_allclose(scores[i, :n], 1 / (1 + np.exp(-want_scores)), atol=1e-5)


def test_propose_pads_when_few_anchors():
    anchors = np.array([[0, 0, 2, 2], [1, 1, 3, 3]], "float32")
    boxes, scores, valid = proposals.propose(
        np.zeros((1, 2), "float32"), np.zeros((1, 2, 4), "float32"), anchors, 3, 3, 4, 8, 0.9
    )
    assert np.asarray(boxes).shape == (1, 4, 4)
    np.testing.assert_array_equal(np.asarray(valid), [[True, True, False, False]])


