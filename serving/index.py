r"""Builds a search index from the extraction client's Parquet output.

    python -m serving.index --descriptors descriptors.parquet --output index/ \
        [--kind ivfpq --nlist 4096 --m 64 --nprobe 16] [--images_root photos/] [--append]

The kind defaults by collection size (exact below a million images, FAISS
IVF-PQ above). The model version the extraction recorded is kept with the
index (searches through a server ask for it; ``--append`` refuses another
version). ``--model_info`` (an export's ``assets.extra/model_info.json``)
is stored with the index so that searches can check the descriptor size.
The index folder is replaced atomically; a killed run leaves the previous
index intact.
"""

import sys

from absl import app, flags

from deep_retrieval import cli
from deep_retrieval.descriptor_files import build_index

FLAGS = flags.FLAGS


def define_flags():
    """Defines the command-line flags (only when run as a program)."""
    flags.DEFINE_string("descriptors", None, "Parquet file with 'image' and 'descriptor' columns.")
    flags.DEFINE_string("output", None, "Index folder to write.")
    flags.DEFINE_enum("kind", None, ["exact", "flat", "ivfpq"], "Index kind (default: by collection size).")
    flags.DEFINE_integer("nlist", None, "IVF-PQ inverted lists (default: about 4 sqrt(n)).")
    flags.DEFINE_integer("m", None, "IVF-PQ sub-quantisers (default: descriptor size / 32).")
    flags.DEFINE_integer("nprobe", 16, "IVF-PQ lists visited per query.")
    flags.DEFINE_string("images_root", None, "Folder the image names are relative to (for result pictures).")
    flags.DEFINE_string("model_info", None, "model_info.json of the export that made the descriptors.")
    flags.DEFINE_boolean("append", False, "Add the new images to the existing index at --output.")


def main(argv):
    del argv
    if not FLAGS.descriptors or not FLAGS.output:
        raise app.UsageError("--descriptors and --output are required")
    try:
        index = build_index(FLAGS.descriptors, FLAGS.output, FLAGS.kind, FLAGS.nlist, FLAGS.m, FLAGS.nprobe,
                      FLAGS.images_root, FLAGS.model_info, FLAGS.append)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{FLAGS.output}: {index.kind} index of {len(index)} descriptors of size {index.dim}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
