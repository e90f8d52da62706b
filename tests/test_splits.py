"""Seeded splits and dataset summaries (crossmodal.data.splits, crossmodal.data.info)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from crossmodal.data import CrossModalDataset, DatasetInfo, make_record
from crossmodal.data.info import describe, expected_random_ap, random_baseline, summary_stats
from crossmodal.data.splits import Splits, default_n_val, fit_protocol, make_splits

LABELS = ["cat", "dog", "sky"]


def make_dataset(tmp_path, n: int = 60, grouped: bool = True, name: str = "toy", relevance: str = "labels"):
    """``n`` items; with ``grouped``, items come in groups of 1, 2 or 3 (group sizes cycle)."""
    rng = np.random.default_rng(7)
    labels = (rng.random((n, 3)) < 0.35).astype(np.uint8)
    groups, g, left = [], 0, 1
    for _ in range(n):
        groups.append(f"g{g}" if grouped else "")
        left -= 1
        if left == 0:
            g += 1
            left = g % 3 + 1

    def rows():
        for i in range(n):
            lab = labels[i] if relevance == "labels" else None
            yield make_record(f"item{i:03d}", [f"caption {i}"] * (i % 3), labels=lab, group=groups[i])

    info = DatasetInfo(
        name=name,
        label_names=LABELS if relevance == "labels" else [],
        relevance=relevance,
        protocol={"n_query": 10, "n_train": 30},
    )
    return CrossModalDataset.from_records(
        rows, info, cache_dir=str(tmp_path / "c"), fingerprint=f"{name}{n}{relevance}"
    )


def group_of(ds: CrossModalDataset) -> np.ndarray:
    return np.asarray(ds.table["group"])


def test_splits_partition_and_groups(tmp_path):
    ds = make_dataset(tmp_path)
    s = make_splits(ds, seed=1)
    n = len(ds)
    assert s.sizes == {"query": 10, "database": 50, "train": 25, "val": 5}  # at least 5 held out
    assert not set(s.query) & set(s.database)
    assert sorted(set(s.query) | set(s.database)) == list(range(n))
    assert set(s.train) <= set(s.database) and set(s.val) <= set(s.database)
    assert not set(s.train) & set(s.val)
    groups = group_of(ds)
    assert not set(groups[s.query]) & set(groups[s.database])
    assert not set(groups[s.train]) & set(groups[s.val])
    for arr in (s.query, s.database, s.train, s.val):
        assert arr.dtype == np.int64 and np.all(np.diff(arr) > 0)


def test_splits_reproducible_from_seed(tmp_path):
    ds = make_dataset(tmp_path, grouped=False)
    a, b, c = make_splits(ds, seed=3), make_splits(ds, seed=3), make_splits(ds, seed=4)
    for name in ("query", "database", "train", "val"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.query.tolist() != c.query.tolist()
    assert len(a.query) == 10 and len(a.train) + len(a.val) == 30


def test_explicit_sizes_and_errors(tmp_path):
    ds = make_dataset(tmp_path, grouped=False)
    s = make_splits(ds, n_query=5, n_train=50, n_val=0)
    assert s.sizes == {"query": 5, "database": 55, "train": 50, "val": 0}
    with pytest.raises(ValueError, match=r"n_query=20 \+ n_train=50 = 70 items needed.*'toy' has only 60"):
        make_splits(ds, n_query=20, n_train=50)
    with pytest.raises(ValueError, match="n_val=30 must be smaller than n_train=30"):
        make_splits(ds, n_val=30)
    with pytest.raises(ValueError, match="n_query >= 1"):
        make_splits(ds, n_query=0)


def test_default_sizes():
    assert default_n_val(10000) == 1000
    assert default_n_val(100000) == 1000
    assert default_n_val(30) == 5
    assert default_n_val(4) == 2
    assert default_n_val(1) == 0
    assert fit_protocol(100, 2000, 10000) == {"n_query": 20, "n_train": 80}  # shrunk to fit
    assert fit_protocol(100, 10, 50) == {"n_query": 10, "n_train": 50}  # fits: kept
    assert fit_protocol(100, 10, 500) == {"n_query": 10, "n_train": 90}
    assert fit_protocol(5000) == {"n_query": 1000, "n_train": 4000}  # the fallback protocol


def test_save_load_roundtrip(tmp_path):
    ds = make_dataset(tmp_path)
    s = make_splits(ds, seed=9)
    path = s.save(tmp_path / "run")
    assert path == tmp_path / "run" / "splits.json"
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["splits.json"]  # no temp files left
    raw = json.loads(path.read_text())
    assert raw["seed"] == 9 and raw["sizes"] == s.sizes and raw["fingerprint"] == ds.fingerprint()
    assert raw["query"] == [ds.ids[i] for i in s.query]
    back = Splits.load(tmp_path / "run", ds)
    for name in ("query", "database", "train", "val"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))
    assert back.seed == 9


def test_load_refuses_another_dataset(tmp_path):
    make_splits(make_dataset(tmp_path), seed=0).save(tmp_path / "splits.json")
    other = make_dataset(tmp_path, n=50, name="other")
    with pytest.raises(ValueError, match="made for dataset 'toy'.*fingerprint"):
        Splits.load(tmp_path / "splits.json", other)
    with pytest.raises(FileNotFoundError, match="no splits file"):
        Splits.load(tmp_path / "nowhere", other)


# -- info --------------------------------------------------------------------------------------


def brute_expected_ap(r: int, m: int) -> float:
    total, count = 0.0, 0
    for rel in itertools.permutations([1] * r + [0] * (m - r)):
        hits = np.cumsum(rel)
        ranks = np.flatnonzero(rel) + 1
        total += np.mean(hits[ranks - 1] / ranks)
        count += 1
    return total / count


@pytest.mark.parametrize("m", [1, 2, 5])
def test_expected_random_ap_matches_enumeration(m):
    for r in range(1, m + 1):
        assert expected_random_ap(r, m) == pytest.approx(brute_expected_ap(r, m))
    assert expected_random_ap(0, m) == 0.0


def test_summary_stats_by_hand(tmp_path):
    ds = make_dataset(tmp_path)
    labels = ds.labels_matrix().astype(int)
    s = make_splits(ds, seed=2)
    stats = summary_stats(ds, s)
    assert stats["n_items"] == 60 and stats["n_labels"] == 3
    assert stats["mean_labels_per_item"] == pytest.approx(labels.sum(1).mean())
    top = stats["label_frequency_top10"]
    assert [t["count"] for t in top] == sorted(labels.sum(0), reverse=True)
    assert top[0]["label"] == LABELS[int(np.argmax(labels.sum(0)))]
    assert stats["captions_per_item"] == {"mean": pytest.approx(1.0), "min": 0, "max": 2}
    assert stats["n_without_captions"] == 20
    rel = (labels[s.query] @ labels[s.database].T) > 0
    assert stats["relevant_fraction"] == pytest.approx(rel.mean())
    want = np.mean([expected_random_ap(r, len(s.database)) for r in rel.sum(1)])
    assert stats["random_map"] == pytest.approx(want)
    assert stats["split_sizes"] == s.sizes
    everyone = random_baseline(ds)
    pair = (labels @ labels.T) > 0
    np.fill_diagonal(pair, False)
    assert everyone["relevant_fraction"] == pytest.approx(pair.sum() / (60 * 59))


def test_describe_text(tmp_path):
    ds = make_dataset(tmp_path)
    s = make_splits(ds, seed=0)
    text = describe(ds, s)
    assert "60 items" in text and "labels: 3" in text
    assert "query 10, database 50, train 25, val 5" in text
    assert "random-ranking mAP" in text
    assert "default protocol: n_query 10, n_train 30" in describe(ds)


def test_image_relevance_baseline(tmp_path):
    ds = make_dataset(tmp_path, n=20, grouped=False, name="caps", relevance="image")
    s = make_splits(ds, n_query=4, n_train=10)
    stats = summary_stats(ds, s)
    assert stats["n_labels"] == 0 and stats["relevance"] == "image"
    assert stats["relevant_fraction"] == pytest.approx(1 / 4)
    assert stats["random_map"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert "same image only" in describe(ds, s)


def test_shrinking_is_warned_only_for_a_published_protocol(caplog):
    """A user's folder of 7,947 images gets 1,000 queries and the rest for training: that is
    the imagefolder rule, not a deviation from a benchmark's protocol, so nothing is warned."""
    import logging

    from crossmodal.data.splits import fit_protocol

    with caplog.at_level(logging.INFO, logger="crossmodal.data.splits"):
        rule = fit_protocol(7947, 1000, 10000, "imagefolder", published=False)
        assert rule == {"n_query": 1000, "n_train": 6947}
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert fit_protocol(7947, 2000, 10000, "mirflickr25k") == {"n_query": 1589, "n_train": 6358}
        assert [r for r in caplog.records if r.levelno == logging.WARNING]
