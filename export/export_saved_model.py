"""Exports a trained descriptor model as a SavedModel for TensorFlow Serving.

    python -m export.export_saved_model --model runs/demo/model.keras \
        --output_dir models/deep_retrieval/1

Writes the SavedModel (signatures ``serving_default``, ``crops`` and ``pixels``, see
`export.descriptor_module`), ``assets.extra/tf_serving_warmup_requests`` (a
few PredictionLog records TF Serving replays at load with
``--enable_model_warmup``) and ``assets.extra/model_info.json`` (descriptor
size, scales, backbone, regions, pooling, image size, training run id). The export is
written beside the target and renamed into place, so a serving process never
sees a half-written version.
"""

import hashlib
import io
import json
import os
import shutil

from absl import app, flags

from deep_retrieval import cli


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("model", None, "Trained descriptor model (.keras file).")
    flags.DEFINE_string("output_dir", None, "Versioned export folder, e.g. models/deep_retrieval/1.")
    flags.DEFINE_integer("image_size", None, "Longest image side in pixels (default: the one the model "
                         "carries; required for a model saved without one).")
    flags.DEFINE_string("model_name", "deep_retrieval", "Model name used in the warm-up requests.")
    flags.DEFINE_string("run_id", None, "Training run id recorded in model_info.json (default: a hash "
                        "of the .keras file).")
    flags.DEFINE_boolean("overwrite", False, "Replace an existing export at --output_dir.")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Precision of the exported backbone (default: "
                      "the model's own; bfloat16 keeps the head, whitening and sums in float32, descriptors "
                      "float32).")


WARMUP_SIZES = ((480, 640), (640, 480), (64, 64))


def warmup_records(model_name, sizes=WARMUP_SIZES):
    """Serialized PredictionLog records: one single-image request per size."""
    import numpy as np
    from PIL import Image
    from tensorflow_serving.apis import prediction_log_pb2

    from serving import client

    records = []
    rng = np.random.default_rng(0)
    for h, w in sizes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        request = client.predict_request(model_name, [buf.getvalue()])
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        records.append(log.SerializeToString())
    return records


def export(model_path, output_dir, image_size=None, model_name="deep_retrieval", run_id=None, overwrite=False,
           dtype=None):
    """Exports ``model_path`` to ``output_dir`` for images of longest side
    ``image_size`` (default: the model's own), its backbone in ``dtype``
    (default: the model's own); returns the model info dict."""
    import tensorflow as tf

    from deep_retrieval.model.descriptor_model import for_inference, load_descriptor_model
    from export.descriptor_module import DescriptorModule

    if not os.path.isfile(model_path):
        raise ValueError(f"{model_path}: model file not found")
    if os.path.exists(output_dir) and not overwrite:
        raise ValueError(f"{output_dir} already exists; pass --overwrite or use a new version number")
    model, image_size = load_descriptor_model(model_path, image_size)
    if run_id is None:
        with open(model_path, "rb") as f:
            run_id = hashlib.sha1(f.read()).hexdigest()[:12]
    model = for_inference(model, dtype)
    module = DescriptorModule(model, image_size)
    tmp = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    module.archive().write_out(tmp, verbose=False)
    extra = os.path.join(tmp, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(extra, "tf_serving_warmup_requests")) as writer:
        for record in warmup_records(model_name):
            writer.write(record)
    info = {
        "descriptor_size": int(model.descriptor_size),
        "backbone": model.config.backbone,
        "scales": list(model.config.scales),
        "levels": model.config.levels,
        "include_global": model.config.include_global,
        "whitening_dim": model.config.whitening_dim,
        "regions": model.config.regions,
        "proposals": model.config.proposals if model.config.regions == "rpn" else None,
        "pooling": model.config.pooling,
        "dtype": model.config.dtype,
        "multiscale_power": model.config.multiscale_power,
        "image_size": int(image_size),
        "training_run_id": run_id,
        "source": os.path.abspath(model_path),
    }
    with open(os.path.join(extra, "model_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    os.replace(tmp, output_dir)
    return info


def main(argv):
    del argv
    if not flags.FLAGS.model or not flags.FLAGS.output_dir:
        raise app.UsageError("--model and --output_dir are required")
    info = export(flags.FLAGS.model, flags.FLAGS.output_dir, flags.FLAGS.image_size, flags.FLAGS.model_name,
                  flags.FLAGS.run_id, flags.FLAGS.overwrite, flags.FLAGS.dtype)
    print(f"exported to {flags.FLAGS.output_dir}: {json.dumps(info)}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
