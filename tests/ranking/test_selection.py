import json

import pytest

from deep_retrieval.ranking.selection import Selection, worst_gain
from training.train import summary

SPLITS = ("scenes", "scenes_camera", "synthetic")


def _records(step, medians):
    return [{"step": step, "dataset": name, "easy_map": m, "medium_map": m, "hard_map": m}
            for name, m in zip(SPLITS, medians)]


def _selection(tmp_path, saved, current):
    return Selection(str(tmp_path), [], save=lambda: saved.append(current[0]), log=lambda message: None)


def _run(selection, current, steps):
    for step, medians in steps:
        current[0] = step
        rows = _records(step, medians)
        with open(selection.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        selection.select(rows)
        selection.earlier(step).extend(rows)


def test_worst_relative_gain_by_hand():
    baseline = {r["dataset"]: r for r in _records(0, (50.0, 40.0, 80.0))}
    # +10 % on scenes, -2.5 % on scenes_camera, +12.5 % on synthetic.
    gain, split = worst_gain(_records(2, (55.0, 39.0, 90.0)), baseline)
    assert gain == pytest.approx(-0.025) and split == "scenes_camera"


def test_kept_only_when_better_than_step_zero_on_every_split(tmp_path):
    saved, current = [], [0]
    selection = _selection(tmp_path, saved, current)
    _run(selection, current, [
        (0, (50.0, 40.0, 80.0)),
        (2, (60.0, 39.0, 90.0)),   # loses on scenes_camera: not kept however much it gains elsewhere
        (4, (55.0, 44.0, 81.0)),   # worst +1.25 % (synthetic): kept
        (6, (70.0, 48.0, 81.5)),   # worst +1.875 %: kept
        (8, (80.0, 60.0, 81.5)),   # worst +1.875 % again: a tie keeps the earlier
    ])
    assert saved == [0, 4, 6]
    assert selection.best == (pytest.approx(1.5 / 80), -6)


def test_step_zero_ships_when_no_round_beats_it_everywhere(tmp_path, capsys):
    saved, current = [], [0]
    selection = _selection(tmp_path, saved, current)
    _run(selection, current, [(0, (50.0, 40.0, 80.0)), (2, (60.0, 39.0, 90.0)), (4, (49.0, 50.0, 95.0))])
    assert saved == [0] and selection.best == (0.0, 0)
    text = summary(selection.records, -selection.best[1])
    assert "step-0 model" in text and "not kept" in text
    assert [line.split()[:2] for line in text.splitlines()[2:]] == [[name, "0"] for name in SPLITS]


def test_a_resumed_run_compares_with_the_earlier_rounds(tmp_path):
    saved, current = [], [0]
    _run(_selection(tmp_path, saved, current),
         current, [(0, (50.0, 40.0, 80.0)), (2, (55.0, 44.0, 88.0))])  # step 2: worst +10 %
    assert saved == [0, 2]
    resumed = _selection(tmp_path, saved, current)
    _run(resumed, current, [(4, (60.0, 43.0, 99.0))])  # worst +7.5 %: below step 2's
    assert saved == [0, 2] and resumed.best == (pytest.approx(0.1), -2)
    _run(resumed, current, [(6, (60.0, 45.0, 99.0))])  # worst +12.5 %
    assert saved == [0, 2, 6]


def test_a_step_without_its_step_zero_split_is_refused(tmp_path):
    selection = _selection(tmp_path, [], [0])
    with pytest.raises(ValueError, match="step-0"):
        selection.select(_records(2, (50.0, 40.0, 80.0)))
