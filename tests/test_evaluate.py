"""Metrics against hand-computed cases and brute-force references."""

from __future__ import annotations

import itertools
import math
import tracemalloc
from collections import Counter

import numpy as np
import pytest

from crossmodal.codes import pack_codes, weighted_hamming
from crossmodal.evaluate import (
    as_packed,
    as_signs,
    average_precision,
    code_statistics,
    concept_words,
    evaluate_directions,
    evaluate_retrieval,
    expected_precision_sum,
    keyword_precision,
    map_at_all,
    map_at_k,
    ndcg_at_k,
    pr_by_radius,
    precision_at_k,
    precision_within_radius,
    rank_top_k,
    recall_at_k,
    self_rank,
    word_relevance,
)

# --- the DCMH-style hand example: 4 queries, 6 database items, 4-bit codes, 3 labels ---------
DB = np.array(
    [
        [+1, +1, +1, +1],  # b0  labels [1,0,0]
        [+1, +1, +1, -1],  # b1  labels [0,1,0]
        [+1, +1, -1, -1],  # b2  labels [1,1,0]
        [+1, -1, -1, -1],  # b3  labels [0,0,1]
        [-1, -1, -1, -1],  # b4  labels [1,0,0]
        [-1, +1, +1, +1],  # b5  labels [0,0,1]
    ],
    dtype=np.int8,
)
DB_LABELS = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]])
Q = np.array(
    [
        [+1, +1, +1, +1],  # q0 labels [1,0,0]
        [-1, -1, -1, -1],  # q1 labels [0,0,1]
        [+1, -1, +1, -1],  # q2 labels [0,1,0]
        [-1, -1, +1, +1],  # q3 labels [0,0,0]: no relevant item
    ],
    dtype=np.int8,
)
Q_LABELS = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]])
HAND = {"query_labels": Q_LABELS, "db_labels": DB_LABELS}

# Stable ranking (ties by database order), R = relevant, N = not:
# q0: d = [0,1,2,3,4,1] -> b0 R, b1 N, b5 N, b2 R, b3 N, b4 R; relevant at ranks 1, 4, 6
#     AP = (1/1 + 2/4 + 3/6) / 3 = 2/3           (the d=1 tie holds two N: no tie effect)
# q1: d = [4,3,2,1,0,3] -> b4 N, b3 R, b2 N, b1 N, b5 R, b0 N; relevant at ranks 2, 5
#     AP = (1/2 + 2/5) / 2 = 0.45
#     tie-aware: b1 (N) and b5 (R) tie at d=3, b5 at rank 4 or 5:
#     ((1/2 + 2/4)/2 + (1/2 + 2/5)/2) / 2 = (0.5 + 0.45) / 2 = 0.475
# q2: d = [2,1,2,1,2,3] -> b1 R, b3 N, b0 N, b2 R, b4 N, b5 N; relevant at ranks 1, 4
#     AP = (1/1 + 2/4) / 2 = 0.75
#     tie-aware: b1 at rank 1 or 2 -> E[1/rank] = (1 + 1/2)/2 = 0.75;
#     b2 at rank 3, 4 or 5 -> E[2/rank] = (2/3 + 2/4 + 2/5)/3 = 47/90;  AP = (0.75 + 47/90)/2
# q3: no relevant item -> AP = 0, still in the mean.
AP_STABLE = [2 / 3, 0.45, 0.75, 0.0]
AP_TIE = [2 / 3, 0.475, (0.75 + 47 / 90) / 2, 0.0]


def test_hand_example_map_stable_and_tie_aware():
    res = evaluate_retrieval(Q, DB, **HAND, ks=(2,), per_query=True)
    np.testing.assert_allclose(res["per_query"]["map"], AP_STABLE)
    np.testing.assert_allclose(res["per_query"]["map_tie"], AP_TIE)
    assert res["map"] == pytest.approx((2 / 3 + 0.45 + 0.75 + 0) / 4)  # 0.46667
    assert res["map_tie"] == pytest.approx(sum(AP_TIE) / 4)  # 0.44444
    assert res["map"] != pytest.approx(res["map_tie"])
    assert res["n_query_no_relevant"] == 1
    # P@2: q0 1/2, q1 1/2, q2 1/2 (b1 R, b3 N), q3 0 -> 0.375
    assert res["p@2"] == pytest.approx(0.375)
    # tie-aware P@2: q2's top 2 is the whole d=1 tie {b1 R, b3 N} -> still 1/2
    assert res["p@2_tie"] == pytest.approx(0.375)


def test_packed_and_sign_inputs_agree():
    q8, db8 = np.repeat(Q, 2, axis=1), np.repeat(DB, 2, axis=1)  # 8 bits: distances double
    a = evaluate_retrieval(q8, db8, **HAND)
    b = evaluate_retrieval(pack_codes(q8), pack_codes(db8), **HAND)
    assert a["map"] == pytest.approx(b["map"]) and a["map_tie"] == pytest.approx(b["map_tie"])
    assert a["map"] == pytest.approx(sum(AP_STABLE) / 4)
    np.testing.assert_array_equal(as_signs(as_packed(q8)), q8)


def test_bad_codes_give_clear_errors():
    with pytest.raises(ValueError, match="metric='cosine'"):
        evaluate_retrieval(Q * 0.5, DB, **HAND)
    with pytest.raises(ValueError, match="code lengths differ"):
        evaluate_retrieval(np.repeat(Q, 2, axis=1), DB, **HAND)
    with pytest.raises(ValueError, match="exactly one"):
        evaluate_retrieval(Q, DB)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_retrieval(Q, DB, metric="euclid", **HAND)


# --- brute force over all orders of tied items -----------------------------------------------
def _brute_force(q, db, labels_q, labels_db, **kw):
    """Average of the stable metrics over every permutation of the database (= every tie order)."""
    perms = list(itertools.permutations(range(db.shape[0])))
    total: dict[str, float] = {}
    for perm in perms:
        p = np.array(perm)
        res = evaluate_retrieval(q, db[p], query_labels=labels_q, db_labels=labels_db[p], tie_aware=False,
                                 **kw)
        for key, v in res.items():
            if isinstance(v, float):
                total[key] = total.get(key, 0.0) + v / len(perms)
    return total


def test_tie_aware_hand_example_equals_brute_force():
    brute = _brute_force(Q, DB, Q_LABELS, DB_LABELS, ks=(2,))
    res = evaluate_retrieval(Q, DB, **HAND, ks=(2,))
    assert res["map_tie"] == pytest.approx(brute["map"])
    assert res["p@2_tie"] == pytest.approx(brute["p@2"])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("norm", ["retrieved", "min_rk"])
def test_tie_aware_equals_brute_force_random(seed, norm):
    rng = np.random.default_rng(seed)
    q = rng.choice([-1, 1], size=(3, 8)).astype(np.int8)
    db = rng.choice([-1, 1], size=(5, 8)).astype(np.int8)
    q[:, :6], db[:, :6] = 1, 1  # only 2 informative bits: distances 0..2, many ties
    lq, ldb = rng.integers(0, 2, (3, 3)), rng.integers(0, 2, (5, 3))
    kw = {"ks": (1, 3, 4), "map_ks": (1, 2, 3, 5), "ndcg_ks": (2, 3), "map_k_norm": norm}
    brute = _brute_force(q, db, lq, ldb, **kw)
    res = evaluate_retrieval(q, db, query_labels=lq, db_labels=ldb, stable=False, **kw)
    checked = 0
    for key, v in brute.items():
        if key.startswith(("map", "p@", "r@", "ndcg@")):
            assert res[key + "_tie"] == pytest.approx(v, abs=1e-12), key
            checked += 1
    assert checked == 1 + 4 + 3 + 3 + 2


@pytest.mark.parametrize("n", range(1, 6))
def test_expected_precision_sum_closed_form(n):
    """Closed form against enumerating every placement of r relevant items in a group of n."""
    for r, s, r_before in itertools.product(range(n + 1), (0, 3), (0, 2)):
        for m in range(n + 1):
            values = []
            for rel_pos in itertools.combinations(range(1, n + 1), r):
                ranks = [p for p in rel_pos if p <= m]
                values.append(sum((r_before + i + 1) / (s + p) for i, p in enumerate(ranks)))
            want = float(np.mean(values))
            assert expected_precision_sum(n, r, s, r_before, m) == pytest.approx(want), (n, r, s, r_before, m)


# --- mAP@k -----------------------------------------------------------------------------------
def _wrong_map_at_k(rel_sorted: np.ndarray, k: int) -> float:
    """The widely copied calc_map_k: AP over the first k *relevant* hits wherever they rank."""
    pos = np.flatnonzero(rel_sorted)[:k] + 1
    return float(np.mean(np.arange(1, pos.size + 1) / pos)) if pos.size else 0.0


def test_map_at_k_differs_from_the_common_wrong_version():
    # One query, database already in distance order (d = 0..5 via 8-bit codes), relevance
    # N N R N R R. Top 2 holds no relevant item, so AP@2 = 0 (divisor R_2 = 0).
    # The wrong version takes the first 2 relevant hits at ranks 3 and 5: (1/3 + 2/5)/2 = 11/30.
    rel = np.array([0, 0, 1, 0, 1, 1])
    q = np.ones((1, 8), np.int8)
    db = np.ones((6, 8), np.int8)
    for i in range(6):
        db[i, :i] = -1  # distance i
    got = map_at_k(q, db, 2, relevance=rel[None, :])
    assert got == 0.0
    assert _wrong_map_at_k(rel, 2) == pytest.approx(11 / 30)
    # k = 4: top 4 = N N R N, one relevant at rank 3 -> AP@4 = (1/3) / 1 = 1/3
    # with divisor min(R, k) = min(3, 4) = 3 -> (1/3) / 3 = 1/9; the wrong version: (1/3 + 2/5 + 3/6)/3
    assert map_at_k(q, db, 4, relevance=rel[None, :]) == pytest.approx(1 / 3)
    assert map_at_k(q, db, 4, relevance=rel[None, :], norm="min_rk") == pytest.approx(1 / 9)
    assert _wrong_map_at_k(rel, 4) == pytest.approx((1 / 3 + 2 / 5 + 3 / 6) / 3)
    assert average_precision(rel, 4) == pytest.approx(1 / 3)
    # k >= n_db: mAP@k equals mAP@all
    assert map_at_k(q, db, 10, relevance=rel[None, :]) == pytest.approx(average_precision(rel))


# --- chunking and memory ---------------------------------------------------------------------
def _random_case(seed: int, nq: int, n: int, bits: int, n_labels: int = 5):
    rng = np.random.default_rng(seed)
    q = rng.choice([-1, 1], size=(nq, bits)).astype(np.int8)
    db = rng.choice([-1, 1], size=(n, bits)).astype(np.int8)
    lq = (rng.random((nq, n_labels)) < 0.3).astype(np.uint8)
    ldb = (rng.random((n, n_labels)) < 0.3).astype(np.uint8)
    return q, db, lq, ldb


def test_chunked_equals_unchunked():
    q, db, lq, ldb = _random_case(0, 37, 300, 16)
    kw = {"query_labels": lq, "db_labels": ldb, "ks": (1, 10, 100), "map_ks": (50,), "ndcg_ks": (10,)}
    whole = evaluate_retrieval(q, db, chunk_size=37, **kw)
    for chunk in (1, 5, None):
        part = evaluate_retrieval(q, db, chunk_size=chunk, max_chunk_elements=1000, **kw)
        for key, v in whole.items():
            if isinstance(v, float):
                assert part[key] == pytest.approx(v, abs=1e-12), (chunk, key)
        np.testing.assert_allclose(part["pr_radius"]["precision"], whole["pr_radius"]["precision"])


def test_stable_map_matches_a_plain_reference():
    q, db, lq, ldb = _random_case(1, 20, 200, 16)
    d = (q[:, None, :] != db[None, :, :]).sum(axis=2)
    aps = []
    for i in range(len(q)):
        order = np.argsort(d[i], kind="stable")
        aps.append(average_precision((lq[i] @ ldb.T > 0)[order]))
    assert map_at_all(q, db, query_labels=lq, db_labels=ldb) == pytest.approx(np.mean(aps))


@pytest.mark.slow
def test_large_database_bounded_memory():
    """200,000 x 2,000 queries, 16-bit codes: the peak stays far below one full distance matrix."""
    rng = np.random.default_rng(0)
    n, nq = 200_000, 2_000
    db = rng.integers(0, 256, size=(n, 2), dtype=np.uint8)
    q = rng.integers(0, 256, size=(nq, 2), dtype=np.uint8)
    ldb = (rng.random((n, 8)) < 0.2).astype(np.uint8)
    lq = (rng.random((nq, 8)) < 0.2).astype(np.uint8)
    tracemalloc.start()
    try:
        res = evaluate_retrieval(q, db, query_labels=lq, db_labels=ldb, ks=(100,), stable=False,
                                 pr_radius=False, per_query=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_matrix_bytes = nq * n  # even at one byte per entry
    assert peak < full_matrix_bytes / 8, f"peak {peak / 1e6:.0f} MB"
    assert res["n_query"] == nq and 0.0 < res["map_tie"] < 1.0
    few = evaluate_retrieval(q[:3], db, query_labels=lq[:3], db_labels=ldb, ks=(100,), stable=False,
                             pr_radius=False, per_query=True, chunk_size=3)
    np.testing.assert_allclose(res["per_query"]["map_tie"][:3], few["per_query"]["map_tie"])


# --- relevance variants and other metrics ----------------------------------------------------
def test_queries_without_relevant_items_count_zero():
    q, db, lq, ldb = _random_case(2, 10, 50, 8)
    lq_none = np.concatenate([lq, np.zeros_like(lq)])  # 10 more queries with no label at all
    q2 = np.concatenate([q, q])
    base = evaluate_retrieval(q, db, query_labels=lq, db_labels=ldb)
    both = evaluate_retrieval(q2, db, query_labels=lq_none, db_labels=ldb)
    assert both["n_query_no_relevant"] >= 10
    assert both["map"] == pytest.approx(base["map"] / 2)
    assert both["map_tie"] == pytest.approx(base["map_tie"] / 2)


def test_same_image_relevance_with_keys():
    # 2 query images, database of 4 captions (2 per image) -> keys say which image a caption is of
    q = np.array([[1, 1, 1, 1, 1, 1, 1, 1], [-1, -1, -1, -1, -1, -1, -1, -1]], np.int8)
    db = np.array([[1] * 8, [-1] * 8, [1] * 7 + [-1], [-1] * 7 + [1]], np.int8)
    db_keys = ["img_a", "img_b", "img_b", "img_a"]
    res = evaluate_retrieval(q, db, query_keys=["img_a", "img_b"], db_keys=db_keys, ks=(1, 2), per_query=True)
    # q0: d = [0, 8, 1, 7] -> ranking c0 R, c2 N, c3 R, c1 N -> AP = (1/1 + 2/3)/2 = 5/6
    # q1: d = [8, 0, 7, 1] -> ranking c1 R, c3 N, c2 R, c0 N -> AP = 5/6
    np.testing.assert_allclose(res["per_query"]["map"], [5 / 6, 5 / 6])
    assert res["p@1"] == 1.0 and res["p@2"] == 0.5 and res["r@2"] == 0.5


def test_ndcg_known_value():
    # graded relevance = shared labels; ranking gains [2, 0, 1]:
    # DCG = 2/log2(2) + 0/log2(3) + 1/log2(4) = 2.5; ideal [2, 1, 0]: 2 + 1/log2(3)
    q = np.ones((1, 8), np.int8)
    db = np.ones((3, 8), np.int8)
    db[1, :1] = -1
    db[2, :2] = -1
    lq, ldb = np.array([[1, 1, 0]]), np.array([[1, 1, 0], [0, 0, 1], [1, 0, 1]])
    want = 2.5 / (2 + 1 / math.log2(3))
    assert ndcg_at_k(q, db, 3, query_labels=lq, db_labels=ldb) == pytest.approx(want)
    assert ndcg_at_k(q, db, 3, query_labels=lq, db_labels=ldb, tie_aware=True) == pytest.approx(want)
    # k = 1: top item has the best gain -> 1.0
    assert ndcg_at_k(q, db, 1, query_labels=lq, db_labels=ldb) == pytest.approx(1.0)
    # exponential gains: (3 + 1/2) / (3 + 1/log2(3))
    got = evaluate_retrieval(q, db, query_labels=lq, db_labels=ldb, ks=(3,), ndcg_gain="exp")["ndcg@3"]
    assert got == pytest.approx(3.5 / (3 + 1 / math.log2(3)))


def test_pr_by_radius_hand_case():
    # q2 of the hand example: d = [2,1,2,1,2,3], relevant b1 and b2 (R = 2)
    # r=0: nothing (P 0 by convention, R 0); r=1: {b1,b3} P 1/2 R 1/2;
    # r=2: {b0..b4} P 2/5 R 1; r>=3: all six P 2/6 R 1
    precision, recall = pr_by_radius(Q[2:3], DB, query_labels=Q_LABELS[2:3], db_labels=DB_LABELS)
    np.testing.assert_allclose(precision, [0, 0.5, 0.4, 2 / 6, 2 / 6])
    np.testing.assert_allclose(recall, [0, 0.5, 1, 1, 1])
    assert precision_within_radius(Q[2:3], DB, query_labels=Q_LABELS[2:3], db_labels=DB_LABELS) == 0.4
    # q3 alone: nothing relevant, everything beyond radius 1 is retrieved -> precision 0 everywhere
    p3, _ = pr_by_radius(Q[3:4], DB, query_labels=Q_LABELS[3:4], db_labels=DB_LABELS)
    assert not p3.any()


def test_precision_and_recall_at_k():
    # q0 stable ranking b0 R, b1 N, b5 N, b2 R, b3 N, b4 R: P@4 = 2/4, R@4 = 2/3
    assert precision_at_k(Q[:1], DB, 4, query_labels=Q_LABELS[:1], db_labels=DB_LABELS) == 0.5
    assert recall_at_k(Q[:1], DB, 4, query_labels=Q_LABELS[:1], db_labels=DB_LABELS) == pytest.approx(2 / 3)


def test_float_cosine_ranking():
    # query along x; database angles 0, 90, 45, 180 degrees (lengths vary: cosine ignores them)
    q = np.array([[1.0, 0.0]])
    db = np.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-2.0, 0.0]])
    rel = np.array([[0, 1, 1, 0]])
    # order: db0 (cos 1) N, db2 (0.71) R, db1 (0) R, db3 (-1) N -> AP = (1/2 + 2/3)/2 = 7/12
    res = evaluate_retrieval(q, db, relevance=rel, metric="cosine", ks=(2,))
    assert res["map"] == pytest.approx(7 / 12) and res["map_tie"] == pytest.approx(7 / 12)
    assert "pr_radius" not in res
    # an exact float tie (duplicate vector): tie-aware averages both orders
    db_tie = np.array([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    res = evaluate_retrieval(q, db_tie, relevance=np.array([[0, 1, 0]]), metric="cosine", ks=(1,))
    assert res["map"] == pytest.approx(0.5) and res["map_tie"] == pytest.approx(0.75)
    assert res["p@1_tie"] == pytest.approx(0.5)


def test_weighted_hamming_equals_numpy_reference():
    q, db, lq, ldb = _random_case(3, 15, 120, 16)
    w = np.random.default_rng(3).random(16) * 2
    d = weighted_hamming(q, db, w)
    ref = np.sum(w * (q[:, None, :] != db[None, :, :]), axis=2)
    np.testing.assert_allclose(d, ref)
    aps = [average_precision((lq[i] @ ldb.T > 0)[np.argsort(np.round(ref[i], 9), kind="stable")])
           for i in range(len(q))]
    got = evaluate_retrieval(q, db, query_labels=lq, db_labels=ldb, bit_weights=w, per_query=True)
    np.testing.assert_allclose(got["per_query"]["map"], aps)
    # unit weights reproduce plain Hamming, stable and tie-aware
    plain = evaluate_retrieval(q, db, query_labels=lq, db_labels=ldb, ks=(10,))
    unit = evaluate_retrieval(pack_codes(q), pack_codes(db), query_labels=lq, db_labels=ldb, ks=(10,),
                              bit_weights=np.ones(16))
    for key in ("map", "map_tie", "p@10", "p@10_tie"):
        assert unit[key] == pytest.approx(plain[key]), key


def test_evaluate_directions_four_ways():
    q, db, lq, ldb = _random_case(4, 12, 40, 16)
    q_txt, db_txt = -q, -db  # text codes: all bits flipped; so t2t == i2i and i2t scores distances 16 - d
    res = evaluate_directions({"query_image": q, "query_text": q_txt, "db_image": db, "db_text": db_txt},
                              query_labels=lq, db_labels=ldb, ks=(5,))
    assert set(res) == {"i2t", "t2i", "i2i", "t2t"}
    assert res["i2i"]["map"] == pytest.approx(res["t2t"]["map"])
    assert res["i2i"]["map"] == pytest.approx(map_at_all(q, db, query_labels=lq, db_labels=ldb))
    assert res["i2t"]["map"] == pytest.approx(map_at_all(q, db_txt, query_labels=lq, db_labels=ldb))
    # keyword form, per-modality keys (two captions per database image)
    keys = np.arange(40)
    out = evaluate_directions(query_image=q[:4], db_text=np.concatenate([db_txt, db_txt]),
                              query_keys=keys[:4], db_keys={"text": np.concatenate([keys, keys])},
                              directions=("i2t",), ks=())
    assert list(out) == ["i2t"] and 0.0 <= out["i2t"]["map"] <= 1.0
    with pytest.raises(KeyError, match="db_image"):
        evaluate_directions({"query_image": q}, query_labels=lq, db_labels=ldb, directions=("i2i",))


# --- what a user sees: typed words, top-k lists, the codes themselves ------------------------
def test_concept_words_hand_case():
    names = ["subgroup:face-smiling", "word:cat", "animals", "word:Cat", "label_0", "subgroup:heart",
             "word:heart", "kind:two words", "x:café", "sky2", "a:b:c"]
    # hyphen, underscore and digit, space, second colon: not one word; repeats kept once
    assert concept_words(names) == ["cat", "animals", "heart", "café"]
    assert concept_words([]) == []


def test_word_relevance_matches_whole_words_only():
    captions = [["a black cat", "kitty"], ["cats on a mat"], ["Cat's toy"], "cat-face", []]
    rel = word_relevance(captions, ["cat", "mat"])
    # "cats" and "cat's" are other tokens; "cat-face" splits at the hyphen; a string is one caption
    np.testing.assert_array_equal(rel, [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0]])
    assert rel.dtype == bool


# 6 database images, 4-bit codes; the word codes tie with several of them
KW_DB = np.array([[1, 1, 1, 1], [1, 1, 1, -1], [1, 1, -1, 1], [-1, -1, -1, -1], [1, -1, 1, 1], [1, 1, 1, 1]],
                 dtype=np.int8)
KW_WORDS = np.array([[1, 1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, 1]], dtype=np.int8)
# w0: d = [0,1,1,4,1,0] -> stable b0 b5 | b1 b2 b4 | b3; relevant {b1, b3}
#     P@3 stable: b0 b5 b1 -> 1/3; tie-aware: 2 of the d=0 pair (none relevant) + 1 of {b1,b2,b4}
#     (one relevant) -> 1/3 expected hits -> 1/9
# w1: d = [4,3,3,0,3,4] -> stable b3 | b1 b2 b4 | b0 b5; relevant {b2, b3}
#     P@3 stable: b3 b1 b2 -> 2/3; tie-aware: b3 + 2 of {b1,b2,b4} (one relevant) -> 5/3 hits -> 5/9
# w2: no relevant image: not judged, left out of the means
KW_REL = np.array([[0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=bool)


def test_keyword_precision_hand_case_with_ties():
    res = keyword_precision(KW_WORDS, KW_DB, KW_REL, k=3)
    assert res["p@3"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert res["p@3_tie"] == pytest.approx((1 / 9 + 5 / 9) / 2)
    assert res["ceiling"] == pytest.approx(2 / 3)  # min(R, 3) / 3 with R = 2 for both judged words
    assert (res["n_words"], res["n_words_no_relevant"], res["n_db"]) == (2, 1, 6)
    np.testing.assert_allclose(res["per_word"]["p@3"], [1 / 3, 2 / 3, 0])
    np.testing.assert_array_equal(res["per_word"]["n_relevant"], [2, 2, 0])
    # packed codes and a k beyond the database give the same kind of answer
    packed = keyword_precision(as_packed(KW_WORDS), as_packed(KW_DB), KW_REL, k=3)
    assert packed["p@3"] == pytest.approx(res["p@3"])
    assert keyword_precision(KW_WORDS, KW_DB, KW_REL, k=50)["p@50"] == pytest.approx(2 / 6)


def test_rank_top_k_hand_case_and_brute_force():
    idx, dist = rank_top_k(KW_WORDS, KW_DB, 3)
    np.testing.assert_array_equal(idx, [[0, 5, 1], [3, 1, 2], [0, 5, 1]])
    np.testing.assert_array_equal(dist, [[0, 0, 1], [0, 3, 3], [0, 0, 1]])
    assert rank_top_k(KW_WORDS, KW_DB, 99)[0].shape == (3, 6)
    rng = np.random.default_rng(7)
    q, db = rng.choice([-1, 1], (9, 12)).astype(np.int8), rng.choice([-1, 1], (70, 12)).astype(np.int8)
    w = rng.random(12)
    refs = {"plain": (None, np.sum(q[:, None] != db[None], axis=2)),
            "weighted": (w, np.round(weighted_hamming(q, db, w), 9))}
    for weights, ref in refs.values():
        got, d = rank_top_k(q, db, 10, bit_weights=weights, chunk_size=2)
        want = np.argsort(ref, axis=1, kind="stable")[:, :10]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(d, np.take_along_axis(ref, want, axis=1))
    with pytest.raises(ValueError, match="k must be"):
        rank_top_k(q, db, 0)


def test_code_statistics_hand_case_and_brute_force():
    st = code_statistics(np.array([[1, 1, 1], [1, 1, 1], [1, -1, 1], [-1, -1, 1]], dtype=np.int8))
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # bit 0: +1 for 3 of 4 items
    assert (st["n_items"], st["bits"], st["n_distinct"], st["largest_group"]) == (4, 3, 3, 2)
    assert st["bit_entropy"] == pytest.approx((h + 1.0 + 0.0) / 3)  # bit 2 is constant: 0, not NaN
    assert st["bit_entropy_min"] == 0.0
    rng = np.random.default_rng(1)
    codes = rng.choice([-1, 1], (200, 16)).astype(np.int8)
    codes[50:120] = codes[0]  # a big group
    st = code_statistics(pack_codes(codes))
    groups = Counter(map(tuple, codes.tolist()))
    assert st["n_distinct"] == len(groups) and st["largest_group"] == max(groups.values())
    p = (codes > 0).mean(axis=0)
    assert st["bit_entropy"] == pytest.approx(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))
    assert code_statistics(np.zeros((0, 8), np.int8))["n_distinct"] == 0


def _own_ranks(codes, weights=None):
    """Stable rank of each item among all when its own code is the query (numpy reference)."""
    if weights is None:
        d = np.sum(codes[:, None] != codes[None], axis=2)
    else:
        d = np.round(weighted_hamming(codes, codes, weights), 9)
    order = np.argsort(d, axis=1, kind="stable")
    return np.array([int(np.flatnonzero(order[i] == i)[0]) + 1 for i in range(len(codes))])


def test_self_rank_equals_brute_force_over_every_tie_order():
    codes = np.array([[1, 1, 1], [1, -1, 1], [1, 1, 1], [-1, -1, 1], [1, 1, 1], [1, -1, 1]], dtype=np.int8)
    res = self_rank(codes, ks=(1, 2), per_item=True)
    # stable: the three copies of (1,1,1) come 1st, 2nd, 3rd in database order; (1,-1,1) twice: 1st, 2nd
    np.testing.assert_array_equal(res["per_item"]["rank"], [1, 1, 2, 1, 3, 2])
    np.testing.assert_array_equal(res["per_item"]["rank"], _own_ranks(codes))
    perms = [np.array(p) for p in itertools.permutations(range(6))]
    ranks = np.zeros((len(perms), 6))
    for j, perm in enumerate(perms):  # database in every order: rank of each original item
        ranks[j, perm] = _own_ranks(codes[perm])
    np.testing.assert_allclose(res["per_item"]["rank_tie"], ranks.mean(axis=0))
    for k in (1, 2):
        assert res[f"top{k}_tie"] == pytest.approx(np.mean(ranks <= k))
        assert res[f"top{k}"] == pytest.approx(np.mean(res["per_item"]["rank"] <= k))
    assert res["top1"] == pytest.approx(3 / 6)  # one first item per distinct code
    assert res["mean_rank"] == pytest.approx(10 / 6) and res["mean_rank_tie"] == pytest.approx(10 / 6)


def test_self_rank_random_and_weighted_against_reference():
    rng = np.random.default_rng(5)
    codes = rng.choice([-1, 1], (90, 6)).astype(np.int8)  # 6 bits, 90 items: many duplicates
    w = rng.random(6)
    w[2] = 0.0  # a bit that does not count: codes differing only there tie at distance 0
    for weights in (None, w):
        res = self_rank(codes, ks=(1, 10), bit_weights=weights, chunk_size=7, per_item=True)
        ref = _own_ranks(codes, weights)
        np.testing.assert_array_equal(res["per_item"]["rank"], ref)
        assert res["top10"] == pytest.approx(np.mean(ref <= 10))
        assert res["median_rank"] == pytest.approx(np.median(ref))


# --- explicit relevance matrices: binary metrics see "> 0", NDCG sees the graded values --------
def test_fractional_relevance_is_relevant_for_every_binary_metric():
    # reported against hashing repos' evaluation code: graded relevance rounded away
    # (a 0.5 similarity rounded to 0 gave mAP 0 with NDCG on and 1 with it off)
    q, db = np.ones((1, 8), np.int8), np.ones((1, 8), np.int8)
    for ndcg_ks in ((1,), ()):
        res = evaluate_retrieval(q, db, relevance=[[0.5]], ks=(1,), ndcg_ks=ndcg_ks)
        assert res["map"] == 1.0 and res["map_tie"] == 1.0
        assert res["p@1"] == 1.0 and res["r@1"] == 1.0 and res["n_query_no_relevant"] == 0
        assert res["pr_radius"]["precision"][0] == 1.0
    assert evaluate_retrieval(q, db, relevance=[[0.5]])["map"] == 1.0  # defaults: NDCG on
    assert map_at_all(q, db, relevance=[[0.5]]) == 1.0  # NDCG off
    assert ndcg_at_k(q, db, 1, relevance=[[0.5]]) == 1.0


def test_graded_matrix_hand_case():
    # one query, items at Hamming distance 0, 1, 2 with graded relevance 0.5, 0, 2.0 (and -1 = not)
    q = np.ones((1, 8), np.int8)
    db = np.ones((4, 8), np.int8)
    db[1, :1] = db[2, :2] = db[3, :3] = -1
    rel = np.array([[0.5, 0.0, 2.0, -1.0]])
    res = evaluate_retrieval(q, db, relevance=rel, ks=(1, 2, 4), map_ks=(2,))
    assert res["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # relevant at ranks 1 and 3
    assert res["map@2"] == 1.0 and res["p@2"] == 0.5 and res["r@2"] == 0.5 and res["r@4"] == 1.0
    # NDCG, linear gains = the values: DCG@4 = 0.5 + 0 + 2 / log2(4); ideal [2, 0.5, 0, 0]
    assert res["ndcg@4"] == pytest.approx(1.5 / (2 + 0.5 / math.log2(3)))
    assert res["ndcg@4_tie"] == pytest.approx(res["ndcg@4"])  # no ties
    # exponential gains 2^g - 1
    got = evaluate_retrieval(q, db, relevance=rel, ks=(4,), ndcg_gain="exp")["ndcg@4"]
    g_half = math.sqrt(2) - 1
    assert got == pytest.approx((g_half + 3 / 2) / (3 + g_half / math.log2(3)))


def test_relevance_matrix_with_non_finite_values_is_refused():
    # reported against hashing repos' evaluation code: NaN similarities silently counted as relevant
    q, db = np.ones((1, 8), np.int8), np.ones((2, 8), np.int8)
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite"):
            evaluate_retrieval(q, db, relevance=[[1.0, bad]])


def test_shared_label_matrix_equals_the_labels_path():
    counts = Q_LABELS @ DB_LABELS.T  # graded relevance = number of shared labels
    by_labels = evaluate_retrieval(Q, DB, **HAND, ks=(1, 3), map_ks=(3,))
    by_matrix = evaluate_retrieval(Q, DB, relevance=counts, ks=(1, 3), map_ks=(3,))
    floats = {k: v for k, v in by_labels.items() if isinstance(v, float)}
    assert floats and floats == pytest.approx({k: by_matrix[k] for k in floats})


@pytest.mark.parametrize("n_db", [40, 400])  # 400: more distinct graded values than 256 in one block
def test_many_graded_values_against_a_numpy_reference(n_db):
    rng = np.random.default_rng(3)
    q, db = rng.choice([-1, 1], (5, 8)).astype(np.int8), rng.choice([-1, 1], (n_db, 8)).astype(np.int8)
    rel = np.where(rng.random((5, n_db)) < 0.4, 0.0, rng.random((5, n_db)))
    res = evaluate_retrieval(q, db, relevance=rel, ks=(10,), per_query=True)
    binary = evaluate_retrieval(q, db, relevance=rel > 0, ks=(10,), ndcg_ks=())
    for key in ("map", "map_tie", "p@10", "p@10_tie", "r@10"):
        assert res[key] == pytest.approx(binary[key])
    d = (q[:, None, :] != db[None, :, :]).sum(axis=2)
    disc = 1 / np.log2(np.arange(2, 12))
    for i in range(5):
        gains = rel[i][np.argsort(d[i], kind="stable")][:10]
        ideal = np.sort(rel[i])[::-1][:10]
        assert res["per_query"]["ndcg@10"][i] == pytest.approx(gains @ disc / (ideal @ disc))
        # tie-aware: each tie group contributes its mean gain at each of its positions
        order = np.argsort(d[i], kind="stable")
        mean_gain = {v: rel[i][d[i] == v].mean() for v in np.unique(d[i])}
        expected = np.array([mean_gain[v] for v in d[i][order]])[:10]
        assert res["per_query"]["ndcg@10_tie"][i] == pytest.approx(expected @ disc / (ideal @ disc))


# --- precision-recall by radius: mean over queries, and pooled over all pairs ----------------------
def test_pr_by_radius_mean_and_pooled_hand_case():
    # q0: d = [0,1,2,3,4,1], relevant b0, b2, b4 (R = 3): within r = 0..4 -> items 1,3,4,5,6, hits 1,1,2,2,3
    # q2: d = [2,1,2,1,2,3], relevant b1, b2 (R = 2):    within r = 0..4 -> items 0,2,5,6,6, hits 0,1,2,2,2
    q, lab = Q[[0, 2]], Q_LABELS[[0, 2]]
    kw = {"query_labels": lab, "db_labels": DB_LABELS}
    precision, recall = pr_by_radius(q, DB, **kw)
    np.testing.assert_allclose(precision, [(1 + 0) / 2, (1 / 3 + 1 / 2) / 2, (2 / 4 + 2 / 5) / 2,
                                           (2 / 5 + 2 / 6) / 2, (3 / 6 + 2 / 6) / 2])  # fmt: skip
    np.testing.assert_allclose(recall, [(1 / 3 + 0) / 2, (1 / 3 + 1 / 2) / 2, (2 / 3 + 1) / 2,
                                        (2 / 3 + 1) / 2, 1])  # fmt: skip
    pooled_p, pooled_r = pr_by_radius(q, DB, pooled=True, **kw)
    np.testing.assert_allclose(pooled_p, [1 / 1, 2 / 5, 4 / 9, 4 / 11, 5 / 12])
    np.testing.assert_allclose(pooled_r, [1 / 5, 2 / 5, 4 / 5, 4 / 5, 5 / 5])
    assert precision_within_radius(q, DB, pooled=True, **kw) == pytest.approx(4 / 9)
    assert precision_within_radius(q, DB, **kw) == pytest.approx(0.45)
    res = evaluate_retrieval(q, DB, **kw)
    assert res["pr_radius_pooled"]["precision"] == pytest.approx(pooled_p.tolist())
    # one query: pooling changes nothing
    one = evaluate_retrieval(Q[2:3], DB, query_labels=Q_LABELS[2:3], db_labels=DB_LABELS)
    for key in ("precision", "recall"):
        assert one["pr_radius_pooled"][key] == pytest.approx(one["pr_radius"][key])
