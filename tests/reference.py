"""Independent numpy references for the tests (no deep_retrieval imports).

The region grid is recomputed here with `fractions.Fraction`, straight from
the formulas of Tolias et al. (ICLR 2016), and R-MAC is a plain loop over
regions.
"""

import math
from fractions import Fraction

import numpy as np


def grid_regions(height, width, levels=3, include_global=False):
    """(x, y, w, h) list of the R-MAC grid, exact rational arithmetic."""
    short, long_ = min(height, width), max(height, width)
    extra = 0
    if short != long_:
        best = None
        for n in range(2, 8):
            b = Fraction(long_ - short, n - 1)
            overlap = (Fraction(short) ** 2 - short * b) / Fraction(short) ** 2
            err = abs(overlap - Fraction(2, 5))
            if best is None or err < best[0]:
                best = (err, n)
        extra = best[1] - 1
    out = [(0, 0, width, height)] if include_global else []
    for level in range(1, levels + 1):
        side = math.floor(Fraction(2 * short, level + 1))
        if side == 0:
            continue
        kx = level + (extra if width > height else 0)
        ky = level + (extra if height > width else 0)

        def offsets(extent, k):
            if k == 1:
                return [0]
            return [math.floor(Fraction(i * (extent - side), k - 1)) for i in range(k)]

        for y in offsets(height, ky):
            for x in offsets(width, kx):
                out.append((x, y, side, side))
    return out


def l2n(x, axis=-1, eps=1e-6):
    return x / (np.linalg.norm(x, axis=axis, keepdims=True) + eps)


def box_cells(boxes, height, width):
    """(x, y, w, h) cell windows covered by (x0, y0, x1, y1) boxes in cells:
    every cell overlapping the box's interior, at least one, inside the map."""
    out = []
    for x0, y0, x1, y1 in boxes:
        c0 = min(max(int(math.floor(x0)), 0), width - 1)
        r0 = min(max(int(math.floor(y0)), 0), height - 1)
        c1 = min(max(int(math.ceil(x1)), c0 + 1), width)
        r1 = min(max(int(math.ceil(y1)), r0 + 1), height)
        out.append((c0, r0, c1 - c0, r1 - r0))
    return out


def rmac(features, levels=3, include_global=False, mean=None, projection=None, regions=None):
    """R-MAC of one [H, W, C] map, float64: L2(sum L2(P(L2(max) - m))).

    ``regions`` ((x, y, w, h) windows) replaces the grid when given."""
    features = np.asarray(features, np.float64)
    height, width, _ = features.shape
    if regions is None:
        regions = grid_regions(height, width, levels, include_global)
    total = 0
    for x, y, w, h in regions:
        v = l2n(features[y : y + h, x : x + w].max(axis=(0, 1)))
        if projection is not None:
            v = l2n((v - mean) @ projection)
        total = total + v
    return l2n(total)


def bilinear_resize(image, out_h, out_w):
    """Half-pixel-centre bilinear resize of one [H, W, C] image, by loops."""
    in_h, in_w, _ = image.shape

    def taps(out_size, in_size):
        res = []
        for o in range(out_size):
            p = (o + 0.5) * in_size / out_size - 0.5
            p = min(max(p, 0.0), in_size - 1)
            lo = int(math.floor(p))
            res.append((lo, min(lo + 1, in_size - 1), p - lo))
        return res

    out = np.zeros((out_h, out_w, image.shape[2]))
    for i, (y0, y1, fy) in enumerate(taps(out_h, in_h)):
        for j, (x0, x1, fx) in enumerate(taps(out_w, in_w)):
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


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


def dir_test_script_regions(height, width, levels=2):
    """The release's ``get_rmac_region_coordinates`` (Tolias et al.'s Matlab
    grid in floating point) and ``pack_regions_for_network``: ``[R, 4]``
    inclusive ``x0, y0, x1, y1`` pixels."""
    steps = np.array([2, 3, 4, 5, 6, 7], np.float32)
    short = min(height, width)
    b = (max(height, width) - short) / (steps - 1)
    idx = int(np.argmin(np.abs((short ** 2 - short * b) / short ** 2 - 0.4))) + 1
    wd = idx if height < width else 0
    hd = idx if height > width else 0
    out = []
    for level in range(1, levels + 1):
        wl = np.floor(2 * short / (level + 1))
        wl2 = np.floor(wl / 2 - 1)
        bw = (width - wl) / (level + wd - 1) if level + wd - 1 > 0 else 0
        bh = (height - wl) / (level + hd - 1) if level + hd - 1 > 0 else 0
        cen_w = np.floor(wl2 + bw * np.arange(level + wd)) - wl2
        cen_h = np.floor(wl2 + bh * np.arange(level + hd)) - wl2
        for y in cen_h:
            for x in cen_w:
                x, y, side = int(round(x)), int(round(y)), int(round(wl))
                x -= max(0, x + side - width)
                y -= max(0, y + side - height)
                out.append((x, y, x + side - 1, y + side - 1))
    return np.array(out, np.float32)


def caffe_roi_range(first, last, stride, extent):
    """The cells ``[start, stop)`` Fast R-CNN's ROIPooling (one bin, C's
    ``round`` of float32 products) max-pools for the inclusive pixel range
    ``[first, last]`` of a map ``extent`` cells long."""
    scale = np.float32(1 / stride)
    start, end = (int(math.floor(float(np.float32(v) * scale) + 0.5)) for v in (first, last))
    size = max(end - start + 1, 1)
    return min(max(start, 0), extent), min(max(start + size, 0), extent)
