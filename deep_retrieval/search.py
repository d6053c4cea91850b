"""Nearest-neighbour search over L2-normalised descriptors, with αQE and DBA.

`Index` holds descriptors and ids. Three kinds:

* ``exact``: a chunked matrix product in numpy (the database is stored once,
  scores are computed a block of rows at a time, so memory stays at the
  database plus ``chunk x n_queries`` scores);
* ``flat``: FAISS ``IndexFlatIP`` (exact, FAISS's kernels);
* ``ivfpq``: a FAISS inverted file built from an ``index_factory`` string
  (by default `default_factory`: an OPQ rotation, inverted lists over a
  trained coarse quantiser, product-quantised codes), approximate, for
  large collections; only the codes are kept, so αQE and DBA need one of
  the exact kinds. Built from shards (`write_on_disk`), its lists live in a
  file beside the index and are read through a memory map.

`default_kind` picks by collection size. Indexes are saved as a versioned
folder written atomically.

Query expansion and database-side augmentation follow the usual definitions:

* αQE (Radenović, Tolias, Chum, TPAMI 2018): the query is replaced by
  ``L2(q + sum_{i<k} s_i^α x_i)`` over its top-``k`` results, ``s_i`` their
  similarities (negative ones count as 0).
* DBA (Gordo et al., IJCV 2017): every database vector is replaced by
  ``L2(sum_{r=0..k} (k - r) / k * x_(r))`` over itself (``r = 0``) and its
  ``k`` nearest database neighbours, weights falling linearly with rank.

`superglobal_rerank` re-ranks the top results with global descriptors only
(SuperGlobal, Shao et al., ICCV 2023).
"""

import contextlib
import json
import os
import shutil
import sys

import numpy as np

from deep_retrieval.files import atomic_write, exclusive_lock, remove_stale_temporaries

FORMAT_VERSION = 1


def _normalize(x):
    x = np.asarray(x, dtype=np.float32)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def topk(queries, database, k, chunk=65536):
    """Exact top-``k`` by inner product: ``(scores [nq, k], indices [nq, k])``.

    Scans the database in blocks of ``chunk`` rows, keeping a running top-k;
    ties go to the lower index.
    """
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = np.asarray(queries, dtype=np.float32)
    database = np.asarray(database, dtype=np.float32)
    n = len(database)
    k = min(int(k), n)
    best_s = np.zeros((len(queries), 0), dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, n, chunk):
        block = queries @ database[start:start + chunk].T  # [nq, b], rows contiguous
        kk = min(k, block.shape[1])
        part = np.argpartition(-block, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(block, part, axis=1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_s.shape[1] > k:
            keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
            best_s = np.take_along_axis(best_s, keep, axis=1)
            best_i = np.take_along_axis(best_i, keep, axis=1)
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def alpha_query_expansion(queries, database, k, alpha=3.0, chunk=65536):
    """αQE: ``L2(q + sum over the top-k of s^α x)`` (see the module docstring)."""
    queries = _normalize(queries)
    if k <= 0:
        return queries
    scores, idx = topk(queries, database, k, chunk)
    weights = np.maximum(scores, 0) ** alpha
    expanded = queries + np.einsum("qk,qkd->qd", weights, np.asarray(database)[idx])
    return _normalize(expanded)


def database_augmentation(database, k, chunk=65536):
    """DBA as DIR released it: each vector becomes itself (weight 1) plus its
    top-``k`` neighbours with weights ``k/k, (k-1)/k, ..., 1/k``, then L2
    (so that inner products stay cosines)."""
    database = _normalize(database)
    if k <= 0:
        return database
    _, idx = topk(database, database, k + 1, chunk)
    weights = np.concatenate([[1.0], (k - np.arange(idx.shape[1] - 1)) / k]).astype(np.float32)
    # The first hit is the vector itself unless a duplicate ties with it.
    return _normalize(np.einsum("r,nrd->nd", weights, database[idx]))


RERANK_M, RERANK_K, RERANK_BETA = 400, 9, 0.15
"""SuperGlobal's published defaults."""


def superglobal_rerank(queries, database, m=RERANK_M, k=RERANK_K, beta=RERANK_BETA, chunk=65536):
    """SuperGlobal re-ranking of each query's top-``m`` results.

    As published (Shao et al., "Global Features are All You Need for Image
    Retrieval and Reranking", ICCV 2023, and its code):

    1. Top-M descriptor augmentation: within the query's top-``m``, each
       result ``x_i`` becomes the weighted mean of its own top-``k + 1``
       among those ``m`` (itself first, weight 1; the others weight ``beta``
       times their similarity to ``x_i``), not re-normalised.
    2. ``s1_i = q . x_i'``; the query becomes the element-wise max of the
       ``k + 1`` refined results with the highest ``s1``, ``q'``.
    3. The ``m`` results are re-ordered by ``(s1_i + q' . x_i') / 2``.

    Args:
        queries: ``[nq, d]``; database: ``[n, d]`` (both L2-normalised here).
        m, k, beta: SuperGlobal's M, K, beta.

    Returns:
        ``(scores [nq, m'], indices [nq, m'])``, ``m' = min(m, n)``, by
        decreasing re-ranked score (ties: initial order).
    """
    queries, database = _normalize(queries), _normalize(database)
    _, idx = topk(queries, database, m, chunk)
    width = min(k + 1, idx.shape[1])
    out_scores, out_idx = [], []
    for q, top in zip(queries, idx):
        x = database[top]  # [m, d]
        sims = x @ x.T
        neighbours = np.argsort(-sims, axis=1, kind="stable")[:, :width]
        weights = beta * np.take_along_axis(sims, neighbours, axis=1)
        weights[:, 0] = 1.0
        refined = np.einsum("ab,abd->ad", weights, x[neighbours]) / weights.sum(1, keepdims=True)
        s1 = refined @ q
        expanded = refined[np.argsort(-s1, kind="stable")[:width]].max(axis=0)
        final = (s1 + refined @ expanded) / 2
        order = np.argsort(-final, kind="stable")
        out_scores.append(final[order])
        out_idx.append(top[order])
    return np.asarray(out_scores, np.float32), np.asarray(out_idx, np.int64)


KINDS = ("exact", "flat", "ivfpq")

PQ_BYTES = 64
"""PQ code bytes per vector in the default factory (64 GB of codes for a
billion images)."""


def default_kind(count):
    """``exact`` below a million vectors, ``ivfpq`` from there."""
    return "exact" if count < 1_000_000 else "ivfpq"


def default_lists(count):
    """Inverted lists for ``count`` vectors, as Faiss's guidelines give them
    ("Guidelines to choose an index", faiss wiki): about 4 sqrt(n) below a
    million, then 65536, 262144 and 1048576 up to 10M, 100M and 1B."""
    if count < 1_000_000:
        return int(max(16, 4 * np.sqrt(max(count, 1))))
    return 65536 if count < 10_000_000 else 262144 if count < 100_000_000 else 1048576


def default_factory(count, dim):
    """The Faiss ``index_factory`` string for ``count`` vectors of size ``dim``.

    ``OPQ{m}_{4m},IVF{K}[_HNSW32],PQ{m}``: an OPQ rotation to ``4 m``
    dimensions, `default_lists` inverted lists (an HNSW coarse quantiser from
    a million vectors up, where a flat one costs too much per query) and
    ``m``-byte PQ codes, ``m = min(PQ_BYTES, dim / 4)``.
    """
    m = max(1, min(PQ_BYTES, dim // 4))
    lists = default_lists(count)
    quantizer = "_HNSW32" if count >= 1_000_000 else ""
    return f"OPQ{m}_{4 * m},IVF{lists}{quantizer},PQ{m}"


def faiss_lists(factory):
    """The number of inverted lists a factory string asks for (``IVF{K}``)."""
    import re

    found = re.search(r"IVF(\d+)", factory)
    if not found:
        raise ValueError(f"factory {factory!r} has no IVF{{K}} part: ivfpq indexes are inverted files "
                         "(their lists are merged on disk)")
    return int(found.group(1))


def set_nprobe(index, nprobe):
    """Lists visited per query, and the HNSW coarse quantiser's search depth
    (at least ``nprobe``: it has to return that many lists)."""
    import faiss

    faiss.extract_index_ivf(index).nprobe = int(nprobe)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(64, 2 * int(nprobe))


def train_index(factory, dim, sample, nprobe=16):
    """A Faiss index of ``factory`` (inner product) trained on ``sample``."""
    import faiss

    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"factory {factory!r}: {' '.join(str(e).split())[:300]}") from None
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):
        # Polysemous training reorders the PQ centroids for Hamming-distance
        # filtering, which these searches do not use; it is most of the
        # training time (100 of 120 s for IVF256,PQ64 on 65536 x 512).
        ivf.do_polysemous_training = False
    lists = faiss_lists(factory)
    if len(sample) < lists:
        raise ValueError(f"{factory} has {lists} lists and needs at least that many training vectors, "
                         f"got {len(sample)}")
    index.train(_normalize(sample))
    set_nprobe(index, nprobe)
    return index


@contextlib.contextmanager
def _quiet_stdout():
    """Drops what native code prints on file descriptor 1 meanwhile: Faiss
    reports its on-disk lists' bookkeeping ("resizing ...", "updating
    ondisk filename ...") with printf."""
    import ctypes

    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def read_faiss(path):
    """A saved Faiss index; on-disk lists are looked for beside it and
    memory-mapped."""
    import faiss

    with _quiet_stdout():
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


LISTS_FILE = "lists.ivfdata"
"""The on-disk inverted lists beside ``faiss.index`` (read with
``IO_FLAG_ONDISK_SAME_DIR``, so the folder can be renamed)."""


def write_on_disk(template, batches, folder, previous=None, part_rows=1 << 20):
    """Writes ``folder/faiss.index`` with its inverted lists in
    ``folder/`` `LISTS_FILE`: the vectors of ``batches`` added in parts.

    Memory stays at one part: each ``part_rows`` vectors go into a copy of
    the empty trained index, which is written to ``folder/parts/`` and
    dropped; the parts' lists (and those of ``previous``, an index being
    extended) are then merged list by list into the lists file, read and
    written through memory maps.

    Args:
        template: the trained, empty index (`train_index`), serialised
            (``faiss.serialize_index``).
        batches: iterable of ``[n, dim]`` float32 vectors, L2-normalised
            here; their ids follow ``previous``'s.
        folder: an existing, empty folder.
        previous: a loaded index whose vectors come first, or None.
        part_rows: vectors per part.

    Returns:
        The number of vectors in the written index.
    """
    import faiss

    parts_folder = os.path.join(folder, "parts")
    os.makedirs(parts_folder)
    start = previous.ntotal if previous is not None else 0
    parts, part = [], None

    def flush():
        path = os.path.join(parts_folder, f"{len(parts):05d}.index")
        faiss.write_index(part, path)
        parts.append(path)

    for vectors in batches:
        if part is None:
            part = faiss.deserialize_index(template)
        vectors = _normalize(vectors)
        part.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
        start += len(vectors)
        if part.ntotal >= part_rows:
            flush()
            part = None
    if part is not None:
        flush()
    sources = [faiss.read_index(path, faiss.IO_FLAG_MMAP) for path in parts]
    if previous is not None:
        sources.insert(0, previous)
    index = faiss.deserialize_index(template)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.path.join(folder, LISTS_FILE))
    pointers = faiss.InvertedListsPtrVector()
    for source in sources:
        pointers.push_back(faiss.extract_index_ivf(source).invlists)
    with _quiet_stdout():
        total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    ivf.ntotal = index.ntotal = total
    faiss.write_index(index, os.path.join(folder, "faiss.index"))
    del sources, pointers
    shutil.rmtree(parts_folder)
    return total


def check_free_space(folder, template, count):
    """Refuses (ValueError) to build ``count`` vectors of the serialised
    index ``template`` into ``folder`` when its disk cannot hold them: the
    parts and then the lists file, each ``count`` codes and ids. The lists
    file is written through a memory map, where a full disk is not an error
    but a SIGBUS that kills the process."""
    import faiss

    ivf = faiss.extract_index_ivf(faiss.deserialize_index(template))
    needed = 2 * count * (ivf.code_size + 8) + (64 << 20)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"{folder}: the index needs about {needed / 2**30:.2f} GiB of disk, "
                         f"{free / 2**30:.2f} GiB are free")


def check_lists(index, path):
    """Refuses an index whose on-disk lists file is shorter than its header
    declares, or whose lists reach past it (a truncated copy, a build that
    ran out of disk): searching it would read past the end of a memory map
    and die of SIGBUS."""
    import faiss

    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return
    try:
        size = os.path.getsize(lists.filename)
    except OSError as e:
        raise ValueError(f"{path}: corrupt index ({LISTS_FILE}: {e.strerror})") from None
    entry = lists.code_size + 8  # codes, then int64 ids
    reach = max((lists.lists.at(i).offset + lists.lists.at(i).capacity * entry for i in range(lists.nlist)),
                default=0)
    if size < max(lists.totsize, reach):
        raise ValueError(f"{path}: corrupt index ({LISTS_FILE} holds {size} bytes, its header declares "
                         f"{max(lists.totsize, reach)}: truncated?)")


def empty_template(path):
    """The trained, empty copy of the ``ivfpq`` index saved in folder
    ``path``, serialised (a `write_on_disk` template for extending it)."""
    import faiss

    index = read_faiss(os.path.join(path, "faiss.index"))
    ivf = faiss.extract_index_ivf(index)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, True)
    empty.this.disown()  # owned by the index now
    ivf.ntotal = index.ntotal = 0
    return faiss.serialize_index(index)


META_KEYS = ("format_version", "dim", "count", "kind", "factory", "nprobe")


def write_meta(folder, dim, count, kind, factory, nprobe, metadata):
    """``folder/meta.json``: the format version, the index's shape and
    parameters, then the free-form ``metadata``."""
    meta = {"format_version": FORMAT_VERSION, "dim": int(dim), "count": int(count), "kind": kind,
            "factory": factory, "nprobe": int(nprobe), **metadata}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


class IdsFile:
    """``folder/ids.json``, a JSON list written a chunk of ids at a time, so
    that a build never holds them all; ``count`` says how many so far.

    Example:

    >>> with IdsFile(folder) as ids:
    ...     ids.write(["a.jpg", "b.jpg"])
    """

    def __init__(self, folder):
        self._file = open(os.path.join(folder, "ids.json"), "w")
        self._file.write("[")
        self.count = 0

    def write(self, names):
        if len(names):
            self._file.write(("," if self.count else "") + ",".join(json.dumps(str(n)) for n in names))
            self.count += len(names)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.write("]")
        self._file.close()


class Index:
    """Descriptors with ids; exact or FAISS search; versioned save and load.

    Args:
        dim: descriptor size.
        metadata: free-form dict saved with the index (model, descriptor
            information).
        kind: one of `KINDS`.
        factory: for ``ivfpq``, the Faiss ``index_factory`` string
            (default: `default_factory` for the collection size).
        nprobe: inverted lists visited per query (``ivfpq``).
    """

    def __init__(self, dim, metadata=None, kind="exact", factory=None, nprobe=16):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        self.dim = int(dim)
        self.metadata = dict(metadata or {})
        self.kind = kind
        self.factory, self.nprobe = factory, int(nprobe)
        self.descriptors = np.zeros((0, self.dim), dtype=np.float32)
        self.ids = []
        self._faiss = None
        self._on_disk = False
        self.path = None  # the folder it was loaded from

    def __len__(self):
        return len(self.ids)

    @property
    def trained(self):
        return self.kind != "ivfpq" or (self._faiss is not None and self._faiss.is_trained)

    def train(self, sample, count=None):
        """Trains the ``ivfpq`` index on ``sample`` (exact kinds ignore it).

        ``count`` is the expected collection size, which picks the default
        factory; its lists are then capped at one per 39 training vectors,
        the fewest Faiss's k-means accepts without a warning.
        """
        if self.kind != "ivfpq":
            return
        if self.factory is None:
            factory = default_factory(count or len(sample), self.dim)
            lists = faiss_lists(factory)
            self.factory = factory.replace(f"IVF{lists}", f"IVF{max(1, min(lists, len(sample) // 39))}")
        self._faiss = train_index(self.factory, self.dim, sample, self.nprobe)

    def add(self, descriptors, ids):
        """Appends ``[n, dim]`` descriptors (L2-normalised here) and their ids."""
        ids = [str(i) for i in ids]
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if descriptors.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} descriptors of size {self.dim}, got {descriptors.shape}")
        descriptors = _normalize(descriptors)
        if self.kind == "ivfpq":
            if self._on_disk:
                raise ValueError("an index with on-disk lists grows by a rebuild: serving.index --append")
            if not self.trained:
                self.train(descriptors)
            self._faiss.add(descriptors)
        else:
            self.descriptors = np.concatenate([self.descriptors, descriptors])
            if self._faiss is not None:  # a built flat index grows with it
                self._faiss.add(descriptors)
        self.ids.extend(ids)

    def _flat(self):
        if self._faiss is None:
            import faiss

            self._faiss = faiss.IndexFlatIP(self.dim)
            self._faiss.add(self.descriptors)
        return self._faiss

    def search(self, queries, k=10, qe=0, alpha=3.0, rerank=False, chunk=65536):
        """``(scores, ids)``: for each query, its top-``k`` (after αQE if
        ``qe``; re-ranked with `superglobal_rerank` if ``rerank``, its
        scores the re-ranked ones)."""
        if int(k) < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query descriptors have size {queries.shape[1]}, the index holds {self.dim}")
        if (qe or rerank) and self.kind == "ivfpq":
            raise ValueError("αQE and re-ranking need the database vectors: use an exact or flat index")
        if rerank:
            if qe:
                raise ValueError("choose αQE or SuperGlobal re-ranking (it refines the query itself)")
            scores, idx = superglobal_rerank(queries, self.descriptors, max(RERANK_M, int(k)), chunk=chunk)
            k = min(int(k), len(self))
            return scores[:, :k], [[self.ids[i] for i in row[:k]] for row in idx]
        if qe:
            queries = alpha_query_expansion(queries, self.descriptors, qe, alpha, chunk)
        queries = _normalize(queries)
        k = min(int(k), len(self))
        if self.kind == "exact":
            scores, idx = topk(queries, self.descriptors, k, chunk)
        else:
            index = self._flat() if self.kind == "flat" else self._faiss
            scores, idx = index.search(queries, k)
        return scores, [[self.ids[i] if i >= 0 else None for i in row] for row in idx]

    def save(self, path):
        """Writes the folder ``path`` atomically (`deep_retrieval.files.atomic_write`):
        descriptors.npy (exact kinds) or faiss.index, ids.json, meta.json.
        A save killed mid-way leaves the previous index in place (or in
        ``path.old``, which `load` reads)."""
        if self._on_disk:
            raise ValueError("an index with on-disk lists is written by its build (serving.index)")

        def write(folder):
            os.makedirs(folder)
            if self.kind == "ivfpq":
                import faiss

                faiss.write_index(self._faiss, os.path.join(folder, "faiss.index"))
            else:
                np.save(os.path.join(folder, "descriptors.npy"), self.descriptors)
            with IdsFile(folder) as ids:
                ids.write(self.ids)
            write_meta(folder, self.dim, len(self), self.kind, self.factory, self.nprobe, self.metadata)

        path = path.rstrip("/")
        with exclusive_lock(path + ".lock", f"{path}: another process is writing this index"):
            remove_stale_temporaries(path)
            atomic_write(path, write)

    @classmethod
    def load(cls, path, expected_dim=None):
        """Reads an index folder; checks its format version and descriptor size.

        If ``path`` is missing but ``path.old`` exists (a save killed between
        its two renames), the previous index in ``path.old`` is read.
        """
        path = path.rstrip("/")
        if not os.path.exists(path) and os.path.exists(path + ".old"):
            path = path + ".old"
        try:
            with open(os.path.join(path, "meta.json")) as f:
                meta = json.load(f)
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: index format {meta.get('format_version')}, this version reads {FORMAT_VERSION}")
            with open(os.path.join(path, "ids.json")) as f:
                ids = json.load(f)
            kind = meta.get("kind", "exact")
            if kind == "ivfpq":
                stored = read_faiss(os.path.join(path, "faiss.index"))
                check_lists(stored, path)
                count, vectors_dim = stored.ntotal, stored.d
            else:
                descriptors = np.load(os.path.join(path, "descriptors.npy"), allow_pickle=False)
                count, vectors_dim = descriptors.shape[0], descriptors.shape[-1]
        except FileNotFoundError as e:
            raise ValueError(f"{path}: not an index folder ({os.path.basename(e.filename)} missing)") from e
        except ValueError as e:
            if str(e).startswith(path):
                raise
            raise ValueError(f"{path}: corrupt index ({e})") from e
        except Exception as e:  # faiss raises RuntimeError on bad files
            raise ValueError(f"{path}: corrupt index ({e})") from e
        try:
            dim = int(meta["dim"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt index (meta.json has no valid dim)") from None
        if (count, vectors_dim) != (len(ids), dim) or meta.get("count") != len(ids):
            raise ValueError(f"{path}: corrupt index ({count} vectors of size {vectors_dim} "
                             f"for {len(ids)} ids of size {dim})")
        if expected_dim is not None and dim != int(expected_dim):
            raise ValueError(f"{path}: descriptors of size {dim}, but the model produces {expected_dim}")
        extra = {k: v for k, v in meta.items() if k not in META_KEYS + ("nlist", "m")}  # nlist, m: before factories
        index = cls(dim, extra, kind, meta.get("factory"), meta.get("nprobe", 16))
        index.ids, index.path = list(ids), path
        if kind == "ivfpq":
            set_nprobe(stored, index.nprobe)
            index._faiss = stored
            index._on_disk = os.path.exists(os.path.join(path, LISTS_FILE))
        else:
            index.descriptors = descriptors.astype(np.float32)
        return index
