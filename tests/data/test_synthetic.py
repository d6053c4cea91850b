import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from deep_retrieval.config import SyntheticConfig
from deep_retrieval.data import groundtruth, photos, synthetic

SMALL = SyntheticConfig(
    source="facades", train_landmarks=3, images_per_landmark=3, test_landmarks=2,
    test_images_per_landmark=3, distractors=2, label_noise=0.25, junk_noise=0.2,
    image_width=96, image_height=72, seed=5,
)


def _digest(folder):
    h = hashlib.sha1()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name == "COMPLETE":
                continue
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_layout_ground_truth_and_boxes(tmp_path):
    root = synthetic.ensure_dataset(SMALL, cache_dir=str(tmp_path), progress=False)
    assert os.path.exists(os.path.join(root, "COMPLETE"))
    train = pd.read_csv(os.path.join(root, "train.csv"))
    assert len(train) == 9 and set(train.columns) == {"image", "label", "x0", "y0", "x1", "y1"}
    boxed = train.dropna()
    assert ((boxed.x0 >= 0) & (boxed.x1 <= 96) & (boxed.y0 >= 0) & (boxed.y1 <= 72)).all()
    assert ((boxed.x1 > boxed.x0) & (boxed.y1 > boxed.y0)).all()
    noise = pd.read_csv(os.path.join(root, "train_noise.csv"))
    assert set(noise.kind) <= {"mislabeled", "junk"} and len(noise) > 0
    ds = groundtruth.load_dataset(root, "synthetic")
    assert len(ds.queries) == 2 and len(ds.images) == 2 * 3 + 2
    for q, g in enumerate(ds.gnd):
        members = np.concatenate([g["easy"], g["hard"], g["junk"]])
        assert sorted(members.tolist()) == [3 * q, 3 * q + 1, 3 * q + 2]
        x0, y0, x1, y1 = ds.query_boxes[q]
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 72
    with Image.open(ds.images[0]) as im:
        assert im.size == (96, 72) and im.mode == "RGB"
    assert synthetic.benchmarks(root) == ["synthetic"]  # procedural facades: no scenes split


def test_deterministic_and_cached(tmp_path):
    a = synthetic.ensure_dataset(SMALL, cache_dir=str(tmp_path / "a"), progress=False)
    b = synthetic.ensure_dataset(SMALL, cache_dir=str(tmp_path / "b"), progress=False)
    assert _digest(a) == _digest(b)
    mtime = os.path.getmtime(os.path.join(a, "COMPLETE"))
    assert synthetic.ensure_dataset(SMALL, cache_dir=str(tmp_path / "a"), progress=False) == a
    assert os.path.getmtime(os.path.join(a, "COMPLETE")) == mtime
    other = synthetic.dataset_dir(SyntheticConfig(seed=6), str(tmp_path))
    assert other != synthetic.dataset_dir(SyntheticConfig(seed=5), str(tmp_path))


def test_photo_views_use_disjoint_real_photographs(tmp_path):

    config = SyntheticConfig(
        source="photos", train_landmarks=3, images_per_landmark=2, test_landmarks=2,
        test_images_per_landmark=3, distractors=2, scene_images_per_landmark=1, scene_distractors=3,
        image_width=96, image_height=72, seed=2,
    )
    try:
        root = synthetic.ensure_dataset(config, cache_dir=str(tmp_path), progress=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sources = pd.read_csv(os.path.join(root, "sources.csv"))
    train = set(sources[sources.role == "train"].source)
    test = set(sources[sources.role == "test"].source)
    distractors = set(sources[sources.role == "distractor"].source)
    test_clutter = set(sources[sources.role == "test_clutter"].source)
    scenes = set(sources[sources.role == "scene"].source)
    scene_distractors = set(sources[sources.role == "scene_distractor"].source)
    assert len(train) == 3 and len(test) == 2 and len(scenes) >= 60
    assert not (train & test) and not ((train | test) & (distractors | test_clutter | scenes | scene_distractors))
    assert not (distractors & test_clutter) and not (scenes & scene_distractors)
    # What validates (the scenes split) is another kind of photo than any training source.
    assert not any(s.startswith("explore_monuments") or s.startswith("templates/") for s in train | test)
    by_source = {p.source: p for p in photos.training_photos(config.photos_dir) + photos.scene_photos()}
    assert all(by_source[s].sha1 == h for s, h in zip(sources.source, sources.sha1) if s in by_source)
    assert set(sources.licence) <= set(photos.LICENCES.values())
    ds = groundtruth.load_dataset(root, "synthetic")
    assert len(ds.queries) == 2 and len(ds.images) == 2 * 3 + 2
    for q, g in enumerate(ds.gnd):
        members = np.concatenate([g["easy"], g["hard"], g["junk"]])
        assert sorted(members.tolist()) == [3 * q, 3 * q + 1, 3 * q + 2]
    with Image.open(ds.images[0]) as im:
        assert im.size == (96, 72) and im.mode == "RGB"
    assert synthetic.benchmarks(root) == ["scenes", "scenes_camera", "synthetic"]
    # The places by each renderer: the same queries and ground truth layout,
    # other pixels.
    val, camera = (groundtruth.load_dataset(root, name) for name in ("scenes", "scenes_camera"))
    for split in (val, camera):
        assert len(split.queries) == len(scenes) and len(split.images) == len(scenes) + 3
    assert [os.path.basename(p) for p in val.images] == [os.path.basename(p) for p in camera.images]
    with Image.open(val.images[0]) as a, Image.open(camera.images[0]) as b:
        assert a.size == b.size and np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() > 10


def test_renderer_chooses_the_training_views_not_the_photos(tmp_path):
    base = dict(source="photos", train_landmarks=2, images_per_landmark=2, test_landmarks=1,
                test_images_per_landmark=1, distractors=1, scene_images_per_landmark=1, scene_distractors=1,
                image_width=96, image_height=72, seed=4)
    roots = {}
    for renderer in ("photo_view", "camera"):
        try:
            roots[renderer] = synthetic.ensure_dataset(SyntheticConfig(renderer=renderer, **base),
                                                       cache_dir=str(tmp_path), progress=False)
        except FileNotFoundError as e:
            pytest.skip(str(e))
    a, b = (pd.read_csv(os.path.join(roots[r], "sources.csv")) for r in ("photo_view", "camera"))
    pd.testing.assert_frame_equal(a, b)  # the same photographs in the same roles
    for name in ("train/l0000_00.jpg", "synthetic/jpg/t0000_00.jpg"):
        with Image.open(os.path.join(roots["photo_view"], name)) as x, Image.open(
                os.path.join(roots["camera"], name)) as y:
            assert np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() > 10
    # The places' splits do not depend on the training renderer.
    for name in ("scenes", "scenes_camera"):
        assert _digest(os.path.join(roots["photo_view"], name)) == _digest(os.path.join(roots["camera"], name))
    with pytest.raises(ValueError, match="renderer"):
        SyntheticConfig(renderer="blender")


def test_folder_of_own_photos_becomes_instances(tmp_path):
    folder = tmp_path / "mine" / "sub"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        # Smooth random images: distinct, and larger than the minimum side.
        small = rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)
        Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(folder / f"p{i}.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / "notes.txt").write_text("ignored")
    config = SyntheticConfig(source="folder", photos_dir=str(tmp_path / "mine"), images_per_landmark=2,
                             test_images_per_landmark=2, distractors=2, scene_images_per_landmark=1,
                             scene_distractors=3, image_width=96, image_height=72)
    root = synthetic.ensure_dataset(config, cache_dir=str(tmp_path / "cache"), progress=False)
    sources = pd.read_csv(os.path.join(root, "sources.csv"))
    mine = sources[sources.role.isin(["train", "test"])]
    assert sorted(mine.source) == [f"sub/p{i}.jpg" for i in range(5)]
    assert (sources.role == "test").sum() == 2
    train = pd.read_csv(os.path.join(root, "train.csv"))
    assert len(train) == 3 * 2 and train.label.nunique() == 3
    ds = groundtruth.load_dataset(root, "synthetic")
    assert len(ds.queries) == 2 and len(ds.images) == 2 * 2 + 2
    # The packages' scenes validate a user's collection too, when installed.
    try:
        photos.scene_photos()
        expected = ["scenes", "scenes_camera", "synthetic"]
    except FileNotFoundError:
        expected = ["synthetic"]
    assert synthetic.benchmarks(root) == expected
    # A changed collection is a new dataset.
    Image.fromarray(np.zeros((240, 320, 3), np.uint8)).save(folder / "p5.jpg")
    assert synthetic.dataset_dir(config, str(tmp_path / "cache")) != root


def test_surroundings_set_aside_are_never_instances(tmp_path):
    config = SyntheticConfig(source="photos", surroundings=12, train_landmarks=4, images_per_landmark=1,
                             test_landmarks=2, test_images_per_landmark=1, distractors=1, scene_distractors=0,
                             image_width=96, image_height=72, seed=3)
    try:
        root = synthetic.ensure_dataset(config, cache_dir=str(tmp_path), progress=False)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    sources = pd.read_csv(os.path.join(root, "sources.csv"))
    aside = set(sources[sources.role == "surroundings"].source)
    instances = set(sources[sources.role.isin(["train", "test"])].source)
    assert len(aside) == 12 and not (aside & instances)
    assert not any(s.startswith("stamps/") for s in aside)  # cut-outs are instances, not surroundings
    # Without surroundings set aside, those photos may be instances: the same
    # seed draws other instances once 12 photos are taken out.
    plain = pd.read_csv(os.path.join(synthetic.ensure_dataset(
        SyntheticConfig(**{**config.__dict__, "surroundings": 0}), cache_dir=str(tmp_path), progress=False),
        "sources.csv"))
    assert "surroundings" not in set(plain.role)
    with pytest.raises(ValueError, match="surroundings"):
        SyntheticConfig(surroundings=-1)
