import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from tests.helpers_images import encoded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def photos(tmp_path):
    """Subfolders, two image sizes (three of one size, so they share a
    group), and files that cannot be described."""
    root = tmp_path / "photos"
    (root / "a" / "b").mkdir(parents=True)
    (root / "wide").mkdir()
    good = {"one.jpg": encoded(60, 80, 1), "a/two.jpg": encoded(60, 80, 2), "a/b/three.jpg": encoded(60, 80, 3),
            "wide/four.png": encoded(40, 120, 4, "PNG"), "a/b/five.jpg": encoded(90, 70, 5)}
    bad = {"corrupt.jpg": b"\xff\xd8 truncated", "a/empty.png": b"", "a/b/text.png": b"not an image at all"}
    for name, data in {**good, **bad}.items():
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("skipped: not an image type")
    return root, good, bad


def _one_at_a_time(saved_model, blobs):
    """The SavedModel's own descriptors, one image per call."""
    import tensorflow as tf

    signature = tf.saved_model.load(saved_model).signatures["serving_default"]
    return {name: signature(images=tf.constant([data]))["descriptors"].numpy()[0] for name, data in blobs.items()}


def _check_output(out, saved_model, good, bad, shards=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from deep_retrieval.retrieval.descriptor_files import read_run_info

    frame = pd.read_parquet(out)  # a file or a folder of shards
    errors_path = f"{out}.errors.csv"
    if shards:
        files = sorted(os.listdir(out))
        assert files == [f"descriptors-{i:05d}-of-{shards:05d}.parquet" for i in range(shards)]
        out = os.path.join(out, files[0])
    assert sorted(frame["image"]) == sorted(good)  # one row per decodable image
    want = _one_at_a_time(saved_model, good)
    for name, vector in zip(frame["image"], frame["descriptor"]):
        np.testing.assert_allclose(vector, want[name], atol=1e-5)
    schema = pq.read_schema(out)  # serving.extract's schema and run record
    assert schema.field("descriptor").type == pa.list_(pa.float32()) and schema.field("image").type == pa.string()
    assert read_run_info(out)["model_version"] == 1
    errors = pd.read_csv(errors_path, dtype=str, keep_default_na=False)
    reasons = dict(zip(errors["image"], errors["reason"]))
    assert sorted(reasons) == sorted(bad)
    assert reasons["a/empty.png"] == "empty file"
    assert reasons["corrupt.jpg"].startswith("INVALID_ARGUMENT: ")


def _beam_extract(exported, images, out, *flags):
    return subprocess.run(
        [sys.executable, "-m", "serving.beam_extract", "--saved_model", exported["version"], "--images", str(images),
         "--output", str(out), *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_direct_runner_over_a_folder_with_bad_files(exported, photos, tmp_path):
    # The default --batch_size (16) exceeds every size group here: with GroupIntoBatches, the DirectRunner
    # emitted the partial batches after the file sinks' GroupByKey had completed and died on an assertion.
    root, good, bad = photos
    out = tmp_path / "out" / "d.parquet"
    out.parent.mkdir()
    result = _beam_extract(exported, root, out, "--runner", "DirectRunner")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(good)} descriptors written" in result.stdout and f"{len(bad)} images failed" in result.stdout
    assert "notes.txt: .txt: not an image type" in result.stderr  # skipped files reported, as serving.extract does
    _check_output(str(out), exported["version"], good, bad)


def test_a_retried_bundle_adds_no_row_twice(exported, photos, tmp_path, monkeypatch):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from deep_retrieval.retrieval.image_lists import list_images
    from serving import beam_inference

    root, good, bad = photos
    calls = tmp_path / "calls"
    real = beam_inference.describe_group

    def flaky(signature, group):  # the first group's first attempt dies, after describing it
        out = real(signature, group)
        with open(calls, "a") as f:
            f.write("call\n")
        if open(calls).read().count("call") == 1:
            raise RuntimeError("worker lost")
        return out

    monkeypatch.setattr(beam_inference, "describe_group", flaky)
    items, _ = list_images(str(root))
    out = str(tmp_path / "shards")
    # The bundle-based DirectRunner retries a failed bundle (up to 4 times), as distributed runners do.
    with beam.Pipeline(options=PipelineOptions(["--runner", "BundleBasedDirectRunner"])) as pipeline:
        beam_inference.build(pipeline, items, exported["version"], out, batch_size=2,
                             run_info=beam_inference.run_info(exported["version"], "serving_default"), shard_size=3)
    assert open(calls).read().count("call") > 1  # the failure happened and the bundle ran again
    _check_output(out, exported["version"], good, bad, shards=3)  # 8 files, 3 to a shard


def test_a_rerun_replaces_the_output_whole_with_even_shards(exported, photos, tmp_path):
    root, good, bad = photos
    out = tmp_path / "shards"
    first = _beam_extract(exported, root, out, "--shard_size", "3")  # 8 files: 3 shards, errors listed
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(os.listdir(out)) == 3 and os.path.exists(f"{out}.errors.csv")
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for i in range(7):
        (fewer / f"{i}.jpg").write_bytes(encoded(60, 80, 10 + i))
    second = _beam_extract(exported, fewer, out, "--shard_size", "2")  # 7 images: 4 shards of 2, 2, 2, 1
    assert second.returncode == 0, second.stderr[-3000:]
    assert "7 descriptors written" in second.stdout
    files = sorted(os.listdir(out))
    assert files == [f"descriptors-{i:05d}-of-00004.parquet" for i in range(4)]  # the 3 old shards are gone
    sizes = sorted(len(pd.read_parquet(out / f)) for f in files)
    assert sizes == [1, 2, 2, 2]
    assert sorted(pd.read_parquet(out)["image"]) == [f"{i}.jpg" for i in range(7)]
    assert not os.path.exists(f"{out}.errors.csv")  # no failure this time: the old list is gone too
