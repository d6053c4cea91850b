"""The image codec, in one place: the accepted formats and the pixel cap,
the checks that enforce them before any decoding (file type and size,
image headers), decoding, cropping and resizing.

Used by the training and evaluation pipelines, the export's serving graph,
the embedded server, the extraction client, search and cleaning. The checks
on files and on Pillow images need no TensorFlow (cleaning's worker
processes stay light); the TensorFlow functions import it when called.
"""

import functools
import os
import stat

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


def _uint(data, offset, size, big_endian):
    import tensorflow as tf

    raw = tf.io.decode_raw(tf.strings.substr(data, offset, size), tf.uint8, fixed_length=size)
    raw = tf.cast(raw, tf.int64)
    order = range(size) if big_endian else range(size - 1, -1, -1)
    value = tf.constant(0, tf.int64)
    for i in order:
        value = value * 256 + raw[i]
    return value


JPEG_XL = -1
"""What `header_pixels` returns for JPEG XL, which is refused: TF decodes
it, but its size fields are not read here before decoding."""

TOO_MANY = 2**62
"""What `header_pixels` returns for a header it cannot vouch for."""


GIF_LOOKAHEAD = 512
"""Full (255-byte) data sub-blocks skipped at once while walking a GIF."""


def _gif_pixels(data, canvas):
    """Pixels TF's GIF decoder allocates: it decodes every frame (even with
    ``expand_animations=False``), so frames x the largest of the canvas and
    the frames' own areas.

    The frames are counted by walking the blocks (extensions and image
    descriptors, each followed by data sub-blocks: a length byte, then that
    many bytes) without decoding. A step of the walk passes a block, a
    short sub-block (with the terminator after it) or a run of up to
    `GIF_LOOKAHEAD` full ones, at most 512 + bytes / 512 steps, so that
    the check costs about as much as decoding a JPEG of the same size; a
    GIF that needs more (hundreds of frames, or tiny sub-blocks) counts as
    `TOO_MANY` pixels."""
    import tensorflow as tf

    raw = tf.cast(tf.io.decode_raw(data, tf.uint8), tf.int32)
    n = tf.size(raw)
    raw = tf.concat([raw, tf.zeros([256 * GIF_LOOKAHEAD + 16], tf.int32)], 0)  # reads past the end see zeros

    def table(flags):  # a color table's bytes, from the packed flags byte
        return tf.where(flags >= 128, 3 * tf.bitwise.left_shift(2, flags % 8), 0)

    def body(pos, in_data, frames, largest, steps):
        # In data: skip the run of full sub-blocks, then one more sub-block.
        sizes = tf.strided_slice(raw, [pos], [pos + 256 * GIF_LOOKAHEAD], [256])
        run = tf.cast(tf.argmin(tf.concat([tf.cast(tf.equal(sizes, 255), tf.int32), [0]], 0)), tf.int32)
        at = pos + 256 * run
        size = tf.gather(raw, at)
        after = at + 1 + size
        terminated = tf.logical_or(tf.equal(size, 0), tf.equal(tf.gather(raw, after), 0))  # the zero length byte
        ended = tf.logical_and(run < GIF_LOOKAHEAD, terminated)
        data_next = tf.where(run < GIF_LOOKAHEAD, tf.where(size > 0, after, at) + tf.cast(terminated, tf.int32), at)
        # At a block: an image descriptor (10 bytes, colour table, LZW code
        # size) or an extension (introducer, label), then its data.
        b = tf.gather(raw, pos)
        image = tf.logical_and(tf.logical_not(in_data), tf.equal(b, 0x2C))
        head = tf.gather(raw, pos + tf.range(10))
        area = tf.cast(head[5] + 256 * head[6], tf.int64) * tf.cast(head[7] + 256 * head[8], tf.int64)
        block_next = pos + tf.where(image, 11 + table(head[9]), 2)
        return (tf.where(in_data, data_next, block_next), tf.logical_or(tf.logical_not(in_data), tf.logical_not(ended)),
                frames + tf.cast(image, tf.int64), tf.where(image, tf.maximum(largest, area), largest), steps + 1)

    def more(pos, in_data):  # in data, or at an extension or image block
        b = tf.gather(raw, tf.minimum(pos, n))
        return tf.logical_and(pos < n, tf.logical_or(in_data, tf.logical_or(tf.equal(b, 0x2C), tf.equal(b, 0x21))))

    limit = 512 + n // 512
    zero = tf.constant(0, tf.int64)
    pos, in_data, frames, largest, steps = tf.while_loop(
        lambda pos, in_data, frames, largest, steps: tf.logical_and(steps < limit, more(pos, in_data)),
        body, (tf.minimum(13 + table(tf.gather(raw, 10)), n), tf.constant(False), zero, zero, tf.constant(0)))
    pixels = tf.maximum(frames, 1) * tf.maximum(canvas, largest)
    return tf.where(more(pos, in_data), tf.constant(TOO_MANY, tf.int64), pixels)


def _header_pixels(data):
    """Pixels a PNG, JPEG, GIF (all its frames), BMP or WebP header declares,
    read without decoding; `JPEG_XL` for JPEG XL; 0 for other or too-short
    data (left to the decoder)."""
    import tensorflow as tf

    length = tf.strings.length(data)
    magic = tf.strings.substr(data, 0, 4)

    def png():
        return _uint(data, 16, 4, True) * _uint(data, 20, 4, True)

    def jpeg():
        shape = tf.cast(tf.io.extract_jpeg_shape(data), tf.int64)
        return shape[0] * shape[1]

    def gif():
        return _gif_pixels(data, _uint(data, 6, 2, False) * _uint(data, 8, 2, False))

    def bmp():
        height = _uint(data, 22, 4, False)
        height = tf.where(height >= 2**31, 2**32 - height, height)  # top-down BMPs
        return _uint(data, 18, 4, False) * height

    def webp():
        # RIFF....WEBP then the first chunk: lossy VP8 (14-bit sizes after the
        # start code), lossless VP8L (two 14-bit sizes minus one, packed) or
        # extended VP8X (24-bit canvas sizes minus one).
        kind = tf.strings.substr(data, 12, 4)
        packed = _uint(data, 21, 4, False)

        def vp8():
            return tf.bitwise.bitwise_and(_uint(data, 26, 2, False), 0x3FFF) * tf.bitwise.bitwise_and(
                _uint(data, 28, 2, False), 0x3FFF)

        def vp8l():
            width = tf.bitwise.bitwise_and(packed, 0x3FFF) + 1
            height = tf.bitwise.bitwise_and(tf.bitwise.right_shift(packed, 14), 0x3FFF) + 1
            return width * height

        def vp8x():
            return (_uint(data, 24, 3, False) + 1) * (_uint(data, 27, 3, False) + 1)

        # A WebP whose first chunk is none of these is refused, not guessed.
        return tf.case([(tf.equal(kind, b"VP8 "), vp8), (tf.equal(kind, b"VP8L"), vp8l),
                        (tf.equal(kind, b"VP8X"), vp8x)],
                       default=lambda: tf.constant(TOO_MANY, tf.int64), exclusive=True)

    zero = lambda: tf.constant(0, tf.int64)  # noqa: E731
    is_webp = tf.logical_and(tf.equal(magic, b"RIFF"), tf.equal(tf.strings.substr(data, 8, 4), b"WEBP"))
    return tf.case(
        [
            (tf.logical_and(tf.equal(magic, b"\x89PNG"), length >= 24), png),
            (tf.logical_and(tf.strings.substr(data, 0, 2) == b"\xff\xd8", length >= 4), jpeg),
            (tf.logical_and(tf.equal(tf.strings.substr(data, 0, 3), b"GIF"), length >= 10), gif),
            (tf.logical_and(tf.equal(tf.strings.substr(data, 0, 2), b"BM"), length >= 26), bmp),
            (tf.logical_and(is_webp, length >= 30), webp),
            (tf.logical_or(tf.equal(tf.strings.substr(data, 0, 2), b"\xff\x0a"),
                           tf.equal(tf.strings.substr(data, 0, 12), b"\x00\x00\x00\x0cJXL \r\n\x87\n")),
             lambda: tf.constant(JPEG_XL, tf.int64)),
        ],
        default=zero,
        exclusive=False,
    )


@functools.cache
def _header_function():
    import tensorflow as tf

    return tf.function(_header_pixels, input_signature=[tf.TensorSpec([], tf.string)])


def header_pixels(data):
    """`_header_pixels` as one graph function (built on first use): the same
    inside a graph, and quick when called eagerly (the server checks
    requests with it)."""
    return _header_function()(data)


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
    from deep_retrieval import functional

    return functional.scaled_size(int(height), int(width), longest / max(height, width))
