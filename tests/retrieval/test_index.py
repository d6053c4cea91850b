import json
import os

import numpy as np
import pytest

from deep_retrieval.retrieval import faiss_ivf, reranking
from deep_retrieval.retrieval import index as index_lib


def _unit(n, d, seed):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_search_equals_brute_force_across_chunks():
    db, q = _unit(1000, 16, 0), _unit(7, 16, 1)
    scores, idx = reranking.topk(q, db, 10, chunk=97)
    full = q @ db.T
    want = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(scores, np.take_along_axis(full, want, axis=1), rtol=1e-6)


def test_alpha_query_expansion_hand_worked():
    db = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    q = np.array([[1, 0]], np.float32)
    # top-2: db0 (s=1), db1 (s=0.6); alpha=1: q + 1*db0 + 0.6*db1 = (2.36, 0.48)
    out = reranking.alpha_query_expansion(q, db, k=2, alpha=1.0)
    want = np.array([2.36, 0.48]) / np.hypot(2.36, 0.48)
    np.testing.assert_allclose(out[0], want, rtol=1e-5)
    np.testing.assert_allclose(reranking.alpha_query_expansion(q, db, k=0), q)


def test_database_augmentation_hand_worked():
    db = np.array([[1, 0], [0.6, 0.8], [0, 1]], np.float32)
    out = reranking.database_augmentation(db, k=1)
    # k=1: x itself (weight 1) and its nearest neighbour (weight 1/1).
    # db0's nearest is db1 (0.6); db2's is db1 (0.8); db1's is db2 (0.8 beats 0.6).
    np.testing.assert_allclose(out[0], np.array([1.6, 0.8]) / np.hypot(1.6, 0.8), rtol=1e-5)
    np.testing.assert_allclose(out[2], np.array([0.6, 1.8]) / np.hypot(0.6, 1.8), rtol=1e-5)
    out = reranking.database_augmentation(db, k=2)
    # db0: itself 1, db1 with 2/2, db2 with 1/2: (1 + 0.6 + 0, 0 + 0.8 + 0.5).
    want0 = np.array([1.6, 1.3]) / np.hypot(1.6, 1.3)
    np.testing.assert_allclose(out[0], want0, rtol=1e-5)


def test_index_search_save_load_round_trip(tmp_path):
    index = index_lib.Index(16, {"model": "demo"})
    db = _unit(50, 16, 2)
    index.add(db[:30], [f"img{i}" for i in range(30)])
    index.add(db[30:], [f"img{i}" for i in range(30, 50)])
    scores, ids = index.search(db[[5, 40]], k=3)
    assert ids[0][0] == "img5" and ids[1][0] == "img40"
    path = str(tmp_path / "idx")
    index.save(path)
    loaded = index_lib.Index.load(path, expected_dim=16)
    assert list(loaded.ids) == list(index.ids) and loaded.metadata == {"model": "demo"}
    np.testing.assert_array_equal(loaded.descriptors, index.descriptors)
    index.add(_unit(1, 16, 3), ["new"])
    index.save(path)  # replacing an existing index
    assert len(index_lib.Index.load(path)) == 51


def test_load_refuses_mismatched_or_corrupt(tmp_path):
    index = index_lib.Index(8)
    index.add(_unit(4, 8, 4), list("abcd"))
    path = str(tmp_path / "idx")
    index.save(path)
    with pytest.raises(ValueError, match="model produces 16"):
        index_lib.Index.load(path, expected_dim=16)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    meta["format_version"] = 99
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ValueError, match="index format 99"):
        index_lib.Index.load(path)
    index.save(path)
    with open(os.path.join(path, "descriptors.npy"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="corrupt index"):
        index_lib.Index.load(path)
    with pytest.raises(ValueError, match="not an index folder"):
        index_lib.Index.load(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match="size 3"):
        index.search(np.zeros((1, 3)))


def test_faiss_flat_equals_exact(tmp_path):
    db, q = _unit(500, 32, 5), _unit(9, 32, 6)
    exact, flat = index_lib.Index(32), index_lib.Index(32, kind="flat")
    ids = [f"i{j}" for j in range(500)]
    exact.add(db, ids)
    flat.add(db[:200], ids[:200])
    flat.add(db[200:], ids[200:])  # incremental
    s1, i1 = exact.search(q, 20)
    s2, i2 = flat.search(q, 20)
    assert i1 == i2
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    flat.save(str(tmp_path / "f"))
    assert index_lib.Index.load(str(tmp_path / "f")).search(q, 20)[1] == i1


def test_ivfpq_recall_and_round_trip(tmp_path):
    # Clustered data: IVF-PQ should find most true neighbours.
    rng = np.random.default_rng(7)
    centers = _unit(20, 64, 8)
    db = centers[rng.integers(0, 20, 4000)] + 0.3 * rng.normal(size=(4000, 64)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:50] + 0.05 * rng.normal(size=(50, 64)).astype(np.float32)
    index = index_lib.Index(64, kind="ivfpq", factory="IVF32,PQ16", nprobe=8)
    index.train(db)
    index.add(db, [str(j) for j in range(4000)])
    _, got = index.search(q, 10)
    _, want = reranking.topk(reranking.normalize(q), db, 10)
    recall = np.mean([len(set(map(int, g)) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall >= 0.8  # the codes' 320 candidates re-ranked exactly (nprobe 8 of 32 lists bounds it)
    assert all(int(g[0]) == j for j, g in enumerate(got[:10]))
    index.k_factor = 1
    _, codes = index.search(q, 10)
    assert np.mean([len(set(map(int, g)) & set(w)) / 10 for g, w in zip(codes, want)]) < recall
    index.k_factor = index_lib.K_FACTOR
    index.save(str(tmp_path / "pq"))
    loaded = index_lib.Index.load(str(tmp_path / "pq"), expected_dim=64)
    assert loaded.kind == "ivfpq" and loaded.search(q, 10)[1] == got
    assert isinstance(loaded.vectors, np.memmap) and loaded.vectors.dtype == np.float16
    with pytest.raises(ValueError, match="αQE and re-ranking need"):
        loaded.search(q, 10, qe=2)


def test_default_kind_and_parameters():
    assert index_lib.default_kind(10_000) == "exact"
    assert index_lib.default_kind(2_000_000) == "ivfpq"
    # Faiss's guidelines: 4 sqrt(n) lists below 1M, then 2^16, 2^18, 2^20 lists with an HNSW quantiser.
    assert faiss_ivf.default_factory(250_000, 2048) == "OPQ64_256,IVF2000,PQ64"
    assert faiss_ivf.default_factory(5_000_000, 2048) == "OPQ64_256,IVF65536_HNSW32,PQ64"
    assert faiss_ivf.default_factory(50_000_000, 512) == "OPQ64_256,IVF262144_HNSW32,PQ64"
    assert faiss_ivf.default_factory(999_999_999, 512) == "OPQ64_256,IVF1048576_HNSW32,PQ64"
    assert faiss_ivf.default_factory(2_000_000, 32) == "OPQ8_32,IVF65536_HNSW32,PQ8"  # 4 dimensions a code byte
    with pytest.raises(ValueError, match="no IVF"):
        faiss_ivf.faiss_lists("HNSW32")


def test_superglobal_rerank_hand_worked():
    db = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)  # a, b, c
    q = np.array([[0.6, 0.8]], np.float32)  # initial order b (0.96), c (0.8), a (0.6)
    scores, idx = reranking.superglobal_rerank(q, db, m=3, k=1, beta=0.5)
    # b' = (b + 0.5*0.8 a) / 1.4, c' = (c + 0.5*0.6 b) / 1.3, a' = (a + 0.5*0.8 b) / 1.4;
    # s1 = q.x' = 0.857143, 0.836923, 0.702857; q' = max(b', c') = (0.857143, 0.907692);
    # final = (s1 + q'.x') / 2.
    assert idx.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(scores[0], [0.990424, 0.909535, 0.833312], atol=2e-6)


def _published_superglobal(q, x, m, k, beta):
    """SuperGlobal's published MDescAug + RerankwMDA, batched over queries in
    torch as in its code (ranks [n_db, nq] in, re-ranked ranks out)."""
    import torch

    Q, X = torch.from_numpy(q).double(), torch.from_numpy(x).double()
    ranks = torch.argsort(-(X @ Q.T), dim=0, stable=True)
    width = k + 1
    top = ranks.T[:, :m]  # nq x m
    xt = X[top]  # nq x m x d
    inner = torch.einsum("abc,adc->abd", xt, xt)
    nb = torch.argsort(-inner, dim=-1, stable=True)[:, :, :width]
    w = torch.take_along_dim(inner, nb, -1).unsqueeze(-1)
    w[:, :, 1:] *= beta
    w[:, :, :1] = 1.0
    gathered = torch.stack([xt[i][nb[i]] for i in range(len(q))])  # nq x m x width x d
    refined = (gathered * w).sum(2) / w.sum(2)
    s1 = torch.einsum("ac,adc->ad", Q, refined)
    pre = torch.argsort(-s1, dim=-1, stable=True)
    reordered = torch.stack([top[i][pre[i]] for i in range(len(q))])
    s1_sorted = torch.take_along_dim(s1, pre, -1)
    best = torch.take_along_dim(refined, pre[:, :width, None], 1).max(1, keepdim=True)[0]
    s2 = torch.einsum("abc,adc->abd", best, torch.take_along_dim(refined, pre[..., None], 1)).sum(1)
    final = torch.argsort(-(s1_sorted + s2) / 2, dim=-1, stable=True)
    return np.stack([reordered[i][final[i]].numpy() for i in range(len(q))])


def test_superglobal_rerank_matches_the_published_algorithm():
    rng = np.random.default_rng(3)
    centres = _unit(12, 32, 4)
    db = centres[rng.integers(0, 12, 300)] + 0.35 * rng.normal(size=(300, 32))
    q = centres[:6] + 0.5 * rng.normal(size=(6, 32))
    db = (db / np.linalg.norm(db, axis=1, keepdims=True)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    _, got = reranking.superglobal_rerank(q, db, m=40, k=5, beta=0.15)
    want = _published_superglobal(q, db, 40, 5, 0.15)
    np.testing.assert_array_equal(got, want)
    _, initial = reranking.topk(q, db, 40)
    assert (got != initial).any()  # the re-ranking moved something


def test_index_search_with_rerank():
    db = _unit(50, 8, 5)
    index = index_lib.Index(8)
    index.add(db, [f"i{i}" for i in range(50)])
    scores, ids = index.search(db[:2], k=5, rerank=True)
    _, want = reranking.superglobal_rerank(db[:2], db)
    assert ids == [[f"i{i}" for i in row[:5]] for row in want] and scores.shape == (2, 5)
    with pytest.raises(ValueError, match="αQE or SuperGlobal"):
        index.search(db[:1], k=5, qe=2, rerank=True)


def test_rescore_hand_worked():
    """Two queries, short lists naming rows 2, 0, -1 and 1, 1, 0: the exact
    scores reorder them, a missing candidate stays last as -inf / -1."""
    vectors = np.array([[1, 0], [0, 1], [0.6, 0.8]], np.float16)
    queries = np.array([[1, 0], [0, 1]], np.float32)
    scores, idx = reranking.rescore(queries, vectors, np.array([[2, 0, -1], [1, 1, 0]]), 3)
    assert idx.tolist() == [[0, 2, -1], [1, 1, 0]]
    np.testing.assert_allclose(scores, [[1, 0.6, -np.inf], [1, 1, 0]], atol=1e-3)


def _on_disk_index(tmp_path, nlist=64, written=range(0, 64, 5)):
    """An IVF-Flat index whose on-disk lists hold three vectors in each of ``written``."""
    import faiss

    quantizer = faiss.IndexFlatIP(4)
    quantizer.add(np.eye(4, dtype=np.float32)[np.arange(nlist) % 4])
    index = faiss.IndexIVFFlat(quantizer, 4, nlist, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    lists = faiss.OnDiskInvertedLists(nlist, index.code_size, str(tmp_path / faiss_ivf.LISTS_FILE))
    codes = np.zeros((3, index.code_size), np.uint8)
    with faiss_ivf.quiet_stdout():
        for i in written:
            lists.add_entries(i, 3, faiss.swig_ptr(np.arange(3, dtype=np.int64) + 3 * i), faiss.swig_ptr(codes))
    index.replace_invlists(lists, True)
    lists.this.disown()
    return index, lists


def test_list_extents_equal_the_accessors_and_a_changed_layout_falls_back(tmp_path, monkeypatch):
    index, lists = _on_disk_index(tmp_path)
    want = np.array([(lists.lists.at(i).size, lists.lists.at(i).capacity, lists.lists.at(i).offset)
                     for i in range(lists.nlist)], np.uint64)
    assert want[5, 0] == 3 and want[1, 1] == 0  # written and never-written lists both present
    np.testing.assert_array_equal(faiss_ivf.list_extents(lists), want)
    # A Faiss whose struct is laid out otherwise reads as garbage: the accessors are used.
    monkeypatch.setattr(np.ctypeslib, "as_array", lambda raw: np.full(3 * lists.nlist, 12345, np.uint64))
    np.testing.assert_array_equal(faiss_ivf.list_extents(lists), want)


def test_check_lists_accepts_never_written_lists_and_refuses_a_short_file(tmp_path):
    index, lists = _on_disk_index(tmp_path)
    faiss_ivf.check_lists(index, "idx")  # SIZE_MAX offsets of empty lists are not a reach past the file
    size = os.path.getsize(lists.filename)
    with open(lists.filename, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ValueError, match="idx: corrupt index .* truncated"):
        faiss_ivf.check_lists(index, "idx")
