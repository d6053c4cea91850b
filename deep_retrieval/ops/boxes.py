"""Box geometry of region proposals: Faster R-CNN's box coding against
anchors, clipping, IoU, and the map from feature cells to pixels and to the
cell ranges a box covers.

Conventions: boxes are ``(x0, y0, x1, y1)`` in **feature-cell units** of the
map the RPN runs on (cell ``(i, j)`` spans ``[j, j + 1) x [i, i + 1)``), so
one model works at every image scale; a box maps to pixels by the ratio of
image size to map size (`cells_to_pixels`).
"""

import math

import numpy as np
from keras import ops

MAX_DELTA_LOG = math.log(1000.0 / 16)
"""Clamp of the predicted log-scale deltas (as in Faster R-CNN)."""


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
