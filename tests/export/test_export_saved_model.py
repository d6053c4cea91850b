import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from export import export_saved_model
from tests.helpers_images import encoded, reference_descriptors


def test_signature_matches_keras_model(exported):
    blobs = [encoded(70, 110, 1), encoded(130, 60, 2, "PNG"), encoded(96, 96, 3, "BMP")]
    loaded = tf.saved_model.load(exported["version"])
    out = loaded.signatures["serving_default"](images=tf.constant(blobs))["descriptors"].numpy()
    want = reference_descriptors(exported["model"], blobs, exported["image_size"])
    assert out.shape == (3, 32)
    assert np.abs(out - want).max() <= 1e-5


def test_same_shape_images_run_as_batches_with_one_at_a_time_descriptors(exported, monkeypatch):
    """serving_default groups the request's images by view shapes: a mixed
    request (two sizes interleaved, more than MAX_BATCH of one) gives each
    image its one-at-a-time descriptor, in request order."""
    from export import descriptor_module

    blobs = [encoded(60, 80, i) if i % 3 else encoded(80, 60, i, "PNG") for i in range(20)]
    loaded = tf.saved_model.load(exported["version"])
    out = loaded.signatures["serving_default"](images=tf.constant(blobs))["descriptors"].numpy()
    one = np.concatenate([loaded.signatures["serving_default"](images=tf.constant([b]))["descriptors"].numpy()
                          for b in blobs])
    assert out.shape == (20, 32) and np.abs(out - one).max() <= 1e-5
    assert np.abs(out - reference_descriptors(exported["model"], blobs, exported["image_size"])).max() <= 1e-5
    # The batches it forms, counted in an eager run with MAX_BATCH 4.
    calls = []

    class Counting:
        def __init__(self, model):
            self.model, self.config, self.descriptor_size = model, model.config, model.descriptor_size

        def __call__(self, views, training=None):
            calls.append(int(views[0].shape[0]))
            return self.model(views, training=training)

    monkeypatch.setattr(descriptor_module, "MAX_BATCH", 4)
    module = descriptor_module.DescriptorModule(Counting(exported["model"]), exported["image_size"])
    eager = module.serve(tf.constant(blobs))["descriptors"].numpy()  # eager: one call per batch
    assert np.abs(eager - out).max() <= 1e-5
    assert sorted(calls) == [1, 3, 4, 4, 4, 4]  # 13 landscape, 7 portrait, in chunks of 4
    assert tf.saved_model.load(exported["version"]).signatures["serving_default"](
        images=tf.constant([], tf.string))["descriptors"].shape == (0, 32)


def test_crops_signature_keeps_the_image_scale(exported):
    blobs = [encoded(120, 160, 8), encoded(100, 70, 9, "PNG")]
    boxes = [[10, 20, 110, 95], [float("nan")] * 4]
    loaded = tf.saved_model.load(exported["version"])
    out = loaded.signatures["crops"](images=tf.constant(blobs), boxes=tf.constant(boxes, tf.float32))
    out = out["descriptors"].numpy()
    want = reference_descriptors(exported["model"], blobs[:1], exported["image_size"], boxes[:1])
    assert np.abs(out[0] - want[0]).max() <= 1e-5
    whole = reference_descriptors(exported["model"], blobs[1:], exported["image_size"])
    assert np.abs(out[1] - whole[0]).max() <= 1e-5  # a NaN box: the whole image
    # The 100x75 box of a 160-px-wide image at 96 px becomes 60x45, not 96x72.
    magnified = reference_descriptors(exported["model"], [_crop(blobs[0], boxes[0])], exported["image_size"])
    assert np.abs(out[0] - magnified[0]).max() > 1e-3


def _crop(data, box):
    import io

    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.crop(tuple(int(v) for v in box)).save(buf, "PNG")
    return buf.getvalue()


def test_pixels_signature(exported):
    pixels = np.random.RandomState(4).randint(0, 256, (2, 48, 72, 3)).astype(np.uint8)
    loaded = tf.saved_model.load(exported["version"])
    out = loaded.signatures["pixels"](images=tf.constant(pixels))["descriptors"].numpy()
    blobs = [_png(p) for p in pixels]
    want = reference_descriptors(exported["model"], blobs, exported["image_size"])
    assert np.abs(out - want).max() <= 1e-5


def _png(pixels):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_session_based_load_like_tf_serving(exported):
    blobs = [encoded(80, 100, 5)]
    want = reference_descriptors(exported["model"], blobs, exported["image_size"])
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], exported["version"])
        sig = meta.signature_def["serving_default"]
        assert sig.inputs["images"].dtype == tf.string.as_datatype_enum
        assert sig.outputs["descriptors"].tensor_shape.dim[1].size == 32
        out = sess.run(sig.outputs["descriptors"].name, {sig.inputs["images"].name: np.array(blobs, dtype=object)})
    assert np.abs(out - want).max() <= 1e-5


def test_saved_model_cli_lists_signatures(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run([cli, "show", "--dir", exported["version"], "--all"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "signature_def['serving_default']" in text and "signature_def['pixels']" in text
    assert "signature_def['crops']" in text and "shape: (-1, 4)" in text
    assert "dtype: DT_STRING" in text and "dtype: DT_UINT8" in text
    assert "shape: (-1, 32)" in text and "shape: (-1, -1, -1, 3)" in text


def test_assets_extra(exported):
    extra = os.path.join(exported["version"], "assets.extra")
    with open(os.path.join(extra, "model_info.json")) as f:
        info = json.load(f)
    assert info["descriptor_size"] == 32 and info["scales"] == [0.75, 1.0]
    assert info["backbone"] == "tiny" and info["regions"] == "grid" and info["image_size"] == 96
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(os.path.join(extra, "tf_serving_warmup_requests")))
    assert len(records) == len(export_saved_model.WARMUP_SIZES)
    log = prediction_log_pb2.PredictionLog.FromString(records[0].numpy())
    request = log.predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    blobs = tf.make_ndarray(request.inputs["images"])
    loaded = tf.saved_model.load(exported["version"])
    assert loaded.signatures["serving_default"](images=tf.constant(blobs))["descriptors"].shape == (1, 32)


def test_refuses_to_overwrite_and_bad_model(exported, tmp_path):
    with pytest.raises(ValueError, match="already exists"):
        export_saved_model.export(exported["keras"], exported["version"], 96)
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot load the model"):
        export_saved_model.export(str(bad), str(tmp_path / "out" / "1"), 96)


def test_rpn_model_exports_and_loads_like_tf_serving(tmp_path):
    from deep_retrieval.model.descriptor_model import DescriptorConfig, build_descriptor_model

    model = build_descriptor_model(DescriptorConfig(
        backbone="tiny", weights=None, whitening_dim=16, scales=(1.0,), regions="rpn",
        proposals=24, pre_nms_proposals=100))
    model.save(tmp_path / "rpn.keras")
    export_saved_model.export(str(tmp_path / "rpn.keras"), str(tmp_path / "m" / "1"), image_size=80)
    with open(tmp_path / "m" / "1" / "assets.extra" / "model_info.json") as f:
        assert json.load(f)["regions"] == "rpn"
    blobs = [encoded(70, 110, 6), encoded(120, 50, 7, "PNG")]
    want = reference_descriptors(model, blobs, 80)
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(tmp_path / "m" / "1"))
        sig = meta.signature_def["serving_default"]
        out = sess.run(sig.outputs["descriptors"].name, {sig.inputs["images"].name: np.array(blobs, dtype=object)})
    assert out.shape == (2, 16)
    assert np.abs(out - want).max() <= 1e-5


def test_bfloat16_export_runs_under_tf_servings_loader(exported, tmp_path):
    """--dtype bfloat16: the backbone in bfloat16, float32 descriptors close
    to the float32 export's, and a SavedModel TF Serving's session loader runs."""
    out = str(tmp_path / "bf16" / "1")
    info = export_saved_model.export(exported["keras"], out, image_size=exported["image_size"], dtype="bfloat16")
    assert info["dtype"] == "bfloat16"
    blobs = [encoded(80, 100, 5), encoded(64, 90, 6)]
    want = reference_descriptors(exported["model"], blobs, exported["image_size"])
    with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], out)
        sig = meta.signature_def["serving_default"]
        assert sig.outputs["descriptors"].dtype == tf.float32.as_datatype_enum
        got = sess.run(sig.outputs["descriptors"].name, {sig.inputs["images"].name: np.array(blobs, dtype=object)})
    cosine = np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.99 and np.abs(got - want).max() > 1e-6  # close, and computed in bfloat16
