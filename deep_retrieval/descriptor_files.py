"""Descriptor files and the search index built from them.

A descriptor file is Parquet with ``image`` and ``descriptor`` columns (what
`serving.extract` writes); the record of the run that made it (model name,
version, signature) sits in the schema metadata under `METADATA_KEY`.
"""

import json
import os
import sys

import numpy as np
import pandas as pd

from deep_retrieval import search

METADATA_KEY = b"deep_retrieval"


def write_descriptors(frame, path, info):
    """``frame`` as Parquet at ``path``, with the run record ``info`` in the
    schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if info:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), METADATA_KEY: json.dumps(info)})
    pq.write_table(table, path)


def read_run_info(path):
    """The run record (model name, version, signature) of a descriptor file,
    or None for a file without one."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None


def build_index(descriptors_path, output, kind=None, nlist=None, m=None, nprobe=16, images_root=None,
                model_info=None, append=False):
    """Builds (or extends) the `search.Index` of a descriptor file and saves
    it to ``output`` (atomically); returns it.

    The run record of the extraction is kept with the index; ``append``
    adds the images not yet held and refuses another model version.
    ``model_info`` (an export's ``model_info.json``) is stored too.
    """
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
