"""The cleaning benchmark's scoring, on a hand-worked case."""

import numpy as np
import pandas as pd
import pytest

from benchmarks.cleaning import score


def test_score_hand_worked():
    decisions = pd.DataFrame({
        "image": ["a", "b", "c", "d"], "kept": [True, True, False, False],
        "x0": [0, 0, np.nan, np.nan], "y0": [0, 0, np.nan, np.nan],
        "x1": [10, 10, np.nan, np.nan], "y1": [10, 10, np.nan, np.nan]})
    result = score(decisions, noise={"c", "b"}, truth={"a": (0, 0, 10, 20)})
    assert result["precision"] == 0.5 and result["recall"] == 0.5
    assert result["box_iou_median"] == pytest.approx(0.5) and result["boxes_scored"] == 1
