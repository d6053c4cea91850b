"""The Beam pipeline of `serving.beam_extract`: files read, grouped by image
size and described by an exported SavedModel through ``RunInference``.

`build` adds it to a pipeline; `SavedModelHandler` is the ``RunInference``
model handler and `describe_group` the call it makes on each group.
"""

import typing

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

KEY_SPREAD = 16
"""Shards of each image size's key (``GroupIntoBatches`` is per key)."""


def read_image(item, max_bytes):
    """``(name, bytes)``, or ``(name, reason)`` when the file cannot be read."""
    import os

    name, path = item
    if "://" in path:
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(path) as f:
                data = f.read(max_bytes + 1)
        except Exception as e:  # noqa: BLE001 - any file system's error is this file's reason
            return name, f"cannot read file: {type(e).__name__}: {e}"
        if len(data) > max_bytes:
            return name, f"cannot read file: more than --max_file_bytes {max_bytes} bytes"
    else:
        from serving.extract import read_file

        data = read_file(os.fspath(path), max_bytes, "--max_file_bytes")
        if isinstance(data, Exception):
            return name, f"cannot read file: {data}"
    return (name, data) if data else (name, "empty file")


def size_key(item):
    """``((height, width, shard), item)``: the grouping key of an encoded image."""
    import zlib

    from serving.extract import header_size

    name, data = item
    return (*header_size(data), zlib.crc32(name.encode("utf-8", "surrogateescape")) % KEY_SPREAD), item


def describe_group(signature, group):
    """``(rows, errors)`` for a group of ``(name, bytes)``: one call of
    ``signature``, split as `serving.extract.isolate` splits a failing
    request (``rows``: ``(name, descriptor)``; ``errors``: ``(name, reason)``)."""
    import grpc
    import numpy as np
    import tensorflow as tf

    from serving.extract import isolate

    codes = {code.value[0]: code.name for code in grpc.StatusCode}

    def call(blobs):
        return np.asarray(signature(images=tf.constant(blobs))["descriptors"], np.float32)

    def reason(error):
        if not isinstance(error, tf.errors.OpError):
            raise error
        return f"{codes.get(error.error_code, 'UNKNOWN')}: {' '.join((error.message or '').split())[:500]}"

    return isolate(group, call, reason)


class SavedModelHandler(ModelHandler):
    """``RunInference``'s model handler for an exported descriptor SavedModel.

    An example is a group of same-size ``(name, bytes)`` images (one call of
    the signature), and its inference is `describe_group`'s ``(rows, errors)``.

    Args:
        saved_model: the SavedModel folder.
        signature_name: the signature taking ``images`` (encoded strings).
    """

    def __init__(self, saved_model, signature_name="serving_default"):
        super().__init__(max_batch_size=1)  # each example is already a batch
        self.saved_model, self.signature_name = saved_model, signature_name

    def load_model(self):
        import tensorflow as tf

        return tf.saved_model.load(self.saved_model)

    def run_inference(self, batch, model, inference_args=None):
        signature = model.signatures[self.signature_name]
        return [PredictionResult(group, describe_group(signature, group)) for group in batch]

    def get_num_bytes(self, batch):
        return sum(len(data) for group in batch for _, data in group)

    def get_metrics_namespace(self):
        return "deep_retrieval"


def error_line(row):
    """``(image, reason)`` as one CSV line (quoted as `pandas` writes it)."""
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(row)
    return buffer.getvalue()


def build(pipeline, items, saved_model, output, signature_name="serving_default", batch_size=16,
          max_file_bytes=64 << 20, run_info=None, shard_size=None):
    """Adds the extraction of ``items`` (``[(name, path)]``) to ``pipeline``:
    ``output`` (Parquet; with ``shard_size``, a folder of
    ``ceil(len(items) / shard_size)`` shards, named as
    `deep_retrieval.descriptor_files.shard_name` names them, that Beam fills
    about evenly) and ``output.errors.csv``."""
    import json
    import os

    import apache_beam as beam
    import pyarrow as pa
    from apache_beam.ml.inference.base import RunInference

    from deep_retrieval.descriptor_files import METADATA_KEY

    read = (pipeline
            | "List" >> beam.Create(items)
            | "Read" >> beam.Map(read_image, max_file_bytes))
    images = read | "Readable" >> beam.Filter(lambda r: isinstance(r[1], bytes))
    unreadable = read | "Unreadable" >> beam.Filter(lambda r: not isinstance(r[1], bytes))
    results = (images
               | "BySize" >> beam.Map(size_key).with_output_types(
                   typing.Tuple[typing.Tuple[int, int, int], typing.Tuple[str, bytes]])  # a deterministic key coder
               | "Group" >> beam.GroupIntoBatches(batch_size)
               | "Groups" >> beam.Values()
               | "Describe" >> RunInference(SavedModelHandler(saved_model, signature_name))
               | "Results" >> beam.Map(lambda prediction: prediction.inference))
    rows = (results
            | "Described" >> beam.FlatMap(lambda r: r[0])
            | "Rows" >> beam.Map(lambda r: {"image": r[0], "descriptor": r[1].tolist()}))
    failed = results | "Failed" >> beam.FlatMap(lambda r: r[1])
    schema = pa.schema([("image", pa.string()), ("descriptor", pa.list_(pa.float32()))],
                       metadata={METADATA_KEY: json.dumps(run_info or {})})
    if shard_size:
        rows | "Write" >> beam.io.WriteToParquet(os.path.join(output, "descriptors"), schema,
                                                 num_shards=max(1, -(-len(items) // shard_size)),
                                                 shard_name_template="-SSSSS-of-NNNNN", file_name_suffix=".parquet")
    else:
        rows | "Write" >> beam.io.WriteToParquet(output, schema, num_shards=1, shard_name_template="")
    ((unreadable, failed)
     | "Errors" >> beam.Flatten()
     | "ErrorLines" >> beam.Map(error_line)
     | "WriteErrors" >> beam.io.WriteToText(output + ".errors.csv", num_shards=1, shard_name_template="",
                                            header="image,reason"))


def run_info(saved_model, signature_name):
    """The run record kept with the output (as `serving.extract` keeps the
    served model's): the model's folder name and its version folder."""
    import os

    folder = os.path.abspath(saved_model.rstrip("/"))
    version = os.path.basename(folder)
    return {"model_name": os.path.basename(os.path.dirname(folder)),
            "model_version": int(version) if version.isdigit() else None,
            "signature_name": signature_name, "saved_model": folder}
