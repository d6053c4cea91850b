"""What an encoded image's header declares, read before anything is decoded:
its pixels counted in the graph (`header_pixels`, all GIF frames; the
decompression-bomb check of `images.decode` and of the servers), and its
format and size as Pillow reads them (`read_header`, the one Pillow header
reader of the project)."""

import functools


def read_header(data):
    """``(format, width, height)`` from the header of the encoded image
    ``data`` (Pillow's format name; nothing is decoded); a ValueError saying
    why when Pillow cannot read one."""
    import io

    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"not encoded image bytes ({type(data).__name__})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format, im.width, im.height
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on a bad header
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None


def header_size(data):
    """``(height, width)`` from the header (`read_header`), or ``(0, 0)``
    when it cannot be read: an ordering key only (the decoder names what
    is wrong with the image)."""
    try:
        _, width, height = read_header(data)
    except ValueError:
        return (0, 0)
    return (height, width)


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
