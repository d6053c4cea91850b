"""Region proposal network (RPN) maths: anchors, NMS and proposals.

DIR (IJCV 2017, Section 3.3) replaces the rigid R-MAC grid by regions
proposed by an RPN trained on landmark boxes; the proposals are max-pooled
exactly like the grid's regions. The network itself is the
`deep_retrieval.layers.RegionProposalNetwork` layer; this module holds the
pure `keras.ops` functions under it, tested against numpy references; box
geometry is in `deep_retrieval.ops.boxes`, training targets and the loss in
`deep_retrieval.ranking.rpn_targets`, and box pooling in `deep_retrieval.ops.functional`.

Conventions: boxes are ``(x0, y0, x1, y1)`` in **feature-cell units** of the
map the RPN runs on (cell ``(i, j)`` spans ``[j, j + 1) x [i, i + 1)``), so
one model works at every image scale; a box maps to pixels by the ratio of
image size to map size (`cells_to_pixels`). Anchors are centred on every
cell, with sides relative to the map's short side, so the same anchor set
covers the same share of the image at every resolution.

Reference: Ren, He, Girshick, Sun, "Faster R-CNN", NIPS 2015 (anchors,
encoding, assignment, loss); Gordo et al., "End-to-end learning of deep visual
representations for image retrieval", IJCV 2017.
"""

import math

import numpy as np
from keras import ops

from deep_retrieval.config import DEFAULT_ANCHOR_RATIOS, DEFAULT_ANCHOR_SCALES
from deep_retrieval.ops.boxes import box_iou, clip_boxes, decode

# ------------------------------------------------------------------ anchors


def anchor_shapes(scales=DEFAULT_ANCHOR_SCALES, ratios=DEFAULT_ANCHOR_RATIOS):
    """``[A, 2]`` numpy (width, height) factors, scale-major: an anchor of
    scale ``s`` and ratio ``r`` on a map with short side ``m`` is
    ``s * m * sqrt(r)`` wide and ``s * m / sqrt(r)`` high."""
    return np.array(
        [[s * math.sqrt(r), s / math.sqrt(r)] for s in scales for r in ratios],
        dtype="float32",
    )


def anchors(height, width, shapes):
    """All anchors of a ``height x width`` map, ``[height * width * A, 4]``.

    Ordered row, column, anchor (the order of a conv output ``[H, W, A]``
    flattened). ``height`` and ``width`` may be ints or scalar tensors.
    """
    shapes = ops.convert_to_tensor(shapes, "float32")
    short = ops.cast(ops.minimum(height, width), "float32")
    size = shapes * short  # [A, 2]
    cy = ops.cast(ops.arange(height), "float32") + 0.5
    cx = ops.cast(ops.arange(width), "float32") + 0.5
    cy = ops.broadcast_to(cy[:, None, None], (height, width, 1))
    cx = ops.broadcast_to(cx[None, :, None], (height, width, 1))
    half_w, half_h = size[None, None, :, 0] / 2, size[None, None, :, 1] / 2
    boxes = ops.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
    return ops.reshape(boxes, (-1, 4))


# -------------------------------------------------------------------- NMS


def non_max_suppression(boxes, valid, threshold):
    """Greedy NMS over score-sorted boxes, without a loop over boxes.

    Box ``i`` is kept iff it is valid and no kept box ``j < i`` overlaps it
    with IoU above ``threshold``. That recursive definition has one solution,
    reached by iterating ``keep <- valid & ~any_j(suppress[i, j] & keep[j])``
    from ``keep = valid``: after ``t`` rounds the first ``t`` boxes are final,
    so it stops after at most ``P`` rounds and in practice after a few (the
    longest suppression chain). Each round is one batched matrix operation.

    Args:
        boxes: ``[N, P, 4]`` sorted by decreasing score.
        valid: ``[N, P]`` bool; invalid boxes neither survive nor suppress.
        threshold: IoU above which the lower-scored box is suppressed.

    Returns:
        ``[N, P]`` bool mask of the kept boxes.
    """
    count = ops.shape(boxes)[1]
    order = ops.arange(count)
    earlier = order[None, :] < order[:, None]  # [i, j]: j ranks above i
    suppress = ops.logical_and(box_iou(boxes, boxes) > threshold, earlier[None])
    suppress = ops.cast(suppress, "float32")

    def body(keep, _changed, rounds):
        hits = ops.einsum("nij,nj->ni", suppress, ops.cast(keep, "float32"))
        new = ops.logical_and(valid, hits < 0.5)
        changed = ops.any(ops.not_equal(new, keep))
        return new, changed, rounds + 1

    def cond(_keep, changed, rounds):
        return ops.logical_and(changed, rounds < count)

    keep, _, _ = ops.while_loop(
        cond, body, (valid, ops.convert_to_tensor(True), ops.convert_to_tensor(0))
    )
    return keep


def propose(logits, deltas, anchor_boxes, height, width, num_proposals,
            pre_nms_proposals, nms_threshold):
    """Decoded, clipped, NMS-filtered top proposals per image.

    Args:
        logits: ``[N, M]`` objectness logits of the ``M`` anchors.
        deltas: ``[N, M, 4]`` predicted deltas.
        anchor_boxes: ``[M, 4]`` from `anchors`.
        height, width: map size (ints or scalar tensors).
        num_proposals: ``K`` proposals kept after NMS.
        pre_nms_proposals: ``P >= K`` best-scored boxes entering NMS.
        nms_threshold: NMS IoU threshold.

    Returns:
        ``(boxes [N, K, 4], scores [N, K], valid [N, K])``; when fewer than
        ``K`` boxes survive, the remaining rows are marked invalid.
    """
    boxes = clip_boxes(decode(deltas, anchor_boxes[None]), height, width)
    batch = ops.shape(logits)[0]
    # Padding guarantees P candidates whatever the number of anchors.
    neg_inf = ops.cast(float("-inf"), logits.dtype)
    scores = ops.concatenate(
        [logits, ops.full((batch, pre_nms_proposals), neg_inf, logits.dtype)], axis=1
    )
    boxes = ops.concatenate(
        [boxes, ops.zeros((batch, pre_nms_proposals, 4), boxes.dtype)], axis=1
    )
    scores, index = ops.top_k(scores, pre_nms_proposals, sorted=True)
    boxes = ops.take_along_axis(boxes, index[:, :, None], axis=1)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    valid = ops.logical_and(scores > neg_inf, area > 0)
    keep = non_max_suppression(boxes, valid, nms_threshold)
    kept_scores = ops.where(keep, scores, neg_inf)
    kept_scores, index = ops.top_k(kept_scores, num_proposals, sorted=True)
    boxes = ops.take_along_axis(boxes, index[:, :, None], axis=1)
    return boxes, ops.sigmoid(kept_scores), kept_scores > neg_inf
