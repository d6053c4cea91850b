"""Retrieval evaluation: mAP and mP@k as in the Revisited Oxford/Paris kit.

Semantics (Radenović et al., CVPR 2018, and the Oxford ``compute_ap``):

* ``ranks`` is ``[n_db, n_queries]``: column ``q`` lists database indices,
  best first.
* For query ``q`` the positives are ``gnd[q]["ok"]``, and ``gnd[q]["junk"]``
  images are removed from the ranking before scoring.
* AP is the trapezoid rule over the recall steps of the positives, divided
  by the number of positives: with positives at 0-based junk-free ranks
  ``r_0 < r_1 < ...``, ``AP = sum_j (P0_j + P1_j) / 2 / n_pos`` with
  ``P0_j = j / r_j`` (1 when ``r_j = 0``) and ``P1_j = (j + 1) / (r_j + 1)``.
* A query without positives scores NaN and is left out of the means.
* mP@k: precision at ``k' = min(k, rank of the last positive)`` (1-based), so
  a query whose positives all lie above rank ``k`` is not penalised for the
  empty tail.
"""

import numpy as np

KAPPAS = (1, 5, 10)


def _positions(ranking, ok, junk):
    """0-based positions of the positives once junk is removed."""
    is_ok = np.isin(ranking, ok)
    is_junk = np.isin(ranking, junk)
    junk_before = np.cumsum(is_junk) - is_junk  # junk strictly before
    where = np.nonzero(is_ok)[0]
    return where - junk_before[where]


def average_precision(positions, num_positives):
    """AP from sorted 0-based positive positions (trapezoid rule)."""
    positions = np.asarray(positions, dtype=np.float64)
    j = np.arange(len(positions), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p0 = np.where(positions == 0, 1.0, j / positions)
    p1 = (j + 1) / (positions + 1)
    return float(np.sum((p0 + p1) / 2) / num_positives)


def compute_map(ranks, gnd, kappas=KAPPAS):
    """mAP, per-query AP, mP@k and per-query P@k.

    Args:
        ranks: ``[n_db, n_queries]`` int array (see module docstring).
        gnd: per query, a dict with ``ok`` and optionally ``junk``.
        kappas: the ``k`` of mP@k.

    Returns:
        ``(map, aps, mpr, prs)``: fractions in [0, 1]; ``aps`` ``[n_queries]``,
        ``mpr`` ``[len(kappas)]``, ``prs`` ``[n_queries, len(kappas)]``; NaN
        rows for queries without positives, excluded from ``map``/``mpr``.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(
            f"ranks must be [n_db, n_queries={len(gnd)}], got shape {ranks.shape}"
        )
    nq = len(gnd)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for q in range(nq):
        ok = np.asarray(gnd[q].get("ok", []), dtype=np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        pos = _positions(ranks[:, q], ok, junk)
        aps[q] = average_precision(pos, len(ok))
        last = pos.max() + 1 if pos.size else 1
        for i, k in enumerate(kappas):
            kq = min(last, k)
            prs[q, i] = np.sum(pos + 1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def _ints(values):
    return np.asarray([] if values is None else values, dtype=np.int64).ravel()


def revisited_protocols(gnd):
    """Easy/Medium/Hard ground truth of the Revisited Oxford/Paris protocol."""
    e = [{"ok": _ints(g["easy"]), "junk": np.concatenate([_ints(g["junk"]), _ints(g["hard"])])} for g in gnd]
    m = [{"ok": np.concatenate([_ints(g["easy"]), _ints(g["hard"])]), "junk": _ints(g["junk"])} for g in gnd]
    h = [{"ok": _ints(g["hard"]), "junk": np.concatenate([_ints(g["junk"]), _ints(g["easy"])])} for g in gnd]
    return {"easy": e, "medium": m, "hard": h}


def oxford_protocol(gnd):
    """Original Oxford5k/Paris6k: positives good + ok, junk removed."""
    return [{"ok": np.concatenate([_ints(g.get("good")), _ints(g.get("ok"))]), "junk": _ints(g.get("junk"))}
            for g in gnd]


def holidays_protocol(gnd, query_indices):
    """INRIA Holidays: positives ``ok``; the query's own database entry is
    removed from its ranking (Jégou et al.'s ``holidays_map.py`` skips the
    query image), as junk.

    Args:
        gnd: per query, a dict with ``ok`` (and optionally ``junk``).
        query_indices: database index of each query image (Holidays queries
            are database images).
    """
    return [
        {"ok": np.setdiff1d(_ints(g["ok"]), [qi]), "junk": np.union1d(_ints(g.get("junk")), [qi])}
        for g, qi in zip(gnd, query_indices)
    ]


def protocols_for(gnd, query_indices=None):
    """The protocols a ground truth supports, by its keys.

    ``query_indices`` (database index of each query, None for queries
    outside the database) marks Holidays-style benchmarks, whose queries are
    database images: with every query in the database and ``ok``-only
    ground truth, the ``holidays`` protocol applies.
    """
    keys = set(gnd[0]) if gnd else set()
    if {"easy", "hard"} <= keys:
        return revisited_protocols(gnd)
    if "good" in keys:
        return {"oxford": oxford_protocol(gnd)}
    if query_indices is not None and len(query_indices) and all(i is not None for i in query_indices):
        return {"holidays": holidays_protocol(gnd, query_indices)}
    return {"all": [{"ok": _ints(g["ok"]), "junk": _ints(g.get("junk"))} for g in gnd]}


def rank_by_similarity(query_descriptors, db_descriptors):
    """``[n_db, n_queries]`` ranks by decreasing inner product (ties: lower index)."""
    scores = np.asarray(db_descriptors) @ np.asarray(query_descriptors).T
    return np.argsort(-scores, axis=0, kind="stable")


def rerank_ranks(query_descriptors, db_descriptors, **kwargs):
    """`rank_by_similarity` with each query's top results re-ordered by
    `reranking.superglobal_rerank` (``kwargs``: its m, k, beta); the rest keep
    their initial order."""
    from deep_retrieval.retrieval import reranking

    ranks = rank_by_similarity(query_descriptors, db_descriptors)
    _, top = reranking.superglobal_rerank(query_descriptors, db_descriptors, **kwargs)
    out = np.empty_like(ranks)
    for j in range(ranks.shape[1]):
        rest = ranks[~np.isin(ranks[:, j], top[j]), j]
        out[:, j] = np.concatenate([top[j], rest])
    return out


def evaluate(ranks, gnd, kappas=KAPPAS, query_indices=None):
    """Per protocol: ``{"map": .., "mp@1": .., ...}`` in percent
    (``query_indices``: see `protocols_for`)."""
    out = {}
    for name, g in protocols_for(gnd, query_indices).items():
        m, _, mpr, _ = compute_map(ranks, g, kappas)
        out[name] = {"map": 100 * m, **{f"mp@{k}": 100 * p for k, p in zip(kappas, mpr)}}
    return out


def format_table(results):
    """A small text table of `evaluate` results."""
    cols = list(next(iter(results.values())))
    lines = ["protocol " + " ".join(f"{c:>7}" for c in cols)]
    for name, r in results.items():
        lines.append(f"{name:8} " + " ".join(f"{r[c]:7.2f}" for c in cols))
    return "\n".join(lines)


def box_recall(candidates, targets, iou_threshold=0.5):
    """Share of target boxes matched by at least one candidate box.

    Args:
        candidates: one ``[k, 4]`` array of ``(x0, y0, x1, y1)`` per image.
        targets: ``[n_images, 4]`` one target box per image (same units).
        iou_threshold: a candidate matches with IoU >= this.

    Returns:
        The recall in ``[0, 1]`` (NaN without targets).
    """
    hits = []
    for boxes, target in zip(candidates, np.asarray(targets, np.float64)):
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        iw = np.clip(np.minimum(boxes[:, 2], target[2]) - np.maximum(boxes[:, 0], target[0]), 0, None)
        ih = np.clip(np.minimum(boxes[:, 3], target[3]) - np.maximum(boxes[:, 1], target[1]), 0, None)
        inter = iw * ih
        union = (
            (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            + (target[2] - target[0]) * (target[3] - target[1])
            - inter
        )
        hits.append(bool(len(boxes)) and bool((inter / np.maximum(union, 1e-12) >= iou_threshold).any()))
    return float(np.mean(hits)) if hits else float("nan")
