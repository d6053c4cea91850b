import numpy as np
import pytest

from deep_retrieval.config import SyntheticConfig
from deep_retrieval.data import groundtruth, synthetic
from deep_retrieval.retrieval import evaluation
from tests.helpers_images import reference_descriptors
from training import evaluate

SMALL = SyntheticConfig(source="facades", train_landmarks=2, images_per_landmark=2, test_landmarks=3,
                        test_images_per_landmark=3, distractors=3, image_width=96, image_height=72, seed=9)


def _reference(model, data, size):
    def desc(paths, boxes=None):
        blobs = [open(p, "rb").read() for p in paths]
        return reference_descriptors(model, blobs, size, boxes)

    db = desc(data.images)
    q = desc(data.queries, data.query_boxes)
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
    with pytest.raises(ValueError, match="resizes images inside its graph"):
        evaluate.run(root, "synthetic", exported["version"], image_size=96, progress=False)
    # uint8 rounding of the resized pixels is the only difference.
    assert saved_res["medium"]["map"] == pytest.approx(keras_res["medium"]["map"], abs=5.0)
    expanded = evaluate.run(root, "synthetic", exported["keras"], image_size=96, qe=1, dba=2, progress=False)
    assert 0 <= expanded["medium"]["map"] <= 100


def test_off_the_shelf_is_the_untrained_backbone_with_plain_rmac():
    import keras

    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model

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


def test_built_in_split_is_named_without_a_path(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    # The built-in split's cache folder, filled with the small split (generating the real one takes minutes).
    home = tmp_path / "keras_home"
    built_in = synthetic.dataset_dir(SyntheticConfig(), cache_dir=str(home / "datasets" / "deep_retrieval"))
    shutil.copytree(synthetic.ensure_dataset(SMALL, progress=False), built_in)
    env = {**os.environ, "KERAS_HOME": str(home)}
    command = [sys.executable, "-m", "training.evaluate", "--backbone", "tiny", "--weights", "none",
               "--image_size", "48", "--noprogress"]
    result = subprocess.run([*command, "--dataset", "synthetic"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"the built-in synthetic split, {built_in}/synthetic" in result.stdout
    assert "medium" in result.stdout.lower()
    result = subprocess.run([*command, "--dataset", "roxford5k"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode != 0 and "--data_root" in result.stderr and "Traceback" not in result.stderr


def test_no_recorded_image_size_is_an_error_not_a_guess(tmp_path, exported):
    import json

    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
    from export import export_saved_model

    root = synthetic.ensure_dataset(SMALL, progress=False)
    # The fixture's model was saved without an image size: nothing is guessed.
    with pytest.raises(ValueError, match="carries no image size.*pass --image_size"):
        evaluate.run(root, "synthetic", exported["keras"], progress=False)
    with pytest.raises(ValueError, match="carries no image size"):
        export_saved_model.export(exported["keras"], str(tmp_path / "e" / "1"))
    # A model built for 77 px carries it through saving, export and evaluation.
    model = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=None, whitening_dim=None), 77)
    model.save(str(tmp_path / "m.keras"))
    info = export_saved_model.export(str(tmp_path / "m.keras"), str(tmp_path / "e" / "1"))
    assert info["image_size"] == 77
    assert json.load(open(tmp_path / "e" / "1" / "assets.extra" / "model_info.json"))["image_size"] == 77
    assert 0 <= evaluate.run(root, "synthetic", str(tmp_path / "m.keras"), progress=False)["medium"]["map"] <= 100


def _holidays(root):
    """Three groups of near-duplicate photos, Holidays-style: each group's first
    image is its query and also a database image; one image is stored sideways."""
    import pickle

    from PIL import Image

    folder = root / "tinyholidays" / "jpg"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    names, upright, groups = [], {}, []
    for g in range(3):
        base = rng.randint(0, 256, (72, 96, 3)).astype(np.float64)
        members = []
        for j in range(3 if g < 2 else 2):
            name = f"{g}0{j}.png"
            if (g, j) == (2, 1):  # a positive that looks nothing like its query
                base = rng.randint(0, 256, base.shape).astype(np.float64)
            pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            upright[name] = pixels
            stored = np.rot90(pixels) if name == "101.png" else pixels  # turned 90 degrees anticlockwise
            Image.fromarray(np.ascontiguousarray(stored)).save(folder / name)
            members.append(len(names))
            names.append(name)
        groups.append(members)
    gnd = [{"ok": np.array(m)} for m in groups]  # the query's own index included, as Holidays lists it
    cfg = {"imlist": names, "qimlist": [names[m[0]] for m in groups], "gnd": gnd, "rotate": {"101.png": 90}}
    with open(root / "tinyholidays" / "gnd_tinyholidays.pkl", "wb") as f:
        pickle.dump(cfg, f)
    return upright, groups


def test_holidays_query_in_its_own_database_and_upright_images(tmp_path):
    import io

    import keras
    from PIL import Image

    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model

    upright, groups = _holidays(tmp_path)
    data = groundtruth.load_dataset(str(tmp_path), "tinyholidays")
    assert data.query_indices == [0, 3, 6]
    turned = data.images[4]
    assert turned.endswith("upright/101.png.png")
    np.testing.assert_array_equal(np.asarray(Image.open(turned)), upright["101.png"])

    keras.utils.set_random_seed(5)  # the same untrained model in both
    got = evaluate.run(str(tmp_path), "tinyholidays", None, image_size=96, progress=False,
                       backbone="tiny", weights=None)
    assert set(got) == {"holidays"}
    keras.utils.set_random_seed(5)
    model = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=None, whitening_dim=None))

    def blob(name):
        buf = io.BytesIO()
        Image.fromarray(upright[name]).save(buf, "PNG")
        return buf.getvalue()

    names = sorted(upright, key=lambda n: (n[0], n[2]))
    db = reference_descriptors(model, [blob(n) for n in names], 96)
    aps = []
    for members in groups:
        query = members[0]
        order = [i for i in np.argsort(-(db @ db[query]), kind="stable") if i != query]  # the query skipped
        hits = [r for r, i in enumerate(order) if i in members[1:]]
        aps.append(np.mean([(k / r if r else 1.0) / 2 + (k + 1) / (r + 1) / 2 for k, r in enumerate(hits)]))
    assert got["holidays"]["map"] == pytest.approx(100 * np.mean(aps), abs=1e-4)
    # Had the query counted as its own first hit, the hard query's AP would rise.
    assert got["holidays"]["map"] < 100 and aps[2] < 0.5
