"""Reads PyTorch checkpoints (``torch.save`` files) into numpy, without torch.

Both on-disk formats are read:

- **legacy** (torch < 1.6, or ``_use_new_zipfile_serialization=False``): five
  pickles in a row (magic number, protocol version, system info, the object
  with its tensors as persistent storage ids, the storage keys in order),
  then each storage as a little-endian int64 element count and its raw bytes;
- **zip** (torch >= 1.6): ``ARCHIVE/data.pkl`` with the same persistent ids
  and each storage in ``ARCHIVE/data/KEY``.

A checkpoint is untrusted input: a pickle can name any callable. Unpickling
goes through `CheckpointUnpickler`, which resolves only torch's
tensor-rebuild functions, its storage types and builtin containers (to
placeholders that build numpy arrays) and refuses every other global with an
error naming the file and the global, before anything runs.

Example:
>>> state = load("efficientnet-lite0.pth")   # {"_conv_stem.weight": ndarray, ...}
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import numpy as np

__all__ = ["CheckpointError", "CheckpointUnpickler", "load"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# torch storage class -> numpy dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}

_CONTAINERS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is refused (names the file)."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` and friends: carries a dtype."""

    def __init__(self, name):
        self.name = name
        dtype = _STORAGE_DTYPES[name]
        if dtype == "bfloat16":
            self.dtype = None  # read as uint16 then widened, see `_bfloat16`
            self.itemsize = 2
        else:
            self.dtype = np.dtype(dtype)
            self.itemsize = self.dtype.itemsize


def _bfloat16(raw):
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """``torch._utils._rebuild_tensor_v2`` in numpy: a strided view, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not size:
        return storage[offset].copy()
    if any(s == 0 for s in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size:
        raise CheckpointError("a tensor reaches past the end of its storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


def _skip(*unused):
    return None


_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class CheckpointUnpickler(pickle.Unpickler):
    """Unpickles a checkpoint's object, resolving only an allow-list of globals.

    Args:
        file: the pickle stream.
        storage: callable ``(storage_type, key, numel) -> 1-D ndarray`` that
            returns the raw storage ``key`` (the format's job).
        source: the file's name, for errors.
        extra_globals: further ``{(module, name): callable}`` a caller trusts
            (the checkpoint importers add plain-data classes this way).
        build_tensors: ``False`` walks the pickle without building tensors
            (the legacy format's first pass, before its storages are read).
    """

    def __init__(self, file, storage, source, extra_globals=None, build_tensors=True):
        super().__init__(file, encoding="latin1")
        self._storage = storage
        self._source = source
        self._extra = dict(extra_globals or {})
        self._build = build_tensors
        self._cache = {}

    def find_class(self, module, name):
        key = (module, name)
        if key in _REBUILDERS:
            return _REBUILDERS[key] if self._build else _skip
        if key in _CONTAINERS:
            return _CONTAINERS[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if key in self._extra:
            return self._extra[key]
        raise CheckpointError(
            f"{self._source}: refused to load the global {module}.{name}: a checkpoint may "
            "only hold tensors, numbers, strings and containers"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise CheckpointError(f"{self._source}: unknown persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._source}: storage of unknown type {storage_type!r:.80}")
        key = str(key)
        if key not in self._cache:
            self._cache[key] = self._storage(storage_type, key, int(numel))
        storage = self._cache[key]
        if not self._build:
            return None
        if len(pid) > 5 and pid[5] is not None:
            # Legacy storage views: (view key, offset, size).
            _, offset, size = pid[5]
            return storage[int(offset):int(offset) + int(size)]
        return storage


def _as_array(raw, storage_type, numel, source, key):
    expected = numel * storage_type.itemsize
    if len(raw) < expected:
        raise CheckpointError(
            f"{source}: storage {key} holds {len(raw)} bytes, {expected} expected (truncated file?)"
        )
    raw = raw[:expected]
    if storage_type.dtype is None:
        return _bfloat16(np.frombuffer(raw, "<u2"))
    return np.frombuffer(raw, storage_type.dtype.newbyteorder("<")).astype(storage_type.dtype)


def _load_zip(path, extra):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip checkpoint holds one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")

        def storage(storage_type, key, numel):
            name = f"{prefix}data/{key}"
            if name not in names:
                raise CheckpointError(f"{path}: storage {key} is missing from the archive")
            return _as_array(archive.read(name), storage_type, numel, path, key)

        return CheckpointUnpickler(io.BytesIO(archive.read(pickles[0])), storage, path, extra).load()


def _load_legacy(path, data, extra):
    stream = io.BytesIO(data)

    def plain():
        return CheckpointUnpickler(stream, None, path).load()

    try:
        magic = plain()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({e})") from None
    if magic != _LEGACY_MAGIC:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (no zip archive, wrong magic number)")
    protocol = plain()
    if protocol != 1001:
        raise CheckpointError(f"{path}: unsupported legacy protocol version {protocol!r}")
    plain()  # system info: little-endian, type sizes
    wanted = {}

    def storage(storage_type, key, numel):
        # Storages follow the object: record what is needed, fill in after.
        wanted[key] = (storage_type, numel)

    # First pass: which storages the object needs (no tensor is built).
    obj_start = stream.tell()
    CheckpointUnpickler(stream, storage, path, extra, build_tensors=False).load()
    keys = plain()
    arrays = {}
    for key in keys:
        header = stream.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{path}: truncated before storage {key}")
        (numel,) = struct.unpack("<q", header)
        storage_type, _ = wanted.get(str(key), (None, numel))
        if storage_type is None:
            raise CheckpointError(f"{path}: storage {key} is not referenced by the object")
        nbytes = numel * storage_type.itemsize
        arrays[str(key)] = _as_array(stream.read(nbytes), storage_type, numel, path, key)
    missing = set(wanted) - set(arrays)
    if missing:
        raise CheckpointError(f"{path}: storages {sorted(missing)[:5]} are missing")
    # Second pass over the object's pickle, now with the arrays.
    stream.seek(obj_start)
    return CheckpointUnpickler(stream, lambda t, key, n: arrays[key], path, extra).load()


def load(path, extra_globals=None):
    """Reads a ``torch.save`` file; tensors come back as numpy arrays.

    Args:
        path: the checkpoint file (legacy or zip format).
        extra_globals: further globals to resolve (see `CheckpointUnpickler`;
            `pickled_data.globals_for` gives numpy arrays and plain objects).

    Returns:
        The saved object (usually a dict of name -> ndarray).

    Raises:
        CheckpointError: unreadable, truncated, or refused (a global outside
            the allow-list); the message names the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path, extra_globals)
        with open(path, "rb") as f:
            return _load_legacy(path, f.read(), extra_globals)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, KeyError,
            TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
