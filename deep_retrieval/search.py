"""Nearest-neighbour search over L2-normalised descriptors, with αQE and DBA.

`Index` holds descriptors and ids. Three kinds:

* ``exact``: a chunked matrix product in numpy (the database is stored once,
  scores are computed a block of rows at a time, so memory stays at the
  database plus ``chunk x n_queries`` scores);
* ``flat``: FAISS ``IndexFlatIP`` (exact, FAISS's kernels);
* ``ivfpq``: FAISS IVF-PQ (inverted lists over a trained coarse quantiser,
  product-quantised codes), approximate, for large collections; only the
  codes are kept, so αQE and DBA need one of the exact kinds.

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

import json
import os
import shutil

import numpy as np

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


def default_kind(count):
    """``exact`` below a million vectors, ``ivfpq`` from there."""
    return "exact" if count < 1_000_000 else "ivfpq"


def default_ivfpq(count, dim):
    """``(nlist, m)``: about 4 sqrt(n) lists; 32 dimensions per PQ code byte."""
    nlist = int(min(65536, max(16, 4 * np.sqrt(max(count, 1)))))
    m = max(1, dim // 32)
    while dim % m:
        m -= 1
    return nlist, m


class Index:
    """Descriptors with ids; exact or FAISS search; versioned save and load.

    Args:
        dim: descriptor size.
        metadata: free-form dict saved with the index (model, descriptor
            information).
        kind: one of `KINDS`.
        nlist, m, nprobe: IVF-PQ lists, PQ sub-quantisers (8 bits each) and
            lists visited per query (defaults: `default_ivfpq`, 16).
    """

    def __init__(self, dim, metadata=None, kind="exact", nlist=None, m=None, nprobe=16):
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        self.dim = int(dim)
        self.metadata = dict(metadata or {})
        self.kind = kind
        self.nlist, self.m, self.nprobe = nlist, m, int(nprobe)
        self.descriptors = np.zeros((0, self.dim), dtype=np.float32)
        self.ids = []
        self._faiss = None

    def __len__(self):
        return len(self.ids)

    @property
    def trained(self):
        return self.kind != "ivfpq" or (self._faiss is not None and self._faiss.is_trained)

    def train(self, sample, count=None):
        """Trains the IVF-PQ quantisers on ``sample`` (ignored by exact kinds).

        ``count`` is the expected collection size (sets the default number of
        lists; capped so that each list gets 39 training vectors, as FAISS
        asks).
        """
        if self.kind != "ivfpq":
            return
        import faiss

        sample = _normalize(sample)
        nlist, m = default_ivfpq(count or len(sample), self.dim)
        self.nlist = self.nlist or max(1, min(nlist, len(sample) // 39))
        self.m = self.m or m
        if len(sample) < self.nlist:
            raise ValueError(f"IVF-PQ with {self.nlist} lists needs at least that many training vectors, "
                             f"got {len(sample)}")
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.m, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
        index.nprobe = self.nprobe
        self._faiss = index

    def add(self, descriptors, ids):
        """Appends ``[n, dim]`` descriptors (L2-normalised here) and their ids."""
        ids = [str(i) for i in ids]
        descriptors = np.asarray(descriptors, dtype=np.float32)
        if descriptors.shape != (len(ids), self.dim):
            raise ValueError(f"expected {len(ids)} descriptors of size {self.dim}, got {descriptors.shape}")
        descriptors = _normalize(descriptors)
        if self.kind == "ivfpq":
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
        """Writes ``path/`` atomically: descriptors.npy, ids.json, meta.json.

        The new folder is written beside the old one and swapped in by two
        renames (``path -> path.old``, ``path.tmp -> path``); a crash between
        them leaves ``path.old``, which `load` reads and the next save puts
        back first, so the previous index is never lost.
        """
        path = path.rstrip("/")
        tmp, old = path + ".tmp", path + ".old"
        if not os.path.exists(path) and os.path.exists(old):
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if self.kind == "ivfpq":
            import faiss

            faiss.write_index(self._faiss, os.path.join(tmp, "faiss.index"))
        else:
            np.save(os.path.join(tmp, "descriptors.npy"), self.descriptors)
        with open(os.path.join(tmp, "ids.json"), "w") as f:
            json.dump(self.ids, f)
        meta = {"format_version": FORMAT_VERSION, "dim": self.dim, "count": len(self), "kind": self.kind,
                "nlist": self.nlist, "m": self.m, "nprobe": self.nprobe, **self.metadata}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)

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
                import faiss

                stored = faiss.read_index(os.path.join(path, "faiss.index"))
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
        extra = {k: v for k, v in meta.items()
                 if k not in ("format_version", "dim", "count", "kind", "nlist", "m", "nprobe")}
        index = cls(dim, extra, kind, meta.get("nlist"), meta.get("m"), meta.get("nprobe", 16))
        index.ids = list(ids)
        if kind == "ivfpq":
            stored.nprobe = index.nprobe
            index._faiss = stored
        else:
            index.descriptors = descriptors.astype(np.float32)
        return index
