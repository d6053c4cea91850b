"""The built-in landmark dataset, generated deterministically on first use.

With ``source="photos"`` (the default) each landmark is a real photograph
(`deep_retrieval.data.photos`: monuments and animals from a Debian package):
one photo is one instance, and each image of it is a new view (`photo_view`)
under perspective change, zoom and crop, rotation, occlusion by other
photographs, a photographed background, lighting, colour, blur and JPEG
quality. The held-out split uses other photos than training, and its
distractors are views of unrelated photographs (objects, tools, fish).
``sources.csv`` records every photo used (bundle, path, SHA-1) and its role.

With ``source="facades"`` each landmark is a procedural planar facade (a wall
colour and texture, a grid of windows, ornaments, a sign) placed in a
procedural cluttered scene (`photograph`); distractors hold clutter only.
It needs no package and is what the unit tests and the ``tiny`` preset use.

Both record each landmark's bounding box. Optional label noise (wrong
labels, junk images) exercises the cleaning step.

Layout written under the cache directory::

    train/*.jpg, train.csv          image,label,x0,y0,x1,y1 (the training manifest)
    train_noise.csv                 image,kind,true_label (the injected noise)
    synthetic/jpg/*.jpg             held-out queries and database
    synthetic/gnd_synthetic.pkl     Revisited Oxford ground truth
    synthetic/boxes.csv             image,x0,y0,x1,y1: the landmark box of every
                                    held-out image showing one (proposal recall)
    sources.csv                     role,index,source,sha1 (photos only)
    COMPLETE                        written last; its presence marks a full dataset
"""

import dataclasses
import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from deep_retrieval.config import SyntheticConfig

FORMAT_VERSION = 3
DATASET_NAME = "synthetic"
FACADE_SIZE = (256, 192)


def default_cache_dir():
    """``$KERAS_HOME/datasets/deep_retrieval`` (``~/.keras`` without KERAS_HOME)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "datasets", "deep_retrieval")


def _folder_listing(directory):
    """Names, sizes and modification times under ``directory``: a changed
    collection gets a new dataset."""
    listing = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(root, name))
            listing.append((os.path.relpath(os.path.join(root, name), directory), stat.st_size, stat.st_mtime_ns))
    return listing


def dataset_dir(config, cache_dir=None):
    """The folder of the dataset described by ``config`` (a hash of it, and
    of the folder's listing with ``source="folder"``)."""
    described = {"v": FORMAT_VERSION, **dataclasses.asdict(config)}
    if config.source == "folder":
        described["listing"] = _folder_listing(config.photos_dir)
    blob = json.dumps(described, sort_keys=True)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    return os.path.join(cache_dir or default_cache_dir(), f"synthetic-v{FORMAT_VERSION}-{digest}")


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


def _clutter(rng, size):
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
    scene = _clutter(rng, size)
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
        occ = _clutter(rng, (max(1, int(ow)), max(1, int(oh))))
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


def _save_jpeg(img, path, rng):
    img.save(path, "JPEG", quality=int(rng.integers(40, 92)))


def _landmark_seed(config, split, index):
    return [config.seed, 7919, 0 if split == "train" else 1, index]


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


class _Facades:
    """Procedural facades: one per (split, index), clutter drawn at random."""

    # Share of the landmark visible in a database image: easy from `easy`,
    # hard from `junk`, junk below; the difficulties of training and
    # database images.
    easy, junk = 0.9, 0.4
    train_difficulty = (0.0, 0.7)
    difficulty = (0.0, 1.0)

    def __init__(self, config):
        self.config = config
        self.sources = []
        self.problems = []
        self.counts = {"train": config.train_landmarks, "test": config.test_landmarks}

    def landmark(self, split, index):
        facade = make_facade(_landmark_seed(self.config, split, index))
        return lambda rng, size, difficulty: photograph(facade, rng, size, difficulty)

    def background(self, rng, size, index, split):
        return _clutter(rng, size)


class _Photos:
    """Real photographs (`deep_retrieval.data.photos`): each instance photo is
    one landmark; the held-out split takes a seeded draw of the photos and
    training the others. The distractor photos are split in three: the
    backgrounds and occluders of training views, those of held-out views,
    and the held-out split's distractor images; so what training learns to
    ignore is not what the held-out split shows."""

    WORK_SIDE = 640  # photos are downscaled once to this longest side
    # A zoomed view shows a part of the photo: that is hard, not junk, as
    # long as a fifth of it is there.
    easy, junk = 0.7, 0.2
    train_difficulty = (0.0, 1.0)
    difficulty = (0.3, 1.0)

    def __init__(self, config):
        from deep_retrieval.data import photos as photos_lib

        self.config = config
        self.problems = []
        if config.source == "folder":
            # A user's collection: every photo, a fifth (at least two) held out.
            instances, self.problems = photos_lib.folder_photos(config.photos_dir)
            if len(instances) < 4:
                raise ValueError(
                    f"{config.photos_dir}: {len(instances)} usable photographs, at least 4 are "
                    f"needed ({len(self.problems)} files could not be used)"
                )
            test = max(2, len(instances) // 5)
            self.counts = {"train": len(instances) - test, "test": test}
            try:
                distractors = photos_lib.distractor_photos()
            except FileNotFoundError:
                distractors = []  # procedural clutter instead, below
        else:
            instances = photos_lib.instance_photos(config.photos_dir)
            distractors = photos_lib.distractor_photos(config.photos_dir)
            self.counts = {"train": config.train_landmarks, "test": config.test_landmarks}
        need = self.counts["train"] + self.counts["test"]
        if len(instances) < need:
            raise ValueError(
                f"{config.photos_dir}: {len(instances)} instance photographs, but "
                f"train_landmarks + test_landmarks = {need}"
            )
        order = np.random.default_rng([config.seed, 23]).permutation(len(instances))
        self.split = {
            "test": [instances[i] for i in order[:self.counts["test"]]],
            "train": [instances[i] for i in order[self.counts["test"]:need]],
        }
        order = np.random.default_rng([config.seed, 29]).permutation(len(distractors))
        parts = np.array_split(order, 3)
        self._cache = {}
        self.clutter = {
            split: [self._image(distractors[i]) for i in part]
            for split, part in zip(("train", "test"), parts)
        }
        self.distractors = [self._image(distractors[i]) for i in parts[2]]
        if not distractors:
            for k, split in enumerate(("train", "test", "distractor")):
                rng = np.random.default_rng([config.seed, 31, k])
                pool = [_clutter(rng, (self.WORK_SIDE, self.WORK_SIDE * 3 // 4)) for _ in range(16)]
                if split == "distractor":
                    self.distractors = pool
                else:
                    self.clutter[split] = pool
        self.sources = (
            [("train", i, p) for i, p in enumerate(self.split["train"])]
            + [("test", i, p) for i, p in enumerate(self.split["test"])]
            + [("distractor", i, distractors[j]) for i, j in enumerate(parts[2])]
            + [("train_clutter", i, distractors[j]) for i, j in enumerate(parts[0])]
            + [("test_clutter", i, distractors[j]) for i, j in enumerate(parts[1])]
        )

    def _load(self, photo):
        img = photo.image()
        img.thumbnail((self.WORK_SIDE, self.WORK_SIDE), Image.BILINEAR)
        return img

    def _image(self, photo):
        if photo.source not in self._cache:
            self._cache[photo.source] = self._load(photo)
        return self._cache[photo.source]

    def landmark(self, split, index):
        img = self._image(self.split[split][index])
        clutter = self.clutter[split]
        return lambda rng, size, difficulty: photo_view(img, rng, size, difficulty, clutter)

    def background(self, rng, size, index, split):
        """A view of a photo with no landmark: a held-out distractor, or
        (training junk) one of the training clutter photos."""
        pool = self.distractors if split == "test" else self.clutter["train"]
        img = pool[index % len(pool)]
        view, _, _ = photo_view(img, rng, size, rng.uniform(0, 1), self.clutter[split])
        return view


def generate(config, out_dir, progress=True):
    """Writes the dataset for ``config`` into ``out_dir`` (see module docs)."""
    size = (config.image_width, config.image_height)
    source = _Facades(config) if config.source == "facades" else _Photos(config)
    for path, reason in source.problems[:20]:
        tqdm.write(f"  skipped {path}: {reason}")
    n_train, n_test = source.counts["train"], source.counts["test"]
    train_dir = os.path.join(out_dir, "train")
    test_dir = os.path.join(out_dir, DATASET_NAME, "jpg")
    os.makedirs(train_dir)
    os.makedirs(test_dir)
    total = (
        n_train * config.images_per_landmark
        + n_test * (config.test_images_per_landmark + 1)
        + config.distractors
    )
    bar = tqdm(total=total, desc="synthetic dataset", unit="img", disable=not progress)

    rows, noise = [], []
    noisy_rng = np.random.default_rng([config.seed, 17])
    for lm in range(n_train):
        render = source.landmark("train", lm)
        for k in range(config.images_per_landmark):
            rng = np.random.default_rng([config.seed, 1, lm, k])
            name = f"l{lm:04d}_{k:02d}.jpg"
            img, box, _ = render(rng, size, rng.uniform(*source.train_difficulty))
            label = lm
            draw = noisy_rng.random()
            if draw < config.label_noise:
                label = int((lm + noisy_rng.integers(1, n_train)) % n_train)
                noise.append((name, "mislabeled", lm))
                box = None
            elif draw < config.label_noise + config.junk_noise:
                img, box = source.background(rng, size, lm * config.images_per_landmark + k, "train"), None
                noise.append((name, "junk", -1))
            _save_jpeg(img, os.path.join(train_dir, name), rng)
            rows.append((f"train/{name}", label) + (box if box else (None,) * 4))
            bar.update()
    columns = ["image", "label", "x0", "y0", "x1", "y1"]
    pd.DataFrame(rows, columns=columns).to_csv(os.path.join(out_dir, "train.csv"), index=False)
    pd.DataFrame(noise, columns=["image", "kind", "true_label"]).to_csv(
        os.path.join(out_dir, "train_noise.csv"), index=False
    )

    imlist, qimlist, gnd, test_boxes = [], [], [], []
    db_labels, db_visible = [], []
    for lm in range(n_test):
        render = source.landmark("test", lm)
        rng = np.random.default_rng([config.seed, 3, lm])
        qname = f"q{lm:04d}"
        img, box, _ = render(rng, size, 0.1)
        _save_jpeg(img, os.path.join(test_dir, qname + ".jpg"), rng)
        qimlist.append(qname)
        gnd.append({"bbx": np.asarray(box, dtype=np.float64)})
        test_boxes.append((qname,) + tuple(box))
        bar.update()
        for k in range(config.test_images_per_landmark):
            rng = np.random.default_rng([config.seed, 4, lm, k])
            name = f"t{lm:04d}_{k:02d}"
            img, box, visible = render(rng, size, rng.uniform(*source.difficulty))
            if box[2] > box[0] and box[3] > box[1]:
                test_boxes.append((name,) + tuple(box))
            _save_jpeg(img, os.path.join(test_dir, name + ".jpg"), rng)
            imlist.append(name)
            db_labels.append(lm)
            db_visible.append(visible)
            bar.update()
    for d in range(config.distractors):
        rng = np.random.default_rng([config.seed, 5, d])
        name = f"x{d:04d}"
        _save_jpeg(source.background(rng, size, d, "test"), os.path.join(test_dir, name + ".jpg"), rng)
        imlist.append(name)
        db_labels.append(-1)
        db_visible.append(0.0)
        bar.update()
    bar.close()
    db_labels, db_visible = np.asarray(db_labels), np.asarray(db_visible)
    for q, entry in enumerate(gnd):
        same = db_labels == q
        # Easy: most of the landmark visible; hard: partly; junk: barely.
        entry["easy"] = np.nonzero(same & (db_visible >= source.easy))[0]
        entry["hard"] = np.nonzero(same & (db_visible >= source.junk) & (db_visible < source.easy))[0]
        entry["junk"] = np.nonzero(same & (db_visible < source.junk))[0]
    pd.DataFrame(test_boxes, columns=["image", "x0", "y0", "x1", "y1"]).to_csv(
        os.path.join(out_dir, DATASET_NAME, "boxes.csv"), index=False
    )
    if source.sources:
        pd.DataFrame(
            [(role, i, p.source, p.sha1) for role, i, p in source.sources],
            columns=["role", "index", "source", "sha1"],
        ).to_csv(os.path.join(out_dir, "sources.csv"), index=False)
    with open(os.path.join(out_dir, DATASET_NAME, f"gnd_{DATASET_NAME}.pkl"), "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)


def ensure_dataset(config=None, cache_dir=None, progress=True):
    """Returns the dataset folder, generating it on first use.

    Generation writes into a temporary sibling folder that is renamed into
    place when complete, so an interrupted run leaves no half dataset.
    """
    config = config or SyntheticConfig()
    out_dir = dataset_dir(config, cache_dir)
    if os.path.exists(os.path.join(out_dir, "COMPLETE")):
        return out_dir
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(config, tmp, progress)
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        json.dump(dataclasses.asdict(config), f)
    if os.path.isdir(out_dir) and not os.path.exists(os.path.join(out_dir, "COMPLETE")):
        shutil.rmtree(out_dir, ignore_errors=True)  # left by an older crash
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # Another process finished the same dataset first: use theirs.
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(out_dir, "COMPLETE")):
            raise
    return out_dir
