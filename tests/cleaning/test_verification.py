"""Pair verification (SIFT matches, RANSAC) against a known homography."""

import numpy as np

from deep_retrieval.cleaning import verification
from deep_retrieval.config import CleanConfig
from tests.cleaning.helpers import H_TRUE, features, scene, warp


def test_verification_accepts_a_warped_copy_and_rejects_another_landmark():
    a = scene(0)
    config = CleanConfig(transform="homography")
    same = verification.verify_pair(features(a), features(warp(a, H_TRUE)), config)
    assert same.inliers >= config.min_inliers
    # The recovered transform maps the facade's corners where H does.
    corners = np.array([[40, 30], [296, 30], [296, 222], [40, 222]], float)
    np.testing.assert_allclose(verification.transform_points(same.matrix, corners),
                               verification.transform_points(H_TRUE, corners), atol=3.0)
    other = verification.verify_pair(features(a), features(scene(5)), config)
    assert other.inliers == 0
