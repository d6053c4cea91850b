import numpy as np

from deep_retrieval.ranking import mining


def test_hard_negatives_one_per_label_hardest_first():
    # Query along x; pool: same label (ignored), two of label 1, one of label 2.
    pool = np.array([[1, 0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [-1, 0]], "float32")
    labels = np.array([0, 1, 1, 2, 3])
    q = np.array([[1.0, 0.0]], "float32")
    out = mining.hard_negatives(q, [0], pool, labels, 3)
    # label 1's nearest is index 1 (index 2 is skipped), then label 2, label 3
    assert out.tolist() == [[1, 3, 4]]
    pad = mining.hard_negatives(q, [0], pool, labels, 5)
    assert pad.tolist() == [[1, 3, 4, -1, -1]]


def test_sample_triplets():
    labels = np.array([0, 0, 1, 1, 2])
    negatives = np.array([[2, 4], [3, -1], [0, 4], [-1, -1], [0, 2]])
    trips = mining.sample_triplets(labels, negatives, np.random.default_rng(0))
    # Query 3 has no negative, query 4 has no positive: both skipped.
    assert trips[:, 0].tolist() == [0, 1, 2]
    for q, p, n in trips:
        assert labels[p] == labels[q] and p != q
        assert labels[n] != labels[q] and n in negatives[q]


def test_excluded_images_are_never_positives():
    labels = np.array([0, 0, 0, 1, 1])
    negatives = np.array([[3], [4], [3]])
    rows = mining.sample_triplets(labels, negatives, np.random.default_rng(0), queries=[0, 1, 2], exclude=[1])
    assert len(rows) == 3 and 1 not in rows[:, 1]
    assert rows[0, 1] == 2  # query 0's only usable positive
    # Label 1 with one usable image left cannot give a positive.
    assert len(mining.sample_triplets(labels, np.array([[0]]), np.random.default_rng(0), queries=[3], exclude=[4])) == 0
