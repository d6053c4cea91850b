"""One label cleaned end to end: features, candidate pairs, verification,
region consistency, the kept component and each kept image's box."""

import numpy as np

from deep_retrieval.cleaning.features import extract_features, load_gray
from deep_retrieval.cleaning.graph import (
    box_from_points,
    candidate_pairs,
    connected_components,
    consistent_edges,
    select_components,
)
from deep_retrieval.cleaning.verification import transform_points, verify_pair


def clean_label(images, config):
    """Cleans the images of one label.

    Args:
        images: list of ``(key, path)``.
        config: `CleanConfig`.

    Returns:
        One dict per image, in order: ``key``, ``kept`` (bool), ``reason``
        (why it was dropped, "" when kept), ``box`` (``(x0, y0, x1, y1)`` or
        None), ``inliers`` (best verified inlier count), ``component`` (size
        of its component).
    """
    import cv2

    cv2.setNumThreads(1)
    results = [dict(key=key, kept=False, reason="", box=None, inliers=0, component=0)
               for key, _ in images]
    features, readable = [], []
    for i, (_, path) in enumerate(images):
        try:
            gray, scale, size = load_gray(path, config.max_side)
        except ValueError as e:
            results[i]["reason"] = str(e)
            continue
        f = extract_features(gray, scale, size, config.max_features, config.contrast_threshold)
        if len(f.points) < config.min_inliers:
            results[i]["reason"] = f"too few local features ({len(f.points)})"
            continue
        features.append(f)
        readable.append(i)
    edges, points, transforms, counts = [], {}, {}, {}
    for a, b in candidate_pairs(features, config.max_pairs, config.neighbors):
        v = verify_pair(features[a], features[b], config)
        if v.inliers:
            edges.append((a, b))
            counts[(a, b)] = v.inliers
            points.setdefault(a, {})[b] = v.points_a
            points.setdefault(b, {})[a] = v.points_b
            transforms[(a, b)] = v.matrix
            transforms[(b, a)] = np.linalg.inv(v.matrix)
    sizes = [f.size for f in features]
    edges = consistent_edges(edges, points, counts, sizes, config.region_consistency)
    kept_pairs = set(edges)
    points = {i: {j: p for j, p in partners.items() if (min(i, j), max(i, j)) in kept_pairs}
              for i, partners in points.items()}
    for (a, b) in edges:
        for node in (a, b):
            results[readable[node]]["inliers"] = max(results[readable[node]]["inliers"], counts[(a, b)])
    components = connected_components(len(features), edges)
    size_of = {i: len(c) for c in components for i in c}
    kept = set(select_components(components, config.min_component_size))
    boxes = estimate_boxes(kept, points, transforms, sizes)
    for node, index in enumerate(readable):
        r = results[index]
        r["component"] = size_of.get(node, 1)
        if node in kept:
            r["box"] = boxes[node]
            r["kept"] = True
        elif size_of.get(node, 1) == 1:
            r["reason"] = "no verified match with another image of the label"
        else:
            r["reason"] = (f"in a verified group of {size_of[node]} images, not the kept group "
                           f"of {len(components[0])}")
    return results


def estimate_boxes(kept, points, transforms, sizes):
    """The landmark's box in each kept image.

    Inlier keypoints lie on the landmark but rarely reach its edges, so the
    box of an image's own inliers is too small. Each image's inliers are
    therefore joined by its verified partners' inliers mapped into it through
    the pair's transform (one propagation step: partners see other parts of
    the landmark), and the box is their bounding box, clipped to the image.

    Args:
        kept: the kept nodes.
        points: ``points[i][j]`` inlier points of ``i`` in its pair with ``j``.
        transforms: ``transforms[(j, i)]`` 3x3 map from ``j`` to ``i``.
        sizes: ``(w, h)`` of each node's image.

    Returns:
        ``{node: (x0, y0, x1, y1) or None}``.
    """
    own = {}
    for i in kept:
        mates = [p for j, p in points.get(i, {}).items() if j in kept]
        own[i] = np.concatenate(mates) if mates else np.zeros((0, 2))
    boxes = {}
    for i in kept:
        gathered = [own[i]] + [
            transform_points(transforms[(j, i)], own[j])
            for j in points.get(i, {}) if j in kept
        ]
        boxes[i] = box_from_points(np.concatenate(gathered), sizes[i])
    return boxes
