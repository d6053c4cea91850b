"""Batch descriptor extraction against TensorFlow Serving (or the embedded server).

    python -m serving.extract --server localhost:8500 --model_name deep_retrieval \
        --images photos/ --output descriptors.parquet

Walks a folder recursively (or reads a CSV with an ``image`` column), sends
encoded images in batches with several requests in flight, and writes a
Parquet file with one row per image: ``image`` (path relative to the folder,
or the CSV value) and ``descriptor`` (float32 list). Only the public
``PredictionService.Predict`` protocol is used, so the real TF Serving works
unchanged.

* ``--server`` takes several comma-separated replicas; batches are spread
  over them and a batch whose replica fails is retried on another, with
  exponential backoff.
* A batch the server rejects is split to isolate the bad images; each goes to
  ``OUTPUT.errors.csv`` with its reason and the rest are extracted.
* Within each chunk, images are sent in the order of their size, so that
  same-size photos share a request (the signature runs each shape group as
  one batch); the output keeps the input order.
* File names that are not valid UTF-8 are written with ``\\xNN`` escapes for
  their undecodable bytes.
* ``--shard_size N`` writes OUTPUT as a folder of numbered Parquet shards of
  N rows each, in input order, for collections too large for one file.
* Results are committed in chunks under ``OUTPUT.parts/``; killed and rerun
  with the same arguments, the run resumes, with no image lost or repeated.
  The final Parquet file is written atomically, then the parts are removed.
* The model version is pinned when the run starts (``--model_version``, or
  the newest then) and recorded in the Parquet file's schema metadata
  (`deep_retrieval.retrieval.descriptor_files.read_run_info`); a run or resume never mixes two versions.
"""

import sys

from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.retrieval.image_lists import list_images, report_skipped
from serving.batch_client import Extractor, Replicas, extract

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_list("server", ["127.0.0.1:8500"], "host:port of one or more TF Serving replicas.")
    flags.DEFINE_string("model_name", "deep_retrieval", "ModelSpec.name.")
    flags.DEFINE_string("signature_name", "serving_default", "Signature taking encoded images.")
    flags.DEFINE_integer("model_version", None, "Model version to ask for (default: the newest when the run "
                         "starts; it is pinned for the run and recorded in the output).")
    flags.DEFINE_string("images", None, "Folder of images (walked recursively) or a CSV with an 'image' column.")
    flags.DEFINE_string("data_dir", None, "With a CSV: folder its image paths are relative to "
                        "(default: the CSV's folder).")
    flags.DEFINE_string("output", None, "Output Parquet file (with --shard_size: a folder of them).")
    flags.DEFINE_integer("shard_size", None, "Write OUTPUT as a folder of Parquet shards of this many rows, "
                         "descriptors-00000-of-00012.parquet, ... (what serving.index, Spark and autofaiss "
                         "read), instead of one file.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 16, "Images per request at most.")
    flags.DEFINE_integer("max_request_bytes", 16 << 20, "Encoded bytes per request at most (a single larger image "
                         "goes alone).")
    flags.DEFINE_integer("max_message_bytes", 256 << 20, "gRPC channel message limit (the default 4 MiB is too small "
                         "for image batches).")
    flags.DEFINE_integer("in_flight", 4, "Requests in flight at once.")
    flags.DEFINE_integer("chunk_size", 512, "Images per committed chunk (the unit of resumption).")
    flags.DEFINE_float("timeout", 120.0, "Seconds per request.")
    flags.DEFINE_integer("retries", 5, "Attempts per batch on unavailable replicas before giving up.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    if not FLAGS.images or not FLAGS.output:
        raise app.UsageError("--images and --output are required")
    extractor = None
    try:
        items, skipped = list_images(FLAGS.images, FLAGS.data_dir)
        report_skipped(skipped)
        replicas = Replicas(FLAGS.server, FLAGS.max_message_bytes)
        extractor = Extractor(replicas, FLAGS.model_name, FLAGS.signature_name, FLAGS.timeout, FLAGS.retries,
                              FLAGS.model_version)
        count, failed = extract(items, FLAGS.output, extractor, FLAGS.batch_size, FLAGS.max_request_bytes,
                                FLAGS.in_flight, FLAGS.chunk_size, FLAGS.progress, FLAGS.max_message_bytes,
                                FLAGS.shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # grpc errors that survived the retries
        import grpc

        if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.NOT_FOUND:
            version = extractor and extractor.version
            print(f"error: extraction stopped: model {FLAGS.model_name!r} version {version} is no "
                  f"longer served ({(e.details() or '')[:200]}); what was extracted is kept in {FLAGS.output}.parts: "
                  "resume while that version is served, or remove the folder to start over", file=sys.stderr)
            return 2
        print(f"error: extraction stopped ({type(e).__name__}: {e}); rerun the same command to resume",
              file=sys.stderr)
        return 2
    if not count:
        print(f"error: no descriptors: all {failed} images failed, see {FLAGS.output}.errors.csv", file=sys.stderr)
        return 1
    print(f"{count} descriptors written to {FLAGS.output}"
          + (f"; {failed} images failed, see {FLAGS.output}.errors.csv" if failed else ""))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
