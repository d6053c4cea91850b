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
        from deep_retrieval.retrieval.image_lists import read_file

        data = read_file(os.fspath(path), max_bytes, "--max_file_bytes")
        if isinstance(data, Exception):
            return name, f"cannot read file: {data}"
    return (name, data) if data else (name, "empty file")


def size_key(item):
    """``((height, width, spread), item)``: the grouping key of an encoded
    image, ``item`` being ``((name, shard), bytes)``."""
    import zlib

    from deep_retrieval.data.image_headers import header_size

    (name, _), data = item
    return (*header_size(data), zlib.crc32(name.encode("utf-8", "surrogateescape")) % KEY_SPREAD), item


def batches(keyed, batch_size):
    """The images of one grouping key in lists of at most ``batch_size``.

    A ``GroupByKey`` then this, rather than ``GroupIntoBatches``: the
    bundle-based DirectRunner emits ``GroupIntoBatches``'s last, partial
    batches from its end-of-window timer after the watermark has reached
    infinity, once a downstream ``GroupByKey`` (each file sink has one)
    has completed, and fails on an assertion (apache/beam#28716). That
    happens as soon as a key holds fewer images than a batch.
    """
    _, items = keyed
    group = []
    for item in items:
        group.append(item)
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


def describe_group(signature, group):
    """``(rows, errors)`` for a group of ``(name, bytes)``: one call of
    ``signature``, split as `deep_retrieval.retrieval.batching.isolate` splits a failing
    request (``rows``: ``(name, descriptor)``; ``errors``: ``(name, reason)``)."""
    import grpc
    import numpy as np
    import tensorflow as tf

    from deep_retrieval.retrieval.batching import isolate

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


def shard_paths(output, count):
    """The files of an output of ``count`` shards (``None``: one file)."""
    if count is None:
        return [output]
    from deep_retrieval.retrieval.descriptor_files import shard_name

    return [f"{output.rstrip('/')}/{shard_name(i, count)}" for i in range(count)]


def schema(run_info):
    """`serving.extract`'s Parquet schema, with the run record."""
    import json

    import pyarrow as pa

    from deep_retrieval.retrieval.descriptor_files import METADATA_KEY

    return pa.schema([("image", pa.string()), ("descriptor", pa.list_(pa.float32()))],
                     metadata={METADATA_KEY: json.dumps(run_info or {})})


def write_shard(path, schema, rows, row_group=4096):
    """Writes ``rows`` (``(name, descriptor)``, an iterable read once) to the
    Parquet file ``path`` on any Beam file system, a row group at a time.
    A retried bundle writes the same file again, whole."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f, pq.ParquetWriter(f, schema) as writer:
        names, vectors = [], []

        def flush():
            column = pa.array([np.asarray(v, np.float32) for v in vectors], schema.field("descriptor").type)
            writer.write_table(pa.table([pa.array(names, pa.string()), column], schema=schema))
            names.clear()
            vectors.clear()

        for name, vector in rows:
            names.append(name)
            vectors.append(vector)
            if len(names) == row_group:
                flush()
        if names:
            flush()


def build(pipeline, items, saved_model, output, signature_name="serving_default", batch_size=16,
          max_file_bytes=64 << 20, run_info=None, shard_size=None, errors=None):
    """Adds the extraction of ``items`` (``[(name, path)]``) to ``pipeline``:
    ``output`` (Parquet; with ``shard_size``, a folder of
    ``ceil(len(items) / shard_size)`` shards named as
    `deep_retrieval.retrieval.descriptor_files.shard_name` names them, image ``i``
    of ``items`` in shard ``i % count``, so that their sizes differ by one
    at most; a shard whose images all failed is written empty) and
    ``errors`` (default ``output.errors.csv``)."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    count = max(1, -(-len(items) // shard_size)) if shard_size else None
    paths = shard_paths(output, count)
    layout = schema(run_info)
    keyed = [((name, i % len(paths)), path) for i, (name, path) in enumerate(items)]
    read = (pipeline
            | "List" >> beam.Create(keyed)
            | "Read" >> beam.Map(read_image, max_file_bytes))
    images = read | "Readable" >> beam.Filter(lambda r: isinstance(r[1], bytes))
    unreadable = read | "Unreadable" >> beam.Filter(lambda r: not isinstance(r[1], bytes))
    results = (images
               | "BySize" >> beam.Map(size_key).with_output_types(
                   typing.Tuple[typing.Tuple[int, int, int], typing.Any])  # a deterministic key coder
               | "Group" >> beam.GroupByKey()
               | "Batches" >> beam.FlatMap(batches, batch_size)
               | "Describe" >> RunInference(SavedModelHandler(saved_model, signature_name))
               | "Results" >> beam.Map(lambda prediction: prediction.inference))
    described = (results
                 | "Described" >> beam.FlatMap(lambda r: r[0])
                 | "ByShard" >> beam.Map(lambda r: (r[0][1], (r[0][0], r[1]))).with_output_types(
                     typing.Tuple[int, typing.Any]))
    every = (pipeline  # a None row for each shard, so that a shard whose images all failed is written too
             | "EveryShard" >> beam.Create([(shard, None) for shard in range(len(paths))]).with_output_types(
                 typing.Tuple[int, typing.Any]))
    _ = ((described, every)
         | "AllRows" >> beam.Flatten()
         | "Shards" >> beam.GroupByKey()
         | "Write" >> beam.MapTuple(
             lambda shard, rows: write_shard(paths[shard], layout, (row for row in rows if row is not None))))
    failed = results | "Failed" >> beam.FlatMap(lambda r: r[1])
    ((unreadable, failed)
     | "Errors" >> beam.Flatten()
     | "ErrorLines" >> beam.MapTuple(lambda key, reason: error_line((key[0], reason)))
     | "WriteErrors" >> beam.io.WriteToText(errors or output + ".errors.csv", num_shards=1,
                                            shard_name_template="", header="image,reason"))
    return paths


def drop_stale(output, paths):
    """Deletes the shards of an earlier run in the folder ``output`` that
    are not among ``paths`` (a rerun with fewer images, or another
    ``--shard_size``)."""
    from apache_beam.io.filesystems import FileSystems

    keep = set(paths)
    stale = [m.path for result in FileSystems.match([f"{output.rstrip('/')}/descriptors-*-of-*.parquet"])
             for m in result.metadata_list if m.path not in keep]
    if stale:
        FileSystems.delete(stale)


def run_info(saved_model, signature_name):
    """The run record kept with the output (as `serving.extract` keeps the
    served model's): the model's folder name and its version folder."""
    import os

    folder = os.path.abspath(saved_model.rstrip("/"))
    version = os.path.basename(folder)
    return {"model_name": os.path.basename(os.path.dirname(folder)),
            "model_version": int(version) if version.isdigit() else None,
            "signature_name": signature_name, "saved_model": folder}
