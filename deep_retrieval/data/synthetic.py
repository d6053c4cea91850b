"""The built-in landmark dataset, generated deterministically on first use.

With ``source="photos"`` (the default) each landmark is a real photograph
(`deep_retrieval.data.photos`: animals, musicians, planets, paintings and
photographed objects from Debian packages): one photo is one instance, and
each image of it is a new view made by a renderer
(`landmarks.RENDERERS`, ``config.renderer`` for training): `views.photo_view`
(perspective change, zoom and crop, rotation, occlusion by other
photographs, a photographed background, lighting, colour, blur) or
`camera_views.camera_view` (a pinhole camera photographing the instance
as a turned plane, often small or cut by the frame, among other
photographs, behind poles and foreground, with sensor noise and JPEG).
Three benchmarks are written beside the training set, all of them
validation splits (`SCENE_SPLITS`, then ``synthetic``):

- ``scenes`` and ``scenes_camera``: photographs of another kind and
  another source than any training photo (monuments, coasts, forests,
  machinery) among landmark-free views, rendered by ``photo_view`` and by
  ``camera``. Whichever renderer training uses, one of them was made by
  the other: transfer to views training was not rendered for.
- ``synthetic``: held-out photos of the training sources among views of
  unrelated photographs, rendered as training is.

``sources.csv`` records every photo used (package, path, licence, SHA-1) and
its role.

With ``source="facades"`` each landmark is a procedural planar facade (a wall
colour and texture, a grid of windows, ornaments, a sign) placed in a
procedural cluttered scene (`views.photograph`); distractors hold clutter only.
It needs no package and is what the unit tests and the ``tiny`` preset use.

Both record each landmark's bounding box. Optional label noise (wrong
labels, junk images) exercises the cleaning step.

Layout written under the cache directory::

    train/*.jpg, train.csv          image,label,x0,y0,x1,y1 (the training manifest)
    train_noise.csv                 image,kind,true_label (the injected noise)
    synthetic/jpg/*.jpg             held-out queries and database
    synthetic/gnd_synthetic.pkl     Revisited Oxford ground truth
    synthetic/boxes.csv             image,x0,y0,x1,y1: the landmark box of every
                                    held-out image showing one (proposal recall)
    scenes/jpg/*.jpg, scenes/gnd_scenes.pkl, scenes_camera/...
                                    the places, by each renderer (photos only)
    sources.csv                     role,index,source,package,licence,sha1 (photos only)
    COMPLETE                        written last; its presence marks a full dataset
"""

import dataclasses
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pandas as pd
from tqdm import tqdm

from deep_retrieval.config import SyntheticConfig
from deep_retrieval.data.landmarks import Facades, Photos, Scenes

FORMAT_VERSION = 5
DATASET_NAME = "synthetic"
SCENES_NAME = "scenes"
SCENE_SPLITS = {SCENES_NAME: "photo_view", "scenes_camera": "camera"}
"""The places' splits by name, each with the renderer of its views."""


def default_cache_dir():
    """``$KERAS_HOME/datasets/deep_retrieval`` (``~/.keras`` without KERAS_HOME)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "datasets", "deep_retrieval")


def _folder_listing(directory):
    """Names, sizes and modification times under ``directory``: a changed
    collection gets a new dataset."""
    listing = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            listing.append((os.path.relpath(os.path.join(root, name), directory), stat.st_size, stat.st_mtime_ns))
    return listing


def dataset_dir(config, cache_dir=None):
    """The folder of the dataset described by ``config`` (a hash of it, and
    of the folder's listing with ``source="folder"``)."""
    described = {"v": FORMAT_VERSION, **dataclasses.asdict(config)}
    if config.source == "folder":
        described["listing"] = _folder_listing(config.photos_dir)
    blob = json.dumps(described, sort_keys=True)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    return os.path.join(cache_dir or default_cache_dir(), f"synthetic-v{FORMAT_VERSION}-{digest}")


def _save_jpeg(img, path, rng):
    img.save(path, "JPEG", quality=int(rng.integers(40, 92)))


def _write_benchmark(source, name, out_dir, config, per_landmark, distractors, seeds, bar):
    """Writes a Revisited-Oxford benchmark ``out_dir/name``: one query per
    landmark of ``source``'s "test" split (cropped to its box by the
    evaluation), ``per_landmark`` database views of each, ``distractors``
    landmark-free views; Easy/Hard/Junk by the share of the landmark
    visible. Returns the ``(image, x0, y0, x1, y1)`` landmark boxes."""
    size = (config.image_width, config.image_height)
    image_dir = os.path.join(out_dir, name, "jpg")
    os.makedirs(image_dir)
    imlist, qimlist, gnd, boxes = [], [], [], []
    db_labels, db_visible = [], []
    query_tag, view_tag, distractor_tag = seeds
    for lm in range(source.counts["test"]):
        render = source.landmark("test", lm)
        rng = np.random.default_rng([config.seed, query_tag, lm])
        qname = f"q{lm:04d}"
        img, box, _ = render(rng, size, 0.1)
        _save_jpeg(img, os.path.join(image_dir, qname + ".jpg"), rng)
        qimlist.append(qname)
        gnd.append({"bbx": np.asarray(box, dtype=np.float64)})
        boxes.append((qname,) + tuple(box))
        bar.update()
        for k in range(per_landmark):
            rng = np.random.default_rng([config.seed, view_tag, lm, k])
            view = f"t{lm:04d}_{k:02d}"
            img, box, visible = render(rng, size, rng.uniform(*source.difficulty))
            if box[2] > box[0] and box[3] > box[1]:
                boxes.append((view,) + tuple(box))
            _save_jpeg(img, os.path.join(image_dir, view + ".jpg"), rng)
            imlist.append(view)
            db_labels.append(lm)
            db_visible.append(visible)
            bar.update()
    for d in range(distractors):
        rng = np.random.default_rng([config.seed, distractor_tag, d])
        view = f"x{d:04d}"
        _save_jpeg(source.background(rng, size, d, "test"), os.path.join(image_dir, view + ".jpg"), rng)
        imlist.append(view)
        db_labels.append(-1)
        db_visible.append(0.0)
        bar.update()
    db_labels, db_visible = np.asarray(db_labels), np.asarray(db_visible)
    for q, entry in enumerate(gnd):
        same = db_labels == q
        # Easy: most of the landmark visible; hard: partly; junk: barely.
        entry["easy"] = np.nonzero(same & (db_visible >= source.easy))[0]
        entry["hard"] = np.nonzero(same & (db_visible >= source.junk) & (db_visible < source.easy))[0]
        entry["junk"] = np.nonzero(same & (db_visible < source.junk))[0]
    with open(os.path.join(out_dir, name, f"gnd_{name}.pkl"), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return boxes


def _scenes(config):
    """The places' source (`Scenes`), or None (facades; or a user's folder
    without the packages)."""
    if config.source == "facades" or not config.scene_distractors:
        return None
    try:
        return Scenes(config)
    except FileNotFoundError as e:
        if config.source != "folder":
            raise
        tqdm.write(f"no {SCENES_NAME} validation split: {e}")
        return None


def generate(config, out_dir, progress=True):
    """Writes the dataset for ``config`` into ``out_dir`` (see module docs)."""
    size = (config.image_width, config.image_height)
    source = Facades(config) if config.source == "facades" else Photos(config)
    scenes = _scenes(config)
    for path, reason in source.problems[:20]:
        tqdm.write(f"  skipped {path}: {reason}")
    n_train, n_test = source.counts["train"], source.counts["test"]
    train_dir = os.path.join(out_dir, "train")
    os.makedirs(train_dir)
    total = (
        n_train * config.images_per_landmark
        + n_test * (config.test_images_per_landmark + 1)
        + config.distractors
    )
    if scenes:
        total += len(SCENE_SPLITS) * (scenes.counts["test"] * (config.scene_images_per_landmark + 1)
                                      + config.scene_distractors)
    bar = tqdm(total=total, desc="built-in dataset", unit="img", disable=not progress)

    rows, noise = [], []
    noisy_rng = np.random.default_rng([config.seed, 17])
    for lm in range(n_train):
        render = source.landmark("train", lm)
        for k in range(config.images_per_landmark):
            rng = np.random.default_rng([config.seed, 1, lm, k])
            name = f"l{lm:04d}_{k:02d}.jpg"
            img, box, _ = render(rng, size, rng.uniform(*source.train_difficulty))
            label = lm
            draw = noisy_rng.random()
            if draw < config.label_noise:
                label = int((lm + noisy_rng.integers(1, n_train)) % n_train)
                noise.append((name, "mislabeled", lm))
                box = None
            elif draw < config.label_noise + config.junk_noise:
                img, box = source.background(rng, size, lm * config.images_per_landmark + k, "train"), None
                noise.append((name, "junk", -1))
            _save_jpeg(img, os.path.join(train_dir, name), rng)
            rows.append((f"train/{name}", label) + (box if box else (None,) * 4))
            bar.update()
    columns = ["image", "label", "x0", "y0", "x1", "y1"]
    pd.DataFrame(rows, columns=columns).to_csv(os.path.join(out_dir, "train.csv"), index=False)
    pd.DataFrame(noise, columns=["image", "kind", "true_label"]).to_csv(
        os.path.join(out_dir, "train_noise.csv"), index=False
    )
    test_boxes = _write_benchmark(source, DATASET_NAME, out_dir, config, config.test_images_per_landmark,
                                  config.distractors, (3, 4, 5), bar)
    pd.DataFrame(test_boxes, columns=["image", "x0", "y0", "x1", "y1"]).to_csv(
        os.path.join(out_dir, DATASET_NAME, "boxes.csv"), index=False
    )
    for k, (name, renderer) in enumerate(SCENE_SPLITS.items() if scenes else ()):
        _write_benchmark(scenes.rendered_by(renderer), name, out_dir, config, config.scene_images_per_landmark,
                         config.scene_distractors, (6 + 3 * k, 7 + 3 * k, 8 + 3 * k), bar)
    bar.close()
    described = source.sources + (scenes.sources if scenes else [])
    if described:
        pd.DataFrame(
            [(role, i, p.source, p.package, p.licence, p.sha1) for role, i, p in described],
            columns=["role", "index", "source", "package", "licence", "sha1"],
        ).to_csv(os.path.join(out_dir, "sources.csv"), index=False)


def benchmarks(root):
    """The benchmarks of a built-in dataset folder that exist, the places
    (`SCENE_SPLITS`) first: ``[name, ...]``."""
    return [name for name in (*SCENE_SPLITS, DATASET_NAME)
            if os.path.exists(os.path.join(root, name, f"gnd_{name}.pkl"))]


def ensure_dataset(config=None, cache_dir=None, progress=True):
    """Returns the dataset folder, generating it on first use.

    Generation writes into a temporary sibling folder that is renamed into
    place when complete, so an interrupted run leaves no half dataset.
    """
    config = config or SyntheticConfig()
    out_dir = dataset_dir(config, cache_dir)
    if os.path.exists(os.path.join(out_dir, "COMPLETE")):
        return out_dir
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(config, tmp, progress)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        json.dump(dataclasses.asdict(config), f)
    if os.path.isdir(out_dir) and not os.path.exists(os.path.join(out_dir, "COMPLETE")):
        shutil.rmtree(out_dir, ignore_errors=True)  # left by an older crash
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # Another process finished the same dataset first: use theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(out_dir, "COMPLETE")):
            raise
    return out_dir
