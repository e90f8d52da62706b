"""Hamming ties in the engine: broken by the continuous query code, checked against a numpy scan."""

from __future__ import annotations

from itertools import combinations, cycle

import numpy as np
import pytest

from crossmodal.codes import hamming_distances, pack_codes, unpack_codes
from crossmodal.data import open_dataset
from crossmodal.index import create_index
from crossmodal.runs.encode import open_run_data
from crossmodal.serving import RetrievalEngine
from crossmodal.serving.engine import _tie_shortlist

BITS = 16


@pytest.fixture(scope="module")
def items(tiny_run):
    """The tiny dataset and its database item ids."""
    return open_dataset("tiny_colours"), [int(i) for i in open_run_data(tiny_run).splits["database"]]


def brute_force(index, cont: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every database item ranked by (Hamming distance, -<cont, code>, id): ``(ids, dist, score)``."""
    ids = index.ids()
    codes = index.reconstruct(ids)
    dist = hamming_distances(pack_codes(cont[None]), codes)[0]
    score = unpack_codes(codes, index.bits).astype(np.float64) @ cont.astype(np.float64)
    _, first, inv = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    score = score[first][inv.ravel()]  # identical codes score exactly alike
    order = np.lexsort((ids, -score, dist))
    return ids[order], dist[order], score[order]


def queries(engine, items) -> list[tuple[str, object, np.ndarray]]:
    """``(source, query, continuous code)``: captions, a colour word and images of the database."""
    dataset, db = items
    texts = ["red", "a blue star", dataset.captions(db[5])[0], dataset.captions(db[30])[0]]
    images = [dataset.load_image(db[i]) for i in (0, 7, 41)]
    return [("text", t, c) for t, c in zip(texts, engine.encode_texts(texts, binarize=False))] + [
        ("image", im, c) for im, c in zip(images, engine.encode_images(images, binarize=False))
    ]


def search(engine, source: str, query, target: str, k: int):
    if source == "text":
        return engine.search_text(query, k) if target == "image" else engine.similar_texts(query, k)
    return engine.similar_images(query, k) if target == "image" else engine.search_image(query, k)


def hit_ids(result, target: str) -> list[int]:
    return [h.item_id if target == "image" else h.text_id for h in result.hits]


def test_continuous_codes_sign_to_the_packed_codes(engine, items):
    dataset, db = items
    texts, images = ["red", "a green circle"], [dataset.load_image(db[0])]
    pairs = [(engine.encode_texts(texts), engine.encode_texts(texts, binarize=False)),
             (engine.encode_images(images), engine.encode_images(images, binarize=False))]  # fmt: skip
    for packed, cont in pairs:
        assert cont.dtype == np.float32 and cont.shape == (len(packed), BITS)
        np.testing.assert_array_equal(pack_codes(cont), packed)


@pytest.mark.parametrize("target", ["image", "text"])
def test_hits_are_sorted_by_distance_then_by_the_continuous_score(engine, items, target):
    index = engine.indexes[target]
    for source, query, cont in queries(engine, items):
        ids, dist, score = brute_force(index, cont)
        by_id = {int(i): (int(d), s) for i, d, s in zip(ids, dist, score)}
        result = search(engine, source, query, target, 25)
        keys = [by_id[i] for i in hit_ids(result, target)]
        assert [h.distance for h in result.hits] == [float(d) for d, _ in keys]  # integer Hamming
        assert all(a[0] < b[0] or (a[0] == b[0] and a[1] >= b[1]) for a, b in zip(keys, keys[1:])), keys


@pytest.mark.parametrize("target", ["image", "text"])
@pytest.mark.parametrize("k", [1, 3, 10, 10_000])
def test_top_k_equals_the_brute_force_ranking(engine, items, target, k):
    index = engine.indexes[target]
    for source, query, cont in queries(engine, items):
        ids, dist, _ = brute_force(index, cont)
        result = search(engine, source, query, target, k)
        assert hit_ids(result, target) == ids[:k].tolist(), (source, k)
        assert [h.distance for h in result.hits] == dist[:k].astype(float).tolist()


@pytest.mark.parametrize("source", ["image", "text"])
def test_own_image_comes_first_among_items_at_its_distance(tiny_run, items, source):
    """The own item's code differs from the query's sign in the two bits the query is least sure
    of; 27 other items differ in other pairs of its 8 least sure bits, all at distance 2. FAISS
    puts the own item (the highest id) last among them; the engine must put it first."""
    dataset, db = items
    own = db[-1]
    engine = RetrievalEngine.load(tiny_run)
    try:
        if source == "image":
            query = dataset.load_image(own)
            cont = engine.encode_images([query], binarize=False)[0]
        else:
            query = dataset.captions(own)[0]
            cont = engine.encode_texts([query], binarize=False)[0]
        unsure = np.argsort(np.abs(cont))[:8]
        assert len(set(np.abs(cont[unsure]).tolist())) == 8  # distinct, so the order is strict
        pairs = [list(p) for p in combinations(unsure, 2) if set(p) != set(unsure[:2])]
        signs = np.where(cont >= 0, 1, -1)
        codes = np.stack([signs * np.where(np.isin(np.arange(BITS), p), -1, 1) for p in pairs + [unsure[:2]]])
        others = [i for i in db if i != own][: len(pairs)]
        index = create_index("flat", BITS)
        index.add(pack_codes(codes), [*others, own])
        engine.indexes["image"] = index

        _, faiss_ids = index.search(pack_codes(cont[None]), 1)
        assert faiss_ids[0, 0] != own  # without the tie-break the own item would not be first
        result = search(engine, source, query, "image", 5)
        assert result.hits[0].item_id == own
        assert [h.distance for h in result.hits] == [2.0] * 5
        assert hit_ids(result, "image") == brute_force(index, cont)[0][:5].tolist()
    finally:
        engine.close()


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])  # range search, range search, 4x searches
def test_the_shortlist_grows_until_the_tie_is_complete(kind):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 2, BITS) * 2 - 1
    near = np.tile(q, (300, 1))  # 300 items at distance 2, each differing in a pair of bits
    for row, (a, b) in zip(near, cycle(combinations(range(BITS), 2))):
        row[[a, b]] *= -1
    far = -np.tile(q, (50, 1))  # 50 at distance 16
    index = create_index(kind, BITS)
    index.add(pack_codes(np.concatenate([far, near])), rng.permutation(350))
    packed = pack_codes(q[None])

    ((dist, ids),) = _tie_shortlist(index, packed, 1, limit=4096)  # first fetch: 65 items
    assert len(ids) == 300 and set(dist.tolist()) == {2}
    ((dist, ids),) = _tie_shortlist(index, packed, 1, limit=100)  # a tie cut 100 items past the first
    assert len(ids) == 101 and set(dist.tolist()) == {2}
    ((dist, ids),) = _tie_shortlist(index, packed, 340, limit=10)  # the 340th ties the 50 far items
    assert dist[-1] == 16 and len(set(ids.tolist())) == len(ids)
    assert len(ids) == 350 or (kind == "hnsw" and len(ids) >= 340)  # HNSW loses some duplicates

    empty = create_index(kind, BITS)
    ((dist, ids),) = _tie_shortlist(empty, packed, 1, limit=10)
    assert len(ids) == 0
