import math

import numpy as np
import pytest

from deep_retrieval.retrieval import evaluation


def _reference_ap_and_pk(ranking, ok, junk, kappas):
    """Straightforward re-implementation: drop junk, walk the list."""
    kept = [int(i) for i in ranking if i not in set(junk)]
    ok = set(int(i) for i in ok)
    hits, ap, ranks_1based = 0, 0.0, []
    for r, idx in enumerate(kept):
        if idx in ok:
            prec_before = 1.0 if r == 0 else hits / r
            hits += 1
            prec_after = hits / (r + 1)
            ap += (prec_before + prec_after) / 2 / len(ok)
            ranks_1based.append(r + 1)
    pk = []
    for k in kappas:
        kq = min(max(ranks_1based), k)
        pk.append(sum(1 for r in ranks_1based if r <= kq) / kq)
    return ap, pk


def test_hand_worked_query():
    # ranking 3,0,5,1,2,4 ; ok {0,2}; junk {5}
    # junk-free positions: 0 -> 1, 2 -> 3 (one junk before it)
    # AP = [(0/1 + 1/2)/2 + (1/3 + 2/4)/2] / 2 = 1/3
    # P@1 = 0, P@5 = P@10 = 2/4 (k' = rank of last positive = 4)
    ranks = np.array([[3, 0, 5, 1, 2, 4]]).T
    m, aps, mpr, prs = evaluation.compute_map(ranks, [{"ok": [0, 2], "junk": [5]}])
    assert m == pytest.approx(1 / 3)
    np.testing.assert_allclose(mpr, [0.0, 0.5, 0.5])


def test_perfect_ranking_and_empty_query():
    ranks = np.array([[0, 1, 2, 3], [2, 3, 0, 1]]).T
    gnd = [{"ok": [0, 1], "junk": []}, {"ok": []}]
    m, aps, mpr, prs = evaluation.compute_map(ranks, gnd)
    assert m == 1.0 and aps[0] == 1.0 and math.isnan(aps[1])
    np.testing.assert_allclose(mpr, [1.0, 1.0, 1.0])  # k' = 2 for P@5 and P@10
    assert np.isnan(prs[1]).all()


def test_positive_listed_as_junk_is_not_counted_before_itself():
    ranks = np.array([[1, 0, 2]]).T
    m, *_ = evaluation.compute_map(ranks, [{"ok": [0], "junk": [0]}])
    # 0 is at position 1; no junk strictly before it -> AP = (0/1 + 1/2) / 2
    assert m == pytest.approx(0.25)


def test_matches_reference_on_random_rankings():
    rng = np.random.default_rng(0)
    n_db, n_q = 60, 25
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    gnd = []
    for _ in range(n_q):
        perm = rng.permutation(n_db)
        gnd.append({"ok": perm[: rng.integers(1, 8)], "junk": perm[10 : 10 + rng.integers(0, 6)]})
    m, aps, mpr, prs = evaluation.compute_map(ranks, gnd, kappas=(1, 5, 10))
    ref = [_reference_ap_and_pk(ranks[:, q], gnd[q]["ok"], gnd[q]["junk"], (1, 5, 10)) for q in range(n_q)]
    np.testing.assert_allclose(aps, [r[0] for r in ref], atol=1e-12)
    np.testing.assert_allclose(prs, [r[1] for r in ref], atol=1e-12)
    assert m == pytest.approx(np.mean([r[0] for r in ref]))


def test_revisited_protocols():
    g = [{"easy": [1], "hard": [2], "junk": [3]}]
    p = evaluation.revisited_protocols(g)
    assert p["easy"][0]["ok"].tolist() == [1] and sorted(p["easy"][0]["junk"].tolist()) == [2, 3]
    assert sorted(p["medium"][0]["ok"].tolist()) == [1, 2] and p["medium"][0]["junk"].tolist() == [3]
    assert p["hard"][0]["ok"].tolist() == [2] and sorted(p["hard"][0]["junk"].tolist()) == [1, 3]


def test_oxford_and_holidays_protocols():
    ox = evaluation.oxford_protocol([{"good": [0], "ok": [4], "junk": [2]}])
    assert sorted(ox[0]["ok"].tolist()) == [0, 4] and ox[0]["junk"].tolist() == [2]
    ho = evaluation.holidays_protocol([{"ok": [1, 2]}], [0])
    assert ho[0]["junk"].tolist() == [0]
    # The query (db index 0) ranked first is ignored: AP = 1.
    m, *_ = evaluation.compute_map(np.array([[0, 1, 2, 3]]).T, ho)
    assert m == 1.0


def test_rank_by_similarity_and_evaluate_percent():
    db = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.3, 0.0]], dtype=np.float32)
    ranks = evaluation.rank_by_similarity(q, db)
    assert ranks[:, 0].tolist() == [1, 2, 0, 3]
    res = evaluation.evaluate(ranks, [{"easy": [2], "hard": [], "junk": []}])
    # The positive is second: AP = (0/1 + 1/2) / 2 = 0.25.
    assert res["easy"]["map"] == pytest.approx(25.0)
    assert math.isnan(res["hard"]["map"])


def test_bad_ranks_shape():
    with pytest.raises(ValueError, match="n_queries=2"):
        evaluation.compute_map(np.zeros((3, 1), int), [{"ok": [0]}, {"ok": [1]}])


def test_box_recall_hand_worked():
    target = [0, 0, 10, 10]
    candidates = [
        np.array([[0, 0, 10, 5], [20, 20, 30, 30]]),  # IoU 0.5: a match at 0.5
        np.array([[0, 0, 10, 4.9]]),                   # IoU 0.49: none
        np.zeros((0, 4)),                              # no candidate at all
    ]
    assert evaluation.box_recall(candidates, [target] * 3, 0.5) == pytest.approx(1 / 3)
    assert evaluation.box_recall(candidates[:2], [target] * 2, 0.4) == 1.0


def test_rerank_ranks_keep_the_rest_in_initial_order():
    from deep_retrieval.retrieval import reranking

    rng = np.random.default_rng(0)
    db = rng.normal(size=(30, 6)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:3] + 0.1
    ranks = evaluation.rerank_ranks(q, db, m=8, k=2)
    initial = evaluation.rank_by_similarity(q, db)
    _, top = reranking.superglobal_rerank(q, db, m=8, k=2)
    for j in range(3):
        assert ranks[:8, j].tolist() == top[j].tolist()
        assert sorted(ranks[:8, j]) == sorted(initial[:8, j])  # the same 8, re-ordered
        assert ranks[8:, j].tolist() == initial[8:, j].tolist()
