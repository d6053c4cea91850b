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

import json
import os
import sys

from absl import app, flags

from deep_retrieval import cli

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


def build(descriptors_path, output, kind=None, nlist=None, m=None, nprobe=16, images_root=None,
          model_info=None, append=False):
    """Builds (or extends) and saves an index; returns it."""
    import numpy as np
    import pandas as pd

    from deep_retrieval import search

    try:
        frame = pd.read_parquet(descriptors_path)
    except Exception as e:
        raise ValueError(f"{descriptors_path}: cannot read Parquet: {e}") from e
    if not {"image", "descriptor"} <= set(frame.columns):
        raise ValueError(f"{descriptors_path}: needs 'image' and 'descriptor' columns")
    repeated = frame["image"].duplicated()
    if repeated.any():
        # One entry per image: a repeated row would rank twice and break the
        # one-id-one-vector contract of the index.
        names = ", ".join(str(n) for n in frame.loc[repeated, "image"].head(5))
        print(f"warning: {descriptors_path}: {int(repeated.sum())} repeated image row(s) skipped, the first "
              f"of each kept: {names}{' ...' if repeated.sum() > 5 else ''}", file=sys.stderr)
        frame = frame[~repeated]
    vectors = np.stack(frame["descriptor"].to_numpy()).astype(np.float32) if len(frame) else None
    if vectors is None:
        raise ValueError(f"{descriptors_path}: no descriptors")
    from serving.extract import read_run_info

    metadata = {}
    run = read_run_info(descriptors_path)
    if run:
        metadata["extraction"] = run
    if model_info:
        with open(model_info) as f:
            metadata["model"] = json.load(f)
    if images_root:
        metadata["images_root"] = os.path.abspath(images_root)
    if append and os.path.exists(output):
        index = search.Index.load(output, expected_dim=vectors.shape[1])
        held = index.metadata.get("extraction")
        if run and held and (held["model_name"], held["model_version"]) != (run["model_name"], run["model_version"]):
            raise ValueError(f"{output} holds descriptors of model {held['model_name']!r} version "
                             f"{held['model_version']}, {descriptors_path} of version {run['model_version']}: "
                             "one index holds one model's descriptors")
        known = set(index.ids)
        keep = ~frame["image"].isin(known).to_numpy()
        frame, vectors = frame[keep], vectors[keep]
        index.metadata.update(metadata)
    else:
        index = search.Index(vectors.shape[1], metadata, kind or search.default_kind(len(vectors)),
                             nlist, m, nprobe)
        if index.kind == "ivfpq":
            rng = np.random.default_rng(0)
            sample = vectors[rng.choice(len(vectors), min(len(vectors), 256 * 1024), replace=False)]
            index.train(sample, count=len(vectors))
    if len(frame):
        index.add(vectors, frame["image"].tolist())
    index.save(output)
    return index


def main(argv):
    del argv
    if not FLAGS.descriptors or not FLAGS.output:
        raise app.UsageError("--descriptors and --output are required")
    try:
        index = build(FLAGS.descriptors, FLAGS.output, FLAGS.kind, FLAGS.nlist, FLAGS.m, FLAGS.nprobe,
                      FLAGS.images_root, FLAGS.model_info, FLAGS.append)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{FLAGS.output}: {index.kind} index of {len(index)} descriptors of size {index.dim}")
    return 0


if __name__ == "__main__":
    define_flags()
    cli.run(main)
