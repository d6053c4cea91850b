"""Scenes with a known geometry for the cleaning tests: a facade on a grey
canvas, its SIFT features, warps, and a label folder with a known answer."""

import cv2
import numpy as np
from PIL import Image

from deep_retrieval.cleaning import features as features_lib
from deep_retrieval.config import CleanConfig
from deep_retrieval.data import views

H_TRUE = np.array([[0.9, 0.08, 30.0], [-0.05, 0.95, 20.0], [0.0003, -0.0002, 1.0]])


def scene(seed, box=(40, 30, 296, 222), size=(360, 260)):
    """A landmark facade pasted at ``box`` on a flat grey canvas."""
    canvas = np.full((size[1], size[0], 3), 128, np.uint8)
    facade = views.make_facade([seed, 1]).resize((box[2] - box[0], box[3] - box[1]))
    canvas[box[1]:box[3], box[0]:box[2]] = np.asarray(facade)
    return canvas


def features(image):
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    config = CleanConfig()
    return features_lib.extract_features(gray, 1.0, (image.shape[1], image.shape[0]),
                                     config.max_features, config.contrast_threshold)


def warp(image, matrix):
    return cv2.warpPerspective(image, matrix, (image.shape[1], image.shape[0]), borderValue=(128, 128, 128))


def iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def label_folder(tmp_path):
    base = scene(2)
    shifts = [np.eye(3), H_TRUE, np.array([[1.05, 0, -10], [0, 1.05, -5], [0, 0, 1.0]])]
    names = []
    for i, m in enumerate(shifts):
        Image.fromarray(warp(base, m)).save(tmp_path / f"good{i}.jpg", quality=92)
        names.append(f"good{i}.jpg")
    Image.fromarray(scene(9)).save(tmp_path / "other.jpg", quality=92)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return names + ["other.jpg", "broken.jpg"]
