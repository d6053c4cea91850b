"""Geometric verification of a matched pair: RANSAC on an affine or
homography model, with a minimum inlier count."""

import dataclasses

import numpy as np

from deep_retrieval.cleaning.features import ratio_matches


@dataclasses.dataclass
class Verification:
    """A verified (or rejected) pair: inlier count, the inlier points of each
    image (original pixels) and the 3x3 transform from the first image to
    the second (None when rejected)."""

    inliers: int
    points_a: np.ndarray
    points_b: np.ndarray
    matrix: np.ndarray = None


def verify_pair(a, b, config):
    """Ratio-test matches between two images, verified by RANSAC.

    Args:
        a, b: `Features`.
        config: `CleanConfig` (ratio, transform, ransac_threshold,
            min_inliers).

    Returns:
        A `Verification`; ``inliers`` is 0 when the pair is rejected (fewer
        than ``min_inliers`` inliers, or no model found).
    """
    import cv2

    empty = Verification(0, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))
    matches = ratio_matches(a.descriptors, b.descriptors, config.ratio)
    if len(matches) < max(config.min_inliers, 4):
        return empty
    src, dst = a.points[matches[:, 0]], b.points[matches[:, 1]]
    # The threshold is in pixels of the downscaled images: scale it to the
    # second image's original resolution.
    threshold = config.ransac_threshold * max(b.size) / min(max(b.size), config.max_side)
    if config.transform == "homography":
        matrix, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=2000,
                                          confidence=0.995)
    else:
        matrix, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
                                            ransacReprojThreshold=threshold, maxIters=2000,
                                            confidence=0.995)
    if matrix is None or mask is None:
        return empty
    mask = mask.ravel().astype(bool)
    if mask.sum() < config.min_inliers:
        return empty
    if matrix.shape == (2, 3):
        matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return Verification(int(mask.sum()), src[mask], dst[mask], matrix)


def transform_points(matrix, points):
    """Applies a 3x3 projective (or affine) ``matrix`` to ``[n, 2]`` points."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    h = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(matrix).T
    w = h[:, 2:3]
    ok = np.abs(w[:, 0]) > 1e-9
    return h[ok, :2] / w[ok]
