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

import io
import os
import pickle
import struct
import zipfile
import zlib

from deep_retrieval.io.torch_pickle import Budget, CheckpointError, CheckpointUnpickler, as_array

MAX_BYTES = 4 << 30
"""What one checkpoint may materialise by default (storages and tensors):
the largest published retrieval network (cirtorch's VGG16, 0.5 GB) twice
over, with room."""
MAX_RATIO = 100
"""Largest compression ratio of a zip member (torch stores storages
uncompressed)."""

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

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
            return as_array(raw, storage_type, numel, path, key)

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
        arrays[str(key)] = as_array(stream.read(nbytes), storage_type, numel, path, key)
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
