import json
import os

import numpy as np
import pytest

from deep_retrieval.retrieval import id_store
from deep_retrieval.retrieval import index as index_lib
from deep_retrieval.retrieval.descriptor_files import build_index

# Names a file system or a user can produce: non-ASCII, separators, quotes,
# control characters, an empty name, a very long one, and the lone
# surrogate os.fsdecode makes of a byte that is not UTF-8.
ODD = ["a.jpg", "dir/sub dir/b c.jpg", "ünïcödé/日本語.png", "emoji 🏛️.jpg", 'quote"s\\back,slash.jpg',
       "new\nline\ttab.jpg", "nul\x00byte", "", "x" * 5000, os.fsdecode(b"caf\xe9.jpg"), "a.jpg ", "A.JPG"]


def _write(folder, chunks, expected=0):
    os.makedirs(folder, exist_ok=True)
    with id_store.IdWriter(str(folder), expected) as writer:
        for chunk in chunks:
            writer.write(chunk)
    return writer.count


def test_names_with_any_characters_round_trip(tmp_path):
    assert _write(tmp_path, [ODD[:5], [], ODD[5:]]) == len(ODD)
    store = id_store.IdStore(str(tmp_path))
    assert len(store) == len(ODD) and list(store) == ODD and store[-1] == ODD[-1] and store[2:4] == ODD[2:4]
    assert [store[i] for i in range(len(ODD))] == ODD
    assert store.positions(ODD).tolist() == list(range(len(ODD)))
    assert store.positions(["b.jpg", "a.jp", "a.jpg  ", "x" * 4999]).tolist() == [-1, -1, -1, -1]
    assert "ünïcödé/日本語.png" in store and "missing" not in store
    with pytest.raises(IndexError):
        store[len(ODD)]
    # The files hold what the format says: UTF-8 one after another, offsets around them.
    raw = open(tmp_path / id_store.NAMES_FILE, "rb").read()
    assert raw == b"".join(n.encode("utf-8", "surrogatepass") for n in ODD)
    offsets = np.fromfile(tmp_path / id_store.OFFSETS_FILE, "<u8")
    assert offsets[0] == 0 and offsets[-1] == len(raw) and raw[offsets[1]:offsets[2]] == ODD[1].encode()


def test_buckets_sort_the_table_and_lookups_match_a_list(tmp_path, monkeypatch):
    monkeypatch.setattr(id_store, "BUCKET_ROWS", 64)  # 5000 names: 128 buckets
    rng = np.random.default_rng(0)
    names = [f"{rng.integers(1e9)}/{i % 700}.jpg" for i in range(5000)]  # repeats: the first one counts
    _write(tmp_path, [names[i:i + 999] for i in range(0, len(names), 999)], expected=len(names))
    hashes = np.fromfile(tmp_path / id_store.HASHES_FILE, "<u8")
    order = np.fromfile(tmp_path / id_store.ORDER_FILE, "<i8")
    assert (np.diff(hashes) >= 0).all() and sorted(order.tolist()) == list(range(len(names)))
    store = id_store.IdStore(str(tmp_path))
    probe = names[::7] + ["absent.jpg", "0/0.jpg"]
    assert store.positions(probe).tolist() == [names.index(n) if n in names else -1 for n in probe]


def test_colliding_hashes_are_told_apart_by_name(tmp_path, monkeypatch):
    # Every name hashes alike: a lookup must compare names, and take the first.
    monkeypatch.setattr(id_store, "name_hashes", lambda encoded: np.full(len(encoded), 7, np.uint64))
    names = ["c", "a", "b", "a", "d"]
    _write(tmp_path, [names])
    store = id_store.IdStore(str(tmp_path))
    assert store.positions(["a", "b", "c", "d", "e"]).tolist() == [1, 2, 0, 4, -1]


def test_truncated_files_are_refused_by_name(tmp_path):
    _write(tmp_path, [["a", "bb", "ccc"]])
    with open(tmp_path / id_store.NAMES_FILE, "r+b") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match=r"corrupt index \(ids.names holds 4 bytes.*truncated"):
        id_store.IdStore(str(tmp_path))
    os.remove(tmp_path / id_store.ORDER_FILE)
    with pytest.raises(ValueError, match=r"corrupt index \(ids.order missing\)"):
        id_store.IdStore(str(tmp_path))
    with open(tmp_path / id_store.ORDER_FILE, "wb") as f:
        f.write(b"\0" * 16)  # two positions for three names
    with pytest.raises(ValueError, match="the id files disagree"):
        id_store.IdStore(str(tmp_path))


def test_an_index_saved_after_adding_to_a_loaded_one_keeps_all_names(tmp_path):
    index = index_lib.Index(4)
    vectors = np.eye(4, dtype=np.float32)
    index.add(vectors[:2], ODD[:2])
    index.save(str(tmp_path / "a"))
    loaded = index_lib.Index.load(str(tmp_path / "a"))
    loaded.add(vectors[2:], ODD[2:4])
    assert loaded.ids.positions(ODD[:4]).tolist() == [0, 1, 2, 3]
    assert loaded.search(vectors[3:], 1)[1] == [[ODD[3]]]
    loaded.save(str(tmp_path / "b"))
    assert list(index_lib.Index.load(str(tmp_path / "b")).ids) == ODD[:4]


def test_version_1_index_with_ids_json_still_loads(tmp_path):
    index = index_lib.Index(4)
    index.add(np.eye(4, dtype=np.float32), ["w", "x", "y", "z"])
    index.save(str(tmp_path / "v1"))
    folder = tmp_path / "v1"
    for name in id_store.FILES:
        os.remove(folder / name)
    with open(folder / "ids.json", "w") as f:
        json.dump(["w", "x", "y", "z"], f)
    meta = json.load(open(folder / "meta.json"))
    json.dump({**meta, "format_version": 1}, open(folder / "meta.json", "w"))
    loaded = index_lib.Index.load(str(folder))
    assert list(loaded.ids) == ["w", "x", "y", "z"] and loaded.search(np.eye(4)[2:3], 1)[1] == [["y"]]


def _parquet(path, names, vectors):
    import pyarrow as pa
    import pyarrow.parquet as pq

    column = pa.ListArray.from_arrays(pa.array(np.arange(0, vectors.size + 1, vectors.shape[1], dtype=np.int32)),
                                      pa.array(vectors.reshape(-1)))
    pq.write_table(pa.table({"image": pa.array(names), "descriptor": column}), path)


@pytest.mark.parametrize("kind", ["exact", "ivfpq"])
def test_names_with_any_characters_survive_append(tmp_path, kind):
    rng = np.random.default_rng(1)
    odd = ODD[:-3] + ODD[-2:]  # Parquet holds UTF-8 only: no lone surrogate
    first = odd + [f"img/{i}.jpg" for i in range(300)]
    second = odd[3:6] + ["more/é\n.jpg", "more/🏛️"] + [f"img2/{i}.jpg" for i in range(300)]
    x1 = rng.normal(size=(len(first), 16)).astype(np.float32)
    x2 = rng.normal(size=(len(second), 16)).astype(np.float32)
    _parquet(tmp_path / "1.parquet", first, x1)
    _parquet(tmp_path / "2.parquet", second, x2)
    out = str(tmp_path / "index")
    factory = "IVF4,PQ4" if kind == "ivfpq" else None
    build_index(str(tmp_path / "1.parquet"), out, kind, factory, train_size=312)
    build_index(str(tmp_path / "2.parquet"), out, append=True)
    index = index_lib.Index.load(out)
    want = first + second[3:]  # the names already held are not added again
    assert list(index.ids) == want
    assert index.ids.positions(want).tolist() == list(range(len(want)))
    # Each name still finds its own vector.
    probe = [0, 6, 9, len(first) + 1]
    vectors = np.concatenate([x1, x2[3:]])[probe]
    assert [row[0] for row in index.search(vectors, 1)[1]] == [want[i] for i in probe]
