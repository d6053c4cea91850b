"""The torch-free checkpoint reader against files written by torch.save itself."""

import collections
import os
import pickle
import zipfile

import numpy as np
import pytest

from deep_retrieval import checkpoints

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
    loaded = checkpoints.load(path)
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
    loaded = checkpoints.load(path)
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
    with pytest.raises(checkpoints.CheckpointError) as info:
        checkpoints.load(path)
    message = str(info.value)
    assert path in message and ("posix.system" in message or "nt.system" in message)
    assert not marker.exists()


def test_refuses_a_plain_pickle_naming_a_callable(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(checkpoints.CheckpointError, match="refused|not a PyTorch checkpoint"):
        checkpoints.load(str(path))
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # unrestricted, the payload is live
    assert marker.exists()


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    path = str(tmp_path / "w.pth")
    torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=False)
    data = open(path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(checkpoints.CheckpointError, match="cut.pth"):
        checkpoints.load(str(cut))
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    with pytest.raises(checkpoints.CheckpointError, match="notes.pth"):
        checkpoints.load(str(text))
    with pytest.raises(checkpoints.CheckpointError, match="no such"):
        checkpoints.load(str(tmp_path / "missing.pth"))
