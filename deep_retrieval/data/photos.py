"""Real photographs that a fresh machine can install, by role.

Three Debian packages (also in Ubuntu) ship photographs:

- ``gcompris-qt-data`` (GPL-3+): the educational suite's activities as Qt
  resource bundles (``/usr/share/gcompris-qt/rcc/*.rcc``), several of them
  photographs: monuments, animals, musicians, planets, hands, paintings,
  everyday objects.
- ``tuxpaint-stamps-default`` (GPL-2): Tux Paint's stamps
  (``/usr/share/tuxpaint/stamps``), hundreds of them photographs of animals,
  plants, food, vehicles and tools cut out on a transparent background
  (the cartoons, letters and symbols are left out).
- ``tuxpaint-data`` (GPL-2+): Tux Paint's templates
  (``/usr/share/tuxpaint/templates``), photographed scenes: coasts, a
  lighthouse, forests, rocks, machinery.

The roles keep the photo sources apart, so that validation measures
transfer to photographs of another kind than training saw:

- `training_photos`: GCompris's animals, musicians, planets, hands,
  paintings and the like, and the Tux Paint cutouts (``cutout=True``: they
  are composited onto a background before views are made of them);
- `scene_photos`: the validation instances, GCompris's monuments and Tux
  Paint's templates: photographed places, which no training photo shows;
- `scene_distractor_photos`: GCompris's everyday objects, tools, fish,
  windmills and dams (``categorization``), the validation's distractors and
  clutter, also unseen in training.

`read_rcc` reads a bundle (Qt's documented ``qres`` format, versions 1 to
3, zlib-compressed entries) without Qt. Nothing is executed: entries are
bytes, decoded by Pillow.
"""

import dataclasses
import hashlib
import io
import os
import struct
import zlib

from PIL import Image

DEFAULT_DIR = "/usr/share/gcompris-qt/rcc"
TUXPAINT_DIR = "/usr/share/tuxpaint"
PACKAGE = "gcompris-qt-data"
PACKAGES = ("gcompris-qt-data", "tuxpaint-stamps-default", "tuxpaint-data")
INSTALL_HINT = f"apt-get install --no-install-recommends {' '.join(PACKAGES)}"
LICENCES = {"gcompris-qt-data": "GPL-3+", "tuxpaint-stamps-default": "GPL-2", "tuxpaint-data": "GPL-2+"}
"""Each package's licence, from its ``/usr/share/doc/PACKAGE/copyright``."""

# (bundle, path fragment that a photo's name must contain, fragments it must not).
TRAINING_SETS = tuple(
    (f"{name}.rcc", "/resource/", ())
    for name in ("erase", "explore_world_animals", "explore_farm_animals", "explore_world_music",
                 "solar_system", "louis-braille", "leftright", "babyshapes", "chronos", "clickgame",
                 "paintings")
)
SCENE_SETS = (("explore_monuments.rcc", "/resource/", ()),)
SCENE_DISTRACTOR_SETS = (
    ("categorization.rcc", "/images/", ("/monuments/", "/numbers/", "/alphabets/")),
)
PHOTO_SUFFIXES = (".webp", ".jpg", ".jpeg", ".png")
MIN_SIDE = 200  # icons and thumbnails are not photographs
# Tux Paint stamps: folders of drawings and the hand-made mirror images of
# other stamps are skipped; a cutout needs this many opaque pixels, and this
# many distinct colours per square root of them (flat-shaded drawings have
# few, photographs many).
STAMP_SKIP = ("cartoon", "symbols/", "_mirror.")
STAMP_MIN_PIXELS = 1500
STAMP_MIN_RICHNESS = 8.0


@dataclasses.dataclass(frozen=True)
class Photo:
    """One photograph: ``source`` is ``bundle.rcc:path`` or a path under the
    package's folder; ``cutout`` marks a photo cut out on a transparent
    background (a Tux Paint stamp)."""

    source: str
    data: bytes
    package: str = PACKAGE
    cutout: bool = False

    @property
    def sha1(self):
        return hashlib.sha1(self.data).hexdigest()

    @property
    def licence(self):
        return LICENCES.get(self.package, "")

    def image(self):
        """The photo as an RGB `PIL.Image` (RGBA for a cutout)."""
        with Image.open(io.BytesIO(self.data)) as im:
            return im.convert("RGBA" if self.cutout else "RGB")


class RccError(ValueError):
    """A resource bundle that cannot be read (names the file)."""


def read_rcc(path):
    """``{path: bytes}`` of every file in a Qt resource bundle (``.rcc``)."""
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:4] != b"qres" or len(blob) < 20:
        raise RccError(f"{path}: not a Qt resource bundle")
    version, tree, data, names = struct.unpack(">IIII", blob[4:20])
    if version not in (1, 2, 3):
        raise RccError(f"{path}: unsupported resource bundle version {version}")
    node_size = 14 if version == 1 else 22

    def name_at(offset):
        start = names + offset
        (length,) = struct.unpack(">H", blob[start:start + 2])
        return blob[start + 6:start + 6 + 2 * length].decode("utf-16-be")

    files, stack, seen = {}, [(0, "")], set()
    while stack:
        index, prefix = stack.pop()
        if index in seen:
            raise RccError(f"{path}: the resource tree has a cycle")
        seen.add(index)
        node = tree + index * node_size
        if node + 14 > len(blob):
            raise RccError(f"{path}: truncated resource tree")
        name_offset, flags = struct.unpack(">IH", blob[node:node + 6])
        name = name_at(name_offset) if index else ""
        if flags & 2:  # directory
            count, first = struct.unpack(">II", blob[node + 6:node + 14])
            folder = f"{prefix}{name}/" if name else prefix
            stack.extend((child, folder) for child in range(first, first + count))
            continue
        (offset,) = struct.unpack(">I", blob[node + 10:node + 14])
        start = data + offset
        (size,) = struct.unpack(">I", blob[start:start + 4])
        raw = blob[start + 4:start + 4 + size]
        if flags & 1:  # zlib, behind a 4-byte uncompressed size
            raw = zlib.decompress(raw[4:])
        elif flags & 4:  # zstd: no photos are stored this way
            continue
        files[prefix + name] = raw
    return files


def _missing(path, package):
    return FileNotFoundError(
        f"{path}: missing. The built-in dataset renders real photographs from the Debian packages "
        f"{', '.join(PACKAGES)}: install them ({INSTALL_HINT}), or pass --synthetic_photos_dir "
        f"(GCompris's rcc/ folder) and --synthetic_tuxpaint_dir where they are. ({package})"
    )


def _collect(photo_dir, sets):
    photos = []
    for bundle, keep, drop in sets:
        path = os.path.join(photo_dir, bundle)
        if not os.path.isfile(path):
            raise _missing(path, PACKAGE)
        for name, data in sorted(read_rcc(path).items()):
            if not name.lower().endswith(PHOTO_SUFFIXES) or keep not in name:
                continue
            if any(d in name for d in drop):
                continue
            with Image.open(io.BytesIO(data)) as im:
                if min(im.size) < MIN_SIDE:
                    continue
            photos.append(Photo(f"{bundle}:{name}", data))
    return photos


def _files(folder, package):
    if not os.path.isdir(folder):
        raise _missing(folder, package)
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(PHOTO_SUFFIXES)]
    return found


def is_photographic_cutout(image):
    """Whether an RGBA stamp is a photograph (many colours over enough opaque
    pixels) rather than a flat-shaded drawing."""
    import numpy as np

    rgba = np.asarray(image.convert("RGBA"))
    opaque = rgba[..., 3] > 200
    count = int(opaque.sum())
    if count < STAMP_MIN_PIXELS:
        return False
    q = rgba[..., :3][opaque].astype(np.int32) // 4
    colours = len(np.unique(q[:, 0] * 4096 + q[:, 1] * 64 + q[:, 2]))
    return colours / count ** 0.5 >= STAMP_MIN_RICHNESS


def stamp_photos(tuxpaint_dir=TUXPAINT_DIR):
    """Tux Paint's photographic stamps, as cutouts (sorted by path)."""
    stamps = os.path.join(tuxpaint_dir, "stamps")
    photos = []
    for path in _files(stamps, "tuxpaint-stamps-default"):
        name = os.path.relpath(path, stamps)
        if not name.lower().endswith(".png") or any(d in name for d in STAMP_SKIP):
            continue
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("RGBA", "LA", "P") or not is_photographic_cutout(im):
                continue
        photos.append(Photo(f"stamps/{name}", data, "tuxpaint-stamps-default", cutout=True))
    return photos


def template_photos(tuxpaint_dir=TUXPAINT_DIR):
    """Tux Paint's photographed templates (sorted by path)."""
    templates = os.path.join(tuxpaint_dir, "templates")
    photos = []
    for path in _files(templates, "tuxpaint-data"):
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            if min(im.size) < MIN_SIDE:
                continue
        photos.append(Photo(f"templates/{os.path.relpath(path, templates)}", data, "tuxpaint-data"))
    return photos


def folder_photos(directory):
    """The photographs under ``directory`` (recursive, sorted), each one an
    instance: ``(photos, problems)`` where ``problems`` lists ``(path,
    reason)`` for files that cannot be used (unreadable, over the pixel
    limit, smaller than `MIN_SIDE`)."""
    from deep_retrieval.data.images import EXTENSIONS, check_image

    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such folder of photographs")
    found, problems = [], []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(EXTENSIONS):
                continue
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                with Image.open(io.BytesIO(data)) as im:
                    check_image(im)
                    if min(im.size) < MIN_SIDE:
                        raise ValueError(f"smaller than {MIN_SIDE} pixels ({im.size[0]}x{im.size[1]})")
                    im.convert("RGB").load()
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                problems.append((path, str(e) or type(e).__name__))
                continue
            found.append(Photo(os.path.relpath(path, directory), data))
    return found, problems


def training_photos(photo_dir=DEFAULT_DIR, tuxpaint_dir=TUXPAINT_DIR):
    """The training instances: GCompris's `TRAINING_SETS` and Tux Paint's
    photographic stamps (cutouts)."""
    return _unique(_collect(photo_dir, TRAINING_SETS) + stamp_photos(tuxpaint_dir))


def _unique(photos):
    """The first of each set of byte-identical photos (a package may ship one
    twice under two names)."""
    seen = set()
    return [p for p in photos if not (p.sha1 in seen or seen.add(p.sha1))]


def scene_photos(photo_dir=DEFAULT_DIR, tuxpaint_dir=TUXPAINT_DIR):
    """The validation instances: GCompris's monuments and Tux Paint's templates."""
    return _collect(photo_dir, SCENE_SETS) + template_photos(tuxpaint_dir)


def scene_distractor_photos(photo_dir=DEFAULT_DIR):
    """The validation's distractors and clutter: GCompris's everyday objects,
    tools, fish, windmills and dams."""
    return _collect(photo_dir, SCENE_DISTRACTOR_SETS)
