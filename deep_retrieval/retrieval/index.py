"""The search index: descriptors with ids, searched exactly or with Faiss,
saved as a versioned folder written atomically.

Three kinds:

* ``exact``: a chunked matrix product in numpy (`reranking.topk`);
* ``flat``: FAISS ``IndexFlatIP`` (exact, FAISS's kernels);
* ``ivfpq``: a FAISS inverted file built from an ``index_factory`` string
  (by default `faiss_ivf.default_factory`: an OPQ rotation, inverted lists
  over a trained coarse quantiser, product-quantised codes), approximate,
  for large collections; αQE and DBA need one of the exact kinds. Built
  from shards (`faiss_ivf.write_on_disk`), its lists live in a file beside
  the index and are read through a memory map. Its descriptors are kept
  too, as float16 in `VECTORS_FILE` (read through a memory map): a search
  takes ``k_factor * k`` candidates from the codes and re-ranks them by
  their exact inner product (`reranking.rescore`), as Faiss's
  ``IndexRefine`` does, so that the codes only have to find the
  neighbours, not order them.

Every kind keeps its ids in an `id_store.IdStore`, read through memory
maps. `default_kind` picks by collection size.
"""

import json
import os

import numpy as np

from deep_retrieval.io.atomic import atomic_write, exclusive_lock, remove_stale_temporaries
from deep_retrieval.retrieval.faiss_ivf import (
    LISTS_FILE,
    check_lists,
    default_factory,
    faiss_lists,
    read_faiss,
    set_nprobe,
    train_index,
)
from deep_retrieval.retrieval.id_store import IdStore, IdWriter, read_only_map
from deep_retrieval.retrieval.reranking import (
    RERANK_M,
    alpha_query_expansion,
    normalize,
    rescore,
    superglobal_rerank,
    topk,
)

FORMAT_VERSION = 2
"""Version 2 keeps the ids in an `id_store.IdStore`; version 1 (read too)
kept them in ``ids.json``."""

KINDS = ("exact", "flat", "ivfpq")

VECTORS_FILE = "vectors.f16"
"""An ``ivfpq`` index's descriptors, float16 rows in id order, no header."""

K_FACTOR = 32
"""Candidates per result an ``ivfpq`` search re-ranks exactly."""


def default_kind(count):
    """``exact`` below a million vectors, ``ivfpq`` from there."""
    return "exact" if count < 1_000_000 else "ivfpq"


META_KEYS = ("format_version", "dim", "count", "kind", "factory", "nprobe", "k_factor")


def write_meta(folder, dim, count, kind, factory, nprobe, metadata, k_factor=K_FACTOR):
    """``folder/meta.json``: the format version, the index's shape and
    parameters, then the free-form ``metadata``."""
    meta = {"format_version": FORMAT_VERSION, "dim": int(dim), "count": int(count), "kind": kind,
            "factory": factory, "nprobe": int(nprobe), "k_factor": int(k_factor), **metadata}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


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
        k_factor: ``ivfpq``: candidates per result re-ranked exactly (1:
            the codes' order, no re-ranking).
    """

    def __init__(self, dim, metadata=None, kind="exact", factory=None, nprobe=16, k_factor=K_FACTOR):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        self.dim = int(dim)
        self.metadata = dict(metadata or {})
        self.kind = kind
        self.factory, self.nprobe = factory, int(nprobe)
        if int(k_factor) < 1:
            raise ValueError(f"k_factor must be at least 1, got {k_factor}")
        self.k_factor = int(k_factor)
        self.descriptors = np.zeros((0, self.dim), dtype=np.float32)
        self.vectors = np.zeros((0, self.dim), dtype=np.float16) if kind == "ivfpq" else None
        self.ids = IdStore()
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
        descriptors = normalize(descriptors)
        if self.kind == "ivfpq":
            if self._on_disk:
                raise ValueError("an index with on-disk lists grows by a rebuild: serving.index --append")
            if not self.trained:
                self.train(descriptors)
            self._faiss.add(descriptors)
            self.vectors = np.concatenate([self.vectors, descriptors.astype(np.float16)])
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
        queries = normalize(queries)
        k = min(int(k), len(self))
        if self.kind == "exact":
            scores, idx = topk(queries, self.descriptors, k, chunk)
        elif self.kind == "ivfpq" and self.vectors is not None and self.k_factor > 1:
            _, candidates = self._faiss.search(queries, min(len(self), k * self.k_factor))
            scores, idx = rescore(queries, self.vectors, candidates, k)
        else:
            index = self._flat() if self.kind == "flat" else self._faiss
            scores, idx = index.search(queries, k)
        return scores, [[self.ids[i] if i >= 0 else None for i in row] for row in idx]

    def save(self, path):
        """Writes the folder ``path`` atomically (`deep_retrieval.io.atomic.atomic_write`):
        descriptors.npy (exact kinds) or faiss.index, the ids
        (`id_store.FILES`), meta.json.
        A save killed mid-way leaves the previous index in place (or in
        ``path.old``, which `load` reads)."""
        if self._on_disk:
            raise ValueError("an index with on-disk lists is written by its build (serving.index)")

        def write(folder):
            os.makedirs(folder)
            if self.kind == "ivfpq":
                import faiss

                faiss.write_index(self._faiss, os.path.join(folder, "faiss.index"))
                if self.vectors is not None:
                    np.ascontiguousarray(self.vectors, np.float16).tofile(os.path.join(folder, VECTORS_FILE))
            else:
                np.save(os.path.join(folder, "descriptors.npy"), self.descriptors)
            with IdWriter(folder, len(self)) as ids:
                ids.copy(self.ids)
            write_meta(folder, self.dim, len(self), self.kind, self.factory, self.nprobe, self.metadata,
                       self.k_factor)

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
            version = meta.get("format_version")
            if version not in (1, FORMAT_VERSION):
                raise ValueError(f"{path}: index format {version}, this version reads 1 to {FORMAT_VERSION}")
            if version == 1:
                ids = IdStore()
                with open(os.path.join(path, "ids.json")) as f:
                    ids.extend(json.load(f))
            else:
                ids = IdStore(path)
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
        index = cls(dim, extra, kind, meta.get("factory"), meta.get("nprobe", 16), meta.get("k_factor", K_FACTOR))
        index.ids, index.path = ids, path
        if kind == "ivfpq":
            set_nprobe(stored, index.nprobe)
            index._faiss = stored
            index._on_disk = os.path.exists(os.path.join(path, LISTS_FILE))
            index.vectors = read_vectors(path, count, dim)
        else:
            index.descriptors = descriptors.astype(np.float32)
        return index


def read_vectors(path, count, dim):
    """The memory map of index folder ``path``'s `VECTORS_FILE` (``[count,
    dim]`` float16), or None for an index built without it."""
    file = os.path.join(path, VECTORS_FILE)
    if not os.path.exists(file):
        return None
    size, want = os.path.getsize(file), count * dim * 2
    if size != want:
        raise ValueError(f"{path}: corrupt index ({VECTORS_FILE} holds {size} bytes, {count} x {dim} float16 "
                         f"are {want}: truncated?)")
    return read_only_map(file, np.float16, (count, dim))
