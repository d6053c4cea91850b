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


def test_collections_filter_names_and_small_images(tmp_path):
    _write_rcc(tmp_path / "explore_monuments.rcc", {
        "src/resource/big.png": _png((300, 240), "blue"),
        "src/resource/icon.png": _png((64, 64), "green"),   # too small: an icon
        "src/resource/notes.qml": b"Item {}",
    })
    for bundle in ("erase.rcc", "explore_world_animals.rcc", "explore_farm_animals.rcc"):
        _write_rcc(tmp_path / bundle, {"src/resource/p.png": _png((400, 300), "white")})
    found = photos.instance_photos(str(tmp_path))
    assert [p.source for p in found] == [
        "explore_monuments.rcc:src/resource/big.png",
        "erase.rcc:src/resource/p.png",
        "explore_world_animals.rcc:src/resource/p.png",
        "explore_farm_animals.rcc:src/resource/p.png",
    ]
    assert found[0].image().size == (300, 240)
    assert np.asarray(found[0].image())[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(FileNotFoundError, match="gcompris-qt-data"):
        photos.distractor_photos(str(tmp_path))


def test_installed_package_holds_real_photographs():
    try:
        instances = photos.instance_photos()
        distractors = photos.distractor_photos()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert len(instances) >= 100 and len(distractors) >= 90
    assert not any("/monuments/" in p.source for p in distractors)
    assert len({p.sha1 for p in instances + distractors}) == len(instances) + len(distractors)
    img = instances[0].image()
    assert min(img.size) >= photos.MIN_SIDE and np.asarray(img).std() > 20
