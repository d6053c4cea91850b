"""RPN training targets and loss (Faster R-CNN, NIPS 2015): anchors are
assigned to the landmark box by IoU, a balanced random sample of them is
kept, and the loss is a binary cross-entropy on objectness plus a smooth-L1
on the box deltas of positive anchors."""

from keras import ops

from deep_retrieval.ops.boxes import box_iou, encode


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
