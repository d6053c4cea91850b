import os

import numpy as np
import pytest
import tensorflow as tf

from deep_retrieval.data import images
from deep_retrieval.retrieval import extraction
from tests.helpers_images import encoded


def _files(tmp_path):
    paths = []
    for i, (h, w) in enumerate([(40, 60), (40, 60), (60, 40), (40, 60)]):
        p = tmp_path / f"{i}.jpg"
        p.write_bytes(encoded(h, w, i))
        paths.append(str(p))
    return paths


def _mean_color(views):
    return tf.reduce_mean(views[0], axis=(1, 2))


def test_batches_same_sizes_and_keeps_order(tmp_path):
    paths = _files(tmp_path)
    calls = []

    def fn(views):
        calls.append([tuple(v.shape) for v in views])
        return _mean_color(views)

    out, failed = extraction.extract(fn, paths, 30, scales=(1.0, 0.5), batch_size=8, progress=False)
    assert failed.size == 0
    # Read by size: the three landscape images form one batch, wherever they sit.
    assert calls == [[(3, 20, 30, 3), (3, 10, 15, 3)], [(1, 30, 20, 3), (1, 15, 10, 3)]]
    for i, p in enumerate(paths):
        image = tf.image.resize(images.decode(tf.io.read_file(p)), calls[1 if i == 2 else 0][0][1:3],
                                antialias=True)
        np.testing.assert_allclose(out[i], np.asarray(tf.reduce_mean(image, axis=(0, 1))), atol=1e-4)


def test_unreadable_images(tmp_path):
    paths = _files(tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    paths.insert(1, str(bad))
    with pytest.raises(ValueError, match="bad.jpg"):
        extraction.extract(_mean_color, paths, 30, progress=False)
    out, failed = extraction.extract(_mean_color, paths, 30, progress=False, strict=False)
    assert failed.tolist() == [1] and np.all(out[1] == 0) and np.all(out[0] != 0)


def test_boxes_crop_keeping_the_image_scale(tmp_path):
    paths = _files(tmp_path)[:1]  # 60 x 40 (W x H)
    out, _ = extraction.extract(lambda views: tf.cast(tf.shape(views[0])[1:3][None], tf.float32), paths, 30,
                                boxes=[[0, 0, 20, 40]], progress=False)
    assert out[0].tolist() == [20.0, 10.0]  # the 20x40 box at 30/60 of its size


def test_proposal_recall_of_the_grid_hand_worked(tmp_path):
    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model
    from tests import reference

    model = build_descriptor_model(DescriptorConfig(backbone="tiny", weights=None, scales=(1.0,)))
    path = tmp_path / "a.png"
    path.write_bytes(encoded(96, 128, 1, "PNG"))  # a 6x8 map at stride 16, no resize at 128
    x, y, w, h = reference.grid_regions(6, 8, 3)[-1]  # the last level-3 window
    exact = [16 * x, 16 * y, 16 * (x + w), 16 * (y + h)]
    tiny = [0, 0, 4, 4]
    result = extraction.proposal_recall(model, [str(path)] * 2, [exact, tiny], 128, tops=(1, 64),
                                        iou_threshold=0.99, progress=False)
    assert result["grid@all"] == 0.5 and result["grid@64"] == 0.5  # the exact window, not the tiny box
    assert result["grid@1"] == 0.0  # the first region is a level-1 window
    assert result["grid_regions"] == len(reference.grid_regions(6, 8, 3)) and result["images"] == 2


def test_saved_model_describer_names_the_file_that_fails(exported, tmp_path):
    paths = _files(tmp_path)
    describe = extraction.saved_model_describer(exported["version"], progress=False)
    out = describe(paths[:2], boxes=[[0, 0, 30, 20], [float("nan")] * 4])
    assert out.shape == (2, 32)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        describe([paths[0], str(bad)])
    with pytest.raises(ValueError, match="missing.jpg: cannot read"):
        describe([str(tmp_path / "missing.jpg")])


def test_describer_of_a_missing_model_names_it(tmp_path):
    with pytest.raises(ValueError, match="nope.keras: no such model file or SavedModel folder"):
        extraction.describer(str(tmp_path / "nope.keras"))


def test_mixed_sizes_run_in_batches_and_keep_their_order(tmp_path):
    """Landscape and portrait files interleaved: read by size, so each size
    runs as batches, and every row still matches its own file."""
    from PIL import Image

    from tests.helpers_images import textured

    paths = []
    for i in range(6):
        h, w = (30, 40) if i % 2 else (40, 30)
        Image.fromarray(textured(h, w, i)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "pipe.png").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "pipe.png")  # never opened for its size either
    paths.append(str(tmp_path / "pipe.png"))
    calls = []

    def fn(views):
        calls.append(tuple(views[0].shape))
        return tf.reduce_mean(views[0], axis=(1, 2))

    out, failed = extraction.extract(fn, paths, 40, progress=False, strict=False)
    assert sorted(calls) == [(3, 30, 40, 3), (3, 40, 30, 3)]  # two batches, not six
    assert failed.tolist() == [6]
    for i in range(6):
        alone, _ = extraction.extract(fn, [paths[i]], 40, progress=False)
        np.testing.assert_allclose(out[i], alone[0], rtol=1e-6)
    assert extraction.size_order(paths, 40) == [1, 3, 5, 0, 2, 4, 6]  # 30x40 before 40x30, the FIFO last
