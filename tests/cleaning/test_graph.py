"""The match graph: components, candidate pairs, region consistency, boxes."""

import numpy as np
import pytest

from deep_retrieval.cleaning import features as features_lib
from deep_retrieval.cleaning import graph


def test_connected_components_and_selection_on_a_hand_built_graph():
    edges = [(0, 1), (1, 2), (3, 4), (6, 6)]
    components = graph.connected_components(7, edges)
    assert components == [[0, 1, 2], [3, 4], [5], [6]]
    assert graph.select_components(components) == [0, 1, 2]
    assert graph.select_components(components, min_component_size=2) == [0, 1, 2, 3, 4]
    assert graph.select_components(graph.connected_components(3, [])) == []


def test_box_from_points_is_clipped():
    assert graph.box_from_points([[-5, 2], [30, 50]], (20, 40)) == (0, 2, 20, 40)
    assert graph.box_from_points(np.zeros((0, 2)), (20, 40)) is None


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
