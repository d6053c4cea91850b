r"""Batch descriptor extraction on Apache Beam: an exported SavedModel run by
Beam's ``RunInference``.

    python -m serving.beam_extract --saved_model models/deep_retrieval/1 \
        --images photos/ --output descriptors.parquet [--runner DirectRunner] [Beam pipeline options]

For collections that belong on a data engine (tens of millions of images):
the same pipeline runs on the DirectRunner here and, with its options, on
Flink, Spark or Dataflow. Every flag this command does not define is handed
to Beam's ``PipelineOptions`` unchanged (``--runner``, ``--flink_master``,
``--project``, ``--temp_location``, ...).

* ``--images`` is a folder, walked recursively on the launching machine, or
  a CSV with an ``image`` column, as for `serving.extract`; paths with a
  scheme (``gs://``, ``s3://``) are read through Beam's file systems.
* Each file is read (regular files of at most ``--max_file_bytes`` only),
  keyed by the image size its header declares, and the images of one size
  are grouped (a ``GroupByKey``, then lists of at most ``--batch_size``:
  `serving.beam_inference.batches` says why not ``GroupIntoBatches``) so
  that each group is one call of the signature; the key also spreads a size
  over `serving.beam_inference.KEY_SPREAD` shards, so one common size is
  not one worker's work.
* `serving.beam_inference.SavedModelHandler` is the ``RunInference`` model handler: it loads the
  SavedModel once per worker process and runs its ``serving_default`` (or
  ``--signature_name``) on a group; a group that fails is split until each
  undecodable image is alone, as `serving.extract` isolates bad images.
* The output has `serving.extract`'s schema (``image``, ``descriptor``;
  the run record in the schema metadata) and ``OUTPUT.errors.csv`` lists
  the files that could not be described, with the reason. Each shard is
  written whole by one step after a ``GroupByKey`` on its number, and the
  errors by Beam's file sink: a retried bundle adds no row twice.
  ``--shard_size N`` makes OUTPUT a folder of ``ceil(images / N)`` numbered
  shards, image ``i`` of the listing in shard ``i mod count``.
* A local OUTPUT is staged beside it and swapped in whole once the pipeline
  succeeds (`deep_retrieval.io.atomic.atomic_write`): a failed run leaves the
  previous output, and a rerun leaves none of its shards. On a remote file
  system the shards are written in place, then an earlier run's deleted.
"""

import sys

from absl import app, flags

from deep_retrieval import cli

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("saved_model", None, "An exported SavedModel version folder (models/NAME/1).")
    flags.DEFINE_string("signature_name", "serving_default", "Signature taking encoded images.")
    flags.DEFINE_string("images", None, "Folder of images (walked recursively) or a CSV with an 'image' column.")
    flags.DEFINE_string("data_dir", None, "With a CSV: folder its image paths are relative to "
                        "(default: the CSV's folder).")
    flags.DEFINE_string("output", None, "Output Parquet file (with --shard_size: a folder of them).")
    flags.DEFINE_integer("shard_size", None, "Write OUTPUT as a folder of about this many rows per Parquet shard, "
                         "descriptors-00000-of-00012.parquet, ...", lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Same-size images per call of the signature at most.")
    flags.DEFINE_integer("max_file_bytes", 64 << 20, "Larger files are listed as errors, unread.")


def main(argv):
    if not FLAGS.saved_model or not FLAGS.images or not FLAGS.output:
        raise app.UsageError("--saved_model, --images and --output are required")
    import logging
    import os

    if not FLAGS.verbose:  # Beam's INFO lines (optional clients, runner choice, batch statistics, renames)
        logging.getLogger("apache_beam").setLevel(logging.WARNING)
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from deep_retrieval.io.atomic import atomic_write
    from deep_retrieval.retrieval.image_lists import check_unique, list_images, report_skipped
    from serving.beam_inference import build, drop_stale, run_info

    if not os.path.isdir(FLAGS.saved_model):
        raise ValueError(f"{FLAGS.saved_model}: no such SavedModel folder")
    items, skipped = list_images(FLAGS.images, FLAGS.data_dir)
    check_unique(items)
    try:
        options = PipelineOptions(argv[1:])
    except SystemExit:
        return 1  # an unknown Beam option: argparse said which
    report_skipped(skipped)
    info = run_info(FLAGS.saved_model, FLAGS.signature_name)

    def extract(output, errors):
        with beam.Pipeline(options=options) as pipeline:
            paths = build(pipeline, items, FLAGS.saved_model, output, FLAGS.signature_name, FLAGS.batch_size,
                          FLAGS.max_file_bytes, info, FLAGS.shard_size, errors)
        return paths

    errors = FLAGS.output + ".errors.csv"
    if "://" in FLAGS.output:  # a remote file system: written in place, then an earlier run's shards dropped
        paths = extract(FLAGS.output, errors)
        if FLAGS.shard_size:
            drop_stale(FLAGS.output, paths)
    else:  # staged beside it and swapped in whole: a failed run leaves the previous output
        staged = []

        def write(tmp):
            staged.append(tmp + ".errors.csv")
            if FLAGS.shard_size:
                os.makedirs(tmp)
            extract(tmp, staged[0])

        try:
            atomic_write(FLAGS.output, write)
            os.replace(staged[0], errors)
        finally:
            if staged and os.path.exists(staged[0]):
                os.remove(staged[0])
    if "://" not in FLAGS.output:  # a local output: count it, and drop an empty errors file
        import pandas as pd
        import pyarrow.parquet as pq

        files = ([os.path.join(FLAGS.output, f) for f in os.listdir(FLAGS.output) if f.endswith(".parquet")]
                 if os.path.isdir(FLAGS.output) else [FLAGS.output])
        count = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        failed = len(pd.read_csv(errors, dtype=str, keep_default_na=False))
        if not failed:
            os.remove(errors)
        if not count:
            print(f"error: no descriptors: all {failed} images failed, see {errors}", file=sys.stderr)
            return 1
        print(f"{count} descriptors written to {FLAGS.output}"
              + (f"; {failed} images failed, see {errors}" if failed else ""))
    else:  # on a remote file system
        print(f"pipeline done: {FLAGS.output} and {errors}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main, pass_through=True)
