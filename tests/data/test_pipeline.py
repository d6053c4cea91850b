"""tf.data pipelines: training images keep their aspect ratio, unreadable
files are skipped without being opened."""

import os

import numpy as np
import pytest
from PIL import Image

from deep_retrieval.data import images, pipeline
from tests.helpers_images import textured


def _pil(pixels, size):
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR), np.float32)


def test_training_images_keep_their_aspect_ratio(tmp_path):
    paths, shapes = [], [(60, 80), (90, 45), (50, 50)]  # landscape, portrait, square
    for i, (h, w) in enumerate(shapes):
        pixels = textured(h, w, 10 + i)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    triplets = [[0, 1, 2], [1, 0, 2]]
    ds = pipeline.triplet_dataset(paths, triplets, 40, batch_size=1, seed=0, augment_images=False)
    batches = list(ds)
    got = sorted(tuple(tuple(b[k].shape[1:3]) for k in ("query", "positive", "negative")) for b in batches)
    # One triplet a batch, each image at its own size: longest side 40, never squashed or padded.
    assert got == [((30, 40), (40, 20), (40, 40)), ((40, 20), (30, 40), (40, 40))]
    portrait = next(b["query"][0].numpy() for b in batches if b["query"].shape[1:3] == (40, 20))
    want = _pil(np.asarray(Image.open(paths[1])), (20, 40))
    assert np.abs(portrait - want).mean() < 1.5
    augmented = list(pipeline.triplet_dataset(paths, triplets, 40, batch_size=1, seed=0))
    assert sorted(tuple(tuple(b[k].shape[1:3]) for k in ("query", "positive", "negative"))
                  for b in augmented) == got  # crops zoomed back to the test-time size
    with pytest.raises(ValueError, match="one triplet at a time"):
        pipeline.triplet_dataset(paths, triplets, 40, batch_size=2, seed=0)
    assert [images.scaled_shape(h, w, 40) for h, w in shapes] == [(30, 40), (40, 20), (40, 40)]


def test_image_dataset_skips_fifos_devices_and_oversized_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(textured(30, 40)).save(good)
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would block the pipeline forever
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # reading it would never end
    paths = [str(tmp_path / "pipe.jpg"), str(good), str(tmp_path / "zero.jpg"), str(tmp_path / "missing.jpg")]
    got = [(int(i), tuple(v.shape)) for i, (v,) in pipeline.image_dataset(paths, 40)]
    assert got == [(1, (30, 40, 3))]
    assert "not a regular file" in images.file_problem(paths[0]) == images.file_problem(paths[2])
    assert images.file_problem(str(good), max_bytes=10).startswith(f"{os.path.getsize(good)} bytes, more than")
    assert images.diagnose(paths[0]).startswith("not a regular file")
