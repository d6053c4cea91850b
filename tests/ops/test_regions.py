import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval.ops import regions
from tests import reference

# Hand-worked grids, L = 3, as (x, y, w, h).
HAND_WORKED = {
    (7, 7): [(0, 0, 7, 7)]
    + [(x, y, 4, 4) for y in (0, 3) for x in (0, 3)]
    + [(x, y, 3, 3) for y in (0, 2, 4) for x in (0, 2, 4)],
    # 7x10: overlap 4/7 for n = 2 is closest to 0.4, so one extra window.
    (7, 10): [(0, 0, 7, 7), (3, 0, 7, 7)]
    + [(x, y, 4, 4) for y in (0, 3) for x in (0, 3, 6)]
    + [(x, y, 3, 3) for y in (0, 2, 4) for x in (0, 2, 4, 7)],
    (10, 7): [(0, 0, 7, 7), (0, 3, 7, 7)]
    + [(x, y, 4, 4) for y in (0, 3, 6) for x in (0, 3)]
    + [(x, y, 3, 3) for y in (0, 2, 4, 7) for x in (0, 2, 4)],
    # 1x5: n = 7 (overlap 1/3), sides 1, 0, 0: only level 1, 7 windows.
    (1, 5): [(x, 0, 1, 1) for x in (0, 0, 1, 2, 2, 3, 4)],
    (24, 32): [(0, 0, 24, 24), (8, 0, 24, 24)]
    + [(x, y, 16, 16) for y in (0, 8) for x in (0, 8, 16)]
    + [(x, y, 12, 12) for y in (0, 6, 12) for x in (0, 6, 13, 20)],
    (32, 24): [(0, 0, 24, 24), (0, 8, 24, 24)]
    + [(x, y, 16, 16) for y in (0, 8, 16) for x in (0, 8)]
    + [(x, y, 12, 12) for y in (0, 6, 13, 20) for x in (0, 6, 12)],
}


@pytest.mark.parametrize("size", sorted(HAND_WORKED))
def test_hand_worked_grids(size):
    got = regions.rmac_regions(*size, levels=3)
    assert got.dtype.kind == "i"
    assert got.tolist() == [list(r) for r in HAND_WORKED[size]]


def test_region_counts_24x32():
    assert len(regions.rmac_regions(24, 32)) == 20
    with_global = regions.rmac_regions(24, 32, include_global=True)
    assert len(with_global) == 21
    assert with_global[0].tolist() == [0, 0, 32, 24]


def test_square_map_with_global_counts_whole_map_twice():
    r = regions.rmac_regions(7, 7, include_global=True).tolist()
    assert r[0] == r[1] == [0, 0, 7, 7]
    assert len(r) == 15


def test_overlap_tie_goes_to_smaller_n():
    # 11x47: n = 6 and n = 7 are equally far from 0.4 (3/55 each).
    assert regions.extra_windows(11, 47) == 5
    assert reference.grid_regions(11, 47) == [
        tuple(r) for r in regions.rmac_regions(11, 47).tolist()
    ]


@pytest.mark.parametrize("levels", [1, 3, 5])
@pytest.mark.parametrize("include_global", [False, True])
def test_matches_rational_reference_on_many_sizes(levels, include_global):
    for height in range(1, 41):
        for width in range(1, 41, 3):
            got = regions.rmac_regions(height, width, levels, include_global)
            want = reference.grid_regions(height, width, levels, include_global)
            assert [tuple(r) for r in got.tolist()] == want, (height, width)


def test_regions_lie_inside_the_map():
    for height, width in [(1, 1), (2, 32), (3, 11), (11, 47), (64, 48)]:
        r = regions.rmac_regions(height, width, levels=4)
        assert (r[:, 0] + r[:, 2] <= width).all() and (r[:, 1] + r[:, 3] <= height).all()
        assert (r[:, :2] >= 0).all() and (r[:, 2:] >= 1).all()


def _float32_grid(height, width, levels=3):
    """The grid evaluated in float32, the way cirtorch's torch code does."""
    steps = np.arange(2, 8, dtype=np.float32)
    short = np.float32(min(height, width))
    b = (np.float32(max(height, width)) - short) / (steps - 1)
    extra = int(np.argmin(np.abs((short**2 - short * b) / short**2 - np.float32(0.4)))) + 1
    extra_x = extra if width > height else 0
    extra_y = extra if height > width else 0
    out = []
    for level in range(1, levels + 1):
        side = np.floor(np.float32(2 * short / (level + 1)))
        if side == 0:
            continue
        half = np.floor(side / 2 - 1)

        def offsets(extent, k):
            step = np.float32((extent - side) / (k - 1)) if k > 1 else np.float32(0)
            return np.floor(half + np.arange(k, dtype=np.float32) * step) - half

        for y in offsets(height, level + extra_y):
            for x in offsets(width, level + extra_x):
                out.append((int(x), int(y), int(side), int(side)))
    return out


@pytest.mark.parametrize("size", [(2, 32), (3, 11)])
def test_exact_arithmetic_where_float32_differs(size):
    exact = [tuple(r) for r in regions.rmac_regions(*size).tolist()]
    assert exact == reference.grid_regions(*size)
    assert exact != _float32_grid(*size)


def test_float32_emulation_agrees_elsewhere():
    for size in [(7, 10), (24, 32), (32, 24), (30, 40)]:
        assert _float32_grid(*size) == reference.grid_regions(*size)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="at least 1x1"):
        regions.rmac_regions(0, 5)
    with pytest.raises(ValueError, match="levels"):
        regions.rmac_regions(5, 5, levels=0)


def _dynamic_regions(height, width, levels):
    """Real regions of the dynamic grid, evaluated in one traced function."""
    out = []
    for level in regions.dynamic_rmac_grid(height, width, levels):
        out.append(
            (level.side, level.xs, level.ys, level.pairs, level.pair_valid)
        )
    return out


def test_dynamic_grid_serves_all_sizes_from_one_trace():
    fn = tf.function(
        lambda h, w: _dynamic_regions(h, w, 3),
        input_signature=[tf.TensorSpec([], tf.int32)] * 2,
    )
    sizes = [(7, 10), (24, 32), (32, 24), (1, 5), (7, 7), (11, 47), (3, 11), (2, 32)]
    for height, width in sizes:
        got = []
        for side, xs, ys, pairs, valid in fn(height, width):
            for (iy, ix), ok in zip(pairs.numpy(), valid.numpy()):
                if ok:
                    got.append((int(xs[ix]), int(ys[iy]), int(side), int(side)))
        assert sorted(got) == sorted(reference.grid_regions(height, width)), (height, width)
    assert fn.experimental_get_tracing_count() == 1


def _caffe_resnet_map(side):
    """The res5c size of an image side through MSRA's ResNet (conv1 7/2 pad 3,
    pool1 3/2 in ceil mode, three stride-2 1x1 convolutions)."""
    side = (side - 1) // 2 + 1
    side = -(-(side - 3) // 2) + 1
    for _ in range(3):
        side = (side - 1) // 2 + 1
    return side


def test_pixel_grid_cells_by_hand_600x800():
    """L = 2 on 600 x 800 px, 19 x 25 cells: level 1 has two 600 px windows at
    x = 0, 200 (cells round(0/32)..round(599/32) = 0..18 and 6..24); level 2
    three 400 px windows at x = 0, 200, 400 (400/32 = 12.5 rounds up to 13)
    by two at y = 0, 200."""
    cells, valid = regions.pixel_grid_cells(600, 800, 19, 25, levels=2, stride=32)
    got = np.asarray(cells)[np.asarray(valid)].tolist()
    assert got == [[0, 0, 20, 19], [6, 0, 25, 19],
                   [0, 0, 13, 13], [6, 0, 20, 13], [13, 0, 25, 13],
                   [0, 6, 13, 19], [6, 6, 20, 19], [13, 6, 25, 19]]


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_pixel_grid_cells_follow_the_release_test_script(levels):
    """Against the release's floating-point grid and Fast R-CNN's rounding,
    on 300 image sizes from 40 to 1200 px, both orientations and squares
    (each region once: R-MAC sums them)."""
    rng = np.random.default_rng(levels)
    sizes = [(int(h), int(w)) for h, w in rng.integers(40, 1200, (300, 2))] + [(512, 512), (800, 533), (533, 800)]
    for height, width in sizes:
        map_h, map_w = _caffe_resnet_map(height), _caffe_resnet_map(width)
        want = []
        for x0, y0, x1, y1 in reference.dir_test_script_regions(height, width, levels):
            (c0, c1), (r0, r1) = (reference.caffe_roi_range(x0, x1, 32, map_w),
                                  reference.caffe_roi_range(y0, y1, 32, map_h))
            want.append([c0, r0, c1, r1])
        cells, valid = regions.pixel_grid_cells(height, width, map_h, map_w, levels, 32)
        # The candidates of a tall image come column by column: the set is what is summed.
        assert sorted(np.asarray(cells)[np.asarray(valid)].tolist()) == sorted(want), (height, width)


def test_pixel_grid_cells_traced_with_unknown_sizes_match_eager():
    fn = tf.function(lambda h, w, mh, mw: regions.pixel_grid_cells(h, w, mh, mw, 2, 32),
                     input_signature=[tf.TensorSpec([], tf.int32)] * 4)
    for size in [(600, 800), (801, 333), (96, 96)]:
        maps = [_caffe_resnet_map(s) for s in size]
        traced = [t.numpy() for t in fn(*size, *maps)]
        eager = [np.asarray(t) for t in regions.pixel_grid_cells(*size, *maps, 2, 32)]
        np.testing.assert_array_equal(traced[0][traced[1]], eager[0][eager[1]])
