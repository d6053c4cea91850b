"""Region proposal network (RPN) maths: anchors, box coding, NMS, targets, loss.

DIR (IJCV 2017, Section 3.3) replaces the rigid R-MAC grid by regions
proposed by an RPN trained on landmark boxes; the proposals are max-pooled
exactly like the grid's regions. The network itself is the
`deep_retrieval.layers.RegionProposalNetwork` layer; this module holds the
pure `keras.ops` functions under it, tested against numpy references.

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

MAX_DELTA_LOG = math.log(1000.0 / 16)
"""Clamp of the predicted log-scale deltas (as in Faster R-CNN)."""

MAX_TABLE_LEVELS = 12
"""Range-max table depth when the map size is unknown at trace time
(maps up to 4096 cells a side)."""


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


# ------------------------------------------------------------- box coding


def _centre_size(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes, anchor_boxes):
    """Faster R-CNN deltas ``(dx, dy, dw, dh)`` of ``boxes`` relative to
    ``anchor_boxes`` (broadcasting): ``dx = (x - xa) / wa``,
    ``dw = log(w / wa)``."""
    x, y, w, h = _centre_size(boxes)
    xa, ya, wa, ha = _centre_size(anchor_boxes)
    w, h = ops.maximum(w, 1e-6), ops.maximum(h, 1e-6)
    return ops.stack(
        [(x - xa) / wa, (y - ya) / ha, ops.log(w / wa), ops.log(h / ha)], axis=-1
    )


def decode(deltas, anchor_boxes):
    """Inverse of `encode`; the log-scale deltas are clamped to `MAX_DELTA_LOG`."""
    xa, ya, wa, ha = _centre_size(anchor_boxes)
    dw = ops.minimum(deltas[..., 2], MAX_DELTA_LOG)
    dh = ops.minimum(deltas[..., 3], MAX_DELTA_LOG)
    x = xa + deltas[..., 0] * wa
    y = ya + deltas[..., 1] * ha
    w, h = wa * ops.exp(dw), ha * ops.exp(dh)
    return ops.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=-1)


def clip_boxes(boxes, height, width):
    """Clips boxes to the map ``[0, width] x [0, height]``."""
    height = ops.cast(height, boxes.dtype)
    width = ops.cast(width, boxes.dtype)
    x0 = ops.clip(boxes[..., 0], 0.0, width)
    y0 = ops.clip(boxes[..., 1], 0.0, height)
    x1 = ops.clip(boxes[..., 2], 0.0, width)
    y1 = ops.clip(boxes[..., 3], 0.0, height)
    return ops.stack([x0, y0, x1, y1], axis=-1)


def cells_to_pixels(boxes, map_size, image_size):
    """Numpy: boxes in cells of a ``(H, W)`` map -> pixels of a ``(h, w)`` image."""
    sy, sx = image_size[0] / map_size[0], image_size[1] / map_size[1]
    return np.asarray(boxes, dtype="float64") * np.array([sx, sy, sx, sy])


def cell_ranges(boxes, height, width):
    """Integer cell ranges ``[x0, x1) x [y0, y1)`` covered by boxes.

    A cell is covered when the box overlaps its interior; every box covers at
    least one cell, and ranges are clipped to the map. Returns int32
    ``(x0, y0, x1, y1)`` tensors of the boxes' leading shape.
    """
    def span(lo, hi, extent):
        start = ops.clip(ops.cast(ops.floor(lo), "int32"), 0, extent - 1)
        stop = ops.cast(ops.ceil(hi), "int32")
        stop = ops.clip(ops.maximum(stop, start + 1), 1, extent)
        return start, stop

    x0, x1 = span(boxes[..., 0], boxes[..., 2], width)
    y0, y1 = span(boxes[..., 1], boxes[..., 3], height)
    return x0, y0, x1, y1


def box_iou(a, b):
    """Pairwise IoU of ``a [..., P, 4]`` and ``b [..., Q, 4]`` -> ``[..., P, Q]``."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    iw = ops.maximum(ops.minimum(a[..., 2], b[..., 2]) - ops.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = ops.maximum(ops.minimum(a[..., 3], b[..., 3]) - ops.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / ops.maximum(area_a + area_b - inter, 1e-12)


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


# ---------------------------------------------------------- box pooling


def _range_max_table(x, axis, levels):
    """``levels`` maps stacked on ``axis``: level ``j`` holds the max over
    ``[i, i + 2^j)`` at position ``i`` (clamped at the end)."""
    extent = ops.shape(x)[axis]
    tables = [x]
    for j in range(1, levels):
        prev = tables[-1]
        shifted_index = ops.minimum(ops.arange(extent) + 2 ** (j - 1), extent - 1)
        tables.append(ops.maximum(prev, ops.take(prev, shifted_index, axis=axis)))
    return ops.concatenate(tables, axis=axis)


def box_max_pool(features, boxes):
    """Exact max over the feature cells each box covers (`cell_ranges`).

    Rows use a range-max (sparse) table, so each box reads two table rows
    instead of scanning; columns are masked. Memory is
    ``O(log2(H) * H * W * C + K * W * C)`` per image.

    Args:
        features: ``[N, H, W, C]``.
        boxes: ``[N, K, 4]`` in cell units (need not be integers).

    Returns:
        ``[N, K, C]``.
    """
    _, height, width, _ = ops.shape(features)
    x0, y0, x1, y1 = cell_ranges(boxes, height, width)
    if isinstance(height, int):
        levels = max(1, int(math.floor(math.log2(height))) + 1)
    else:
        levels = MAX_TABLE_LEVELS
    table = _range_max_table(features, 1, levels)  # [N, levels * H, W, C]
    batch, channels = ops.shape(features)[0], ops.shape(features)[3]
    table = ops.reshape(table, (-1, width, channels))  # [N * levels * H, W, C]
    span = y1 - y0
    # Exact floor(log2(span)) in integers: count the powers of two <= span.
    powers = ops.convert_to_tensor([2 ** j for j in range(levels)], "int32")
    level = ops.sum(ops.cast(span[..., None] >= powers, "int32"), axis=-1) - 1
    step = ops.take(powers, level)
    image = ops.arange(batch, dtype="int32")[:, None] * (levels * height)
    first = image + level * height + y0
    second = image + level * height + y1 - step
    # Plain gathers of whole [W, C] rows (cheap, and so is their gradient).
    rows = ops.maximum(ops.take(table, first, axis=0), ops.take(table, second, axis=0))  # [N, K, W, C]
    cols = ops.arange(width)[None, None, :]
    inside = ops.logical_and(cols >= x0[..., None], cols < x1[..., None])
    neg_inf = ops.cast(float("-inf"), features.dtype)
    return ops.max(ops.where(inside[..., None], rows, neg_inf), axis=2)


# ------------------------------------------------------ training targets


def _rank(keys):
    """Rank of each entry along the last axis (0 = smallest key)."""
    return ops.argsort(ops.argsort(keys, axis=-1), axis=-1)


def assign_targets(anchor_boxes, gt_boxes, has_box, random_keys, anchors_per_image=256,
                   positive_fraction=0.5, positive_iou=0.7, negative_iou=0.3):
    """Faster R-CNN anchor labels and regression targets, one box per image.

    Positives: IoU >= ``positive_iou`` with the box, or the best anchor(s)
    for it; negatives: IoU < ``negative_iou``. A minibatch of
    ``anchors_per_image`` anchors per image is sampled, at most
    ``positive_fraction`` of them positive, the rest negative, choosing
    the anchors with the smallest ``random_keys``. Images without a box get
    no sampled anchor.

    Args:
        anchor_boxes: ``[M, 4]``.
        gt_boxes: ``[N, 4]`` (cells); rows of images without a box are ignored.
        has_box: ``[N]`` bool.
        random_keys: ``[N, M]`` uniform numbers (the sampling's randomness).

    Returns:
        ``(labels, targets)``: int32 ``[N, M]`` with 1 (positive), 0
        (negative) or -1 (not sampled), and ``[N, M, 4]`` encoded boxes.
    """
    iou = box_iou(gt_boxes[:, None, :], anchor_boxes[None])[:, 0, :]  # [N, M]
    best = ops.max(iou, axis=1, keepdims=True)
    positive = ops.logical_or(
        iou >= positive_iou, ops.logical_and(iou >= best, best > 0)
    )
    positive = ops.logical_and(positive, has_box[:, None])
    negative = ops.logical_and(
        ops.logical_and(iou < negative_iou, ops.logical_not(positive)), has_box[:, None]
    )
    max_positive = int(anchors_per_image * positive_fraction)
    big = ops.cast(2.0, random_keys.dtype)
    take_pos = ops.logical_and(positive, _rank(ops.where(positive, random_keys, big)) < max_positive)
    num_pos = ops.sum(ops.cast(take_pos, "int32"), axis=1, keepdims=True)
    take_neg = ops.logical_and(
        negative, _rank(ops.where(negative, random_keys, big)) < anchors_per_image - num_pos
    )
    labels = ops.where(take_pos, 1, ops.where(take_neg, 0, -1))
    targets = encode(gt_boxes[:, None, :], anchor_boxes[None])
    return ops.cast(labels, "int32"), targets


def smooth_l1(x, beta):
    """Huber-style smooth L1: ``0.5 x^2 / beta`` below ``beta``, ``|x| - beta/2`` above."""
    ax = ops.abs(x)
    return ops.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


def rpn_loss(logits, deltas, labels, targets, box_weight=1.0, beta=1.0 / 9):
    """Objectness binary cross-entropy plus smooth-L1 on positive deltas.

    Both terms are averaged over the sampled anchors of the batch (as in
    torchvision's Faster R-CNN), so images without a box add nothing.

    Returns:
        ``(total, objectness, box)`` scalar losses.
    """
    sampled = ops.cast(labels >= 0, "float32")
    positive = ops.cast(labels == 1, "float32")
    count = ops.maximum(ops.sum(sampled), 1.0)
    target = ops.cast(ops.maximum(labels, 0), "float32")
    # Numerically stable BCE with logits.
    bce = ops.maximum(logits, 0.0) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))
    objectness = ops.sum(bce * sampled) / count
    box = ops.sum(ops.sum(smooth_l1(deltas - targets, beta), axis=-1) * positive) / count
    return objectness + box_weight * box, objectness, box
