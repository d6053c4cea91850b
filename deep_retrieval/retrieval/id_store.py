"""The image ids of an index, kept on disk and read through memory maps, so
that a search over a hundred million images holds none of their names in
the heap.

Four files in the index folder:

- `NAMES_FILE`: the names, UTF-8, one after another (a lone surrogate, as
  ``os.fsdecode`` makes of an undecodable file name, is kept with
  ``surrogatepass``: any Python string round-trips);
- `OFFSETS_FILE`: ``count + 1`` little-endian uint64, name ``i`` being
  ``names[offsets[i]:offsets[i + 1]]``;
- `HASHES_FILE` and `ORDER_FILE`: every name's 64-bit BLAKE2b hash, sorted,
  and the position of each, so that `IdStore.positions` finds a name by a
  binary search and then compares the name itself.

`IdWriter` writes them as the names stream past; the sorted table is made a
bucket at a time (by the hashes' top bits), so memory stays at one bucket
whatever the collection size.
"""

import collections.abc
import hashlib
import math
import os
import shutil

import numpy as np

NAMES_FILE = "ids.names"
OFFSETS_FILE = "ids.offsets"
HASHES_FILE = "ids.hashes"
ORDER_FILE = "ids.order"
FILES = (NAMES_FILE, OFFSETS_FILE, HASHES_FILE, ORDER_FILE)

BUCKET_ROWS = 1 << 22
"""Hash records sorted at once when the table is written (64 MiB)."""

_CHUNK = 1 << 16


def encode(name):
    return str(name).encode("utf-8", "surrogatepass")


def name_hashes(encoded):
    """The 64-bit BLAKE2b hashes (uint64) of encoded names: a format's hash,
    unlike Python's ``hash``, the same in every process and version."""
    digests = b"".join(hashlib.blake2b(e, digest_size=8).digest() for e in encoded)
    return np.frombuffer(digests, "<u8").astype(np.uint64)


def read_only_map(path, dtype, shape):
    """A read-only memory map of ``shape`` items of ``dtype`` (zeros when
    empty: numpy cannot map an empty file)."""
    if not np.prod(shape):
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype, "r", shape=shape)


class IdStore(collections.abc.Sequence):
    """The names of an index: a read-only sequence over the files in
    ``folder`` (none: empty), plus the names `extend` added since, held in
    memory until the index is saved.

    Raises ValueError when the files disagree (a truncated copy).

    Example:

    >>> ids = IdStore("index")
    >>> ids[3], "holidays/100000.jpg" in ids, ids.positions(["a.jpg", "b.jpg"])
    """

    def __init__(self, folder=None):
        self._added, self._added_at = [], {}
        if folder is None:
            self._stored = 0
            self._offsets = np.zeros(1, "<u8")
            self._names = np.zeros(0, np.uint8)
            self._hashes, self._order = np.zeros(0, np.uint64), np.zeros(0, "<i8")
            return
        sizes = {}
        for name in FILES:
            try:
                sizes[name] = os.path.getsize(os.path.join(folder, name))
            except FileNotFoundError:
                raise ValueError(f"{folder}: corrupt index ({name} missing)") from None
        count = sizes[OFFSETS_FILE] // 8 - 1
        if count < 0 or sizes[OFFSETS_FILE] % 8 or sizes[HASHES_FILE] != 8 * count or sizes[ORDER_FILE] != 8 * count:
            raise ValueError(f"{folder}: corrupt index (the id files disagree: {OFFSETS_FILE} "
                             f"{sizes[OFFSETS_FILE]} bytes, {HASHES_FILE} {sizes[HASHES_FILE]}, {ORDER_FILE} "
                             f"{sizes[ORDER_FILE]}: truncated?)")
        self._stored = count
        self._offsets = read_only_map(os.path.join(folder, OFFSETS_FILE), "<u8", (count + 1,))
        if int(self._offsets[-1]) != sizes[NAMES_FILE]:
            raise ValueError(f"{folder}: corrupt index ({NAMES_FILE} holds {sizes[NAMES_FILE]} bytes, "
                             f"{OFFSETS_FILE} says {int(self._offsets[-1])}: truncated?)")
        self._names = read_only_map(os.path.join(folder, NAMES_FILE), np.uint8, (sizes[NAMES_FILE],))
        self._hashes = read_only_map(os.path.join(folder, HASHES_FILE), np.uint64, (count,))
        self._order = read_only_map(os.path.join(folder, ORDER_FILE), "<i8", (count,))

    def __len__(self):
        return self._stored + len(self._added)

    def _raw(self, i):
        return bytes(self._names[int(self._offsets[i]):int(self._offsets[i + 1])])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"id {i} out of range ({len(self)} ids)")
        if i >= self._stored:
            return self._added[i - self._stored]
        return self._raw(i).decode("utf-8", "surrogatepass")

    def __iter__(self):
        for start in range(0, self._stored, _CHUNK):
            yield from self[start:min(start + _CHUNK, self._stored)]
        yield from list(self._added)

    def __contains__(self, name):
        return bool(self.positions([name])[0] >= 0)

    def positions(self, names):
        """The first position of each of ``names`` (int64; -1 for a name not held)."""
        encoded = [encode(n) for n in names]
        out = np.full(len(encoded), -1, np.int64)
        if self._stored and encoded:
            hashes = name_hashes(encoded)
            start = np.searchsorted(self._hashes, hashes)  # both uint64: no copy of the map
            hit = np.asarray(self._hashes[np.minimum(start, self._stored - 1)]) == hashes
            for j in np.nonzero(hit)[0]:  # only the names whose hash is held are compared
                k = int(start[j])
                while k < self._stored and self._hashes[k] == hashes[j]:  # a 64-bit collision is rare
                    if self._raw(int(self._order[k])) == encoded[j]:
                        out[j] = self._order[k]
                        break
                    k += 1
        for j in np.nonzero(out < 0)[0]:
            out[j] = self._added_at.get(str(names[j]), -1)
        return out

    def extend(self, names):
        """Adds ``names`` after the held ones (in memory until saved)."""
        for name in names:
            name = str(name)
            self._added_at.setdefault(name, len(self))
            self._added.append(name)


class HashBuckets:
    """``(hash, position)`` records spilled to bucket files under ``folder``
    by the hashes' top bits, then read back a bucket at a time, so that
    memory stays at one bucket (``bucket_rows``, default `BUCKET_ROWS`,
    records for ``expected`` in all; a wrong guess costs memory, not
    correctness). The folder is removed by `close`."""

    def __init__(self, folder, expected, bucket_rows=None):
        self.folder = folder
        self._bits = max(0, math.ceil(math.log2(max(expected, 1) / (bucket_rows or BUCKET_ROWS))))
        os.makedirs(folder, exist_ok=True)

    def add(self, hashes, positions):
        """Appends the records of uint64 ``hashes`` and int64 ``positions``."""
        which = hashes >> np.uint64(64 - self._bits) if self._bits else np.zeros(len(hashes), np.uint64)
        for b in np.unique(which):
            keep = which == b
            with open(os.path.join(self.folder, f"{int(b):06d}"), "ab") as f:
                np.stack([hashes[keep].view(np.int64), positions[keep]], axis=1).astype("<i8").tofile(f)

    def sorted(self):
        """Yields ``(hashes, positions)`` a bucket at a time, in hash order
        overall, by hash then position within a bucket."""
        for bucket in sorted(os.listdir(self.folder)):
            records = np.fromfile(os.path.join(self.folder, bucket), "<i8").reshape(-1, 2)
            hashes = records[:, 0].view(np.uint64)
            order = np.lexsort((records[:, 1], hashes))
            yield hashes[order], records[order, 1]

    def close(self):
        shutil.rmtree(self.folder)


class IdWriter:
    """Writes an `IdStore`'s files into ``folder`` a chunk of names at a
    time; ``count`` says how many so far.

    Args:
        folder: an existing folder.
        expected: about how many names will be written (sizes the
            `HashBuckets` of the sorted table).

    Example:

    >>> with IdWriter(folder) as ids:
    ...     ids.write(["a.jpg", "b.jpg"])
    """

    def __init__(self, folder, expected=0):
        self.folder, self.count, self._end = folder, 0, 0
        self._table = HashBuckets(os.path.join(folder, "ids.scratch"), expected)
        self._names = open(os.path.join(folder, NAMES_FILE), "wb")
        self._offsets = open(os.path.join(folder, OFFSETS_FILE), "wb")
        self._offsets.write(np.zeros(1, "<u8").tobytes())

    def write(self, names):
        encoded = [encode(n) for n in names]
        if not encoded:
            return
        ends = self._end + np.cumsum(np.fromiter(map(len, encoded), np.uint64, len(encoded)))
        self._names.write(b"".join(encoded))
        self._offsets.write(ends.astype("<u8").tobytes())
        self._end = int(ends[-1])
        self._table.add(name_hashes(encoded), np.arange(self.count, self.count + len(encoded), dtype=np.int64))
        self.count += len(encoded)

    def copy(self, store):
        """Writes every name of the `IdStore` ``store``, its files copied a
        chunk at a time rather than decoded."""
        for start in range(0, store._stored, _CHUNK):
            stop = min(start + _CHUNK, store._stored)
            first = int(store._offsets[start])
            self._names.write(store._names[first:int(store._offsets[stop])].tobytes())
            ends = np.asarray(store._offsets[start + 1:stop + 1], np.uint64) - np.uint64(first) + np.uint64(self._end)
            self._offsets.write(ends.astype("<u8").tobytes())
            self._end = int(ends[-1])
            self._table.add(np.asarray(store._hashes[start:stop]), np.asarray(store._order[start:stop]) + self.count)
        self.count += store._stored
        self.write(store._added)

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc):
        self._names.close()
        self._offsets.close()
        if kind is None:
            with open(os.path.join(self.folder, HASHES_FILE), "wb") as hashes, \
                    open(os.path.join(self.folder, ORDER_FILE), "wb") as order:
                for values, positions in self._table.sorted():  # a name's first position comes first
                    values.astype("<u8").tofile(hashes)
                    positions.astype("<i8").tofile(order)
        self._table.close()
