"""Encoded test images (made here, never committed)."""

import io
import math

import numpy as np
from PIL import Image


def encoded(height, width, seed=0, fmt="JPEG"):
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def reference_descriptors(model, blobs, image_size, boxes=None):
    """The Keras model's multi-resolution descriptor, assembled by hand.

    For each scale ``s`` the decoded image (cropped to its box, corners
    rounded half up) is resized from the original by ``s * image_size /
    max(H, W)`` of the *full* image; the single-scale descriptors are summed
    and L2-normalised in numpy (DIR's multi-resolution).
    """
    import tensorflow as tf

    out = []
    for i, data in enumerate(blobs):
        image = tf.cast(tf.io.decode_image(data, channels=3, expand_animations=False), tf.float32)
        full = max(image.shape[:2])
        if boxes is not None and boxes[i] is not None and not np.isnan(boxes[i]).any():
            x0, y0, x1, y1 = (int(math.floor(v + 0.5)) for v in boxes[i])
            image = image[y0:y1, x0:x1]
        total = 0.0
        for s in model.config.scales:
            factor = image_size * s / full
            size = [max(1, int(math.floor(d * factor + 0.5))) for d in image.shape[:2]]
            view = tf.image.resize(image, size, antialias=True)
            total = total + np.asarray(model.single_scale(view[None]))[0].astype(np.float64)
        out.append(total / np.linalg.norm(total))
    return np.stack(out).astype(np.float32)


def webp_declaring(width, height):
    """A tiny lossless WebP whose VP8L header is patched to declare
    ``width x height`` (the decoder is never reached)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "WEBP", lossless=True)
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8L"
    packed = int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
    packed |= (width - 1) | ((height - 1) << 14)
    data[21:25] = packed.to_bytes(4, "little")
    return bytes(data)
