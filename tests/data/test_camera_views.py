import hashlib

import numpy as np
import pytest
from PIL import Image

from deep_retrieval.data import camera_views
from deep_retrieval.data.camera_views import camera_view, corners_box, project_plane, rotation


def _photos(n, seed=0):
    rng = np.random.default_rng(seed)
    # Smooth random pictures of a few sizes: distinct, with structure at every scale.
    return [Image.fromarray(rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)).resize(
        (int(rng.integers(200, 400)), int(rng.integers(150, 300))), Image.BICUBIC) for _ in range(n)]


def test_frontal_plane_projects_by_hand():
    # A 2 x 1 plane at depth 4, focal 100, principal point (160, 120):
    # x = 160 +- 100 * 1 / 4, y = 120 +- 100 * 0.5 / 4.
    corners = project_plane(2.0, 1.0, np.eye(3), (0, 0, 4), 100.0, (160, 120))
    np.testing.assert_allclose(corners, [[135, 107.5], [185, 107.5], [185, 132.5], [135, 132.5]])


def test_turned_plane_projects_by_hand():
    # Yaw 60 degrees about the vertical axis: a corner (X, Y, 0) of the plane
    # goes to (X cos 60, Y, -X sin 60). The top-left corner (-1, -0.5) is
    # then at depth 4 + 0.866 = 4.866: x = 160 - 100 * 0.5 / 4.866 = 149.725,
    # y = 120 - 100 * 0.5 / 4.866 = 109.725. The top-right (1, -0.5) at depth
    # 4 - 0.866 = 3.134: x = 160 + 100 * 0.5 / 3.134 = 175.954, y = 104.046.
    turn = rotation(np.deg2rad(60), 0.0, 0.0)
    corners = project_plane(2.0, 1.0, turn, (0, 0, 4), 100.0, (160, 120))
    np.testing.assert_allclose(corners[0], [149.725, 109.725], atol=1e-3)
    np.testing.assert_allclose(corners[1], [175.954, 104.046], atol=1e-3)
    # The near side looks taller than the far side: foreshortening.
    assert corners[2, 1] - corners[1, 1] > corners[3, 1] - corners[0, 1]


def test_roll_turns_in_the_image_plane():
    # Roll 90 degrees about the optical axis: (X, Y) -> (-Y, X).
    corners = project_plane(2.0, 1.0, rotation(0.0, 0.0, np.pi / 2), (0, 0, 4), 100.0, (160, 120))
    np.testing.assert_allclose(corners[0], [160 + 12.5, 120 - 25], atol=1e-9)


def test_box_of_corners_by_hand():
    quad = np.array([[10.2, 20.7], [50.0, 18.1], [49.5, 60.0], [9.9, 61.3]])
    assert corners_box(quad, (320, 240)) == (9, 18, 50, 62)
    # Cut by the frame: clipped to it.
    assert corners_box(quad - [30, 30], (320, 240)) == (0, 0, 20, 32)
    assert corners_box(quad + [400, 0], (320, 240)) == (0, 0, 0, 0)


def test_views_are_deterministic_per_seed():
    photos = _photos(4)

    def render(seed):
        img, box, visible = camera_view(photos[0], np.random.default_rng(seed), (160, 120), 0.7, photos)
        return hashlib.sha1(img.tobytes()).hexdigest(), box, visible

    assert render(3) == render(3)
    assert render(3) != render(4)


@pytest.mark.parametrize("difficulty", [0.0, 0.5, 1.0])
def test_box_bounds_the_instance(difficulty, monkeypatch):
    # The instance is pure red, the surroundings pure blue and green, and the
    # camera's noise and blur are small against that: red pixels lie in the
    # box. Occluders (of any colour, a red pole too) are left out here.
    monkeypatch.setattr(camera_views, "_occlude",
                        lambda canvas, rng, box, d, s: (canvas, np.zeros(canvas.shape[:2], bool)))
    red = Image.new("RGB", (300, 200), (255, 0, 0))
    others = [Image.new("RGB", (300, 200), c) for c in ((0, 0, 255), (0, 255, 0))]
    for seed in range(8):
        img, box, visible = camera_view(red, np.random.default_rng(seed), (160, 120), difficulty, others)
        a = np.asarray(img).astype(int)
        red_pixels = (a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80)
        assert img.size == (160, 120) and 0.0 <= visible <= 1.0
        if not red_pixels.any():
            assert visible < 0.05
            continue
        ys, xs = np.nonzero(red_pixels)
        x0, y0, x1, y1 = box
        # Blur and JPEG may bleed red a couple of pixels past the plane's edge.
        assert x0 - 3 <= xs.min() and xs.max() < x1 + 3 and y0 - 3 <= ys.min() and ys.max() < y1 + 3
        # The red share of the frame is the visible share of the projected plane, give or take edges.
        area = max(1, (x1 - x0) * (y1 - y0))
        assert red_pixels.sum() <= area * 1.1


def test_easy_views_show_most_of_the_instance_and_hard_ones_less():
    photos = _photos(5, seed=1)

    def visible(difficulty):
        return [camera_view(photos[0], np.random.default_rng(s), (160, 120), difficulty, photos)[2]
                for s in range(30)]

    easy, hard = visible(0.0), visible(1.0)
    assert np.median(easy) > 0.9 and np.mean(hard) < np.mean(easy) - 0.1


def test_nothing_but_the_photo_files_shared_with_photo_view():
    import inspect

    source = inspect.getsource(camera_views)
    assert "deep_retrieval.data.views" not in source and "from deep_retrieval" not in source
