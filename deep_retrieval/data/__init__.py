"""Training manifests, the synthetic dataset, ground truth and tf.data pipelines."""

MAX_PIXELS = 89_478_485
"""Largest image accepted anywhere (width x height; Pillow's default limit).
A larger header is refused before decoding, so a decompression bomb (a small
file declaring a huge image) cannot exhaust memory."""
