import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval import evaluation
from deep_retrieval.config import recorded_image_size
from deep_retrieval.config import SyntheticConfig
from deep_retrieval.data import groundtruth, pipeline, synthetic
from training import evaluate

SMALL = SyntheticConfig(source="facades", train_landmarks=2, images_per_landmark=2, test_landmarks=3,
                        test_images_per_landmark=3, distractors=3, image_width=96, image_height=72, seed=9)


def _reference(model, data, size):
    def desc(path, box=None):
        image = pipeline.decode(tf.io.read_file(path))
        if box is not None:
            image = pipeline.crop_box(image, box)
        return np.asarray(model(pipeline.resize_longest(image, size)[None]))[0]

    db = np.stack([desc(p) for p in data.images])
    q = np.stack([desc(p, b) for p, b in zip(data.queries, data.query_boxes)])
    ranks = np.argsort(-(db @ q.T), axis=0, kind="stable")
    return evaluation.evaluate(ranks, data.gnd)


def test_synthetic_split_matches_reference_pipeline(exported):
    root = synthetic.ensure_dataset(SMALL, progress=False)
    got = evaluate.run(root, "synthetic", exported["keras"], image_size=96, progress=False)
    want = _reference(exported["model"], groundtruth.load_dataset(root, "synthetic"), 96)
    assert set(got) == {"easy", "medium", "hard"}
    for protocol in got:
        for key in ("map", "mp@1", "mp@5", "mp@10"):
            a, b = got[protocol][key], want[protocol][key]
            assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-6)


def test_saved_model_and_qe_dba(exported):
    root = synthetic.ensure_dataset(SMALL, progress=False)
    keras_res = evaluate.run(root, "synthetic", exported["keras"], image_size=96, progress=False)
    saved_res = evaluate.run(root, "synthetic", exported["version"], progress=False)
    assert recorded_image_size(exported["version"]) == 96
    # uint8 rounding of the resized pixels is the only difference.
    assert saved_res["medium"]["map"] == pytest.approx(keras_res["medium"]["map"], abs=5.0)
    expanded = evaluate.run(root, "synthetic", exported["keras"], image_size=96, qe=1, dba=2, progress=False)
    assert 0 <= expanded["medium"]["map"] <= 100


def test_missing_model(tmp_path):
    with pytest.raises(ValueError, match="no such model"):
        evaluate.descriptor_fn(str(tmp_path / "nope.keras"))


def test_off_the_shelf_is_the_untrained_backbone_with_plain_rmac():
    import keras

    from deep_retrieval.model import DescriptorConfig, build_descriptor_model

    root = synthetic.ensure_dataset(SMALL, progress=False)
    keras.utils.set_random_seed(4)
    got = evaluate.run(root, "synthetic", None, image_size=96, progress=False, backbone="tiny", weights=None)
    keras.utils.set_random_seed(4)
    model = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=None, whitening_dim=None))
    assert model.head.pca is None
    want = _reference(model, groundtruth.load_dataset(root, "synthetic"), 96)
    for protocol in got:
        a, b = got[protocol]["map"], want[protocol]["map"]
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, abs=1e-6)


def test_command_needs_one_model_source():
    import subprocess
    import sys

    for args in ([], ["--model", "m.keras", "--backbone", "tiny"], ["--backbone", "tiny", "--dataset", "x"]):
        result = subprocess.run([sys.executable, "-m", "training.evaluate", *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert "--model" in result.stderr or "--data_root" in result.stderr


def test_no_recorded_image_size_is_an_error_not_a_guess(tmp_path, exported):
    import shutil

    lone = tmp_path / "lone.keras"
    shutil.copy(exported["keras"], lone)  # no config.json beside it
    with pytest.raises(ValueError, match="pass --image_size"):
        recorded_image_size(str(lone))
    assert recorded_image_size(str(lone), 123) == 123
    (tmp_path / "config.json").write_text('{"image_size": 77}')
    assert recorded_image_size(str(lone)) == 77
