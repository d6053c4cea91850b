"""Real photographs that a fresh machine can install: GCompris's image sets.

The Debian package ``gcompris-qt-data`` (``apt-get install gcompris-qt-data``;
also in Ubuntu) ships the educational suite's activities as Qt resource
bundles (``/usr/share/gcompris-qt/rcc/*.rcc``). Several hold photographs:
monuments of the world (``explore_monuments``), animals (``erase``,
``explore_world_animals``, ``explore_farm_animals``), and everyday objects,
tools, fish, windmills and dams (``categorization``). The built-in dataset
uses the monuments and animals as instances (one photo, one instance) and
the objects as distractors; the object category ``monuments`` is left out,
since it shows the same monuments again.

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
PACKAGE = "gcompris-qt-data"
INSTALL_HINT = f"apt-get install --no-install-recommends {PACKAGE}"

# (bundle, path fragment that a photo's name must contain, fragments it must not).
INSTANCE_SETS = (
    ("explore_monuments.rcc", "/resource/", ()),
    ("erase.rcc", "/resource/", ()),
    ("explore_world_animals.rcc", "/resource/", ()),
    ("explore_farm_animals.rcc", "/resource/", ()),
)
DISTRACTOR_SETS = (
    ("categorization.rcc", "/images/", ("/monuments/", "/numbers/", "/alphabets/")),
)
PHOTO_SUFFIXES = (".webp", ".jpg", ".jpeg", ".png")
MIN_SIDE = 200  # icons and thumbnails are not photographs


@dataclasses.dataclass(frozen=True)
class Photo:
    """One photograph of a bundle: ``source`` is ``bundle.rcc:path``."""

    source: str
    data: bytes

    @property
    def sha1(self):
        return hashlib.sha1(self.data).hexdigest()

    def image(self):
        """The photo as an RGB `PIL.Image`."""
        with Image.open(io.BytesIO(self.data)) as im:
            return im.convert("RGB")


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


def _collect(photo_dir, sets):
    photos = []
    for bundle, keep, drop in sets:
        path = os.path.join(photo_dir, bundle)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path}: missing. The built-in dataset renders real photographs from the "
                f"Debian package {PACKAGE}: install it ({INSTALL_HINT}), or pass "
                "--synthetic_photos_dir pointing at its rcc/ folder."
            )
        for name, data in sorted(read_rcc(path).items()):
            if not name.lower().endswith(PHOTO_SUFFIXES) or keep not in name:
                continue
            if any(d in name for d in drop):
                continue
            photo = Photo(f"{bundle}:{name}", data)
            with Image.open(io.BytesIO(data)) as im:
                if min(im.size) < MIN_SIDE:
                    continue
            photos.append(photo)
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


def instance_photos(photo_dir=DEFAULT_DIR):
    """The photographs used as instances (monuments and animals), sorted by source."""
    return _collect(photo_dir, INSTANCE_SETS)


def distractor_photos(photo_dir=DEFAULT_DIR):
    """The photographs used as distractors and clutter (objects, tools, fish...)."""
    return _collect(photo_dir, DISTRACTOR_SETS)
