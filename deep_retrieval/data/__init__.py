"""Training manifests, the synthetic dataset, ground truth and tf.data pipelines."""

MAX_PIXELS = 89_478_485
"""Largest image accepted anywhere (width x height; Pillow's default limit).
A larger header is refused before decoding, so a decompression bomb (a small
file declaring a huge image) cannot exhaust memory."""


def check_pixels(width, height):
    """Raises ValueError when a ``width x height`` image is over `MAX_PIXELS`
    (call it on the header's size, before decoding)."""
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"image of {width}x{height} pixels is over the {MAX_PIXELS:,}-pixel limit (decompression bomb?)"
        )
