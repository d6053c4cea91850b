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
error naming the file and the global, before anything runs. It also bounds
what a file may cost: `check_pickle` walks each pickle's opcodes first
(memo indices in sequence, nesting), the storages' declared sizes are summed
against a memory budget before any is read, a compressed member is never
inflated past its declared size, and every tensor's extent (offset, sizes
and strides) must lie inside its storage before a view of it is taken.

Example:
>>> state = load("efficientnet-lite0.pth")   # {"_conv_stem.weight": ndarray, ...}
"""

import collections
import functools
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np

__all__ = ["CheckpointError", "CheckpointUnpickler", "check_pickle", "load"]

MAX_BYTES = 4 << 30
"""What one checkpoint may materialise by default (storages and tensors):
the largest published retrieval network (cirtorch's VGG16, 0.5 GB) twice
over, with room."""

VIEW_SLACK = 64 << 20
"""Tensors may hold this much more than their storages (views that repeat
elements: zero strides); a file whose tensors expand further is refused."""

MAX_NESTING = 1000
"""Deepest ``MARK`` nesting a pickle may have."""

MAX_RATIO = 100
"""Largest compression ratio of a zip member (torch stores storages
uncompressed)."""

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


class Budget:
    """Bytes a checkpoint may still materialise (`MAX_BYTES` by default);
    ``spend`` refuses what goes past it, naming ``what``."""

    def __init__(self, limit=MAX_BYTES):
        self.limit, self.used, self.storages = int(limit), 0, 0

    def spend(self, nbytes, what):
        if nbytes < 0 or self.used + nbytes > self.limit:
            raise CheckpointError(f"{what} would bring the checkpoint to {(self.used + nbytes) / 2**20:.0f} MiB, "
                                  f"past its budget of {self.limit / 2**20:.0f} MiB")
        self.used += nbytes


def _rebuild_tensor(storage, offset, size, stride, *unused, budget=None):
    """``torch._utils._rebuild_tensor_v2`` in numpy: a strided view, copied,
    once its extent is known to lie inside ``storage`` (torch never writes
    negative strides; zero strides repeat elements, and the copy is charged
    to ``budget``)."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError("a tensor without a storage")
    offset = int(offset)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"a tensor of sizes {size[:8]} and strides {stride[:8]} (negative or mismatched)")
    count = int(np.prod(size, dtype=object))
    if budget is not None:
        budget.spend(count * storage.itemsize, f"a tensor of shape {size[:8]}")
        if budget.used > 2 * budget.storages + VIEW_SLACK:
            raise CheckpointError(f"the tensors expand their storages past {VIEW_SLACK >> 20} MiB more than "
                                  "the storages hold (zero strides?)")
    if count == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= storage.size:
        raise CheckpointError("a tensor reaches past the end of its storage")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], size, tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def check_pickle(file, source, max_nesting=MAX_NESTING):
    """Walks the opcodes of the pickle at ``file``'s position, then seeks
    back: refuses memo indices out of sequence (the C unpickler sizes its
    memo by the largest index given: 2**28 would cost 4 GiB) and nesting
    deeper than ``max_nesting``, before anything is built."""
    import pickletools

    start, memo, depth = file.tell(), 0, 0
    try:
        for op, arg, _ in pickletools.genops(file):
            if op.name == "MEMOIZE":
                memo += 1
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if int(arg) > memo:
                    raise CheckpointError(f"{source}: memo index {int(arg)} out of sequence (after {memo} entries)")
                memo = max(memo, int(arg) + 1)
            elif op.name == "MARK":
                depth += 1
                if depth > max_nesting:
                    raise CheckpointError(f"{source}: nested deeper than {max_nesting}")
            elif pickletools.markobject in op.stack_before:
                depth -= 1
    except CheckpointError:
        raise
    except ValueError as e:  # an unknown opcode, a truncated pickle
        raise CheckpointError(f"{source}: not a pickle ({e})") from None
    finally:
        file.seek(start)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


def _skip(*unused):
    return None


_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
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

    def __init__(self, file, storage, source, extra_globals=None, build_tensors=True, budget=None):
        super().__init__(file, encoding="latin1")
        self._file = file
        self._storage = storage
        self._source = source
        self._extra = dict(extra_globals or {})
        self._build = build_tensors
        self._budget = budget
        self._cache = {}

    def load(self):
        check_pickle(self._file, self._source)
        return super().load()

    def find_class(self, module, name):
        key = (module, name)
        if key == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter if self._build else _skip
        if key in _REBUILDERS:
            return functools.partial(_rebuild_tensor, budget=self._budget) if self._build else _skip
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
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"{self._source}: storage {key!r:.40} of {numel!r:.40} elements")
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


def _declare(wanted, budget, path):
    """Charges the storages ``wanted`` (``{key: (type, numel)}``) to
    ``budget`` before any is read."""
    total = sum(numel * storage_type.itemsize for storage_type, numel in wanted.values())
    budget.spend(total, f"{path}: its {len(wanted)} storages")
    budget.storages = total


def _load_zip(path, extra, budget):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: a zip checkpoint holds one data.pkl, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and _read(archive, byteorder, 16, path).strip() not in (b"little", b""):
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        data = _read(archive, pickles[0], budget.limit, path)
        wanted = {}

        def declared(storage_type, key, numel):
            if f"{prefix}data/{key}" not in names:
                raise CheckpointError(f"{path}: storage {key} is missing from the archive")
            wanted[key] = (storage_type, numel)

        # First pass: the storages the object needs, charged before any is read.
        CheckpointUnpickler(io.BytesIO(data), declared, path, extra, build_tensors=False).load()
        _declare(wanted, budget, path)

        def storage(storage_type, key, numel):
            raw = _read(archive, f"{prefix}data/{key}", numel * storage_type.itemsize, path)
            return _as_array(raw, storage_type, numel, path, key)

        return CheckpointUnpickler(io.BytesIO(data), storage, path, extra, budget=budget).load()


def _read(archive, name, limit, path):
    """At most ``limit`` bytes of the member ``name``, inflated a chunk at a
    time (never past ``limit``); a member compressed past `MAX_RATIO` is
    refused."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_RATIO * max(info.compress_size, 1024):
        raise CheckpointError(f"{path}: {name} inflates {info.compress_size} bytes to {info.file_size} "
                              f"(more than {MAX_RATIO}:1; torch stores its data uncompressed)")
    out = bytearray()
    with archive.open(info) as f:
        while len(out) < limit:
            chunk = f.read(min(1 << 20, limit - len(out)))
            if not chunk:
                break
            out += chunk
    return bytes(out)


def _load_legacy(path, data, extra, budget):
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
    _declare(wanted, budget, path)
    keys = plain()
    arrays = {}
    for key in keys:
        header = stream.read(8)
        if len(header) < 8:
            raise CheckpointError(f"{path}: truncated before storage {key}")
        (numel,) = struct.unpack("<q", header)
        storage_type, declared = wanted.get(str(key), (None, numel))
        if storage_type is None:
            raise CheckpointError(f"{path}: storage {key} is not referenced by the object")
        if numel != declared:
            raise CheckpointError(f"{path}: storage {key} holds {numel} elements, the object declares {declared}")
        nbytes = numel * storage_type.itemsize
        arrays[str(key)] = _as_array(stream.read(nbytes), storage_type, numel, path, key)
    missing = set(wanted) - set(arrays)
    if missing:
        raise CheckpointError(f"{path}: storages {sorted(missing)[:5]} are missing")
    # Second pass over the object's pickle, now with the arrays.
    stream.seek(obj_start)
    return CheckpointUnpickler(stream, lambda t, key, n: arrays[key], path, extra, budget=budget).load()


def load(path, extra_globals=None, max_bytes=MAX_BYTES):
    """Reads a ``torch.save`` file; tensors come back as numpy arrays.

    Args:
        path: the checkpoint file (legacy or zip format).
        extra_globals: further globals to resolve (see `CheckpointUnpickler`;
            `pickled_data.globals_for` gives numpy arrays and plain objects).
        max_bytes: the memory budget: storages and tensors together.

    Returns:
        The saved object (usually a dict of name -> ndarray).

    Raises:
        CheckpointError: unreadable, truncated, or refused (a global outside
            the allow-list); the message names the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        budget = Budget(max_bytes)
        if zipfile.is_zipfile(path):
            return _load_zip(path, extra_globals, budget)
        if os.path.getsize(path) > max_bytes:
            raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, past the budget of {max_bytes}")
        with open(path, "rb") as f:
            return _load_legacy(path, f.read(), extra_globals, budget)
    except CheckpointError as e:
        if str(e).startswith(path):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, KeyError,
            TypeError, IndexError, AttributeError, RecursionError, MemoryError, OverflowError,
            NotImplementedError, zlib.error) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
