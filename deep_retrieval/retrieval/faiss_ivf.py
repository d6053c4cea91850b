"""Faiss inverted files for large collections: the default factory, training,
and the on-disk build whose lists are merged part by part and read through a
memory map (`write_on_disk`), with the checks that keep a full disk or a
truncated lists file from killing the process."""

import contextlib
import os
import shutil
import sys

import numpy as np

from deep_retrieval.retrieval.reranking import normalize

PQ_BYTES = 64
"""PQ code bytes per vector in the default factory (64 GB of codes for a
billion images)."""


def default_lists(count):
    """Inverted lists for ``count`` vectors, as Faiss's guidelines give them
    ("Guidelines to choose an index", faiss wiki): about 4 sqrt(n) below a
    million, then 65536, 262144 and 1048576 up to 10M, 100M and 1B."""
    if count < 1_000_000:
        return int(max(16, 4 * np.sqrt(max(count, 1))))
    return 65536 if count < 10_000_000 else 262144 if count < 100_000_000 else 1048576


def default_factory(count, dim):
    """The Faiss ``index_factory`` string for ``count`` vectors of size ``dim``.

    ``OPQ{m}_{4m},IVF{K}[_HNSW32],PQ{m}``: an OPQ rotation to ``4 m``
    dimensions, `default_lists` inverted lists (an HNSW coarse quantiser from
    a million vectors up, where a flat one costs too much per query) and
    ``m``-byte PQ codes, ``m = min(PQ_BYTES, dim / 4)``.
    """
    m = max(1, min(PQ_BYTES, dim // 4))
    lists = default_lists(count)
    quantizer = "_HNSW32" if count >= 1_000_000 else ""
    return f"OPQ{m}_{4 * m},IVF{lists}{quantizer},PQ{m}"


def faiss_lists(factory):
    """The number of inverted lists a factory string asks for (``IVF{K}``)."""
    import re

    found = re.search(r"IVF(\d+)", factory)
    if not found:
        raise ValueError(f"factory {factory!r} has no IVF{{K}} part: ivfpq indexes are inverted files "
                         "(their lists are merged on disk)")
    return int(found.group(1))


def set_nprobe(index, nprobe):
    """Lists visited per query, and the HNSW coarse quantiser's search depth
    (at least ``nprobe``: it has to return that many lists)."""
    import faiss

    faiss.extract_index_ivf(index).nprobe = int(nprobe)
    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(64, 2 * int(nprobe))


def train_index(factory, dim, sample, nprobe=16):
    """A Faiss index of ``factory`` (inner product) trained on ``sample``."""
    import faiss

    try:
        index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"factory {factory!r}: {' '.join(str(e).split())[:300]}") from None
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if isinstance(ivf, faiss.IndexIVFPQ):
        # Polysemous training reorders the PQ centroids for Hamming-distance
        # filtering, which these searches do not use; it is most of the
        # training time (100 of 120 s for IVF256,PQ64 on 65536 x 512).
        ivf.do_polysemous_training = False
    lists = faiss_lists(factory)
    if len(sample) < lists:
        raise ValueError(f"{factory} has {lists} lists and needs at least that many training vectors, "
                         f"got {len(sample)}")
    index.train(normalize(sample))
    set_nprobe(index, nprobe)
    return index


@contextlib.contextmanager
def quiet_stdout():
    """Drops what native code prints on file descriptor 1 meanwhile: Faiss
    reports its on-disk lists' bookkeeping ("resizing ...", "updating
    ondisk filename ...") with printf."""
    import ctypes

    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def read_faiss(path):
    """A saved Faiss index; on-disk lists are looked for beside it and
    memory-mapped."""
    import faiss

    with quiet_stdout():
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


LISTS_FILE = "lists.ivfdata"
"""The on-disk inverted lists beside ``faiss.index`` (read with
``IO_FLAG_ONDISK_SAME_DIR``, so the folder can be renamed)."""


def write_on_disk(template, batches, folder, previous=None, part_rows=1 << 20):
    """Writes ``folder/faiss.index`` with its inverted lists in
    ``folder/`` `LISTS_FILE`: the vectors of ``batches`` added in parts.

    Memory stays at one part: each ``part_rows`` vectors go into a copy of
    the empty trained index, which is written to ``folder/parts/`` and
    dropped; the parts' lists (and those of ``previous``, an index being
    extended) are then merged list by list into the lists file, read and
    written through memory maps.

    Args:
        template: the trained, empty index (`train_index`), serialised
            (``faiss.serialize_index``).
        batches: iterable of ``[n, dim]`` float32 vectors, already
            L2-normalised (the build normalises them once, as it also
            writes their float16 rows); their ids follow ``previous``'s.
        folder: an existing, empty folder.
        previous: a loaded index whose vectors come first, or None.
        part_rows: vectors per part.

    Returns:
        The number of vectors in the written index.
    """
    import faiss

    parts_folder = os.path.join(folder, "parts")
    os.makedirs(parts_folder)
    start = previous.ntotal if previous is not None else 0
    parts, part = [], None

    def flush():
        path = os.path.join(parts_folder, f"{len(parts):05d}.index")
        faiss.write_index(part, path)
        parts.append(path)

    for vectors in batches:
        if part is None:
            part = faiss.deserialize_index(template)
        part.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
        start += len(vectors)
        if part.ntotal >= part_rows:
            flush()
            part = None
    if part is not None:
        flush()
    sources = [faiss.read_index(path, faiss.IO_FLAG_MMAP) for path in parts]
    if previous is not None:
        sources.insert(0, previous)
    index = faiss.deserialize_index(template)
    ivf = faiss.extract_index_ivf(index)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, os.path.join(folder, LISTS_FILE))
    pointers = faiss.InvertedListsPtrVector()
    for source in sources:
        pointers.push_back(faiss.extract_index_ivf(source).invlists)
    with quiet_stdout():
        total = lists.merge_from_multiple(pointers.data(), pointers.size(), False)
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # owned by the index now
    ivf.ntotal = index.ntotal = total
    faiss.write_index(index, os.path.join(folder, "faiss.index"))
    del sources, pointers
    shutil.rmtree(parts_folder)
    return total


def check_free_space(folder, template, count):
    """Refuses (ValueError) to build ``count`` vectors of the serialised
    index ``template`` into ``folder`` when its disk cannot hold them: the
    parts and then the lists file, each ``count`` codes and ids, and the
    float16 descriptors kept for re-ranking. The lists
    file is written through a memory map, where a full disk is not an error
    but a SIGBUS that kills the process."""
    import faiss

    index = faiss.deserialize_index(template)
    ivf = faiss.extract_index_ivf(index)  # a view into index, which must stay alive
    needed = 2 * count * (ivf.code_size + 8) + count * index.d * 2 + (64 << 20)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ValueError(f"{folder}: the index needs about {needed / 2**30:.2f} GiB of disk, "
                         f"{free / 2**30:.2f} GiB are free")


def list_extents(lists):
    """``[nlist, 3]`` uint64: the size, capacity and offset of each list of
    a ``faiss.OnDiskInvertedLists``, copied out of its
    ``std::vector<OnDiskOneList>`` at once (the SWIG accessors take 7 s a
    million lists). The layout, three ``size_t``, is checked against the
    accessors on the first and last lists; another layout falls back on
    them."""
    import ctypes

    count = lists.nlist
    if not count:
        return np.zeros((0, 3), np.uint64)
    raw = (ctypes.c_size_t * (3 * count)).from_address(int(lists.lists.data().this))
    extents = np.ctypeslib.as_array(raw).reshape(count, 3).astype(np.uint64)

    def accessor(i):
        one = lists.lists.at(i)
        return one.size, one.capacity, one.offset

    if all(tuple(int(v) for v in extents[i]) == accessor(i) for i in (0, count - 1)):
        return extents
    return np.array([accessor(i) for i in range(count)], np.uint64)


def check_lists(index, path):
    """Refuses an index whose on-disk lists file is shorter than its header
    declares, or whose lists reach past it (a truncated copy, a build that
    ran out of disk): searching it would read past the end of a memory map
    and die of SIGBUS."""
    import faiss

    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(lists, faiss.OnDiskInvertedLists):
        return
    try:
        size = os.path.getsize(lists.filename)
    except OSError as e:
        raise ValueError(f"{path}: corrupt index ({LISTS_FILE}: {e.strerror})") from None
    extents = list_extents(lists)
    used = extents[:, 1] > 0  # a list never written has no place in the file (its offset is SIZE_MAX)
    entry = lists.code_size + 8  # codes, then int64 ids
    reach = int((extents[used, 2] + extents[used, 1] * np.uint64(entry)).max()) if used.any() else 0
    if size < max(lists.totsize, reach):
        raise ValueError(f"{path}: corrupt index ({LISTS_FILE} holds {size} bytes, its header declares "
                         f"{max(lists.totsize, reach)}: truncated?)")


def empty_template(path):
    """The trained, empty copy of the ``ivfpq`` index saved in folder
    ``path``, serialised (a `write_on_disk` template for extending it)."""
    import faiss

    index = read_faiss(os.path.join(path, "faiss.index"))
    ivf = faiss.extract_index_ivf(index)
    empty = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
    ivf.replace_invlists(empty, True)
    empty.this.disown()  # owned by the index now
    ivf.ntotal = index.ntotal = 0
    return faiss.serialize_index(index)
