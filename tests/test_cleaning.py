import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks.cleaning import score
from deep_retrieval.cleaning import features as features_lib
from deep_retrieval.cleaning import graph, label, runner, verification
from deep_retrieval.config import CleanConfig
from deep_retrieval.data import views

H_TRUE = np.array([[0.9, 0.08, 30.0], [-0.05, 0.95, 20.0], [0.0003, -0.0002, 1.0]])


def scene(seed, box=(40, 30, 296, 222), size=(360, 260)):
    """A landmark facade pasted at ``box`` on a flat grey canvas."""
    canvas = np.full((size[1], size[0], 3), 128, np.uint8)
    facade = views.make_facade([seed, 1]).resize((box[2] - box[0], box[3] - box[1]))
    canvas[box[1]:box[3], box[0]:box[2]] = np.asarray(facade)
    return canvas


def features(image):
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    config = CleanConfig()
    return features_lib.extract_features(gray, 1.0, (image.shape[1], image.shape[0]),
                                     config.max_features, config.contrast_threshold)


def warp(image, matrix):
    return cv2.warpPerspective(image, matrix, (image.shape[1], image.shape[0]), borderValue=(128, 128, 128))


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


def test_connected_components_and_selection_on_a_hand_built_graph():
    edges = [(0, 1), (1, 2), (3, 4), (6, 6)]
    components = graph.connected_components(7, edges)
    assert components == [[0, 1, 2], [3, 4], [5], [6]]
    assert graph.select_components(components) == [0, 1, 2]
    assert graph.select_components(components, min_component_size=2) == [0, 1, 2, 3, 4]
    assert graph.select_components(graph.connected_components(3, [])) == []


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


def iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_box_from_points_is_clipped():
    assert graph.box_from_points([[-5, 2], [30, 50]], (20, 40)) == (0, 2, 20, 40)
    assert graph.box_from_points(np.zeros((0, 2)), (20, 40)) is None


def _label_folder(tmp_path):
    base = scene(2)
    shifts = [np.eye(3), H_TRUE, np.array([[1.05, 0, -10], [0, 1.05, -5], [0, 0, 1.0]])]
    names = []
    for i, m in enumerate(shifts):
        Image.fromarray(warp(base, m)).save(tmp_path / f"good{i}.jpg", quality=92)
        names.append(f"good{i}.jpg")
    Image.fromarray(scene(9)).save(tmp_path / "other.jpg", quality=92)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return names + ["other.jpg", "broken.jpg"]


def test_clean_label_keeps_the_verified_group(tmp_path):
    names = _label_folder(tmp_path)
    results = label.clean_label([(n, str(tmp_path / n)) for n in names], CleanConfig())
    by_name = {r["key"]: r for r in results}
    assert [by_name[n]["kept"] for n in names] == [True, True, True, False, False]
    assert by_name["other.jpg"]["reason"] == "no verified match with another image of the label"
    assert by_name["broken.jpg"]["reason"].startswith("unreadable image")
    assert iou(by_name["good0.jpg"]["box"], (40, 30, 296, 222)) >= 0.7


def test_clean_command_writes_outputs_and_resumes(tmp_path):

    names = _label_folder(tmp_path)
    rows = [(n, "a") for n in names] + [("../escape.jpg", "a")]
    for i in range(2):
        Image.fromarray(np.full((50, 60, 3), 40 * i, np.uint8)).save(tmp_path / f"flat{i}.jpg")
        rows.append((f"flat{i}.jpg", "b"))
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(tmp_path / "noisy.csv", index=False)
    output = str(tmp_path / "out" / "clean.csv")
    config = CleanConfig(workers=1)
    # A previous run was killed after finishing label "b" and while writing
    # its next line: the finished label is reused, the torn line ignored.
    os.makedirs(tmp_path / "out")
    journal = runner.journal_path(output, config, str(tmp_path / "noisy.csv"))
    # Keys are row numbers among the manifest's valid rows (the escaping row is not one).
    fake = [dict(key=k, kept=False, reason="from the journal", box=None, inliers=0, component=1) for k in (5, 6)]
    with open(journal, "w") as f:
        f.write(json.dumps({"label": "b", "results": fake}) + "\n" + '{"label": "a", "resu')
    summary = runner.run(str(tmp_path / "noisy.csv"), str(tmp_path), output, config, progress=False)
    assert summary.startswith("8 images in, 3 kept with a box") and not os.path.exists(journal)
    kept = pd.read_csv(output)
    assert kept["image"].tolist() == ["good0.jpg", "good1.jpg", "good2.jpg"]
    assert kept[["x0", "y0", "x1", "y1"]].notna().all().all()
    decisions = pd.read_csv(output + ".decisions.csv").set_index("image")
    assert decisions.loc["flat0.jpg", "reason"] == "from the journal"
    assert "escapes the data directory" in decisions.loc["../escape.jpg", "reason"]
    assert decisions.loc["broken.jpg", "reason"].startswith("unreadable image")
    report = pd.read_csv(output + ".report.csv").set_index("label")
    assert report.loc["a", "images_in"] == 5 and report.loc["a", "kept"] == 3
    assert report.loc["b", "kept"] == 0


def test_parallel_workers_give_the_same_result(tmp_path):
    names = _label_folder(tmp_path)
    groups = {"x": [(i, str(tmp_path / n)) for i, n in enumerate(names)],
              "y": [(i + 10, str(tmp_path / n)) for i, n in enumerate(names[:3])]}
    one = runner.clean_manifest(groups, CleanConfig(workers=1), str(tmp_path / "j1.jsonl"), progress=False)
    two = runner.clean_manifest(groups, CleanConfig(workers=2), str(tmp_path / "j2.jsonl"), progress=False)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)


def test_score_hand_worked():
    decisions = pd.DataFrame({
        "image": ["a", "b", "c", "d"], "kept": [True, True, False, False],
        "x0": [0, 0, np.nan, np.nan], "y0": [0, 0, np.nan, np.nan],
        "x1": [10, 10, np.nan, np.nan], "y1": [10, 10, np.nan, np.nan]})
    result = score(decisions, noise={"c", "b"}, truth={"a": (0, 0, 10, 20)})
    assert result["precision"] == 0.5 and result["recall"] == 0.5
    assert result["box_iou_median"] == pytest.approx(0.5) and result["boxes_scored"] == 1


def test_candidate_pairs_are_bounded_by_global_similarity():
    rng = np.random.RandomState(0)
    centres = np.abs(rng.randn(2, 128)).astype(np.float32)

    def feat(c):
        d = np.abs(centres[c] + 0.05 * rng.randn(30, 128)).astype(np.float32)
        return features_lib.Features(np.zeros((30, 2), np.float32), d, (10, 10))

    features = [feat(i % 2) for i in range(8)]  # even: cluster 0, odd: cluster 1
    assert len(graph.candidate_pairs(features, max_pairs=28, neighbors=2)) == 28  # all pairs
    pairs = graph.candidate_pairs(features, max_pairs=10, neighbors=2)
    assert all(a % 2 == b % 2 for a, b in pairs)  # only within a cluster
    assert len(pairs) <= 8 * 2 and {i for p in pairs for i in p} == set(range(8))


def test_pairs_matched_off_the_landmark_are_dropped():
    # Image 0 shows the landmark at (10..50, 10..50): images 1 and 2 match it
    # there; image 3 (a shared background) matches its corner (60..90, 60..90).
    def square(x0, y0, x1, y1):
        return np.array([[x0, y0], [x1, y1], [x0, y1], [x1, y0]], np.float32)

    landmark, corner = square(10, 10, 50, 50), square(60, 60, 90, 90)
    points = {
        0: {1: landmark, 2: landmark + 2, 3: corner},
        1: {0: landmark, 2: landmark},
        2: {0: landmark, 1: landmark},
        3: {0: corner},
    }
    edges = [(0, 1), (0, 2), (0, 3), (1, 2)]
    counts = {(0, 1): 40, (0, 2): 30, (0, 3): 35, (1, 2): 50}
    sizes = [(100, 100)] * 4
    assert graph.consistent_edges(edges, points, counts, sizes, 0.5) == [(0, 1), (0, 2), (1, 2)]
    assert graph.consistent_edges(edges, points, counts, sizes, 0.0) == edges
    assert graph.box_overlap((0, 0, 10, 10), (5, 5, 20, 20)) == pytest.approx(25 / 100)
    assert graph.box_overlap((0, 0, 10, 10), (2, 2, 4, 4)) == 1.0
