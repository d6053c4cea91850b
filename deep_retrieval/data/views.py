"""Rendering the built-in dataset's images (see `deep_retrieval.data.synthetic`):
procedural facades photographed in cluttered scenes (`make_facade`,
`photograph`), and new views of a real photograph under perspective, zoom
and crop, rotation, occlusion, background, lighting, colour, blur
(`photo_view`). Each is a deterministic function of its random generator;
each returns the image and the landmark's bounding box."""

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FACADE_SIZE = (256, 192)


def _colour(rng, low=0, high=256):
    return tuple(int(c) for c in rng.integers(low, high, 3))


def make_facade(landmark_seed):
    """The frontal image of one landmark (RGB, `FACADE_SIZE`)."""
    rng = np.random.default_rng(landmark_seed)
    w, h = FACADE_SIZE
    wall = np.array(_colour(rng, 40, 220), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Wall texture: a gradient plus a couple of sinusoidal patterns.
    tex = 0
    for _ in range(2):
        fx, fy = rng.uniform(0.02, 0.25, 2)
        tex = tex + rng.uniform(8, 30) * np.sin(fx * xx + fy * yy + rng.uniform(0, 6.3))
    grad = rng.uniform(-40, 40) * (yy / h - 0.5)
    base = np.clip(wall[None, None, :] + (tex + grad)[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    rows, cols = int(rng.integers(2, 6)), int(rng.integers(2, 7))
    margin_x, margin_y = w * rng.uniform(0.05, 0.12), h * rng.uniform(0.05, 0.15)
    cell_w, cell_h = (w - 2 * margin_x) / cols, (h - 2 * margin_y) / rows
    window, frame = _colour(rng), _colour(rng)
    fill_w, fill_h = rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.8)
    arched = rng.random() < 0.5
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.1:
                continue
            cx, cy = margin_x + (c + 0.5) * cell_w, margin_y + (r + 0.5) * cell_h
            ww, hh = cell_w * fill_w / 2, cell_h * fill_h / 2
            box = [cx - ww, cy - hh, cx + ww, cy + hh]
            draw.rectangle(box, fill=window, outline=frame, width=2)
            if arched:
                draw.pieslice([cx - ww, cy - hh - ww, cx + ww, cy - hh + ww], 180, 360, fill=frame)
    for _ in range(int(rng.integers(2, 6))):
        kind = rng.integers(0, 3)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        s = rng.uniform(8, 40)
        if kind == 0:
            draw.ellipse([x - s, y - s, x + s, y + s], fill=_colour(rng))
        elif kind == 1:
            pts = [(x + s * np.cos(a), y + s * np.sin(a)) for a in rng.uniform(0, 6.3, 3)]
            draw.polygon(pts, fill=_colour(rng))
        else:
            draw.rectangle([x - s, y - s / 3, x + s, y + s / 3], fill=_colour(rng))
    # A sign: a band with a random bar code, strongly landmark-specific.
    sy = rng.uniform(0.02, 0.9) * h
    draw.rectangle([w * 0.2, sy, w * 0.8, sy + h * 0.08], fill=_colour(rng))
    bars = rng.integers(0, 2, 24)
    for i, b in enumerate(bars):
        if b:
            x0 = w * 0.22 + i * w * 0.56 / 24
            draw.rectangle([x0, sy + 2, x0 + w * 0.56 / 48, sy + h * 0.08 - 2], fill=frame)
    return img


def clutter_scene(rng, size):
    w, h = size
    arr = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    img = Image.fromarray(arr, "RGB").resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(10, 30))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        sx, sy = rng.uniform(1, max(2, w / 4)), rng.uniform(1, max(2, h / 4))
        shape = [x - sx, y - sy, x + sx, y + sy]
        if rng.random() < 0.5:
            draw.rectangle(shape, fill=_colour(rng))
        else:
            draw.ellipse(shape, fill=_colour(rng))
    return img


def _homography(src, dst):
    """3x3 H with dst ~ H @ src for four point pairs."""
    rows = []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y, -u])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y, -v])
    _, _, vt = np.linalg.svd(np.asarray(rows, dtype=np.float64))
    return (vt[-1] / vt[-1, -1]).reshape(3, 3)


def photograph(facade, rng, size, difficulty):
    """Renders ``facade`` into a scene.

    Args:
        facade: the landmark's frontal image.
        rng: numpy Generator.
        size: output (width, height).
        difficulty: 0 (frontal, fully visible) .. 1 (strong warp, partial).

    Returns:
        ``(image, box, visible)``: the RGB image, the landmark's box
        ``(x0, y0, x1, y1)`` clipped to the image, and the visible share of
        the landmark's area.
    """
    w, h = size
    fw, fh = facade.size
    scene = clutter_scene(rng, size)
    scale = rng.uniform(0.55, 0.95) * (1 - 0.35 * difficulty * rng.random())
    bw = w * scale
    bh = bw * fh / fw
    if bh > h * 0.95:
        bh = h * 0.95
        bw = bh * fw / fh
    shift = 0.5 * difficulty
    cx = w / 2 + rng.uniform(-1, 1) * (w - bw) / 2 + rng.uniform(-shift, shift) * bw
    cy = h / 2 + rng.uniform(-1, 1) * (h - bh) / 2 + rng.uniform(-shift, shift) * bh
    corners = _rectangle(bw, bh, cx, cy, np.deg2rad(rng.uniform(-8, 8) * (0.5 + difficulty)))
    corners += rng.uniform(-1, 1, (4, 2)) * (0.05 + 0.15 * difficulty) * np.array([bw, bh])
    m, visible, box = _paste_warped(scene, facade, corners)
    # Occluder over part of the landmark.
    if rng.random() < 0.3 + 0.5 * difficulty and m.any():
        ox0, oy0, ox1, oy1 = box
        ow = (ox1 - ox0) * rng.uniform(0.1, 0.2 + 0.3 * difficulty)
        oh = (oy1 - oy0) * rng.uniform(0.2, 0.6)
        x = rng.uniform(ox0, max(ox0 + 1, ox1 - ow))
        y = rng.uniform(oy0, max(oy0 + 1, oy1 - oh))
        occ = clutter_scene(rng, (max(1, int(ow)), max(1, int(oh))))
        scene.paste(occ, (int(x), int(y)))
        visible *= 1 - (ow * oh) / max((ox1 - ox0) * (oy1 - oy0), 1)
    arr = np.asarray(scene, dtype=np.float32)
    gain = rng.uniform(0.6, 1.4) * rng.uniform(0.8, 1.2, 3)
    gamma = rng.uniform(0.7, 1.4)
    arr = 255.0 * (np.clip(arr * gain, 0, 255) / 255.0) ** gamma
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    return img, box, float(min(visible, 1.0))


def _rectangle(width, height, cx, cy, angle):
    """Corners (clockwise from top-left) of a rectangle rotated by ``angle``."""
    corners = np.array([[-width / 2, -height / 2], [width / 2, -height / 2],
                        [width / 2, height / 2], [-width / 2, height / 2]])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return corners @ rot.T + [cx, cy]


def _paste_warped(scene, image, corners):
    """Pastes ``image`` into ``scene`` with its corners at ``corners``.

    Returns ``(mask, visible, box)``: the pixels it covers, the share of its
    warped area inside the scene, and the bounding box of the covered pixels
    (``(0, 0, 0, 0)`` when none).
    """
    fw, fh = image.size
    src = [(0, 0), (fw, 0), (fw, fh), (0, fh)]
    # PIL's PERSPECTIVE maps output pixels to input pixels: invert.
    inv = _homography(corners, src)
    coeffs = (inv / inv[2, 2]).flatten()[:8]
    warped = image.transform(scene.size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    mask = Image.new("L", (fw, fh), 255).transform(scene.size, Image.PERSPECTIVE, coeffs, Image.BILINEAR)
    scene.paste(warped, (0, 0), mask)
    m = np.asarray(mask) > 127
    visible = m.sum() / max(_polygon_area(corners), 1.0)
    box = (0, 0, 0, 0)
    if m.any():
        ys, xs = np.nonzero(m)
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return m, visible, box


def _polygon_area(p):
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def _photo_crop(photo, rng, size):
    """A random crop of ``photo`` at ``size``'s aspect ratio, resized to it."""
    w, h = size
    pw, ph = photo.size
    scale = min(pw / w, ph / h) * rng.uniform(0.5, 1.0)
    cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
    x, y = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    return photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)


def photo_view(photo, rng, size, difficulty, clutter):
    """A new view of a real photograph: the photo is the landmark.

    The photo goes through a random perspective warp, rotation, zoom (up to
    a crop of part of it) and shift into a scene whose background is a crop
    of a ``clutter`` photograph; part of it may be covered by another
    clutter crop; then lighting, colour, blur (JPEG quality is set on save).

    Args:
        photo: the instance's RGB image.
        rng: numpy Generator.
        size: output (width, height).
        difficulty: 0 (frontal, whole photo) .. 1 (strong warp, zoomed crop,
            occluded).
        clutter: RGB images for the background and occluders.

    Returns:
        ``(image, box, visible)`` as `photograph` does: the photo's box
        ``(x0, y0, x1, y1)`` clipped to the view and the share of the photo
        that stays visible.
    """
    w, h = size
    fw, fh = photo.size
    scene = _photo_crop(clutter[int(rng.integers(len(clutter)))], rng, size)
    fit = min(w / fw, h / fh)
    zoom = rng.uniform(0.75, 1.0) * (1 + 2.5 * difficulty * rng.random())
    bw, bh = fw * fit * zoom, fh * fit * zoom
    slack_x, slack_y = abs(w - bw) / 2, abs(h - bh) / 2
    cx = w / 2 + rng.uniform(-1, 1) * slack_x
    cy = h / 2 + rng.uniform(-1, 1) * slack_y
    corners = _rectangle(bw, bh, cx, cy, np.deg2rad(rng.uniform(-1, 1) * (3 + 12 * difficulty)))
    # Out-of-plane rotation: one side of the photo recedes.
    tilt = rng.uniform(-1, 1) * 0.35 * difficulty
    if rng.random() < 0.5:
        corners[[0, 3], 1] = cy + (corners[[0, 3], 1] - cy) * (1 - tilt)
        corners[[1, 2], 1] = cy + (corners[[1, 2], 1] - cy) * (1 + tilt)
    else:
        corners[[0, 1], 0] = cx + (corners[[0, 1], 0] - cx) * (1 - tilt)
        corners[[2, 3], 0] = cx + (corners[[2, 3], 0] - cx) * (1 + tilt)
    corners += rng.uniform(-1, 1, (4, 2)) * (0.03 + 0.15 * difficulty) * np.array([bw, bh])
    m, visible, box = _paste_warped(scene, photo, corners)
    for _ in range(int(rng.random() < 0.3 + 0.6 * difficulty) + int(rng.random() < 0.4 * difficulty)):
        if not m.any():
            break
        ox0, oy0, ox1, oy1 = box
        ow = max(1, int((ox1 - ox0) * rng.uniform(0.1, 0.2 + 0.3 * difficulty)))
        oh = max(1, int((oy1 - oy0) * rng.uniform(0.2, 0.4 + 0.4 * difficulty)))
        x = int(rng.uniform(ox0, max(ox0 + 1, ox1 - ow)))
        y = int(rng.uniform(oy0, max(oy0 + 1, oy1 - oh)))
        occluder = _photo_crop(clutter[int(rng.integers(len(clutter)))], rng, (ow, oh))
        covered = m[y:y + oh, x:x + ow].sum()
        scene.paste(occluder, (x, y))
        visible *= 1 - covered / max(m.sum(), 1)
        m[y:y + oh, x:x + ow] = False
    arr = np.asarray(scene, dtype=np.float32)
    gain = rng.uniform(0.5, 1.5) * rng.uniform(0.8, 1.2, 3)
    gamma = rng.uniform(0.65, 1.5)
    arr = 255.0 * (np.clip(arr * gain, 0, 255) / 255.0) ** gamma
    arr += rng.normal(0, 1 + 6 * difficulty * rng.random(), arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.6 + 1.4 * difficulty)))
    return img, box, float(min(visible, 1.0))


def composite_cutout(cutout, background, rng, size):
    """A photograph of a cut-out object: ``cutout`` (RGBA) at 55-80 % of the
    frame over an out-of-focus crop of ``background`` (RGB), at ``size``.
    Made once per instance: its views are then taken of this photograph."""
    scene = _photo_crop(background, rng, size).filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 4.0)))
    alpha = cutout.getchannel("A")
    box = alpha.getbbox() or (0, 0) + cutout.size
    cutout = cutout.crop(box)
    w, h = size
    fit = min(w / cutout.width, h / cutout.height) * rng.uniform(0.55, 0.8)
    cutout = cutout.resize((max(1, round(cutout.width * fit)), max(1, round(cutout.height * fit))), Image.BICUBIC)
    x = int(rng.integers(0, w - cutout.width + 1))
    y = int(rng.integers(0, h - cutout.height + 1))
    scene.paste(cutout, (x, y), cutout)
    return scene
