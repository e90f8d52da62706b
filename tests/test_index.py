from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from crossmodal.codes import hamming_distances, pack_codes
from crossmodal.index import (
    PAD_DISTANCE,
    BinaryIndex,
    IndexFileError,
    ReadOnlyIndexError,
    create_index,
    list_index_kinds,
    range_search_kinds,
    sidecar_path,
)
from crossmodal.registry import UnknownNameError

BITS = 64
N = 1500
KINDS = list_index_kinds()


def clustered_codes(n: int, bits: int, n_centres: int = 25, flip: float = 0.04, seed: int = 0) -> np.ndarray:
    """Packed codes around random centres with a few bits flipped: neighbours are close."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2, size=(n_centres, bits))
    bits01 = centres[rng.integers(0, n_centres, n)] ^ (rng.random((n, bits)) < flip)
    return pack_codes(bits01 * 2 - 1)


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    # OpenMP threads spin against each other on a busy 2-core machine: 8x slower tests.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    db = clustered_codes(N, BITS)
    ids = np.arange(N, dtype=np.int64) * 7 + 3  # external ids unlike positions
    queries = db[:20] ^ np.uint8(1)  # 8 bits away from database items
    return db, ids, queries, hamming_distances(queries, db)


def true_dist(ref: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Reference distance of each returned id (ids are 7 * pos + 3)."""
    rows = np.arange(ref.shape[0])[:, None]
    return ref[rows, (ids - 3) // 7]


def build(kind: str, db: np.ndarray, ids: np.ndarray, **params) -> BinaryIndex:
    index = create_index(kind, BITS, **params)
    index.add(db, ids)
    return index


def test_registry_lists_kinds_and_rejects_unknown():
    assert KINDS == ["flat", "hnsw", "ivf", "multihash"]
    with pytest.raises(UnknownNameError, match="flat, hnsw, ivf, multihash"):
        create_index("lsh", BITS)
    with pytest.raises(ValueError, match="unknown parameter"):
        create_index("flat", BITS, nprobe=3)
    with pytest.raises(ValueError, match="bits=12"):
        create_index("flat", 12)


def test_flat_equals_reference_exactly(data):
    db, ids, q, ref = data
    dist, got = build("flat", db, ids).search(q, 10)
    assert dist.dtype == np.int32 and got.dtype == np.int64 and got.shape == (20, 10)
    np.testing.assert_array_equal(dist, np.sort(ref, axis=1)[:, :10])
    np.testing.assert_array_equal(true_dist(ref, got), dist)


def test_ivf_full_probe_equals_flat(data):
    db, ids, q, ref = data
    index = build("ivf", db, ids)
    nlist = index.params["nlist"]
    assert 1 < nlist <= N // 39
    dist, got = index.search(q, 10, nprobe=nlist)
    np.testing.assert_array_equal(dist, np.sort(ref, axis=1)[:, :10])  # same multiset of distances
    np.testing.assert_array_equal(true_dist(ref, got), dist)


@pytest.mark.parametrize("kind", ["hnsw", "multihash", "ivf"])
def test_approximate_kinds_high_recall_and_true_distances(data, kind):
    db, ids, q, ref = data
    dist, got = build(kind, db, ids).search(q, 10)
    valid = got >= 0
    np.testing.assert_array_equal(true_dist(ref, np.where(valid, got, 3))[valid], dist[valid])
    # recall by distance, so ties do not count as misses: hits within the true 10th distance
    kth = np.sort(ref, axis=1)[:, 9:10]
    recall = ((dist <= kth) & valid).sum() / got.size
    assert recall >= 0.9, f"{kind} recall {recall:.2f}"


@pytest.mark.parametrize("kind", KINDS)
def test_padding_when_fewer_than_k(kind, data):
    db, ids, q, _ = data
    index = create_index(kind, BITS)
    dist, got = index.search(q[:2], 5)  # empty index
    assert (got == -1).all() and (dist == PAD_DISTANCE).all()
    index.add(db[:50], ids[:50])
    dist, got = index.search(db[:2], 60, nprobe=index.params.get("nlist"))
    assert got.shape == (2, 60)
    assert (got[:, :1] >= 0).all() and (got[:, 50:] == -1).all()
    assert (dist[got == -1] == PAD_DISTANCE).all()


@pytest.mark.parametrize("kind", KINDS)
def test_add_remove_never_returns_removed(kind, data):
    db, ids, q, ref = data
    index = build(kind, db, ids)
    removed = ids[: N // 3]
    assert index.remove(removed) == removed.size
    assert index.ntotal == N - removed.size
    dist, got = index.search(db[:30], 20, nprobe=index.params.get("nlist"))
    assert not np.isin(got, removed).any()
    assert (got[:, 0] >= 0).all()
    with pytest.raises(KeyError, match="not in the index"):
        index.remove(removed[:3])
    assert index.remove(removed[:3], missing_ok=True) == 0
    with pytest.raises(ValueError, match="already in the index"):
        index.add(db[-2:], ids[-2:])
    fresh = np.random.default_rng(9).integers(0, 256, size=(5, BITS // 8), dtype=np.uint8)
    index.add(fresh, removed[:5])  # ids can be reused after removal
    dist, got = index.search(fresh, 1, nprobe=index.params.get("nlist"))
    assert index.ntotal == N - removed.size + 5
    assert got[:, 0].tolist() == removed[:5].tolist() and (dist[:, 0] == 0).all()


def test_tombstones_survive_save_and_compaction(tmp_path, data):
    db, ids, q, _ = data
    index = build("hnsw", db, ids)
    index.remove(ids[:10])
    index.save(tmp_path / "h.index")
    assert json.loads(sidecar_path(tmp_path / "h.index").read_text())["tombstones"] == ids[:10].tolist()
    loaded = BinaryIndex.load(tmp_path / "h.index")
    _, got = loaded.search(db[:10], 5)
    assert not np.isin(got, ids[:10]).any()
    loaded.remove(ids[10 : N // 2 + 10])  # past half: rebuilt without the dead codes
    assert loaded.faiss_index.ntotal == loaded.ntotal == N - N // 2 - 10


def test_tombstoned_neighbourhood_is_searched_past(data):
    db, ids, q, ref = data
    index = build("hnsw", db, ids)
    nearest = np.argsort(ref[0], kind="stable")[:400]  # far more dead than the first over-fetch
    index.remove(ids[nearest])
    assert index.faiss_index.ntotal == N  # still tombstones, not compacted
    dist, got = index.search(q[:1], 10)
    assert (got >= 0).all() and not np.isin(got, ids[nearest]).any()
    live_ref = np.delete(ref[0], nearest)
    np.testing.assert_array_equal(true_dist(ref[:1], got), dist)
    assert (dist[0] <= np.sort(live_ref)[9]).mean() >= 0.8


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(tmp_path, data, kind, mmap):
    db, ids, q, _ = data
    index = build(kind, db, ids)
    index.remove(ids[:7])
    path = tmp_path / f"{kind}.index"
    index.save(path)
    loaded = BinaryIndex.load(path, mmap=mmap, expected_bits=BITS)
    assert (loaded.kind, loaded.bits, loaded.ntotal, loaded.params) == (
        kind,
        BITS,
        index.ntotal,
        index.params,
    )
    for a, b in zip(index.search(q, 10), loaded.search(q, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.ids(), ids[7:])
    if mmap:
        with pytest.raises(ReadOnlyIndexError, match="mmap"):
            loaded.add(db[:1], [10**9])


def test_load_without_sidecar_derives_kind(tmp_path, data):
    db, ids, q, _ = data
    index = build("multihash", db, ids, nflip=1)
    index.save(tmp_path / "m.index")
    sidecar_path(tmp_path / "m.index").unlink()
    loaded = BinaryIndex.load(tmp_path / "m.index")
    assert loaded.kind == "multihash" and loaded.params["nflip"] == 1
    np.testing.assert_array_equal(loaded.search(q, 5)[1], index.search(q, 5)[1])


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("with_sidecar", [True, False])
def test_bad_files_raise_index_file_error(tmp_path, data, mmap, with_sidecar):
    db, ids, _, _ = data
    good = tmp_path / "good.index"
    build("flat", db, ids).save(good)
    blob = good.read_bytes()
    cases = {"truncated": blob[: len(blob) // 2], "empty": b"", "garbage": b"\x00junk" * 100}
    for name, content in cases.items():
        path = tmp_path / f"{name}.index"
        path.write_bytes(content)
        if with_sidecar:
            sidecar_path(path).write_bytes(sidecar_path(good).read_bytes())
        with pytest.raises(IndexFileError, match=str(path)):
            BinaryIndex.load(path, mmap=mmap)
    with pytest.raises(IndexFileError, match="expected 128 bits"):
        BinaryIndex.load(good, mmap=mmap, expected_bits=128)
    with pytest.raises(IndexFileError, match="does not exist"):
        BinaryIndex.load(tmp_path / "missing.index")


def test_range_search_inclusive_semantics(data):
    db, ids, q, ref = data
    index = build("flat", db, ids)
    radius = int(np.sort(ref[0])[5])  # a radius that items sit exactly on
    (d_in, i_in), *_ = index.range_search(q[:3], radius)
    (d_ex, i_ex), *_ = index.range_search(q[:3], radius, inclusive=False)
    assert set(i_in.tolist()) == set(ids[ref[0] <= radius].tolist())
    assert set(i_ex.tolist()) == set(ids[ref[0] < radius].tolist())
    assert d_in.max() == radius and (d_ex < radius).all()
    assert (np.diff(d_in) >= 0).all()  # sorted by distance
    np.testing.assert_array_equal(true_dist(ref[:1], i_in[None]), d_in[None])


@pytest.mark.parametrize("kind", ["ivf", "multihash"])
def test_range_search_other_kinds_and_removed(kind, data):
    db, ids, q, ref = data
    index = build(kind, db, ids, **({"nflip": 3} if kind == "multihash" else {}))
    index.remove(ids[:100])
    nprobe = index.params.get("nlist")
    for row, (dist, got) in enumerate(index.range_search(q[:5], 3, nprobe=nprobe)):
        assert not np.isin(got, ids[:100]).any()
        assert (dist <= 3).all()
        np.testing.assert_array_equal(true_dist(ref[row : row + 1], got[None])[0], dist)
        if kind == "ivf":  # all lists probed: exact
            expected = ids[(ref[row] <= 3) & (np.arange(N) >= 100)]
            assert set(got.tolist()) == set(expected.tolist())


def test_range_search_unsupported_names_supporting_kinds(data):
    db, ids, q, _ = data
    assert range_search_kinds() == ["flat", "ivf", "multihash"]
    with pytest.raises(NotImplementedError, match="flat, ivf, multihash"):
        build("hnsw", db, ids).range_search(q, 3)


def test_bad_inputs(data):
    db, ids, q, _ = data
    index = create_index("flat", BITS)
    with pytest.raises(ValueError, match=r"uint8 \[n, 8\]"):
        index.add(db[:, :4], ids)
    with pytest.raises(ValueError, match="duplicate ids"):
        index.add(db[:2], [5, 5])
    with pytest.raises(ValueError, match=">= 0"):
        index.add(db[:1], [-1])
    with pytest.raises(ValueError, match="2 ids for 3 codes"):
        index.add(db[:3], [1, 2])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "multihash"])
def test_reconstruct_returns_the_stored_codes(kind):
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (300, 8), dtype=np.uint8)
    ids = np.arange(300, dtype=np.int64) * 7 + 3
    index = create_index(kind, 64)
    index.train(codes)
    index.add(codes, ids)
    pick = rng.choice(300, 20, replace=False)
    np.testing.assert_array_equal(index.reconstruct(ids[pick]), codes[pick])
    with pytest.raises(KeyError, match="not in the index"):
        index.reconstruct([4])


def test_reconstruct_names_missing_ids_on_either_side_and_on_an_empty_index():
    codes = np.arange(24, dtype=np.uint8).reshape(3, 8)
    index = create_index("flat", 64)
    with pytest.raises(KeyError, match=r"\[5\]"):
        index.reconstruct([5])
    assert index.reconstruct([]).shape == (0, 8)
    index.add(codes, [10, 20, 30])
    for missing in ([0], [31], [15, 20]):
        with pytest.raises(KeyError, match="not in the index"):
            index.reconstruct(missing)
    np.testing.assert_array_equal(index.reconstruct([30, 10]), codes[[2, 0]])
    index.remove([20])
    with pytest.raises(KeyError, match=r"\[20\]"):
        index.reconstruct([20])


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruct_follows_adds_removals_compaction_and_mmap(tmp_path, kind, data):
    db, ids, _, _ = data
    index = build(kind, db[:600], ids[:600])
    np.testing.assert_array_equal(index.reconstruct(ids[:600][::-1]), db[:600][::-1])
    index.remove(ids[:400])  # tombstoned kinds compact past half
    index.add(db[600:700], ids[600:700])
    index.add(db[:10], ids[:10])  # re-added after removal
    keep = np.r_[0:10, 400:700]
    np.testing.assert_array_equal(index.reconstruct(ids[keep]), db[keep])
    with pytest.raises(KeyError, match="not in the index"):
        index.reconstruct(ids[10:12])
    index.save(tmp_path / "x.index")
    loaded = BinaryIndex.load(tmp_path / "x.index", mmap=True)
    np.testing.assert_array_equal(loaded.reconstruct(ids[keep][::7]), db[keep][::7])


def test_the_served_index_holds_every_item_query_split_included(tiny_run):
    """Evaluation keeps its query/database split; the index a user searches holds the whole
    collection, so no image is unfindable for being a query of the protocol."""
    import json

    from crossmodal.data import open_dataset
    from crossmodal.runs.encode import open_run_data
    from crossmodal.store import MetadataStore

    data = open_run_data(tiny_run)
    n = len(open_dataset("tiny_colours"))
    assert len(data.splits["query"]) > 0
    assert json.loads((tiny_run / "manifest.json").read_text())["index"]["items"] == n
    with MetadataStore.open(tiny_run / "store.sqlite") as store:
        assert sorted(store.item_ids()) == list(range(n))
