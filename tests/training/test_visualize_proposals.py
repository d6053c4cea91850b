import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
from PIL import Image

from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
from tests.helpers_images import encoded
from training import visualize_proposals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_writes_picture_and_recall(tmp_path):
    model = build_descriptor_model(DescriptorConfig(
        backbone="tiny", weights=None, scales=(1.0,), regions="rpn", proposals=16, pre_nms_proposals=64))
    model.save(tmp_path / "m.keras")
    (tmp_path / "jpg").mkdir()
    for name in ("a", "b"):
        (tmp_path / "jpg" / f"{name}.jpg").write_bytes(encoded(90, 120, ord(name)))
    pd.DataFrame({"image": ["a", "b", "missing"], "x0": [10, 0, 0], "y0": [10, 0, 0],
                  "x1": [100, 120, 5], "y1": [80, 90, 5]}).to_csv(tmp_path / "boxes.csv", index=False)
    out = tmp_path / "proposals.png"  # the default: beside the model, in its run folder
    work = tmp_path / "cwd"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "training.visualize_proposals", "--model", str(tmp_path / "m.keras"),
         "--boxes", str(tmp_path / "boxes.csv"), "--image_size", "120",
         "--top", "4,16", "--output_json", str(tmp_path / "r.json"), "--noprogress"],
        cwd=work, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}:" in result.stdout and os.listdir(work) == []
    assert "missing not found" in result.stderr
    with Image.open(out) as im:
        assert im.size == (120, 90)
        drawn = np.asarray(im.convert("RGB"))
    # The landmark box is drawn in green on the first image.
    assert (drawn[10, 10:100] == [0, 255, 0]).all()
    with open(tmp_path / "r.json") as f:
        recall = json.load(f)
    assert recall["images"] == 2 and set(recall) >= {"rpn@4", "rpn@16", "grid@all"}
    assert recall["rpn@4"] <= recall["rpn@16"]
    # The whole-image box of "b" is matched by the grid's level-1 window (IoU 0.75 >= 0.5).
    assert recall["grid@all"] >= 0.5


def test_box_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("image,x0\na,1\n")
    try:
        visualize_proposals.load_boxes(str(tmp_path / "bad.csv"))
    except ValueError as e:
        assert "missing columns" in str(e) and "bad.csv" in str(e)
    else:
        raise AssertionError("expected ValueError")
