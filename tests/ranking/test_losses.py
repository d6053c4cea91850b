import numpy as np
import pytest

from deep_retrieval.ranking import losses


def test_triplet_loss_matches_numpy():
    rng = np.random.default_rng(0)
    q, p, n = (rng.normal(size=(6, 5)).astype("float32") for _ in range(3))
    want = np.mean(np.maximum(0, 0.1 + ((q - p) ** 2).sum(1) - ((q - n) ** 2).sum(1)))
    assert float(losses.triplet_ranking_loss(q, p, n, 0.1)) == pytest.approx(want, rel=1e-5)
    total = float(losses.triplet_ranking_loss_sum(q, p, n, 0.1))
    assert total == pytest.approx(6 * want, rel=1e-5)


def test_hand_worked_cases():
    q = np.array([[1.0, 0.0]], "float32")
    p = np.array([[0.0, 1.0]], "float32")  # |q-p|^2 = 2
    n = np.array([[-1.0, 0.0]], "float32")  # |q-n|^2 = 4
    assert float(losses.triplet_ranking_loss(q, p, n, 0.1)) == 0.0
    assert float(losses.triplet_ranking_loss(q, n, p, 0.1)) == pytest.approx(2.1)
    assert float(losses.triplet_ranking_loss(q, q, q, 0.1)) == pytest.approx(0.1)
