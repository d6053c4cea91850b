"""Hard-negative mining and triplet sampling (numpy, backend-free).

DIR trains on triplets whose negative is one of the images nearest to the
query under the current model, taken from other landmarks, with at most one
image per landmark so that one confusing landmark does not fill the batch.
"""

import numpy as np


def hard_negatives(query_descriptors, query_labels, pool_descriptors, pool_labels, num_negatives):
    """Nearest pool images of other labels, at most one per label.

    Args:
        query_descriptors: ``[nq, D]``.
        query_labels: ``[nq]``.
        pool_descriptors: ``[np, D]``.
        pool_labels: ``[np]``; pool images may have labels absent from the
            queries (distractors).
        num_negatives: ``k`` negatives per query.

    Returns:
        ``[nq, k]`` pool indices, hardest (most similar) first; ``-1`` pads
        rows for which fewer than ``k`` labels qualify.
    """
    q = np.asarray(query_descriptors, dtype=np.float32)
    p = np.asarray(pool_descriptors, dtype=np.float32)
    query_labels = np.asarray(query_labels)
    pool_labels = np.asarray(pool_labels)
    scores = q @ p.T
    out = np.full((len(q), num_negatives), -1, dtype=np.int64)
    for i in range(len(q)):
        order = np.argsort(-scores[i], kind="stable")
        order = order[pool_labels[order] != query_labels[i]]
        _, first = np.unique(pool_labels[order], return_index=True)
        picks = order[np.sort(first)][:num_negatives]
        out[i, : len(picks)] = picks
    return out


def sample_triplets(labels, negatives, rng, queries=None, exclude=()):
    """Triplets ``(query, positive, negative)`` of pool indices.

    Args:
        labels: ``[n]`` label of each training image.
        negatives: ``[len(queries), k]`` from `hard_negatives` (pool indices
            already mapped to training indices).
        rng: numpy Generator.
        queries: training indices that were mined (default ``arange(n)``).
        exclude: training indices never used as positives (images that
            failed to decode).

    Returns:
        ``[m, 3]`` int array: for each query with a valid negative, a random
        positive of the same label (not itself) and one of its hard negatives
        drawn uniformly.
    """
    labels = np.asarray(labels)
    queries = np.arange(len(labels)) if queries is None else np.asarray(queries)
    by_label, exclude = {}, set(int(i) for i in exclude)
    for idx, lab in enumerate(labels):
        if idx not in exclude:
            by_label.setdefault(lab, []).append(idx)
    rows = []
    for qi, negs in zip(queries, negatives):
        negs = negs[negs >= 0]
        positives = [j for j in by_label.get(labels[qi], []) if j != qi]
        if not len(negs) or not positives:
            continue
        rows.append((qi, rng.choice(positives), rng.choice(negs)))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)
