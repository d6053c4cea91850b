"""The pickle inside a PyTorch checkpoint, unpickled without running
anything it names (`CheckpointUnpickler`): torch's tensor-rebuild
functions, storage types and builtin containers resolve to placeholders
that build numpy arrays, every other global is refused, the opcodes are
walked first (`check_pickle`), and what the tensors may cost is counted
(`Budget`). The file formats around it are `torch_checkpoint`'s."""

import collections
import functools
import pickle

import numpy as np

VIEW_SLACK = 64 << 20
"""Tensors may hold this much more than their storages (views that repeat
elements: zero strides); a file whose tensors expand further is refused."""

MAX_NESTING = 1000
"""Deepest ``MARK`` nesting a pickle may have."""


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
    """Bytes a checkpoint may still materialise (``limit``); ``spend``
    refuses what goes past it, naming ``what``."""

    def __init__(self, limit):
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


def as_array(raw, storage_type, numel, source, key):
    """The storage ``key`` of ``source`` as a flat numpy array of ``numel`` elements, from its raw bytes."""
    expected = numel * storage_type.itemsize
    if len(raw) < expected:
        raise CheckpointError(
            f"{source}: storage {key} holds {len(raw)} bytes, {expected} expected (truncated file?)"
        )
    raw = raw[:expected]
    if storage_type.dtype is None:
        return _bfloat16(np.frombuffer(raw, "<u2"))
    return np.frombuffer(raw, storage_type.dtype.newbyteorder("<")).astype(storage_type.dtype)
