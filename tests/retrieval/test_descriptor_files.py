"""Descriptor files: the run record, shards, and the index built from them."""

import os

import numpy as np
import pandas as pd
import pytest

from deep_retrieval.retrieval import descriptor_files, faiss_ivf, reranking
from deep_retrieval.retrieval import index as index_lib
from deep_retrieval.retrieval.descriptor_files import build_index


def _parquet(path, names, vectors):
    pd.DataFrame({"image": names, "descriptor": list(vectors.astype(np.float32))}).to_parquet(path)


def test_build_append_and_refuse(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    _parquet(tmp_path / "a.parquet", [f"a{i}" for i in range(20)], vectors[:20])
    _parquet(tmp_path / "b.parquet", [f"a{i}" for i in range(10, 30)], vectors[10:])
    out = str(tmp_path / "idx")
    built = build_index(str(tmp_path / "a.parquet"), out, images_root=str(tmp_path))
    assert built["kind"] == "exact" and built["count"] == 20
    build_index(str(tmp_path / "b.parquet"), out, append=True)
    loaded = index_lib.Index.load(out)
    assert len(loaded) == 30 and len(set(loaded.ids)) == 30  # a10..a19 not added twice
    assert loaded.metadata["images_root"] == str(tmp_path)
    _, ids = loaded.search(vectors[25], 1)
    assert ids[0][0] == "a25"
    _parquet(tmp_path / "c.parquet", ["x"], np.zeros((1, 4)))
    with pytest.raises(ValueError, match="size 8, but the model produces 4"):
        build_index(str(tmp_path / "c.parquet"), out, append=True)
    with pytest.raises(ValueError, match="missing.parquet: no such file"):
        build_index(str(tmp_path / "missing.parquet"), out)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet: cannot read Parquet"):
        build_index(str(tmp_path / "junk.parquet"), out)


def test_run_record_travels_in_the_schema_and_into_the_index(tmp_path):
    frame = pd.DataFrame({"image": ["a", "b"], "descriptor": list(np.eye(2, dtype=np.float32))})
    info = {"model_name": "deep_retrieval", "model_version": 3, "signature": "serving_default"}
    descriptor_files.write_descriptors(frame, str(tmp_path / "d.parquet"), info)
    assert descriptor_files.read_run_info(str(tmp_path / "d.parquet")) == info
    assert pd.read_parquet(tmp_path / "d.parquet")["image"].tolist() == ["a", "b"]
    frame.to_parquet(tmp_path / "plain.parquet")
    assert descriptor_files.read_run_info(str(tmp_path / "plain.parquet")) is None
    index = build_index(str(tmp_path / "d.parquet"), str(tmp_path / "idx"))
    assert index_lib.Index.load(str(tmp_path / "idx")).metadata["extraction"] == info == index["extraction"]
    descriptor_files.write_descriptors(frame, str(tmp_path / "v4.parquet"), {**info, "model_version": 4})
    with pytest.raises(ValueError, match="one index holds one model's descriptors"):
        build_index(str(tmp_path / "v4.parquet"), str(tmp_path / "idx"), append=True)


def _clustered(n, dim, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    x = centres[rng.integers(0, 64, n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _shards(folder, names, vectors, count, info=None):
    folder.mkdir()
    bounds = np.linspace(0, len(names), count + 1).astype(int)
    for i in range(count):
        frame = pd.DataFrame({"image": names[bounds[i]:bounds[i + 1]],
                              "descriptor": list(vectors[bounds[i]:bounds[i + 1]])})
        descriptor_files.write_descriptors(frame, str(folder / descriptor_files.shard_name(i, count)), info)
    return str(folder)


def test_a_folder_of_shards_streams_into_the_same_index_as_one_file(tmp_path):
    n, dim = 12000, 16
    vectors, names = _clustered(n, dim, 0), [f"img/{i}.jpg" for i in range(n)]
    _parquet(tmp_path / "one.parquet", names, vectors)
    folder = _shards(tmp_path / "shards", names, vectors, 3)
    factory = "IVF32,PQ8"
    one = build_index(str(tmp_path / "one.parquet"), str(tmp_path / "one"), "ivfpq", factory, nprobe=8)
    sharded = build_index(folder, str(tmp_path / "sharded"), "ivfpq", factory, nprobe=8)
    assert one["count"] == sharded["count"] == n and sharded["factory"] == factory
    assert sorted(os.listdir(tmp_path / "sharded")) == ["faiss.index", "ids.hashes", "ids.names", "ids.offsets",
                                                        "ids.order", "lists.ivfdata", "meta.json", "vectors.f16"]
    os.rename(tmp_path / "sharded", tmp_path / "moved")  # the lists are found beside the index
    a, b = index_lib.Index.load(str(tmp_path / "one")), index_lib.Index.load(str(tmp_path / "moved"))
    assert list(a.ids) == list(b.ids) == names
    queries = vectors[::97] + 0.05 * np.random.default_rng(1).normal(size=(len(vectors[::97]), dim))
    scores_a, got_a = a.search(queries, 10)
    scores_b, got_b = b.search(queries, 10)
    assert got_a == got_b and np.allclose(scores_a, scores_b)  # sharding does not change the index
    # Against exact search in numpy: most true neighbours are found.
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    want = np.argsort(-(q @ vectors.T), axis=1)[:, :10]
    recall = np.mean([len({int(g.split("/")[1][:-4]) for g in row} & set(w)) / 10 for row, w in zip(got_b, want)])
    assert recall >= 0.5
    with pytest.raises(ValueError, match="on-disk lists"):
        b.add(vectors[:1], ["x"])


def test_appending_shards_to_an_on_disk_index(tmp_path):
    import faiss

    n, dim = 12000, 16
    vectors, names = _clustered(n, dim, 2), [f"{i}" for i in range(n)]
    folder = _shards(tmp_path / "shards", names, vectors, 4)
    first = os.path.join(folder, descriptor_files.shard_name(0, 4))
    out = str(tmp_path / "idx")
    build_index(first, out, "ivfpq", "IVF16,PQ8", nprobe=4, train_size=3000)
    # The reference: Faiss's own in-memory index, the same quantisers, every vector added at once.
    reference = faiss.deserialize_index(faiss_ivf.empty_template(out))
    reference.add(vectors)
    reference.nprobe = 4
    grown = build_index(folder, out, append=True)  # the first shard again, and three new ones
    assert grown["count"] == n and grown["factory"] == "IVF16,PQ8"
    index = index_lib.Index.load(out)
    assert list(index.ids) == names
    index.k_factor = 1  # the codes' own order, as Faiss gives it
    queries = vectors[::40]
    scores, got = index.search(queries, 5)
    want_scores, want = reference.search(queries, 5)
    assert got == [[str(i) for i in row] for row in want]
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_repeated_names_across_shards_are_indexed_once(tmp_path, capsys):
    rng = np.random.default_rng(3)
    names = [f"n{int(i)}" for i in rng.integers(0, 300, 1000)]  # many repeats, across shards
    vectors = rng.normal(size=(1000, 4)).astype(np.float32)
    folder = _shards(tmp_path / "s", names, vectors, 5)
    descriptors = descriptor_files.Descriptors(folder)
    skipped = descriptor_files.repeated_rows(descriptors, str(tmp_path / "scratch"), bucket_rows=100)
    seen, want = set(), []
    for i, name in enumerate(names):  # the reference: every row after a name's first
        if name in seen:
            want.append(i)
        seen.add(name)
    assert skipped.tolist() == want
    build_index(folder, str(tmp_path / "idx"))
    index = index_lib.Index.load(str(tmp_path / "idx"))
    assert list(index.ids) == list(dict.fromkeys(names))
    first = {name: names.index(name) for name in index.ids}
    np.testing.assert_allclose(index.descriptors[5], reranking.normalize(vectors[first[index.ids[5]]]), rtol=1e-5)
    assert f"{len(want)} repeated image row(s) skipped" in capsys.readouterr().err


def test_shards_of_two_models_or_sizes_are_refused(tmp_path):
    info = {"model_name": "deep_retrieval", "model_version": 1, "signature_name": "serving_default"}
    folder = _shards(tmp_path / "s", ["a", "b"], np.eye(2, dtype=np.float32), 2, info)
    frame = pd.DataFrame({"image": ["c"], "descriptor": [np.ones(2, np.float32)]})
    descriptor_files.write_descriptors(frame, os.path.join(folder, "z.parquet"), {**info, "model_version": 2})
    with pytest.raises(ValueError, match="z.parquet holds descriptors of model 'deep_retrieval' version 2"):
        build_index(folder, str(tmp_path / "idx"))
    os.remove(os.path.join(folder, "z.parquet"))
    _parquet(os.path.join(folder, "z.parquet"), ["c"], np.ones((1, 3)))
    with pytest.raises(ValueError, match="z.parquet: descriptors of size \\[3\\] among ones of size 2"):
        build_index(folder, str(tmp_path / "idx"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .parquet files"):
        build_index(str(empty), str(tmp_path / "idx"))
    assert not os.path.exists(tmp_path / "idx")


def _ivfpq(tmp_path, n=3000):
    vectors = _clustered(n, 16, 5)
    _parquet(tmp_path / "v.parquet", [f"{i}" for i in range(n)], vectors)
    out = str(tmp_path / "idx")
    build_index(str(tmp_path / "v.parquet"), out, "ivfpq", "IVF8,PQ8", nprobe=4, train_size=3000)
    return out, vectors


def test_a_second_writer_is_refused_while_the_first_holds_the_index(tmp_path):
    from deep_retrieval.io.atomic import exclusive_lock

    _parquet(tmp_path / "a.parquet", ["a", "b"], np.eye(2, 8))
    out = str(tmp_path / "idx")
    build_index(str(tmp_path / "a.parquet"), out)
    _parquet(tmp_path / "b.parquet", ["c"], np.eye(1, 8))
    with exclusive_lock(out + ".lock", "held"):  # what a running serving.index --append holds
        with pytest.raises(ValueError, match="idx: another serving.index is writing it"):
            build_index(str(tmp_path / "b.parquet"), out, append=True)
        with pytest.raises(ValueError, match="another process is writing this index"):
            index_lib.Index.load(out).save(out)
    assert build_index(str(tmp_path / "b.parquet"), out, append=True)["count"] == 3  # once it is free


def test_a_truncated_lists_file_is_a_one_line_error_not_a_crash(tmp_path):
    out, vectors = _ivfpq(tmp_path)
    assert index_lib.Index.load(out).search(vectors[:2], 3)[1][0][0] == "0"  # then unmapped
    lists = os.path.join(out, faiss_ivf.LISTS_FILE)
    os.truncate(lists, os.path.getsize(lists) // 2)  # searching this mapped file died of SIGBUS
    with pytest.raises(ValueError, match=r"idx: corrupt index \(lists.ivfdata holds .* truncated\?\)"):
        index_lib.Index.load(out)


def test_temporaries_of_a_killed_build_are_removed_by_the_next(tmp_path):
    _parquet(tmp_path / "a.parquet", ["a", "b"], np.eye(2, 8))
    stale = tmp_path / ".idx.tmp-999999-1"  # what atomic_write leaves when SIGKILL stops it mid-build
    (stale / "parts").mkdir(parents=True)
    (stale / "parts" / "00000.index").write_bytes(b"x" * 1000)
    (tmp_path / ".idx.old.tmp-999999-1").write_text("another file's temporary, not the index's")
    build_index(str(tmp_path / "a.parquet"), str(tmp_path / "idx"))
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == [".idx.old.tmp-999999-1", "a.parquet", "idx", "idx.lock"]


def test_a_full_disk_is_a_one_line_error_and_the_previous_index_stays(tmp_path, monkeypatch):
    import errno
    import shutil
    from collections import namedtuple

    out, vectors = _ivfpq(tmp_path)
    before = list(index_lib.Index.load(out).ids)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(ValueError, match=r"idx\.tmp-.*: the index needs about .* GiB of disk, 0\.00 GiB are free"):
        build_index(str(tmp_path / "v.parquet"), out, "ivfpq", "IVF8,PQ8", nprobe=4, train_size=3000)
    monkeypatch.undo()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "descriptors.npy")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(ValueError, match=r"idx: cannot write the index: No space left on device \(descriptors.npy\)"):
        build_index(str(tmp_path / "v.parquet"), out, "exact")
    monkeypatch.undo()
    assert list(index_lib.Index.load(out).ids) == before
    assert sorted(os.listdir(tmp_path)) == ["idx", "idx.lock", "v.parquet"]


def test_re_ranked_ivfpq_search_is_exact_when_the_short_list_covers_everything(tmp_path):
    """Every list probed and k_factor * k >= n: the exact top-k of numpy over
    the float16 descriptors, after a build from shards and after --append;
    the float16 rows kept are the descriptors to float16 precision."""
    n, dim = 4000, 16
    vectors, names = _clustered(n, dim, 7), [f"{i}" for i in range(n)]
    folder = _shards(tmp_path / "shards", names, vectors, 4)
    out = str(tmp_path / "idx")
    meta = build_index(os.path.join(folder, descriptor_files.shard_name(0, 4)), out, "ivfpq", "IVF8,PQ4",
                       nprobe=8, train_size=1000, k_factor=500)
    assert meta["k_factor"] == 500
    grown = build_index(folder, out, append=True)
    assert grown["count"] == n and grown["k_factor"] == 500
    index = index_lib.Index.load(out)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(index.vectors, np.float32), unit, atol=1e-3)
    queries = unit[::50] + 0.05 * np.random.default_rng(2).normal(size=(80, dim)).astype(np.float32)
    scores, got = index.search(queries, 10)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact = q @ np.asarray(index.vectors, np.float32).T  # brute force over all n
    want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
    assert got == [[str(i) for i in row] for row in want]
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want, 1), atol=1e-5)
    np.testing.assert_allclose(scores, np.sort(q @ unit.T, axis=1)[:, ::-1][:, :10], atol=2e-3)  # vs float32
    index.k_factor = 1  # the codes alone order them worse
    assert index.search(queries, 10)[1] != got


def test_a_truncated_vectors_file_is_a_one_line_error(tmp_path):
    out, _ = _ivfpq(tmp_path)
    path = os.path.join(out, index_lib.VECTORS_FILE)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)
    with pytest.raises(ValueError, match=r"idx: corrupt index \(vectors.f16 holds 95998 bytes, 3000 x 16 float16"):
        index_lib.Index.load(out)
