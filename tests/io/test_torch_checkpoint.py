"""The torch-free checkpoint reader against files written by torch.save itself."""

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from deep_retrieval.io import torch_checkpoint, torch_pickle

torch = pytest.importorskip("torch")


def _state():
    """Tensors of several dtypes, a non-contiguous view, a shared storage, a Parameter."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return collections.OrderedDict(
        conv=torch.randn(8, 3, 3, 3, generator=g),
        transposed=base.t(),                      # strided view of `base`
        row=base[2],                              # offset into the same storage
        base=base,
        half=torch.randn(5, generator=g).half(),
        bf16=torch.randn(7, generator=g).to(torch.bfloat16),
        long=torch.arange(10, dtype=torch.int64),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
        meta={"name": "net", "sizes": [1, 2, 3], "pair": (0.5, "x")},
    )


def _numpy(value):
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16:
            return value.float().numpy()
        return value.numpy()
    return value


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reads_what_torch_saved(tmp_path, zip_format):
    state = _state()
    path = str(tmp_path / "ckpt.pth")
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    assert zipfile.is_zipfile(path) == zip_format
    loaded = torch_checkpoint.load(path)
    assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
    for key, value in state.items():
        want = _numpy(value)
        if isinstance(want, np.ndarray):
            assert loaded[key].dtype == (np.float32 if key == "bf16" else want.dtype), key
            assert loaded[key].shape == want.shape, key
            np.testing.assert_array_equal(loaded[key], want, err_msg=key)
        else:
            assert loaded[key] == want


def test_module_state_dict_round_trip(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(4, 2))
    path = str(tmp_path / "net.pth")
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, path)
    loaded = torch_checkpoint.load(path)
    assert loaded["epoch"] == 3
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(loaded["state_dict"][key], value.numpy())


class _Payload:
    """Pickles as a call to os.system that would create ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_refuses_other_globals_before_they_run(tmp_path, zip_format):
    marker = tmp_path / "ran"
    path = str(tmp_path / "evil.pth")
    torch.save({"weight": torch.ones(2), "x": _Payload(marker)}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(torch_checkpoint.CheckpointError) as info:
        torch_checkpoint.load(path)
    message = str(info.value)
    assert path in message and ("posix.system" in message or "nt.system" in message)
    assert not marker.exists()


def test_refuses_a_plain_pickle_naming_a_callable(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(torch_checkpoint.CheckpointError, match="refused|not a PyTorch checkpoint"):
        torch_checkpoint.load(str(path))
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # unrestricted, the payload is live
    assert marker.exists()


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    path = str(tmp_path / "w.pth")
    torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=False)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(torch_checkpoint.CheckpointError, match="cut.pth"):
        torch_checkpoint.load(str(cut))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(torch_checkpoint.CheckpointError, match="notes.pth"):
        torch_checkpoint.load(str(text))
    with pytest.raises(torch_checkpoint.CheckpointError, match="no such"):
        torch_checkpoint.load(str(tmp_path / "missing.pth"))


class _Strided:
    """Pickles as torch's tensor rebuild with the extent given (as a
    crafted file would declare it)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def _crafted(tmp_path, offset, size, stride, zip_format=True, elements=16):
    import warnings

    path = str(tmp_path / "crafted.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated, and is what torch.save writes
        storage = torch.arange(elements, dtype=torch.float32).storage()
    torch.save({"w": _Strided(storage, offset, size, stride)}, path, _use_new_zipfile_serialization=zip_format)
    return path


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_crafted_extent_inside_the_storage_reads_as_torch_reads_it(tmp_path, zip_format):
    path = _crafted(tmp_path, 3, (3, 2), (4, 1), zip_format)  # rows 3-4, 7-8, 11-12 of arange(16)
    np.testing.assert_array_equal(torch_checkpoint.load(path)["w"], [[3, 4], [7, 8], [11, 12]])
    expanded = _crafted(tmp_path, 0, (4, 3), (0, 1), zip_format)  # a legitimate expand (zero stride)
    np.testing.assert_array_equal(torch_checkpoint.load(expanded)["w"], [[0, 1, 2]] * 4)


@pytest.mark.parametrize("extent", [
    (15, (4,), (-1,)),            # negative stride: read memory before the storage
    (2, (3, 3), (-1 << 20, 1 << 20)),  # mixed signs, 8 MiB either side: crashed the reader (SIGSEGV)
    (12, (2, 3), (4, 1)),         # past the end
    (-1, (2,), (1,)),             # negative offset
    (0, (2, 2), (1,)),            # sizes and strides of different lengths
], ids=["negative", "mixed", "past-end", "negative-offset", "mismatched"])
def test_a_tensor_outside_its_storage_is_refused(tmp_path, extent):
    with pytest.raises(torch_checkpoint.CheckpointError, match="crafted.pth"):
        torch_checkpoint.load(_crafted(tmp_path, *extent))


def test_zero_strides_cannot_materialise_past_the_budget(tmp_path):
    path = _crafted(tmp_path, 0, (1 << 14, 1 << 14), (0, 0))  # 64 bytes of storage seen as 1 GiB
    with pytest.raises(torch_checkpoint.CheckpointError, match="crafted.pth.*expand|crafted.pth.*budget"):
        torch_checkpoint.load(path)


def test_a_checkpoint_past_the_memory_budget_is_refused_before_reading(tmp_path):
    path = str(tmp_path / "big.pth")
    torch.save({"w": torch.zeros(1 << 16)}, path)  # 256 KiB
    assert torch_checkpoint.load(path)["w"].shape == (1 << 16,)
    with pytest.raises(torch_checkpoint.CheckpointError, match="big.pth.*budget of 0 MiB"):
        torch_checkpoint.load(path, max_bytes=100_000)


def test_a_deflated_storage_bomb_is_refused(tmp_path):
    plain = str(tmp_path / "plain.pth")
    torch.save({"w": torch.zeros(2 << 20)}, plain)  # an 8 MiB storage, stored
    bomb = str(tmp_path / "bomb.pth")
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr(info.filename, src.read(info))  # every member deflated: 8 MiB in a few KiB
    assert os.path.getsize(bomb) < 100_000
    with pytest.raises(torch_checkpoint.CheckpointError, match="bomb.pth.*inflates"):
        torch_checkpoint.load(bomb)


def test_memo_and_nesting_abuse_is_refused_before_unpickling(tmp_path):
    import struct

    memo = tmp_path / "memo.pth"  # an empty list memoised at index 2**28: the C unpickler grows its memo to it
    memo.write_bytes(b"\x80\x02]r" + struct.pack("<I", 1 << 28) + b".")
    with pytest.raises(torch_checkpoint.CheckpointError, match="memo.pth: memo index 268435456 out of sequence"):
        torch_checkpoint.load(str(memo))
    nested = tmp_path / "nested.pth"
    nested.write_bytes(b"\x80\x02" + b"(" * 5000 + b"t" * 5000 + b".")
    with pytest.raises(torch_checkpoint.CheckpointError, match="nested.pth: nested deeper than 1000"):
        torch_checkpoint.load(str(nested))
    ordinary = tmp_path / "ordinary.pkl"  # what pickle writes passes the scan
    ordinary.write_bytes(pickle.dumps([{"a": (1, 2)}, [3.0] * 3, "x"] * 50, protocol=2))
    with open(ordinary, "rb") as f:
        torch_pickle.check_pickle(f, "ordinary.pkl")
        assert f.tell() == 0
