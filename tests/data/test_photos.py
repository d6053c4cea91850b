"""The Qt resource-bundle reader and the photo collections."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from deep_retrieval.data import photos


def _write_rcc(path, files, compress=(), version=3):
    """A bundle written straight from Qt's documented layout (``qres``, the
    tree of 14- or 22-byte nodes, UTF-16 names, size-prefixed data)."""
    folders = sorted({name.rsplit("/", 1)[0] for name in files if "/" in name})
    assert len(folders) == 1, "one folder is enough here"
    folder = folders[0]
    names, data = b"", b""

    def add_name(text):
        nonlocal names
        offset = len(names)
        names += struct.pack(">HI", len(text), 0) + text.encode("utf-16-be")
        return offset

    node = 14 if version == 1 else 22

    def pad(raw):
        return raw + b"\0" * (node - len(raw))

    entries = sorted(files.items())
    nodes = [pad(struct.pack(">IHII", 0, 2, 1, 1))]  # root: one child, node 1
    nodes.append(pad(struct.pack(">IHII", add_name(folder), 2, len(entries), 2)))
    for name, raw in entries:
        flags = 0
        if name in compress:
            raw = struct.pack(">I", len(raw)) + zlib.compress(raw)
            flags = 1
        offset = len(data)
        data += struct.pack(">I", len(raw)) + raw
        nodes.append(pad(struct.pack(">IHHHI", add_name(name.rsplit("/", 1)[1]), flags, 0, 0, offset)))
    header = 24 if version == 3 else 20
    tree_offset = header
    data_offset = tree_offset + len(nodes) * node
    names_offset = data_offset + len(data)
    blob = b"qres" + struct.pack(">IIII", version, tree_offset, data_offset, names_offset)
    if version == 3:
        blob += struct.pack(">I", 0)
    path.write_bytes(blob + b"".join(nodes) + data + names)


def _png(size, colour):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_reads_plain_and_zlib_entries(tmp_path, version):
    files = {"res/a.txt": b"hello", "res/b.bin": bytes(range(256)) * 4, "res/c.png": _png((8, 4), "red")}
    path = tmp_path / "bundle.rcc"
    _write_rcc(path, files, compress={"res/b.bin"}, version=version)
    assert photos.read_rcc(str(path)) == files


def test_rejects_other_files(tmp_path):
    path = tmp_path / "x.rcc"
    path.write_bytes(b"PK\x03\x04 not a bundle")
    with pytest.raises(photos.RccError, match="x.rcc"):
        photos.read_rcc(str(path))


def _rgba_png(pixels):
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, "PNG")
    return buf.getvalue()


def test_collections_by_role_filter_names_and_small_images(tmp_path):
    rcc, tux = tmp_path / "rcc", tmp_path / "tuxpaint"
    rcc.mkdir()
    _write_rcc(rcc / "explore_monuments.rcc", {
        "src/resource/big.png": _png((300, 240), "blue"),
        "src/resource/icon.png": _png((64, 64), "green"),   # too small: an icon
        "src/resource/notes.qml": b"Item {}",
    })
    bundles = [bundle for bundle, _, _ in photos.TRAINING_SETS]
    for i, bundle in enumerate(bundles):
        _write_rcc(rcc / bundle, {"src/resource/p.png": _png((400, 300), (10 * i, 0, 0))})
    # The same photo shipped twice is one instance.
    _write_rcc(rcc / bundles[-1], {"src/resource/p.png": _png((400, 300), (0, 0, 0))})
    rng = np.random.default_rng(0)
    photo = np.zeros((80, 80, 4), np.uint8)
    photo[10:70, 10:70, :3] = rng.integers(0, 256, (60, 60, 3))  # a photograph's many colours
    photo[10:70, 10:70, 3] = 255
    drawing = photo.copy()
    drawing[10:70, 10:70, :3] = [200, 30, 30]  # flat shading
    for name, pixels in (("animals/photo.png", photo), ("animals/drawing.png", drawing),
                         ("cartoon/photo.png", photo), ("animals/photo_mirror.png", photo)):
        (tux / "stamps" / name).parent.mkdir(parents=True, exist_ok=True)
        (tux / "stamps" / name).write_bytes(_rgba_png(pixels))
    (tux / "templates").mkdir()
    (tux / "templates" / "coast.jpg").write_bytes(_png((320, 240), "white"))
    (tux / "templates" / "thumb.png").write_bytes(_png((100, 80), "white"))

    training = photos.training_photos(str(rcc), str(tux))
    assert [p.source for p in training] == [f"{b}:src/resource/p.png" for b in bundles[:-1]] + [
        "stamps/animals/photo.png"]
    assert [p.cutout for p in training] == [False] * (len(bundles) - 1) + [True]
    assert training[-1].image().mode == "RGBA" and training[-1].package == "tuxpaint-stamps-default"
    assert training[0].licence == "GPL-3+" and training[-1].licence == "GPL-2"
    scenes = photos.scene_photos(str(rcc), str(tux))
    assert [p.source for p in scenes] == ["explore_monuments.rcc:src/resource/big.png", "templates/coast.jpg"]
    assert np.asarray(scenes[0].image())[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(FileNotFoundError, match="gcompris-qt-data"):
        photos.scene_distractor_photos(str(rcc))
    with pytest.raises(FileNotFoundError, match="tuxpaint-stamps-default"):
        photos.training_photos(str(rcc), str(tmp_path / "nowhere"))


def test_installed_packages_hold_real_photographs_apart_by_role():
    try:
        training = photos.training_photos()
        scenes = photos.scene_photos()
        distractors = photos.scene_distractor_photos()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert len(training) >= 400 and len(scenes) >= 60 and len(distractors) >= 90
    assert sum(p.cutout for p in training) >= 200
    assert not any("/monuments/" in p.source for p in distractors)
    assert not any("monuments" in p.source or p.source.startswith("templates/") for p in training)
    everything = training + scenes + distractors
    assert len({p.sha1 for p in everything}) == len(everything)
    img = training[0].image()
    assert min(img.size) >= photos.MIN_SIDE and np.asarray(img).std() > 20


