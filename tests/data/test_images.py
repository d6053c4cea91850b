"""`images.scale_views` against PIL: DIR's query crops and multi-resolution."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from deep_retrieval.data import image_headers, images
from tests.helpers_images import textured


def _pil(pixels, size):
    return np.asarray(Image.fromarray(pixels).resize(size, Image.BILINEAR), np.float32)


def test_query_crop_is_the_box_scaled_by_s_over_the_full_image():
    pixels = textured(300, 400)  # H x W
    box = (40, 30, 240, 180)  # a 200 x 150 box
    (view,) = images.scale_views(tf.constant(pixels, tf.float32), 200, box=box)
    # S / max(W, H) = 200 / 400: the crop becomes 100 x 75, not 200 x 150.
    assert view.shape == (75, 100, 3)
    want = _pil(pixels[30:180, 40:240], (100, 75))
    assert np.abs(view.numpy() - want).mean() < 1.5


def test_crop_corners_round_to_the_nearest_pixel_as_pil_crop():
    pixels = textured(50, 60, 1)
    box = (10.4, 5.5, 40.6, 30.49)
    (view,) = images.scale_views(tf.constant(pixels, tf.float32), 60, box=box)
    want = np.asarray(Image.fromarray(pixels).crop((10, 6, 41, 30)), np.float32)
    np.testing.assert_array_equal(view.numpy(), want)  # scale 1: no resampling


def test_each_scale_is_resized_from_the_original():
    pixels = textured(600, 900, 2)
    scales = (550 / 800, 1.0, 1050 / 800)
    views = images.scale_views(tf.constant(pixels, tf.float32), 400, scales)
    assert [v.shape[:2] for v in views] == [(183, 275), (267, 400), (350, 525)]
    big = views[2].numpy()
    from_original = _pil(pixels, (525, 350))
    # Upsampling the 400-px image instead (what DIR does not do) blurs the detail.
    from_resized = _pil(_pil(pixels, (400, 267)).round().astype(np.uint8), (525, 350))
    near, far = np.abs(big - from_original).mean(), np.abs(big - from_resized).mean()
    assert near < 2.0 and far > 3 * near, (near, far)


def test_a_nan_box_is_no_crop_and_a_batch_resizes_as_one():
    pixels = textured(40, 80, 3)
    (whole,) = images.scale_views(tf.constant(pixels, tf.float32), 40, box=[np.nan] * 4)
    (batch,) = images.scale_views(tf.constant(np.stack([pixels] * 2), tf.float32), 40)
    assert whole.shape == (20, 40, 3) and batch.shape == (2, 20, 40, 3)
    np.testing.assert_allclose(batch[1].numpy(), whole.numpy(), atol=1e-4)
    assert np.abs(whole.numpy() - _pil(pixels, (40, 20))).mean() < 1.5


def test_webp_headers_are_read_and_bombs_refused():
    import io

    import pytest

    sizes = []
    for kwargs in (dict(lossless=True), dict(lossless=False)):
        buf = io.BytesIO()
        Image.fromarray(textured(201, 300, 4)).save(buf, "WEBP", **kwargs)
        sizes.append(int(image_headers.header_pixels(tf.constant(buf.getvalue()))))
        assert images.decode(tf.constant(buf.getvalue())).shape == (201, 300, 3)
    # VP8X (extended): 24-bit canvas width-1 and height-1 at bytes 24 and 27.
    vp8x = b"RIFF" + (22).to_bytes(4, "little") + b"WEBPVP8X" + (10).to_bytes(4, "little") + bytes(4)
    vp8x += (299).to_bytes(3, "little") + (200).to_bytes(3, "little")
    sizes.append(int(image_headers.header_pixels(tf.constant(vp8x))))
    assert sizes == [300 * 201] * 3
    # A lossless header declaring 16383 x 16383 (10 KB files like it decode to 800 MB).
    from tests.helpers_images import webp_declaring

    with pytest.raises(tf.errors.InvalidArgumentError, match="image refused"):
        images.decode(tf.constant(webp_declaring(16383, 16383)))


def test_gif_headers_count_every_frame():
    import io

    import pytest

    from deep_retrieval.data.images import check_image
    from tests.helpers_images import gif_frames_bomb, gif_tiny_subblocks

    def pil_pixels(data):  # the independent reference: Pillow's frame count and canvas
        with Image.open(io.BytesIO(data)) as im:
            return im.n_frames * im.size[0] * im.size[1]

    for frames, (w, h) in ((1, (120, 90)), (5, (120, 90)), (1, (1500, 1000))):
        pictures = [Image.fromarray(textured(h, w, seed)).convert("P") for seed in range(frames)]
        buf = io.BytesIO()
        pictures[0].save(buf, "GIF", save_all=frames > 1, append_images=pictures[1:])
        data = buf.getvalue()
        assert int(image_headers.header_pixels(data)) == pil_pixels(data) == frames * w * h
        assert images.decode(data).shape == (h, w, 3)  # the first frame
    bomb = gif_frames_bomb(3000, 60)  # 470 KB; each frame 9 MP, all of them 540 MP
    assert int(image_headers.header_pixels(bomb)) == pil_pixels(bomb) == 60 * 3000 * 3000
    with pytest.raises(tf.errors.InvalidArgumentError, match="image refused"):
        images.decode(bomb)
    with pytest.raises(ValueError, match="60 frames of 3000x3000"):
        check_image(Image.open(io.BytesIO(bomb)))
    # 100,000 one-byte sub-blocks need more walking steps than a 200 KB file is allowed.
    tiny = gif_tiny_subblocks(100_000)
    assert int(image_headers.header_pixels(tiny)) == image_headers.TOO_MANY
    with pytest.raises(tf.errors.InvalidArgumentError, match="image refused"):
        images.decode(tiny)
    assert int(image_headers.header_pixels(gif_tiny_subblocks(100))) == 64


def test_jpeg_xl_is_refused_with_its_reason():
    import pytest

    codestream = b"\xff\x0a" + bytes(40)
    container = b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(40)
    for data in (codestream, container):
        assert int(image_headers.header_pixels(data)) == image_headers.JPEG_XL
        with pytest.raises(tf.errors.InvalidArgumentError, match="JPEG XL is not accepted"):
            images.decode(data)


@pytest.mark.parametrize("box, words", [
    ((0, 0, 60, 80), None),                   # the whole 60x80 image
    ((-0.5, -1, 61, 81), None),               # a pixel outside, from rounding: clipped
    ((10.2, 10.2, 10.7, 11.6), None),         # rounds to x 10..11, y 10..12: one pixel wide
    ((10.2, 10.2, 10.4, 10.4), "no whole pixel"),  # rounds to x 10..10
    ((50, 40, 10, 5), "no whole pixel"),      # reversed
    ((10, 10, 10, 30), "no whole pixel"),     # empty
    ((59.6, 0, 61, 80), "no whole pixel"),    # rounds to x 60..60 once clipped to the image
    ((100, 100, 160, 160), "not inside"),
    ((0, 0, 1e30, 1e30), "not inside"),
    ((0, 0, float("inf"), 10), "not a finite number"),
    ((0, 0, float("nan"), 10), "not a finite number"),
    (("a", 0, 1, 1), "4 numbers"),
])
def test_box_problem_by_hand(box, words):
    problem = images.box_problem(box, 60, 80)
    assert problem is None if words is None else words in problem
