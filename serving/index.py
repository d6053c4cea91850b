r"""Builds a search index from the extraction's Parquet output: one file, or
a folder of shards (``serving.extract --shard_size``).

    python -m serving.index --descriptors descriptors/ --output index/ \
        [--kind ivfpq --factory OPQ64_256,IVF65536_HNSW32,PQ64 --nprobe 16] [--images_root photos/] [--append]

The kind defaults by collection size: exact below a million images, a FAISS
inverted file from there, whose factory follows Faiss's guidelines
(`deep_retrieval.retrieval.faiss_ivf.default_factory`: OPQ, 65536 lists with an HNSW
coarse quantiser up to 10M, 262144 to 100M, 1048576 to 1B, 64-byte PQ
codes). An ``ivfpq`` build streams: the quantisers are trained on
``--train_size`` random descriptors, then the shards are read a batch at a
time into on-disk inverted lists, so memory does not grow with the
collection (exact kinds hold every descriptor).

The model version the extraction recorded is kept with the index (searches
through a server ask for it; ``--append`` refuses another version, and
shards of two versions are refused). ``--model_info`` (an export's
``assets.extra/model_info.json``) is stored with the index so that searches
can check the descriptor size. The index folder is replaced atomically; a
killed run leaves the previous index intact.
"""


from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.retrieval.descriptor_files import build_index

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("descriptors", None, "Parquet file with 'image' and 'descriptor' columns, or a folder "
                        "of such shards.")
    flags.DEFINE_string("output", None, "Index folder to write.")
    flags.DEFINE_enum("kind", None, ["exact", "flat", "ivfpq"], "Index kind (default: by collection size).")
    flags.DEFINE_string("factory", None, "ivfpq: Faiss index_factory string, an inverted file "
                        "(default: by collection size, e.g. OPQ64_256,IVF65536_HNSW32,PQ64 for 1M-10M).")
    flags.DEFINE_integer("train_size", None, "ivfpq: random descriptors the quantisers are trained on "
                         "(default: 40 per inverted list).")
    flags.DEFINE_integer("nprobe", 16, "ivfpq: inverted lists visited per query.")
    flags.DEFINE_integer("k_factor", None, "ivfpq: candidates per result that a search re-ranks by their exact "
                         "inner product, read from the index's float16 descriptors (default 32, or the "
                         "appended index's; 1 for none).")
    flags.DEFINE_string("images_root", None, "Folder the image names are relative to (for result pictures).")
    flags.DEFINE_string("model_info", None, "model_info.json of the export that made the descriptors.")
    flags.DEFINE_boolean("append", False, "Add the new images to the existing index at --output.")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    if not FLAGS.descriptors or not FLAGS.output:
        raise app.UsageError("--descriptors and --output are required")
    meta = build_index(FLAGS.descriptors, FLAGS.output, FLAGS.kind, FLAGS.factory, FLAGS.nprobe,
                       FLAGS.images_root, FLAGS.model_info, FLAGS.append, FLAGS.train_size, FLAGS.progress,
                       FLAGS.k_factor)
    print(f"{FLAGS.output}: {meta['kind']} index of {meta['count']} descriptors of size {meta['dim']}"
          + (f" ({meta['factory']})" if meta["factory"] else ""))
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
