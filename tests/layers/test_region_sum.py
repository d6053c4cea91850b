import numpy as np

from deep_retrieval.layers import RegionSum


def test_sum_with_and_without_mask():
    x = np.arange(24, dtype="float32").reshape(2, 3, 4)
    np.testing.assert_allclose(np.asarray(RegionSum()(x)), x.sum(axis=1))
    valid = np.array([True, False, True])
    np.testing.assert_allclose(np.asarray(RegionSum()(x, valid)), x[:, 0] + x[:, 2])
    assert RegionSum().compute_output_shape((2, 3, 4)) == (2, 4)
