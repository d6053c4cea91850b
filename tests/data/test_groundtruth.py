import os
import pickle

import numpy as np
import pytest

from deep_retrieval.data import groundtruth


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _gnd():
    return {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"bbx": np.array([1.0, 2.0, 30.5, 40.0]), "easy": np.array([0]),
                 "hard": np.array([2]), "junk": np.array([], dtype=np.int64)}],
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_containers_and_numpy(tmp_path, protocol):
    path = tmp_path / "gnd_x.pkl"
    _write(path, _gnd(), protocol)
    cfg = groundtruth.load_groundtruth(str(path))
    assert cfg["imlist"] == ["a", "b", "c"]
    np.testing.assert_array_equal(cfg["gnd"][0]["bbx"], [1.0, 2.0, 30.5, 40.0])


def test_refuses_code_execution(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "gnd_evil.pkl"
    evil = _gnd()
    evil["gnd"][0]["easy"] = _Exploit(marker)
    _write(path, evil)
    with pytest.raises(ValueError, match="refused to load posix.system|refused to load os.system"):
        groundtruth.load_groundtruth(str(path))
    assert not marker.exists()


def test_refuses_other_globals(tmp_path):
    path = tmp_path / "gnd_x.pkl"
    _write(path, {"imlist": [], "qimlist": [], "gnd": [], "x": pytest.approx})
    with pytest.raises(ValueError, match="refused to load"):
        groundtruth.load_groundtruth(str(path))


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        groundtruth.load_groundtruth(str(tmp_path / "missing.pkl"))
    path = tmp_path / "gnd_bad.pkl"
    _write(path, {"imlist": []})
    with pytest.raises(ValueError, match="gnd_bad.pkl: expected a dict"):
        groundtruth.load_groundtruth(str(path))


def test_load_dataset_layout(tmp_path):
    os.makedirs(tmp_path / "toy" / "jpg")
    _write(tmp_path / "toy" / "gnd_toy.pkl", _gnd())
    ds = groundtruth.load_dataset(str(tmp_path), "toy")
    assert ds.images[0] == str(tmp_path / "toy" / "jpg" / "a.jpg")
    assert ds.queries == [str(tmp_path / "toy" / "jpg" / "q.jpg")]
    assert ds.query_boxes == [(1.0, 2.0, 30.5, 40.0)]


def test_rotation_must_be_a_quarter_turn(tmp_path):
    from PIL import Image

    folder = tmp_path / "h" / "jpg"
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 4)).save(folder / "a.jpg")
    cfg = {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"ok": np.array([0])}], "rotate": {"a": 45}}
    _write(tmp_path / "h" / "gnd_h.pkl", cfg)
    with pytest.raises(ValueError, match="a.jpg: rotation 45 is not a multiple of 90"):
        groundtruth.load_dataset(str(tmp_path), "h")
    cfg["rotate"] = {"a": 270}
    _write(tmp_path / "h" / "gnd_h.pkl", cfg)
    data = groundtruth.load_dataset(str(tmp_path), "h")
    with Image.open(data.images[0]) as im:
        assert im.size == (4, 8) and data.query_indices == [0]


def test_pickles_that_would_allocate_past_the_file_are_refused(tmp_path):
    import struct

    memo = tmp_path / "gnd_memo.pkl"  # a memo index of 2**28 cost 4 GiB before the unpickler failed
    memo.write_bytes(b"\x80\x02}r" + struct.pack("<I", 1 << 28) + b".")
    with pytest.raises(ValueError, match="gnd_memo.pkl: .*memo index 268435456 out of sequence"):
        groundtruth.load_groundtruth(str(memo))
    buffer = tmp_path / "gnd_bytes.pkl"  # bytes(2**40): a terabyte asked for in 30 bytes
    buffer.write_bytes(b"\x80\x02c__builtin__\nbytes\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R.")
    with pytest.raises(ValueError, match="gnd_bytes.pkl: .*refused bytes\\(\\) with arguments"):
        groundtruth.load_groundtruth(str(buffer))
