"""The cleaning job over a manifest: outputs, journal and resume, workers."""

import json
import os

import numpy as np
import pandas as pd
from PIL import Image

from deep_retrieval.cleaning import runner
from deep_retrieval.config import CleanConfig
from tests.cleaning.helpers import label_folder


def test_clean_command_writes_outputs_and_resumes(tmp_path):

    names = label_folder(tmp_path)
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
    names = label_folder(tmp_path)
    groups = {"x": [(i, str(tmp_path / n)) for i, n in enumerate(names)],
              "y": [(i + 10, str(tmp_path / n)) for i, n in enumerate(names[:3])]}
    one = runner.clean_manifest(groups, CleanConfig(workers=1), str(tmp_path / "j1.jsonl"), progress=False)
    two = runner.clean_manifest(groups, CleanConfig(workers=2), str(tmp_path / "j2.jsonl"), progress=False)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True)
