"""The image codec, in one place: the accepted formats and the pixel cap,
the checks that enforce them before any decoding (file type and size,
image headers), decoding, cropping and resizing.

Used by the training and evaluation pipelines, the export's serving graph,
the embedded server, the extraction client, search and cleaning. The checks
on files and on Pillow images need no TensorFlow (cleaning's worker
processes stay light); the TensorFlow functions import it when called.
"""

import os
import stat

from deep_retrieval.data.image_headers import JPEG_XL, header_pixels

MAX_PIXELS = 89_478_485
"""Largest image accepted anywhere (width x height; Pillow's default limit).
A larger header is refused before decoding, so a decompression bomb (a small
file declaring a huge image) cannot exhaust memory."""

MAX_FILE_BYTES = 1 << 30
"""Larger image files are refused unread."""

FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
"""What ``tf.io.decode_image`` decodes and the pipelines accept (Pillow's
format names); JPEG XL, which TF also decodes, is refused (`JPEG_XL`)."""

EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp")
"""File name endings taken as images when a folder is walked."""


def check_pixels(width, height, frames=1):
    """Raises ValueError when a ``width x height`` image (of ``frames``
    frames, all of which TF decodes in a GIF) is over `MAX_PIXELS` (call it
    on the header's size, before decoding)."""
    if width * height * frames > MAX_PIXELS:
        counted = f"{frames} frames of " if frames > 1 else ""
        raise ValueError(
            f"image of {counted}{width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
        )


def check_image(image):
    """`check_pixels` on an opened PIL image, counting a GIF's frames as TF's
    decoder does (read from the file's blocks, not decoded); an animated
    WebP, which TF does not decode to RGB, is refused too."""
    frames = getattr(image, "n_frames", 1)
    if image.format == "WEBP" and frames > 1:
        raise ValueError("animated WebP is not decoded by TensorFlow to RGB; use its first frame")
    check_pixels(*image.size, frames if image.format == "GIF" else 1)


def file_problem(path, max_bytes=MAX_FILE_BYTES, limit="the limit of"):
    """Why ``path`` cannot be read as an image file, or None: only regular
    files are read (a FIFO would block, ``/dev/zero`` never ends), of at most
    ``max_bytes`` (``limit`` names that bound in the message)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot read the file ({type(e).__name__}: {e.strerror or e})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a folder, FIFO or device)"
    if st.st_size > max_bytes:
        return f"{st.st_size} bytes, more than {limit} {max_bytes}"
    return None


JPEG_XL_REFUSED = "image refused: JPEG XL is not accepted (its size is not checked before decoding); use JPEG or PNG"


def decode(data, max_pixels=MAX_PIXELS):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes -> float32 RGB ``[H, W, 3]`` in [0, 255].

    Grayscale and palette images are expanded to RGB, alpha dropped, 16-bit
    PNG reduced to 8 bits, CMYK JPEG converted, the first GIF frame used;
    EXIF orientation is not applied (the same in training and serving). An
    image whose header declares more than ``max_pixels`` pixels (a GIF: all
    its frames), and JPEG XL, are refused before decoding
    (InvalidArgumentError).
    """
    import tensorflow as tf

    pixels = header_pixels(data)
    checks = [
        tf.debugging.assert_less_equal(
            pixels, tf.constant(max_pixels, tf.int64),
            message=f"image refused: its header declares more than {max_pixels} pixels, all GIF frames counted "
                    "(decompression bomb?)"),
        tf.debugging.assert_none_equal(pixels, tf.constant(JPEG_XL, tf.int64), message=JPEG_XL_REFUSED),
    ]
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return tf.cast(image, tf.float32)


def diagnose(path):
    """Why ``path`` cannot be used: the read or decode error as one line
    (None when it decodes). Used to report failed items with a reason."""
    import tensorflow as tf

    problem = file_problem(path)
    if problem:
        return problem
    try:
        data = tf.io.read_file(os.fsencode(path))
    except (tf.errors.OpError, OSError) as e:
        return f"cannot read the file ({type(e).__name__}: {e.message if hasattr(e, 'message') else e})"
    try:
        decode(data)
    except tf.errors.OpError as e:
        lines = [line.strip() for line in str(e.message).splitlines() if line.strip()]
        useful = [line for line in lines if "image refused" in line] or lines
        return useful[0].split("}}")[-1].strip()[:300] or type(e).__name__
    return None


BOX_SLACK = 1.0
"""How far (pixels) a box corner may lie outside its image (rounding)."""


def box_problem(box, width, height):
    """Why ``box = (x0, y0, x1, y1)`` cannot crop a ``width`` x ``height``
    image, or None: its corners must be finite numbers inside the image
    (within `BOX_SLACK`), and the box, rounded as `crop_box` rounds it and
    clipped to the image, at least one pixel wide and high."""
    import math

    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        return f"box {str(box)[:80]}: a box is 4 numbers x0,y0,x1,y1"
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return f"box {x0:g},{y0:g},{x1:g},{y1:g} has a coordinate that is not a finite number"
    if not (-BOX_SLACK <= min(x0, x1) and max(x0, x1) <= width + BOX_SLACK
            and -BOX_SLACK <= min(y0, y1) and max(y0, y1) <= height + BOX_SLACK):
        return f"box {x0:g},{y0:g},{x1:g},{y1:g} is not inside the {width}x{height} image"
    left, top = max(0, math.floor(x0 + 0.5)), max(0, math.floor(y0 + 0.5))
    right, bottom = min(width, math.floor(x1 + 0.5)), min(height, math.floor(y1 + 0.5))
    if right - left < 1 or bottom - top < 1:
        return (f"box {x0:g},{y0:g},{x1:g},{y1:g} covers no whole pixel of the {width}x{height} image "
                "(x0 < x1 and y0 < y1, at least one pixel each way)")
    return None


def crop_box(image, box):
    """Crops ``[H, W, 3]`` to ``box = (x0, y0, x1, y1)`` in pixels.

    Corners round to the nearest pixel (half up), as PIL's ``Image.crop``
    does in cirtorch's loader; the box is clipped to the image and keeps at
    least one pixel.
    """
    import tensorflow as tf

    shape = tf.shape(image)
    box = tf.cast(tf.floor(tf.cast(box, tf.float32) + 0.5), tf.int32)
    x0 = tf.clip_by_value(box[0], 0, shape[1] - 1)
    y0 = tf.clip_by_value(box[1], 0, shape[0] - 1)
    x1 = tf.clip_by_value(box[2], x0 + 1, shape[1])
    y1 = tf.clip_by_value(box[3], y0 + 1, shape[0])
    return image[y0:y1, x0:x1]


def scale_views(image, longest, scales=(1.0,), box=None):
    """The image at each scale, each resized once from the decoded ``image``.

    At scale ``s`` the *full* image's longest side becomes ``s * longest``.
    With a ``box``, the crop is taken at the original resolution and resized
    by that same factor, so a query crop keeps the scale of its image (DIR's
    test code resizes the image, then crops; cirtorch's loader since 7525bcc
    crops, then resizes by the full image's ratio). Each scale resamples the
    original, never an already-resized copy (bilinear, antialiased when
    shrinking).

    Args:
        image: float32 ``[H, W, 3]`` (or a batch ``[N, H, W, 3]`` of one
            size, without ``box``).
        longest: the longest side at scale 1 (the model's ``S``).
        scales: relative scales, e.g. ``(550/800, 1, 1050/800)``.
        box: optional ``(x0, y0, x1, y1)`` in original pixels; a box with a
            NaN means no crop.

    Returns:
        A tuple of float32 ``[h_s, w_s, 3]`` images, one per scale.
    """
    import tensorflow as tf

    full = tf.reduce_max(tf.shape(image)[-3:-1])
    if box is not None:
        box = tf.convert_to_tensor(box, tf.float32)
        image = tf.cond(tf.reduce_any(tf.math.is_nan(box)), lambda: image, lambda: crop_box(image, box))
    shape = tf.shape(image)[-3:-1]
    return tuple(
        tf.image.resize(image, _scaled_size(shape, full, longest * float(s)), method="bilinear", antialias=True)
        for s in scales
    )


def _scaled_size(shape, full, longest):
    """``shape`` scaled by ``longest / full``, rounded half up, at least 1."""
    import tensorflow as tf

    factor = tf.cast(longest, tf.float32) / tf.cast(full, tf.float32)
    return tf.maximum(tf.cast(tf.floor(tf.cast(shape, tf.float32) * factor + 0.5), tf.int32), 1)


def scaled_shape(height, width, longest):
    """``(height, width)`` of an image once its longest side is ``longest``
    (`scale_views`' rounding, in Python)."""
    from deep_retrieval.ops import functional

    return functional.scaled_size(int(height), int(width), longest / max(height, width))
