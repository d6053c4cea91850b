import numpy as np
import pandas as pd
from PIL import Image

from deep_retrieval.data import manifest


def _image(path, size=(40, 30)):
    Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)


def test_validation_reports_every_bad_row(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a1.jpg", "a2.jpg", "b1.jpg", "b2.jpg", "c1.jpg", "d1.jpg", "d2.jpg"):
        _image(data / name)
    (data / "broken.jpg").write_text("not an image")
    _image(tmp_path / "outside.jpg")
    rows = [
        ("a1.jpg", 0, 0, 0, 40, 30),       # 1 ok, full-image box
        ("a2.jpg", 0, None, None, None, None),  # 2 ok, no box
        ("b1.jpg", 1, 5, 5, 20, 20),       # 3 ok
        ("b2.jpg", 1, 5, 5, 50, 20),       # 4 box outside the 40x30 image
        ("missing.jpg", 1, None, None, None, None),  # 5 file not found
        ("broken.jpg", 2, None, None, None, None),   # 6 unreadable
        ("c1.jpg", 3, None, None, None, None),       # 7 lonely label
        ("../outside.jpg", 0, None, None, None, None),  # 8 escapes data_dir
        ("d1.jpg", 4, 3, None, 9, 9),      # 9 partial box
        ("d2.jpg", 4, 9, 9, 3, 3),         # 10 empty box
        ("b2.jpg", 1, None, None, None, None),  # 11 ok (same file, no box)
    ]
    csv = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["image", "label", "x0", "y0", "x1", "y1"]).to_csv(csv, index=False)
    m = manifest.read_manifest(str(csv), str(data))
    assert m.frame["image"].tolist() == ["a1.jpg", "a2.jpg", "b1.jpg", "b2.jpg", "d1.jpg", "d2.jpg", "b2.jpg"]
    reasons = {p.row: p.reason for p in m.problems}
    assert reasons[5] == "file not found"
    assert reasons[6].startswith("unreadable image")
    assert "no other image" in reasons[7]
    assert "escapes the data directory" in reasons[8]
    assert sorted(reasons) == [5, 6, 7, 8]
    assert str(m.problems[0]).startswith("row 5 (missing.jpg):")
    # Bad boxes are dropped, their images kept without a box.
    box_reasons = {p.row: p.reason for p in m.box_problems}
    assert sorted(box_reasons) == [4, 9, 10]
    assert "box ignored" in box_reasons[4] and "outside the 40x30 image" in box_reasons[4]
    assert "partial box" in box_reasons[9]
    assert "empty box" in box_reasons[10]
    assert m.summary() == "7 images kept (2 with a box), 4 rows skipped, 3 invalid boxes ignored"
    assert m.has_boxes.tolist() == [True, False, True, False, False, False, False]
    allowed = manifest.read_manifest(str(csv), str(data), allow_outside=True)
    assert 8 not in {p.row for p in allowed.problems}


def test_missing_columns(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\nx.jpg,1\n")
    try:
        manifest.read_manifest(str(csv), str(tmp_path))
    except ValueError as e:
        assert "missing ['image']" in str(e) and "m.csv" in str(e)
    else:
        raise AssertionError("expected ValueError")
