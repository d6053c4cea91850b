"""Local features of the cleaning step: RootSIFT on downscaled grayscale
images, and Lowe's ratio-test matches between two images."""

import dataclasses

import numpy as np
from PIL import Image

from deep_retrieval.data.images import check_image


@dataclasses.dataclass
class Features:
    """Local features of one image: ``points [n, 2]`` in original pixels,
    ``descriptors [n, 128]`` RootSIFT, and the original ``size (w, h)``."""

    points: np.ndarray
    descriptors: np.ndarray
    size: tuple


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
