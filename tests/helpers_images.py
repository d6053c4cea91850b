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


def _gif_parts(side):
    """A PIL-made one-frame ``side x side`` GIF split into (everything before
    its image block, the image block with its data, the trailer)."""
    buf = io.BytesIO()
    Image.new("P", (side, side), 0).save(buf, "GIF")
    data = buf.getvalue()
    flags = data[10]
    pos = 13 + (3 * 2 ** ((flags & 7) + 1) if flags & 0x80 else 0)
    while data[pos] == 0x21:  # extensions: introducer, label, sub-blocks
        pos += 2
        while data[pos]:
            pos += 1 + data[pos]
        pos += 1
    assert data[pos] == 0x2C and data[-1:] == b"\x3b"
    return data[:pos], data[pos:-1], data[-1:]


def gif_frames_bomb(side=3000, frames=60):
    """A GIF of ``frames`` complete ``side x side`` frames of one colour
    (about 8 KB each): every frame header is within the pixel limit, all of
    them together far over it (TF decodes every frame)."""
    head, image, tail = _gif_parts(side)
    return head + image * frames + tail


def gif_tiny_subblocks(count=100_000):
    """A one-frame 8x8 GIF whose image data is ``count`` one-byte
    sub-blocks (valid, but each sub-block is a step of the frame walk)."""
    head, image, tail = _gif_parts(8)
    return head + image[:11] + b"\x01\x00" * count + b"\x00" + tail


def jpeg_declaring(width, height):
    """A tiny baseline JPEG whose SOF0 header is patched to declare
    ``width x height`` (the decoder is never reached)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def textured(height, width, seed=0):
    """Fine detail (1-pixel noise over smooth gradients): resampling twice shows."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(smooth + rng.uniform(-60, 60, (height, width, 3)), 0, 255).astype(np.uint8)


def jpeg_bytes(images, quality=95):
    """JPEG files of float ``[H, W, 3]`` RGB images in 0..255."""
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def served_descriptors(model_name, base_path, blobs):
    """The descriptors of image files ``blobs`` as the embedded TF Serving
    server answers a gRPC Predict for the SavedModel versions under
    ``base_path``."""
    from serving import client
    from serving import service as server_lib
    from serving.model_manager import ModelManager

    manager = ModelManager(model_name, str(base_path), poll_seconds=0)
    server, port = server_lib.build_server(manager, 0)
    server.start()
    try:
        response = client.prediction_stub(f"127.0.0.1:{port}").Predict(client.predict_request(model_name, blobs),
                                                                         timeout=120)
    finally:
        server.stop(0)
    return client.descriptors(response)
