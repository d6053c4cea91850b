"""Encoded test images (made here, never committed)."""

import io

import numpy as np
from PIL import Image


def encoded(height, width, seed=0, fmt="JPEG"):
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def reference_descriptors(model, blobs, image_size):
    """The Keras model on the same decoded, resized pixels as the export."""
    from deep_retrieval.data import pipeline

    out = []
    for data in blobs:
        image = pipeline.resize_longest(pipeline.decode(data), image_size)
        out.append(np.asarray(model(image[None]))[0])
    return np.stack(out)
