"""The R-MAC region grid of Tolias, Sicre and Jégou (ICLR 2016).

At scale ``l = 1..L`` the grid places square windows of side
``floor(2 * min(H, W) / (l + 1))``: ``l`` along the short side and ``l + e``
along the long side, where ``e = n - 1`` and ``n in {2..7}`` is the number of
largest-scale windows whose overlap ``(s^2 - s*b) / s^2`` with
``b = (long - short) / (n - 1)`` is closest to 0.4 (ties go to the smaller
``n``; square maps get ``e = 0``). The ``i``-th of ``k`` windows along a side
of length ``E`` starts at ``floor(i * (E - side) / (k - 1))`` (``0`` when
``k == 1``). A scale whose side is zero is skipped.

Everything here is exact integer arithmetic. The widely used PyTorch
implementation (cirtorch) evaluates the same formulas in float32 and therefore
returns a slightly different grid on a few map sizes (for example 2x32, 3x11
and 11x47); this module follows the formulas, not that rounding.

Two forms are provided: `rmac_grid`/`rmac_regions` for Python ints (numpy
output, used whenever the feature-map size is known when the graph is built)
and `dynamic_rmac_grid` for symbolic sizes (`keras.ops`, used inside a traced
graph whose feature-map size is only known at run time).
"""

import dataclasses

import numpy as np
from keras import ops

MAX_EXTRA_WINDOWS = 6
"""Largest number of extra windows along the long side (``n - 1`` with n <= 7)."""

_TARGET_OVERLAP = (2, 5)


@dataclasses.dataclass(frozen=True)
class GridLevel:
    """One scale of the grid: square windows of ``side`` cells at every
    combination of column offset in ``xs`` and row offset in ``ys``."""

    side: int
    xs: tuple
    ys: tuple


def _check_size(height, width, levels):
    if int(height) < 1 or int(width) < 1:
        raise ValueError(
            f"Feature map must be at least 1x1 cells, got {height}x{width}."
        )
    if int(levels) < 1:
        raise ValueError(f"`levels` must be >= 1, got {levels}.")


def _overlap_error_key(n, short, diff):
    """An integer proportional to |overlap(n) - 0.4| for n windows.

    overlap(n) = 1 - diff / ((n - 1) * short), so
    |overlap - 2/5| = |3 (n-1) short - 5 diff| / (5 (n-1) short). Scaling by
    the positive constant 60 * 5 * short (60 = lcm(1..6)) leaves an integer
    with the same ordering over n.
    """
    num, den = _TARGET_OVERLAP
    return abs((den - num) * (n - 1) * short - den * diff) * (60 // (n - 1))


def extra_windows(height, width):
    """Number of windows the long side gets beyond the short side's ``l``."""
    short, long_ = min(height, width), max(height, width)
    if short == long_:
        return 0
    keys = [
        _overlap_error_key(n, short, long_ - short)
        for n in range(2, MAX_EXTRA_WINDOWS + 2)
    ]
    return int(np.argmin(keys)) + 1


def _offsets(extent, side, count):
    if count == 1:
        return (0,)
    return tuple((i * (extent - side)) // (count - 1) for i in range(count))


def rmac_grid(height, width, levels=3):
    """The grid as a list of `GridLevel`, one per non-empty scale.

    Args:
        height: feature-map height in cells (int).
        width: feature-map width in cells (int).
        levels: number of scales ``L``.
    """
    _check_size(height, width, levels)
    height, width, levels = int(height), int(width), int(levels)
    extra = extra_windows(height, width)
    grid = []
    for level in range(1, levels + 1):
        side = (2 * min(height, width)) // (level + 1)
        if side == 0:
            continue
        count_x = level + (extra if width > height else 0)
        count_y = level + (extra if height > width else 0)
        grid.append(
            GridLevel(
                side=side,
                xs=_offsets(width, side, count_x),
                ys=_offsets(height, side, count_y),
            )
        )
    return grid


def rmac_regions(height, width, levels=3, include_global=False):
    """R-MAC regions of a ``height x width`` feature map.

    Args:
        height: feature-map height in cells.
        width: feature-map width in cells.
        levels: number of scales ``L``.
        include_global: prepend the whole map as one more region (the cirtorch
            variant; on a square map the level-1 window is then the whole map
            a second time, and both count).

    Returns:
        int64 array of shape ``[R, 4]`` with rows ``(x, y, w, h)`` in cells:
        the region covers rows ``y..y+h-1`` and columns ``x..x+w-1``. Order:
        the global region (if any), then scales from coarse to fine, each
        row-major (``y`` outer, ``x`` inner).
    """
    rows = [(0, 0, int(width), int(height))] if include_global else []
    for g in rmac_grid(height, width, levels):
        rows.extend((x, y, g.side, g.side) for y in g.ys for x in g.xs)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


@dataclasses.dataclass(frozen=True)
class DynamicGridLevel:
    """One scale of the grid for a size known only at run time.

    Windows are enumerated over a fixed number of candidates so that shapes are
    static: ``xs``/``ys`` hold ``level + MAX_EXTRA_WINDOWS`` candidate offsets
    each, of which only the first (the level's window count) are real.
    ``side`` is a scalar tensor. ``pairs`` lists, as
    ``[level * (level + MAX_EXTRA_WINDOWS), 2]`` int32 indices
    ``(y_candidate, x_candidate)``, the candidate pairs that can be real for
    this map's orientation, and ``pair_valid`` says which of them are (none
    when the side is zero).
    """

    side: object
    xs: object
    ys: object
    pairs: object
    pair_valid: object


def _dynamic_offsets(extent, side, count, num_candidates):
    i = ops.arange(num_candidates, dtype="int32")
    step = ops.maximum(count - 1, 1)
    offsets = ops.floor_divide(i * (extent - side), step)
    offsets = ops.where(count > 1, offsets, ops.zeros_like(offsets))
    return offsets, i < count


def dynamic_extra_windows(height, width):
    """`extra_windows` for scalar int32 tensors (traceable)."""
    short = ops.minimum(height, width)
    diff = ops.maximum(height, width) - short
    keys = ops.stack(
        [
            _overlap_error_key(n, short, diff)
            for n in range(2, MAX_EXTRA_WINDOWS + 2)
        ]
    )
    extra = ops.cast(ops.argmin(keys), "int32") + 1
    return ops.where(diff > 0, extra, ops.zeros_like(extra))


def dynamic_rmac_grid(height, width, levels=3):
    """`rmac_grid` for scalar int32 tensors, with fixed-size candidate sets.

    Returns a list of `DynamicGridLevel`, one per level ``1..levels`` (a level
    whose side is zero has no valid pair rather than being dropped, so that the
    structure does not depend on the size).
    """
    height = ops.cast(height, "int32")
    width = ops.cast(width, "int32")
    extra = dynamic_extra_windows(height, width)
    wide = width > height
    zero = ops.zeros_like(extra)
    grid = []
    for level in range(1, int(levels) + 1):
        side = ops.floor_divide(2 * ops.minimum(height, width), level + 1)
        num = level + MAX_EXTRA_WINDOWS
        count_x = level + ops.where(wide, extra, zero)
        count_y = level + ops.where(height > width, extra, zero)
        xs, x_valid = _dynamic_offsets(width, side, count_x, num)
        ys, y_valid = _dynamic_offsets(height, side, count_y, num)
        # The short side has exactly `level` windows, so only `level * num`
        # of the num * num candidate pairs can be real.
        short_idx = np.repeat(np.arange(level), num)
        long_idx = np.tile(np.arange(num), level)
        pair_y = ops.where(wide, short_idx, long_idx)
        pair_x = ops.where(wide, long_idx, short_idx)
        pairs = ops.cast(ops.stack([pair_y, pair_x], axis=-1), "int32")
        pair_valid = ops.logical_and(
            ops.take(y_valid, pair_y), ops.take(x_valid, pair_x)
        )
        pair_valid = ops.logical_and(pair_valid, side > 0)
        grid.append(
            DynamicGridLevel(side=side, xs=xs, ys=ys, pairs=pairs, pair_valid=pair_valid)
        )
    return grid


def _roi_cells(first, last, stride, extent):
    """Caffe's ROIPooling range (one bin) of the inclusive pixel range
    ``[first, last]``: ``round(first / stride)`` to ``round(last / stride)``
    (C's ``round``, half away from zero), at least one cell, clipped to
    ``[0, extent]``; half-open ``[start, stop)``, empty when the ROI starts
    past the map."""
    start = ops.floor_divide(2 * first + stride, 2 * stride)
    end = ops.floor_divide(2 * last + stride, 2 * stride)
    stop = start + ops.maximum(end - start + 1, 1)
    return ops.clip(start, 0, extent), ops.clip(stop, 0, extent)


def pixel_grid_cells(image_height, image_width, map_height, map_width, levels=2, stride=32):
    """The regions of the DIR Caffe release: the R-MAC grid computed on the
    image in pixels (its ``test.py``, after Tolias et al.'s Matlab code),
    sent to Caffe's ROIPooling as inclusive ``(x, y, x + side - 1, y + side
    - 1)`` boxes and pooled at ``spatial_scale = 1 / stride`` into cell
    ranges of the ``map_height x map_width`` feature map.

    The grid's formulas are those of `rmac_grid` on the image size, in exact
    integers (``test.py`` evaluates them in floating point; its rounding and
    border pull-back leave the integer offsets unchanged).

    Args:
        image_height, image_width: the image the network saw, in pixels
            (ints or scalar tensors).
        map_height, map_width: its feature map, in cells.
        levels: the grid's ``L`` (the release uses 2).
        stride: pixels per feature cell (32 for ResNet).

    Returns:
        ``(cells, valid)``: int32 ``[R, 4]`` half-open ranges ``(x0, y0, x1,
        y1)`` over a fixed set of candidate regions (`dynamic_rmac_grid`),
        and a bool ``[R]`` mask of the real ones. A real region may be
        empty (``x1 == x0``), which Caffe pools as zeros.
    """
    map_height = ops.cast(map_height, "int32")
    map_width = ops.cast(map_width, "int32")
    cells, valid = [], []
    for level in dynamic_rmac_grid(image_height, image_width, levels):
        ys = ops.take(level.ys, level.pairs[:, 0])
        xs = ops.take(level.xs, level.pairs[:, 1])
        x0, x1 = _roi_cells(xs, xs + level.side - 1, stride, map_width)
        y0, y1 = _roi_cells(ys, ys + level.side - 1, stride, map_height)
        cells.append(ops.stack([x0, y0, x1, y1], axis=-1))
        valid.append(level.pair_valid)
    return ops.concatenate(cells, axis=0), ops.concatenate(valid, axis=0)
