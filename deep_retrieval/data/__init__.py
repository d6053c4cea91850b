"""Training manifests, the synthetic dataset, ground truth and tf.data pipelines."""

MAX_PIXELS = 89_478_485
"""Largest image accepted anywhere (width x height; Pillow's default limit).
A larger header is refused before decoding, so a decompression bomb (a small
file declaring a huge image) cannot exhaust memory."""


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
