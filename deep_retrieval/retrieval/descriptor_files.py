"""Descriptor files and the search index built from them.

A descriptor file is Parquet with ``image`` and ``descriptor`` columns (what
`serving.extract` writes); the record of the run that made it (model name,
version, signature) sits in the schema metadata under `METADATA_KEY`. A
large extraction writes a folder of shards named by `shard_name`, which
`Descriptors` reads one record batch at a time, as Spark and autofaiss read
such a folder.

`build_index` makes the `index.Index` of a file or folder. Exact kinds hold
every descriptor; ``ivfpq`` streams: its quantisers are trained on a random
sample, the vectors are added a batch at a time into on-disk lists
(`faiss_ivf.write_on_disk`), and the ids are written as they come
(`id_store.IdWriter`), so memory does not grow with the collection.
"""

import contextlib
import json
import os
import sys

import numpy as np

from deep_retrieval.io.atomic import atomic_write, exclusive_lock, remove_stale_temporaries
from deep_retrieval.retrieval import faiss_ivf, reranking
from deep_retrieval.retrieval import index as index_lib
from deep_retrieval.retrieval.id_store import HashBuckets, IdWriter, encode, name_hashes

METADATA_KEY = b"deep_retrieval"

TRAIN_PER_LIST = 40
"""Training vectors per inverted list by default (Faiss asks for 39 at least
and advises 30 to 256)."""

TRAIN_MIN = 65536
"""Training vectors at least (what OPQ and 256-centroid PQ sub-quantisers
train on: Faiss samples 256 per centroid)."""


def shard_name(index, count):
    """``descriptors-00003-of-00012.parquet``: shard ``index`` of ``count``."""
    return f"descriptors-{index:05d}-of-{count:05d}.parquet"


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


def _same_model(a, b):
    return (a["model_name"], a["model_version"]) == (b["model_name"], b["model_version"])


class Descriptors:
    """The descriptor files of a Parquet file or a folder of shards, read a
    record batch at a time.

    Args:
        source: a Parquet file, or a folder whose ``*.parquet`` files (in
            name order) are its shards.

    Raises ValueError naming the file when one is unreadable, lacks the
    columns, or was extracted by another model than the first.
    """

    def __init__(self, source):
        import pyarrow.parquet as pq

        if os.path.isdir(source):
            names = sorted(n for n in os.listdir(source) if n.endswith(".parquet") and not n.startswith((".", "_")))
            if not names:
                raise ValueError(f"{source}: no .parquet files in the folder")
            self.paths = [os.path.join(source, n) for n in names]
        else:
            self.paths = [source]
        self.counts, self.run, self.dim = [], None, None
        for path in self.paths:
            try:
                f = pq.ParquetFile(path)
            except FileNotFoundError:
                raise ValueError(f"{path}: no such file or folder") from None
            except Exception as e:
                raise ValueError(f"{path}: cannot read Parquet: {e}") from e
            if not {"image", "descriptor"} <= set(f.schema_arrow.names):
                raise ValueError(f"{path}: needs 'image' and 'descriptor' columns")
            self.counts.append(f.metadata.num_rows)
            run = read_run_info(path)
            if run and self.run and not _same_model(run, self.run):
                raise ValueError(f"{path} holds descriptors of model {run['model_name']!r} version "
                                 f"{run['model_version']}, {self.paths[0]} of version {self.run['model_version']}: "
                                 "one index holds one model's descriptors")
            self.run = self.run or run
            if self.dim is None and f.metadata.num_rows:
                self.dim = _vectors(next(f.iter_batches(batch_size=1, columns=["descriptor"])), path).shape[1]
        if not len(self):
            raise ValueError(f"{source}: no descriptors")

    def __len__(self):
        return sum(self.counts)

    def batches(self, rows=65536, vectors=True):
        """Yields ``(names, vectors [n, dim] float32)`` (``vectors`` False:
        ``(names, None)``, reading the image column only), in file order."""
        import pyarrow.parquet as pq

        columns = ["image", "descriptor"] if vectors else ["image"]
        for path in self.paths:
            try:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=rows, columns=columns):
                    names = batch.column("image").to_pylist()
                    yield names, (_vectors(batch, path, self.dim) if vectors else None)
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f"{path}: cannot read Parquet: {e}") from e

    def take(self, positions, vectors=True):
        """``(names, vectors)`` of the rows at sorted ``positions`` (counted
        over all files), read in one pass (``vectors`` False: names only)."""
        positions = np.asarray(positions, dtype=np.int64)
        names, out, start = [], [], 0
        for batch_names, batch_vectors in self.batches(vectors=vectors):
            lo, hi = np.searchsorted(positions, [start, start + len(batch_names)])
            here = positions[lo:hi] - start
            names += [batch_names[p] for p in here]
            if vectors:
                out.append(batch_vectors[here])
            start += len(batch_names)
        return names, (np.concatenate(out) if vectors else None)


def _vectors(batch, path, dim=None):
    """The ``descriptor`` list column of a record batch as ``[n, dim]`` float32."""
    import pyarrow.compute as pc

    column = batch.column("descriptor")
    if column.null_count:
        raise ValueError(f"{path}: {column.null_count} rows without a descriptor")
    lengths = np.asarray(pc.list_value_length(column))
    dim = int(lengths[0]) if dim is None and len(lengths) else dim
    if len(lengths) and (lengths != dim).any():
        raise ValueError(f"{path}: descriptors of size {sorted(set(lengths.tolist()) - {dim})[:3]} "
                         f"among ones of size {dim}")
    return np.asarray(column.flatten(), dtype=np.float32).reshape(len(lengths), dim or 0)


def repeated_rows(descriptors, scratch, bucket_rows=None):
    """Sorted positions of the rows that repeat an earlier row's image name.

    Memory stays bounded: the names' hashes (`id_store.name_hashes`) go to
    `id_store.HashBuckets` under ``scratch`` (removed after), each bucket is
    checked alone, and only the rows whose hash repeats are compared by name.
    """
    table = HashBuckets(scratch, len(descriptors), bucket_rows)
    position = 0
    for names, _ in descriptors.batches(vectors=False):
        table.add(name_hashes([encode(n) for n in names]), np.arange(position, position + len(names)))
        position += len(names)
    candidates = []
    for hashes, positions in table.sorted():
        repeats = np.zeros(len(hashes), bool)
        repeats[1:] = hashes[1:] == hashes[:-1]
        repeats[:-1] |= repeats[1:]  # every row of a repeated hash, its first included
        candidates.append(positions[repeats])
    table.close()
    candidates = np.sort(np.concatenate(candidates)) if candidates else np.zeros(0, np.int64)
    if not len(candidates):
        return candidates
    seen, repeated = set(), []
    for position, name in zip(candidates, descriptors.take(candidates, vectors=False)[0]):
        if name in seen:
            repeated.append(position)
        seen.add(name)
    return np.asarray(repeated, dtype=np.int64)


def _kept(descriptors, skip, rows=65536):
    """``descriptors.batches`` without the rows at positions ``skip``."""
    position = 0
    for names, vectors in descriptors.batches(rows):
        lo, hi = np.searchsorted(skip, [position, position + len(names)])
        if hi > lo:
            keep = np.ones(len(names), bool)
            keep[skip[lo:hi] - position] = False
            position += len(names)
            yield [n for n, k in zip(names, keep) if k], vectors[keep]
        else:
            position += len(names)
            yield names, vectors


def _sample(descriptors, count, seed=0):
    """``count`` vectors drawn at random (without replacement) from the
    files, read in one pass."""
    rng = np.random.default_rng(seed)
    return descriptors.take(np.sort(rng.choice(len(descriptors), size=min(count, len(descriptors)),
                                               replace=False)))[1]


def _warn_repeated(source, descriptors, skip):
    if not len(skip):
        return
    names = descriptors.take(skip[:5], vectors=False)[0]
    # One entry per image: a repeated row would rank twice and break the
    # one-id-one-vector contract of the index.
    print(f"warning: {source}: {len(skip)} repeated image row(s) skipped, the first of each kept: "
          f"{', '.join(names)}{' ...' if len(skip) > 5 else ''}", file=sys.stderr)


def build_index(source, output, kind=None, factory=None, nprobe=16, images_root=None, model_info=None,
                append=False, train_size=None, progress=False, k_factor=None):
    """Builds (or extends) the `index.Index` of a descriptor file or folder
    of shards and saves it to ``output`` (atomically); returns what its
    ``meta.json`` holds (kind, count, dim, factory, ...).

    ``kind`` defaults by collection size (`index.default_kind`), an
    ``ivfpq`` ``factory`` to `faiss_ivf.default_factory`; its quantisers are
    trained on ``train_size`` random vectors (default `TRAIN_PER_LIST` per
    list, `TRAIN_MIN` at least). A name met twice is indexed once (its
    first row), with a warning. The run record of the extraction is kept with the index; ``append`` adds
    the images not yet held and refuses another model version (it reads the
    held ids). ``model_info`` (an export's ``model_info.json``) is stored too.
    An ``ivfpq`` build also writes the descriptors as float16
    (`index.VECTORS_FILE`), as they stream past, for the exact re-ranking of
    ``k_factor`` (default `index.K_FACTOR`) candidates per result.
    """
    output = output.rstrip("/")
    busy = (f"{output}: another serving.index is writing it (lock held on {output}.lock); "
            "wait for it, or write another --output")
    with exclusive_lock(output + ".lock", busy):
        remove_stale_temporaries(output)  # of builds that were killed: nobody else writes here
        try:
            return _build_index(source, output, kind, factory, nprobe, images_root, model_info, append,
                                train_size, progress, k_factor)
        except OSError as e:  # a full disk, a folder that cannot be written
            raise ValueError(f"{output}: cannot write the index: {e.strerror or e}"
                             + (f" ({e.filename})" if e.filename else "")) from None


def _build_index(source, output, kind, factory, nprobe, images_root, model_info, append, train_size, progress,
                 k_factor):
    import faiss
    from tqdm import tqdm

    descriptors = Descriptors(source)
    metadata = {}
    if descriptors.run:
        metadata["extraction"] = descriptors.run
    if model_info:
        with open(model_info) as f:
            metadata["model"] = json.load(f)
    if images_root:
        metadata["images_root"] = os.path.abspath(images_root)
    previous = None
    if append and (os.path.exists(output) or os.path.exists(output.rstrip("/") + ".old")):
        previous = index_lib.Index.load(output, expected_dim=descriptors.dim)
        held = previous.metadata.get("extraction")
        if descriptors.run and held and not _same_model(held, descriptors.run):
            raise ValueError(f"{output} holds descriptors of model {held['model_name']!r} version "
                             f"{held['model_version']}, {source} of version {descriptors.run['model_version']}: "
                             "one index holds one model's descriptors")
        metadata = {**previous.metadata, **metadata}
        kind, factory, nprobe = previous.kind, previous.factory, previous.nprobe
        k_factor = k_factor or previous.k_factor
    k_factor = k_factor or index_lib.K_FACTOR
    kind = kind or index_lib.default_kind(len(descriptors))
    keep_vectors = kind == "ivfpq" and (previous is None or previous.vectors is not None)
    if kind == "ivfpq" and not keep_vectors:
        print(f"warning: {output} was built without {index_lib.VECTORS_FILE}: the extended index searches "
              "its codes without exact re-ranking; rebuild it for re-ranking", file=sys.stderr)
    if kind == "ivfpq" and previous is not None:
        template = faiss_ivf.empty_template(previous.path)
    elif kind == "ivfpq":
        factory = factory or faiss_ivf.default_factory(len(descriptors), descriptors.dim)
        size = train_size or max(TRAIN_MIN, TRAIN_PER_LIST * faiss_ivf.faiss_lists(factory))
        template = faiss.serialize_index(
            faiss_ivf.train_index(factory, descriptors.dim, _sample(descriptors, size), nprobe))

    def write(folder):
        os.makedirs(folder)
        skip = repeated_rows(descriptors, os.path.join(folder, "scratch"))
        _warn_repeated(source, descriptors, skip)
        expected = len(descriptors) - len(skip) + (len(previous) if previous is not None else 0)
        with IdWriter(folder, expected) as ids, contextlib.ExitStack() as stack, \
                tqdm(total=len(descriptors) - len(skip), unit="vec", desc="index", disable=not progress) as bar:
            vectors_file = None
            if keep_vectors:
                vectors_file = stack.enter_context(open(os.path.join(folder, index_lib.VECTORS_FILE), "wb"))
            if previous is not None:
                ids.copy(previous.ids)
                if vectors_file is not None:
                    for start in range(0, len(previous), 1 << 18):
                        vectors_file.write(np.ascontiguousarray(previous.vectors[start:start + (1 << 18)]).tobytes())

            def batches():  # the rows to add; their names (and float16 rows) are written as they pass
                for names, vectors in _kept(descriptors, skip):
                    bar.update(len(names))
                    if previous is not None:  # the images it holds are not added again
                        keep = previous.ids.positions(names) < 0
                        names, vectors = [n for n, k in zip(names, keep) if k], vectors[keep]
                    ids.write(names)
                    vectors = reranking.normalize(vectors)
                    if vectors_file is not None:
                        vectors_file.write(vectors.astype(np.float16).tobytes())
                    yield vectors

            if kind == "ivfpq":
                held = len(previous) if previous is not None else 0
                faiss_ivf.check_free_space(folder, template, held + len(descriptors))
                count = faiss_ivf.write_on_disk(template, batches(), folder,
                                             previous._faiss if previous is not None else None)
            else:
                held = [previous.descriptors] if previous is not None else []
                matrix = np.concatenate(held + list(batches()))  # batches() normalises
                np.save(os.path.join(folder, "descriptors.npy"), matrix)
                count = len(matrix)
        if count != ids.count:
            raise RuntimeError(f"{count} vectors written for {ids.count} ids")
        index_lib.write_meta(folder, descriptors.dim, count, kind, factory if kind == "ivfpq" else None, nprobe,
                             metadata, k_factor)

    atomic_write(output.rstrip("/"), write)
    with open(os.path.join(output, "meta.json")) as f:
        return json.load(f)
