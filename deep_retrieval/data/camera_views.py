"""A second view renderer, from another nuisance model than
`views.photo_view`: a pinhole camera photographs the instance as a plane in
a scene made of other real photographs.

`photo_view` fills most of the frame with the photo, tilts it by moving its
corners and covers it with rectangular crops. Real photographs of a place
or an object differ in other ways, and those are what `camera_view` draws:

- the instance is often a small part of the frame (a quarter of its width
  at the hardest), or cut by the frame's edge;
- its plane is turned in 3-D (yaw up to 55 degrees, pitch up to 35) in
  front of a camera of random field of view, so foreshortening follows a
  real homography, and the camera rolls (in-plane rotation up to 30);
- the surroundings are other real photographs (other instances among
  them), some standing in the scene behind it at their own angles, the
  backdrop out of focus;
- occluders of other kinds: poles and railings, soft-edged blobs cut from
  other photos, an out-of-focus foreground band;
- camera effects: exposure and white balance, vignetting, defocus or
  motion blur, signal-dependent sensor noise, JPEG compression.

Warping, blurring and coding are OpenCV's; only the photo files are shared
with `photo_view`. `camera_view` has `photo_view`'s signature, so a split
can be rendered by either (`deep_retrieval.data.landmarks.RENDERERS`).
"""

import cv2
import numpy as np
from PIL import Image


def rotation(yaw, pitch, roll):
    """The 3x3 rotation turning a plane by ``yaw`` (about the vertical
    axis), ``pitch`` (about the horizontal axis), then the camera's
    ``roll`` (about the optical axis), in radians: ``R = Rz @ Ry @ Rx``."""
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    ry = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]])
    rz = np.array([[cr, -sr, 0.0], [sr, cr, 0.0], [0.0, 0.0, 1.0]])
    return rz @ ry @ rx


def project_plane(width, height, turn, centre, focal, principal):
    """The image corners of a ``width`` x ``height`` plane, turned by
    ``turn`` (3x3) about its centre placed at camera coordinates
    ``centre`` (x right, y down, z forward), seen by a pinhole camera of
    ``focal`` length (pixels) and ``principal`` point: ``[4, 2]``, clockwise
    from the plane's top-left corner."""
    local = np.array([[-width / 2, -height / 2, 0.0], [width / 2, -height / 2, 0.0],
                      [width / 2, height / 2, 0.0], [-width / 2, height / 2, 0.0]])
    points = local @ np.asarray(turn, np.float64).T + np.asarray(centre, np.float64)
    return focal * points[:, :2] / points[:, 2:] + np.asarray(principal, np.float64)


def corners_box(corners, size):
    """The pixel box ``(x0, y0, x1, y1)`` that the quadrilateral ``corners``
    covers inside a frame of ``size`` (width, height); ``(0, 0, 0, 0)`` when
    it lies outside."""
    w, h = size
    x0, y0 = np.floor(corners.min(axis=0)).astype(int)
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    return (int(x0), int(y0), int(x1), int(y1)) if x1 > x0 and y1 > y0 else (0, 0, 0, 0)


def _depth(depth, width, height, turn):
    """``depth``, or more where the turned plane's nearest corner would come
    closer than half of it to the camera (a plane seen nearly edge-on)."""
    near = (np.array([[-width, -height, 0.0], [width, -height, 0.0], [width, height, 0.0], [-width, height, 0.0]])
            / 2 @ np.asarray(turn).T)[:, 2].min()
    return max(depth, -2.0 * near)


def _quad_area(corners):
    x, y = corners[:, 0], corners[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _array(photo):
    return np.asarray(photo.convert("RGB"), np.float32)


def _warp(image, corners, size):
    """``image`` (float RGB) warped so its corners land on ``corners``, and
    its coverage in [0, 1], both at ``size``. The image is first reduced
    to about its projected size, so that a far plane does not alias."""
    h, w = image.shape[:2]
    extent = max(np.ptp(corners[:, 0]), np.ptp(corners[:, 1]), 1.0)
    shrink = min(1.0, 1.5 * extent / max(w, h))
    if shrink < 1.0:
        image = cv2.resize(image, (max(2, round(w * shrink)), max(2, round(h * shrink))),
                           interpolation=cv2.INTER_AREA)
        h, w = image.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    matrix = cv2.getPerspectiveTransform(src, np.float32(corners))
    warped = cv2.warpPerspective(image, matrix, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    cover = cv2.warpPerspective(np.ones((h, w), np.float32), matrix, size, flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_CONSTANT)
    return warped, cover


def _composite(canvas, layer, alpha):
    alpha = alpha[..., None]
    return canvas * (1 - alpha) + layer * alpha


def _backdrop(rng, size, surroundings):
    """An out-of-focus photograph filling the frame, with one to three other
    photographs standing in the scene at their own angles."""
    w, h = size
    photo = _array(surroundings[int(rng.integers(len(surroundings)))])
    ph, pw = photo.shape[:2]
    cover = max(w / pw, h / ph) * rng.uniform(1.0, 1.6)
    photo = cv2.resize(photo, (max(w, round(pw * cover)), max(h, round(ph * cover))), interpolation=cv2.INTER_AREA)
    x = int(rng.integers(0, photo.shape[1] - w + 1))
    y = int(rng.integers(0, photo.shape[0] - h + 1))
    canvas = photo[y:y + h, x:x + w]
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    canvas = cv2.GaussianBlur(np.ascontiguousarray(canvas), (0, 0), rng.uniform(0.5, 4.0))
    for _ in range(int(rng.integers(1, 4))):
        other = _array(surroundings[int(rng.integers(len(surroundings)))])
        oh, ow = other.shape[:2]
        focal = w / (2 * np.tan(np.deg2rad(rng.uniform(35, 75)) / 2))
        turn = rotation(*np.deg2rad(rng.uniform(-50, 50, 3) * (1, 0.6, 0.3)))
        depth = _depth(focal / (rng.uniform(0.25, 0.7) * w), 1.0, oh / ow, turn)
        centre = ((rng.uniform(0, w) - w / 2) * depth / focal, (rng.uniform(0, h) - h / 2) * depth / focal, depth)
        corners = project_plane(1.0, oh / ow, turn, centre, focal, (w / 2, h / 2))
        warped, cover = _warp(other, corners, size)
        canvas = _composite(canvas, warped, cover)
    return canvas


def _occlude(canvas, rng, box, difficulty, surroundings):
    """Draws one occluder over ``box`` (the instance's) and returns the
    canvas and the pixels it covers (bool)."""
    w, h = canvas.shape[1], canvas.shape[0]
    x0, y0, x1, y1 = box
    kind = rng.integers(3)
    mask = np.zeros((h, w), np.float32)
    if kind == 0:  # poles or railings, straight across the instance
        colour = rng.uniform(0, 255, 3)
        for _ in range(int(rng.integers(1, 4))):
            thick = max(2, int((x1 - x0) * rng.uniform(0.03, 0.06 + 0.1 * difficulty)))
            if rng.random() < 0.6:
                x = int(rng.uniform(x0, x1))
                lean = int(rng.uniform(-0.2, 0.2) * h)
                cv2.line(mask, (x - lean, -5), (x + lean, h + 5), 1.0, thick)
            else:
                y = int(rng.uniform(y0, y1))
                cv2.line(mask, (-5, y), (w + 5, y + int(rng.uniform(-0.1, 0.1) * w)), 1.0, thick)
        layer = np.broadcast_to(colour, canvas.shape).astype(np.float32)
    elif kind == 1:  # a soft-edged blob cut from another photograph
        centre = (int(rng.uniform(x0, x1)), int(rng.uniform(y0, y1)))
        axes = (max(2, int((x1 - x0) * rng.uniform(0.15, 0.25 + 0.25 * difficulty))),
                max(2, int((y1 - y0) * rng.uniform(0.2, 0.35 + 0.3 * difficulty))))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1)
        mask = cv2.GaussianBlur(mask, (0, 0), max(axes) * 0.1)
        other = _array(surroundings[int(rng.integers(len(surroundings)))])
        layer = cv2.resize(other, (w, h), interpolation=cv2.INTER_AREA)
    else:  # an out-of-focus foreground band across the bottom of the frame
        top = int(h * (1 - rng.uniform(0.1, 0.2 + 0.25 * difficulty)))
        edge = np.linspace(0, np.pi * rng.uniform(1, 4), w)
        rows = top + (np.sin(edge + rng.uniform(0, 6.3)) * h * 0.04).astype(int)
        mask[np.arange(h)[:, None] >= rows[None, :]] = 1.0
        mask = cv2.GaussianBlur(mask, (0, 0), 3.0)
        other = _array(surroundings[int(rng.integers(len(surroundings)))])
        layer = cv2.GaussianBlur(cv2.resize(other, (w, h), interpolation=cv2.INTER_AREA), (0, 0), 6.0)
    return _composite(canvas, layer, mask), mask > 0.5


def _camera(canvas, rng, difficulty):
    """Exposure, white balance, vignetting, blur, sensor noise and JPEG."""
    h, w = canvas.shape[:2]
    canvas = canvas * rng.uniform(0.55, 1.45) * rng.uniform(0.85, 1.15, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    radius = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
    canvas = canvas * (1 - rng.uniform(0, 0.5) * radius)[..., None]
    canvas = np.clip(canvas, 0, 255).astype(np.float32)
    blur = rng.random()
    if blur < 0.3:  # defocus
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.5, 0.8 + 1.5 * difficulty))
    elif blur < 0.55:  # camera shake: a line kernel
        length = int(rng.integers(3, 4 + int(8 * difficulty)))
        kernel = np.zeros((length, length), np.float32)
        angle = rng.uniform(0, np.pi)
        c = (length - 1) / 2
        dx, dy = np.cos(angle) * c, np.sin(angle) * c
        cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1)
        canvas = cv2.filter2D(canvas, -1, kernel / kernel.sum())
    # Shot noise grows with the signal, read noise does not.
    shot, read = rng.uniform(0, 0.3 + 1.2 * difficulty), rng.uniform(0.5, 2 + 4 * difficulty)
    canvas = canvas + rng.normal(0, 1, canvas.shape) * np.sqrt(shot * canvas + read ** 2)
    pixels = np.clip(canvas, 0, 255).astype(np.uint8)
    ok, coded = cv2.imencode(".jpg", pixels[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 90))])
    return np.ascontiguousarray(cv2.imdecode(coded, cv2.IMREAD_COLOR)[..., ::-1])


def camera_view(photo, rng, size, difficulty, surroundings):
    """A photograph of ``photo`` (the instance, a plane) taken by a camera
    in a scene of ``surroundings``.

    Args:
        photo: the instance's RGB `PIL.Image`.
        rng: numpy Generator; the view is a deterministic function of it.
        size: output (width, height).
        difficulty: 0 (near frontal, large, whole) .. 1 (turned far, small
            or cut by the frame, occluded, poor camera).
        surroundings: RGB `PIL.Image` photographs the scene is made of
            (other instances may be among them; ``photo`` itself is skipped).

    Returns:
        ``(image, box, visible)``: the RGB `PIL.Image`; the instance's box
        ``(x0, y0, x1, y1)`` in the frame (`corners_box`, occluded parts
        included); the share of its projected area that stays in the frame
        and unoccluded.
    """
    w, h = size
    others = [s for s in surroundings if s is not photo] or [photo]
    canvas = _backdrop(rng, size, others)
    image = _array(photo)
    ph, pw = image.shape[:2]
    focal = w / (2 * np.tan(np.deg2rad(rng.uniform(40, 80)) / 2))
    turn = rotation(np.deg2rad(rng.uniform(-1, 1) * (5 + 50 * difficulty)),
                    np.deg2rad(rng.uniform(-1, 1) * (3 + 32 * difficulty)),
                    np.deg2rad(rng.uniform(-1, 1) * (2 + 28 * difficulty)))
    # The frontal width it would have, as a share of the frame's: a quarter
    # of it at the hardest.
    share = rng.uniform(0.5, 0.95) * (1 - 0.5 * difficulty * rng.random())
    width = share * min(w, h * pw / ph)
    depth = _depth(focal / width, 1.0, ph / pw, turn)  # the plane is 1 wide, ph / pw high
    # Where its centre lands: inside the frame, or (hard) near an edge so
    # that the frame cuts it.
    reach = 0.5 + 0.3 * difficulty
    target = (w / 2 + rng.uniform(-1, 1) * max(0.0, w / 2 - width * (1 - reach)),
              h / 2 + rng.uniform(-1, 1) * max(0.0, h / 2 - width * ph / pw * (1 - reach)))
    centre = ((target[0] - w / 2) * depth / focal, (target[1] - h / 2) * depth / focal, depth)
    corners = project_plane(1.0, ph / pw, turn, centre, focal, (w / 2, h / 2))
    warped, cover = _warp(image, corners, size)
    canvas = _composite(canvas, warped, cover)
    box = corners_box(corners, size)
    seen = cover > 0.5
    for _ in range(int(rng.random() < 0.2 + 0.6 * difficulty) + int(rng.random() < 0.35 * difficulty)):
        if not seen.any():
            break
        canvas, covered = _occlude(canvas, rng, box, difficulty, others)
        seen &= ~covered
    visible = min(1.0, seen.sum() / max(_quad_area(corners), 1.0))
    return Image.fromarray(_camera(canvas, rng, difficulty), "RGB"), box, float(visible)
