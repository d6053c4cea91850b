"""Re-ranking over L2-normalised descriptors, in numpy: exact top-k, αQE,
DBA and SuperGlobal.

* αQE (Radenović, Tolias, Chum, TPAMI 2018): the query is replaced by
  ``L2(q + sum_{i<k} s_i^α x_i)`` over its top-``k`` results, ``s_i`` their
  similarities (negative ones count as 0).
* DBA (Gordo et al., IJCV 2017): every database vector is replaced by
  ``L2(sum_{r=0..k} (k - r) / k * x_(r))`` over itself (``r = 0``) and its
  ``k`` nearest database neighbours, weights falling linearly with rank.
* `superglobal_rerank` re-ranks the top results with global descriptors
  only (SuperGlobal, Shao et al., ICCV 2023).

Scores are computed a block of ``chunk`` database rows at a time, so memory
stays at the database plus ``chunk x n_queries`` scores.
"""

import numpy as np


def normalize(x):
    """Rows scaled to unit L2 norm, as float32."""
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


def rescore(queries, vectors, candidates, k, chunk=64):
    """Exact re-ranking of short lists: ``(scores [nq, k], indices [nq, k])``,
    the ``k`` best of each query's ``candidates`` (``[nq, c]`` rows of
    ``vectors``, ``-1`` for none) by their exact inner product.

    ``vectors`` may be a memory map (float16 on disk): each chunk of queries
    reads the rows its short lists name once, in file order, so the page
    cache, not the heap, holds them. Missing results are ``-inf`` / ``-1``.
    """
    queries = np.asarray(queries, dtype=np.float32)
    candidates = np.asarray(candidates, dtype=np.int64)
    k = min(int(k), candidates.shape[1])
    scores = np.full((len(queries), k), -np.inf, np.float32)
    indices = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), chunk):
        q, c = queries[start:start + chunk], candidates[start:start + chunk]
        rows, inverse = np.unique(np.where(c >= 0, c, 0), return_inverse=True)
        exact = np.asarray(vectors[rows], dtype=np.float32) @ q.T  # [rows, nq]
        s = exact[inverse.reshape(c.shape), np.arange(len(q))[:, None]]
        s = np.where(c >= 0, s, -np.inf)
        order = np.lexsort((c, -s), axis=1)[:, :k]
        scores[start:start + len(q)] = np.take_along_axis(s, order, axis=1)
        indices[start:start + len(q)] = np.where(np.isfinite(scores[start:start + len(q)]),
                                                 np.take_along_axis(c, order, axis=1), -1)
    return scores, indices


def alpha_query_expansion(queries, database, k, alpha=3.0, chunk=65536):
    """αQE: ``L2(q + sum over the top-k of s^α x)`` (see the module docstring)."""
    queries = normalize(queries)
    if k <= 0:
        return queries
    scores, idx = topk(queries, database, k, chunk)
    weights = np.maximum(scores, 0) ** alpha
    expanded = queries + np.einsum("qk,qkd->qd", weights, np.asarray(database)[idx])
    return normalize(expanded)


def database_augmentation(database, k, chunk=65536):
    """DBA as DIR released it: each vector becomes itself (weight 1) plus its
    top-``k`` neighbours with weights ``k/k, (k-1)/k, ..., 1/k``, then L2
    (so that inner products stay cosines)."""
    database = normalize(database)
    if k <= 0:
        return database
    _, idx = topk(database, database, k + 1, chunk)
    weights = np.concatenate([[1.0], (k - np.arange(idx.shape[1] - 1)) / k]).astype(np.float32)
    # The first hit is the vector itself unless a duplicate ties with it.
    return normalize(np.einsum("r,nrd->nd", weights, database[idx]))


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
    queries, database = normalize(queries), normalize(database)
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
