"""One label cleaned end to end, and its boxes."""

import numpy as np

from deep_retrieval.cleaning import label, verification
from deep_retrieval.config import CleanConfig
from tests.cleaning.helpers import H_TRUE, features, iou, label_folder, scene, warp


def test_box_estimate_on_a_pair_with_known_homography():
    a = scene(1)
    b = warp(a, H_TRUE)
    config = CleanConfig(transform="homography")
    fa, fb = features(a), features(b)
    v = verification.verify_pair(fa, fb, config)
    assert v.inliers >= config.min_inliers
    points = {0: {1: v.points_a}, 1: {0: v.points_b}}
    transforms = {(0, 1): v.matrix, (1, 0): np.linalg.inv(v.matrix)}
    boxes = label.estimate_boxes({0, 1}, points, transforms, [fa.size, fb.size])
    corners = np.array([[40, 30], [296, 30], [296, 222], [40, 222]], float)
    projected = verification.transform_points(H_TRUE, corners)
    want_b = (*projected.min(axis=0), *projected.max(axis=0))
    for got, want in ((boxes[0], (40, 30, 296, 222)), (boxes[1], want_b)):
        assert iou(got, want) >= 0.7, (got, want)
        # Inliers lie on the landmark: the estimate does not spill out of it.
        assert got[0] >= want[0] - 4 and got[2] <= want[2] + 4


def test_clean_label_keeps_the_verified_group(tmp_path):
    names = label_folder(tmp_path)
    results = label.clean_label([(n, str(tmp_path / n)) for n in names], CleanConfig())
    by_name = {r["key"]: r for r in results}
    assert [by_name[n]["kept"] for n in names] == [True, True, True, False, False]
    assert by_name["other.jpg"]["reason"] == "no verified match with another image of the label"
    assert by_name["broken.jpg"]["reason"].startswith("unreadable image")
    assert iou(by_name["good0.jpg"]["box"], (40, 30, 296, 222)) >= 0.7
