import numpy as np

from deep_retrieval.layers import PixelGridMaxPooling
from tests import keras_utils, reference


def test_pools_the_release_grid_of_the_image():
    """The maxima of the cells Caffe's ROIPooling reads for each region of
    the release's test.py grid, on a 600 x 800 image's 19 x 25 map."""
    x = np.random.RandomState(0).rand(2, 19, 25, 4).astype("float32")
    pooled, valid = PixelGridMaxPooling(levels=2, stride=32)(x, np.zeros((2, 600, 800, 3), "float32"))
    got = np.asarray(pooled)[:, np.asarray(valid)]
    want = []
    for x0, y0, x1, y1 in reference.dir_test_script_regions(600, 800, 2):
        (c0, c1), (r0, r1) = reference.caffe_roi_range(x0, x1, 32, 25), reference.caffe_roi_range(y0, y1, 32, 19)
        want.append(x[:, r0:r1, c0:c1].max((1, 2)))
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(np.stack(want, 1), axis=1))
    assert got.shape == (2, 8, 4)


def test_a_region_past_the_map_pools_zeros_as_caffe_does():
    """A 40 x 1200 px image on a map cut to 2 x 3 cells: the far windows
    start past the map, an empty ROI, which Caffe's layer sets to 0."""
    x = np.random.RandomState(1).rand(1, 2, 3, 4).astype("float32") + 1
    pooled, valid = PixelGridMaxPooling(levels=1, stride=32)(x, np.zeros((1, 40, 1200, 3), "float32"))
    got = np.asarray(pooled)[0, np.asarray(valid)]
    assert (got == 0).all(axis=1).any() and (got > 0).all(axis=1).any()


def test_layer_contract(tmp_path):
    rng = np.random.RandomState(0)
    inputs = [rng.rand(1, 8, 10, 3).astype("float32"), np.zeros((1, 256, 320, 3), "float32")]
    keras_utils.run_layer_test(PixelGridMaxPooling, {"levels": 2, "stride": 32}, inputs, [(1, 23, 3), (23,)], tmp_path)
