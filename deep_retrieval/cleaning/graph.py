"""The graph of verified pairs: which pairs to match, region consistency,
connected components, and the landmark boxes of kept images."""

import itertools

import numpy as np


def connected_components(count, edges):
    """Components of an undirected graph on ``count`` nodes (union-find).

    Returns:
        Lists of node indices, largest first (ties: smallest first node).
    """
    parent = list(range(count))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in edges:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups = {}
    for i in range(count):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def select_components(components, min_component_size=0):
    """The nodes kept: the largest component (``min_component_size == 0``),
    or every component of at least ``min_component_size`` nodes. A single
    node is never a verified group."""
    if not components:
        return []
    if min_component_size <= 0:
        chosen = [components[0]] if len(components[0]) >= 2 else []
    else:
        chosen = [c for c in components if len(c) >= max(min_component_size, 2)]
    return sorted(i for c in chosen for i in c)


def box_from_points(points, size):
    """Bounding box ``(x0, y0, x1, y1)`` of ``[n, 2]`` points, clipped to the
    image ``size (w, h)``; None without points."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    if len(points) == 0:
        return None
    w, h = size
    x0, y0 = np.clip(points.min(axis=0), 0, [w, h])
    x1, y1 = np.clip(points.max(axis=0), 0, [w, h])
    if x1 <= x0 or y1 <= y0:
        return None
    return (float(x0), float(y0), float(x1), float(y1))


def box_overlap(a, b):
    """Intersection of two boxes over the smaller one's area (1 when one
    holds the other); 0 for a missing box."""
    if a is None or b is None:
        return 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def consistent_edges(edges, points, inliers, sizes, threshold):
    """The verified pairs whose matches lie on each image's landmark.

    Matches on a shared background or object link images of different
    landmarks. In each image, the matches of a pair cover a region (their
    bounding box); a landmark is the region that most pairs agree on (DIR's
    region consistency). For each image the consensus region is the pair
    box with the largest inlier-weighted overlap with its other pair boxes;
    a pair is kept when its box overlaps the consensus region of *both* its
    images by at least ``threshold`` (`box_overlap`).

    Args:
        edges: verified pairs ``(a, b)``.
        points: ``points[i][j]`` inlier points of ``i`` in its pair with ``j``.
        inliers: ``{(a, b): count}``.
        sizes: ``(w, h)`` of each node's image.
        threshold: in [0, 1]; 0 keeps every pair.

    Returns:
        The kept pairs, in order.
    """
    if threshold <= 0:
        return list(edges)
    weight = {**inliers, **{(b, a): n for (a, b), n in inliers.items()}}
    consensus = {}
    for i, partners in points.items():
        boxes = {j: box_from_points(p, sizes[i]) for j, p in partners.items()}
        score = {j: sum(weight[(i, k)] * box_overlap(boxes[j], boxes[k]) for k in boxes) for j in boxes}
        best = max(sorted(score), key=lambda j: score[j])
        consensus[i] = (boxes, boxes[best])
    kept = []
    for a, b in edges:
        if all(box_overlap(consensus[i][0][j], consensus[i][1]) >= threshold for i, j in ((a, b), (b, a))):
            kept.append((a, b))
    return kept


def candidate_pairs(features, max_pairs, neighbors):
    """All pairs of a label, or, above ``max_pairs``, each image with its
    ``neighbors`` nearest images by the mean-RootSIFT global descriptor."""
    n = len(features)
    if n * (n - 1) // 2 <= max_pairs:
        return list(itertools.combinations(range(n), 2))
    glob = np.stack([
        f.descriptors.mean(axis=0) if len(f.descriptors) else np.zeros(128, np.float32)
        for f in features
    ])
    glob /= np.maximum(np.linalg.norm(glob, axis=1, keepdims=True), 1e-12)
    sim = glob @ glob.T
    np.fill_diagonal(sim, -np.inf)
    k = min(neighbors, n - 1)
    nearest = np.argsort(-sim, axis=1)[:, :k]
    return sorted({(min(i, j), max(i, j)) for i in range(n) for j in nearest[i]})
