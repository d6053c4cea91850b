"""Automatic cleaning of a noisy landmark collection (DIR, Section 4).

For each label: SIFT features on downscaled images, ratio-test matching
between candidate pairs, RANSAC geometric verification (affine or
homography, with a minimum inlier count), region consistency (a pair's
matches must lie on the region most of each image's pairs agree on, so that
matches on shared backgrounds do not link different landmarks), a graph
whose edges are the pairs left, and the largest connected component kept (or
every component above a size). Each kept image gets the landmark's bounding box: the box of
the inlier keypoints of all its verified matches inside the kept component.
Those boxes train the region proposal network.

Pairs per label grow quadratically, so they are bounded: a label with more
than ``max_pairs`` pairs matches each image only with its ``neighbors`` most
similar images under a cheap global descriptor (the normalised mean of the
image's RootSIFT descriptors), which finds the near views of the same
landmark at a linear cost.

OpenCV does the local features and RANSAC; the graph, pair selection and box
logic are plain numpy. This module imports neither Keras nor TensorFlow, so
the worker processes that clean labels in parallel start quickly.

Reference: Gordo, Almazán, Revaud, Larlus, "Deep Image Retrieval: Learning
global representations for image search", ECCV 2016, Section 4.
"""

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from deep_retrieval.data.images import check_image


@dataclasses.dataclass
class Features:
    """Local features of one image: ``points [n, 2]`` in original pixels,
    ``descriptors [n, 128]`` RootSIFT, and the original ``size (w, h)``."""

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple


@dataclasses.dataclass
class Verification:
    """A verified (or rejected) pair: inlier count, the inlier points of each
    image (original pixels) and the 3x3 transform from the first image to
    the second (None when rejected)."""

    inliers: int
    points_a: np.ndarray
    points_b: np.ndarray
    matrix: np.ndarray = None


def load_gray(path, max_side):
    """Grayscale uint8 image downscaled so its longest side is at most
    ``max_side``; returns ``(array, scale, (width, height))``.

    Raises:
        ValueError: unreadable or undecodable file, or an image larger than
            the pixel limit `deep_retrieval.data.MAX_PIXELS` (checked on the
            header, before decoding); the message says why.
    """
    try:
        with Image.open(path) as im:
            original = im.size
            check_image(im)
            im.draft("L", (max_side, max_side))  # fast JPEG downscale on decode
            if im.mode.startswith("I;16") or im.mode == "I":
                # 16-bit: keep the top 8 bits (convert("L") would clip).
                gray = Image.fromarray((np.asarray(im, np.uint32) >> 8).astype(np.uint8))
            else:
                gray = im.convert("L")
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from e
    if max(gray.size) > max_side:
        factor = max_side / max(gray.size)
        gray = gray.resize((max(1, round(gray.size[0] * factor)), max(1, round(gray.size[1] * factor))),
                           Image.BILINEAR)
    return np.asarray(gray), gray.size[0] / original[0], original


def extract_features(gray, scale, size, max_features=1000, contrast_threshold=0.04):
    """RootSIFT features of a grayscale image (points mapped back to the
    original resolution by ``1 / scale``)."""
    import cv2

    sift = cv2.SIFT_create(nfeatures=max_features, contrastThreshold=contrast_threshold)
    keypoints, desc = sift.detectAndCompute(gray, None)
    if desc is None or len(keypoints) == 0:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), size)
    desc = desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12)
    desc = np.sqrt(desc).astype(np.float32)
    points = np.array([k.pt for k in keypoints], np.float32) / scale
    return Features(points, desc, size)


def ratio_matches(desc_a, desc_b, ratio=0.8):
    """``[m, 2]`` index pairs passing Lowe's ratio test (nearest neighbour
    closer than ``ratio`` times the second nearest)."""
    if len(desc_a) < 2 or len(desc_b) < 2:
        return np.zeros((0, 2), np.int64)
    import cv2

    knn = cv2.BFMatcher(cv2.NORM_L2).knnMatch(desc_a, desc_b, k=2)
    pairs = [(m.queryIdx, m.trainIdx) for m, n in knn if m.distance < ratio * n.distance]
    return np.asarray(pairs, np.int64).reshape(-1, 2)


def verify_pair(a, b, config):
    """Ratio-test matches between two images, verified by RANSAC.

    Args:
        a, b: `Features`.
        config: `CleanConfig` (ratio, transform, ransac_threshold,
            min_inliers).

    Returns:
        A `Verification`; ``inliers`` is 0 when the pair is rejected (fewer
        than ``min_inliers`` inliers, or no model found).
    """
    import cv2

    empty = Verification(0, np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))
    matches = ratio_matches(a.descriptors, b.descriptors, config.ratio)
    if len(matches) < max(config.min_inliers, 4):
        return empty
    src, dst = a.points[matches[:, 0]], b.points[matches[:, 1]]
    # The threshold is in pixels of the downscaled images: scale it to the
    # second image's original resolution.
    threshold = config.ransac_threshold * max(b.size) / min(max(b.size), config.max_side)
    if config.transform == "homography":
        matrix, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=2000,
                                          confidence=0.995)
    else:
        matrix, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
                                            ransacReprojThreshold=threshold, maxIters=2000,
                                            confidence=0.995)
    if matrix is None or mask is None:
        return empty
    mask = mask.ravel().astype(bool)
    if mask.sum() < config.min_inliers:
        return empty
    if matrix.shape == (2, 3):
        matrix = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return Verification(int(mask.sum()), src[mask], dst[mask], matrix)


def transform_points(matrix, points):
    """Applies a 3x3 projective (or affine) ``matrix`` to ``[n, 2]`` points."""
    points = np.asarray(points, np.float64).reshape(-1, 2)
    h = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ np.asarray(matrix).T
    w = h[:, 2:3]
    ok = np.abs(w[:, 0]) > 1e-9
    return h[ok, :2] / w[ok]


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


# ------------------------------------------------------------ a whole manifest


def journal_path(output, config, manifest_path):
    """Where finished labels are recorded while a run is in progress. The
    name holds a hash of the settings (``workers`` aside) and of the
    manifest's bytes, so a rerun of the same job resumes and any other job
    starts afresh."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "workers"}
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode())
    with open(manifest_path, "rb") as f:
        digest.update(f.read())
    return f"{output}.journal-{digest.hexdigest()[:12]}.jsonl"


def _read_journal(path):
    done = {}
    if not os.path.exists(path):
        return done
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash: that label runs again
            done[entry["label"]] = entry["results"]
    return done


def _clean_one(args):
    label, images, config = args
    return label, clean_label(images, config)


def clean_manifest(groups, config, journal, progress=True):
    """Cleans every label, in parallel, resuming from ``journal``.

    Args:
        groups: ``{label: [(key, path), ...]}`` (labels as strings).
        config: `CleanConfig`.
        journal: JSON-lines file; each finished label is appended (and
            flushed to disk) as soon as it is done, and labels already in it
            are not run again.
        progress: show a progress bar.

    Returns:
        ``{label: results of clean_label}``.
    """
    done = _read_journal(journal)
    todo = sorted((k for k in groups if k not in done), key=lambda k: -len(groups[k]))
    workers = config.workers or os.cpu_count() or 1
    bar = tqdm(total=sum(len(v) for v in groups.values()), initial=sum(len(groups[k]) for k in done if k in groups),
               desc="cleaning", unit="img", disable=not progress)
    with open(journal, "a") as log:
        def record(label, results):
            log.write(json.dumps({"label": label, "results": results}) + "\n")
            log.flush()
            os.fsync(log.fileno())
            done[label] = results
            bar.update(len(results))

        # Workers import this module and the configuration only (no Keras or
        # TensorFlow), so starting them is cheap.
        jobs = [(label, groups[label], config) for label in todo]
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                record(*_clean_one(job))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                for label, results in pool.map(_clean_one, jobs, chunksize=1):
                    record(label, results)
    bar.close()
    return {k: done[k] for k in groups}


def decisions_frame(manifest, results):
    """One row per input row of a manifest: ``image, label, kept, reason,
    inliers, component, x0, y0, x1, y1``.

    Args:
        manifest: the `deep_retrieval.data.manifest.Manifest` read (its
            dropped rows come first, with the manifest's reason).
        results: ``{label: clean_label results}`` keyed by frame row.
    """
    import pandas as pd

    rows = [dict(image=p.image, label=None, kept=False, reason=p.reason, inliers=0, component=0)
            for p in manifest.problems]
    by_row = {r["key"]: r for label_results in results.values() for r in label_results}
    for i, row in enumerate(manifest.frame.itertuples(index=False)):
        r = by_row[i]
        box = r["box"] or [float("nan")] * 4
        rows.append(dict(image=row.image, label=row.label, kept=r["kept"], reason=r["reason"],
                         inliers=r["inliers"], component=r["component"],
                         x0=box[0], y0=box[1], x1=box[2], y1=box[3]))
    return pd.DataFrame(rows, columns=["image", "label", "kept", "reason", "inliers", "component",
                                       "x0", "y0", "x1", "y1"])


def report_frame(decisions):
    """Per label: ``images_in``, ``kept``, ``dropped``."""
    known = decisions[decisions["label"].notna()]
    report = known.groupby("label").agg(images_in=("image", "size"), kept=("kept", "sum")).reset_index()
    report["dropped"] = report["images_in"] - report["kept"]
    return report


def score(decisions, noise, truth):
    """Quality of a cleaning run against known noise and true boxes.

    Args:
        decisions: frame with ``image``, ``kept`` and ``x0..y1`` per input
            image.
        noise: the set of images that are noise (mislabeled or junk).
        truth: ``{image: (x0, y0, x1, y1)}`` true landmark boxes of clean
            images.

    Returns:
        A dict: ``precision`` and ``recall`` of the dropped images as noise
        detection, ``box_iou_median`` and ``box_iou_share_05`` over kept clean
        images with a true box, and the counts behind them.
    """
    dropped = set(decisions.loc[~decisions["kept"], "image"])
    true_drops = len(dropped & noise)
    ious = []
    for row in decisions[decisions["kept"]].itertuples(index=False):
        if row.image in truth and not np.isnan(row.x0):
            a, b = (row.x0, row.y0, row.x1, row.y1), truth[row.image]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            ious.append(inter / union if union > 0 else 0.0)
    ious = np.asarray(ious)
    return {
        "images": len(decisions),
        "noise": len(noise),
        "dropped": len(dropped),
        "precision": true_drops / len(dropped) if dropped else float("nan"),
        "recall": true_drops / len(noise) if noise else float("nan"),
        "boxes_scored": len(ious),
        "box_iou_median": float(np.median(ious)) if len(ious) else float("nan"),
        "box_iou_share_05": float((ious >= 0.5).mean()) if len(ious) else float("nan"),
    }
