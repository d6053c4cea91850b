import numpy as np

from deep_retrieval.ranking import rpn_targets


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
    labels, targets = rpn_targets.assign_targets(anchors, gt, has_box, keys, anchors_per_image=4,
                                         positive_fraction=0.25)
    # At most one positive (the smaller key), then three negatives; the
    # image without a box gets nothing.
    np.testing.assert_array_equal(np.asarray(labels), [[1, -1, -1, 0, 0], [-1] * 5])
    np.testing.assert_allclose(np.asarray(targets)[0, 0], [0, 0, 0, 0], atol=1e-6)



def test_assign_targets_best_anchor_is_positive():
    anchors = np.array([[0, 0, 4, 4], [0, 0, 8, 8], [20, 20, 24, 24]], "float32")
    gt = np.array([[0, 0, 6, 6]], "float32")  # IoUs 0.44, 0.56, 0: none >= 0.7
    labels, _ = rpn_targets.assign_targets(anchors, gt, np.array([True]),
                                   np.array([[0.1, 0.2, 0.3]], "float32"))
    np.testing.assert_array_equal(np.asarray(labels), [[-1, 1, 0]])



def test_rpn_loss_matches_numpy():
    rng = np.random.RandomState(7)
    logits = rng.randn(2, 6).astype("float32")
    deltas = rng.randn(2, 6, 4).astype("float32")
    targets = rng.randn(2, 6, 4).astype("float32")
    labels = np.array([[1, 0, -1, 0, 1, -1], [-1, -1, 0, 0, 0, 1]], "int32")
    total, obj, box = (float(v) for v in rpn_targets.rpn_loss(logits, deltas, labels, targets))
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
