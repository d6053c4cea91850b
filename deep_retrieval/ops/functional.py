"""Pure `keras.ops` functions behind the descriptor layers.

Everything here is stateless and backend-agnostic; the Keras layers in
`deep_retrieval.layers` are thin wrappers that hold configuration and weights.
Tensors are channels-last: feature maps ``[N, H, W, C]``, region sets
``[N, R, C]``.
"""

import math

from keras import ops

from deep_retrieval.ops import boxes as boxes_lib
from deep_retrieval.ops import regions as regions_lib

_TINY = 1e-24


def l2_normalize(x, axis=-1, epsilon=1e-6):
    """``x / (||x||_2 + epsilon)`` along ``axis``.

    The epsilon is added to the norm (as in the DIR and cirtorch code), not
    to its square. The norm's square is floored at 1e-24 before the square
    root so that an all-zero vector has a finite (zero) gradient.
    """
    sq = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x / (ops.sqrt(ops.maximum(sq, _TINY)) + epsilon)


def is_static_size(*dims):
    """True when every dimension is a Python int (known at trace time)."""
    return all(isinstance(d, int) for d in dims)


def grid_max_pool(features, levels=3, include_global=False):
    """Exact max over every R-MAC region of a feature map.

    Args:
        features: ``[N, H, W, C]`` feature map.
        levels: number of grid scales.
        include_global: also pool the whole map (first region).

    Returns:
        ``(pooled, valid)``: ``pooled`` is ``[N, R, C]``; ``valid`` is ``None``
        when the map size was known at trace time (all ``R`` regions are real)
        and otherwise a boolean ``[R]`` mask over a fixed set of candidate
        regions (invalid rows hold arbitrary values and must be masked).
    """
    _, height, width, _ = ops.shape(features)
    if is_static_size(height, width):
        return _static_grid_max_pool(features, height, width, levels, include_global), None
    return _dynamic_grid_max_pool(features, height, width, levels, include_global)


def _flatten_regions(x):
    """``[N, A, B, C]`` -> ``[N, A * B, C]`` keeping a symbolic batch size."""
    _, a, b, channels = ops.shape(x)
    return ops.reshape(x, (-1, a * b, channels))


def _static_grid_max_pool(features, height, width, levels, include_global):
    out = []
    if include_global:
        out.append(ops.max(features, axis=(1, 2))[:, None, :])
    for level in regions_lib.rmac_grid(height, width, levels):
        s = level.side
        # Separable window max: rows first, then columns of the row maxima.
        rows = ops.stack(
            [ops.max(features[:, y : y + s], axis=1) for y in level.ys], axis=1
        )
        windows = ops.stack(
            [ops.max(rows[:, :, x : x + s], axis=2) for x in level.xs], axis=2
        )
        out.append(_flatten_regions(windows))
    return ops.concatenate(out, axis=1) if len(out) > 1 else out[0]


def _window_max(x, starts, side, axis):
    """Max over ``[start, start + side)`` along ``axis`` for each start.

    ``x`` is rank 4 and ``axis`` is 1 or 2; one output slice per start is
    stacked at ``axis``. Cells outside a window are replaced by -inf, so the
    result is exact; a window with no cell yields -inf.
    """
    extent = ops.shape(x)[axis]
    cells = ops.arange(extent, dtype="int32")[None, :]
    inside = ops.logical_and(
        cells >= starts[:, None], cells < (starts + side)[:, None]
    )
    neg_inf = ops.cast(float("-inf"), x.dtype)
    out = []
    for i in range(ops.shape(starts)[0]):
        mask = inside[i]
        mask = mask[None, :, None, None] if axis == 1 else mask[None, None, :, None]
        out.append(ops.max(ops.where(mask, x, neg_inf), axis=axis))
    return ops.stack(out, axis=axis)


def _dynamic_grid_max_pool(features, height, width, levels, include_global):
    pooled, valid = [], []
    if include_global:
        pooled.append(ops.max(features, axis=(1, 2))[:, None, :])
        valid.append(ops.ones((1,), dtype="bool"))
    for level in regions_lib.dynamic_rmac_grid(height, width, levels):
        rows = _window_max(features, level.ys, level.side, axis=1)
        windows = _window_max(rows, level.xs, level.side, axis=2)
        num = ops.shape(level.xs)[0]
        flat = _flatten_regions(windows)
        index = level.pairs[:, 0] * num + level.pairs[:, 1]
        pooled.append(ops.take(flat, index, axis=1))
        valid.append(level.pair_valid)
    return ops.concatenate(pooled, axis=1), ops.concatenate(valid, axis=0)


def _region_mask(valid):
    """A ``[R]`` (shared) or ``[N, R]`` (per image) mask as ``[., R, 1]``."""
    return valid[None, :, None] if len(valid.shape) == 1 else valid[:, :, None]


def mask_invalid_regions(regions, valid):
    """Replace invalid regions by ones (a harmless placeholder: finite, non-zero).

    ``valid`` is None (all valid), ``[R]`` or ``[N, R]``.
    """
    if valid is None:
        return regions
    return ops.where(_region_mask(valid), regions, ops.ones_like(regions))


def sum_regions(regions, valid=None):
    """Sum of ``[N, R, C]`` over the region axis, counting only valid regions
    (``valid``: None, ``[R]`` or ``[N, R]``)."""
    if valid is not None:
        regions = regions * ops.cast(_region_mask(valid), regions.dtype)
    return ops.sum(regions, axis=1)


def scaled_size(height, width, scale):
    """``(round(height * scale), round(width * scale))``, at least 1 each.

    Rounds half up (``floor(v + 0.5)``) for Python ints and tensors alike.
    """
    if scale == 1:
        return height, width
    if is_static_size(height, width):
        return tuple(max(1, int(math.floor(d * scale + 0.5))) for d in (height, width))
    return tuple(
        ops.maximum(
            ops.cast(ops.floor(ops.cast(d, "float32") * scale + 0.5), "int32"), 1
        )
        for d in (height, width)
    )


def _source_index(out_size, in_size):
    """Bilinear source indices and weights with half-pixel centres.

    Matches ``tf.image.resize(..., "bilinear", antialias=False)`` and torch's
    ``interpolate(mode="bilinear", align_corners=False)`` for a given size.
    """
    scale = ops.cast(in_size, "float32") / ops.cast(out_size, "float32")
    pos = (ops.arange(out_size, dtype="float32") + 0.5) * scale - 0.5
    pos = ops.clip(pos, 0.0, ops.cast(in_size - 1, "float32"))
    lo = ops.floor(pos)
    frac = pos - lo
    lo = ops.cast(lo, "int32")
    hi = ops.minimum(lo + 1, in_size - 1)
    return lo, hi, frac


def resize_bilinear(images, height, width):
    """Bilinear resize of ``[N, H, W, C]`` images to ``height x width``.

    Works with Python ints and with scalar tensors (a size known only at run
    time), on every backend. No antialiasing, so it matches the usual
    ``F.interpolate``/``tf.image.resize`` bilinear resampling.
    """
    _, in_h, in_w, _ = ops.shape(images)
    lo, hi, frac = _source_index(height, in_h)
    frac = ops.cast(frac, images.dtype)[None, :, None, None]
    x = ops.take(images, lo, axis=1) * (1 - frac) + ops.take(images, hi, axis=1) * frac
    lo, hi, frac = _source_index(width, in_w)
    frac = ops.cast(frac, images.dtype)[None, None, :, None]
    return ops.take(x, lo, axis=2) * (1 - frac) + ops.take(x, hi, axis=2) * frac


MAX_TABLE_LEVELS = 12
"""Range-max table depth in `box_max_pool` when the map size is unknown at
trace time (maps up to 4096 cells a side)."""


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
    """Exact max over the feature cells each box covers (`deep_retrieval.ops.boxes.cell_ranges`).

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
    x0, y0, x1, y1 = boxes_lib.cell_ranges(boxes, height, width)
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
