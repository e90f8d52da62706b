"""Summaries of a dataset: sizes, labels, captions, and what random ranking would score.

``summary_stats`` returns the numbers, ``describe`` the same as readable text (the
``crossmodal data-info`` command prints it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from crossmodal.data.records import RELEVANCE_IMAGE, CrossModalDataset
from crossmodal.data.splits import Splits

# Above this many (query pattern x database pattern) pairs, queries are sampled.
MAX_PATTERN_PAIRS = 25_000_000
SAMPLE_QUERIES = 2000


def summary_stats(dataset: CrossModalDataset, splits: Splits | None = None) -> dict[str, Any]:
    """Counts and rates describing ``dataset`` (and its ``splits`` when given).

    Keys: ``name``, ``n_items``, ``relevance``, ``n_labels``, ``mean_labels_per_item``,
    ``n_unlabeled``, ``label_frequency_top10`` (list of ``{label, count, fraction}``),
    ``captions_per_item`` (``mean``, ``min``, ``max``), ``n_without_captions``, ``bow_dim``,
    ``mean_bow_words``, ``relevant_fraction`` (share of the database relevant to a random
    query), ``random_map`` (expected mAP of a random ranking), ``relevance_scope`` (what
    those two were computed over), ``split_sizes`` (or None), ``protocol``, ``build``
    (the loader's stats).
    """
    labels = dataset.labels_matrix()
    n = len(dataset)
    counts = labels.sum(axis=0, dtype=np.int64)
    per_item = labels.sum(axis=1, dtype=np.int64)
    caption_counts = _list_lengths(dataset, "captions")
    stats: dict[str, Any] = {
        "name": dataset.name,
        "n_items": n,
        "relevance": dataset.info.relevance,
        "n_labels": int(labels.shape[1]),
        "mean_labels_per_item": float(per_item.mean()) if n else 0.0,
        "n_unlabeled": int((per_item == 0).sum()) if labels.shape[1] else 0,
        "label_frequency_top10": _top_labels(dataset.info.label_names, counts, n),
        "captions_per_item": _describe_counts(caption_counts),
        "n_without_captions": int((caption_counts == 0).sum()),
        "bow_dim": dataset.info.bow_dim,
        "mean_bow_words": float(_list_lengths(dataset, "bow_idx").mean())
        if n and dataset.info.bow_dim
        else 0.0,
        "split_sizes": splits.sizes if splits is not None else None,
        "protocol": dict(dataset.info.protocol),
        "build": dict(dataset.info.stats),
    }
    stats.update(random_baseline(dataset, splits))
    return stats


def _list_lengths(dataset: CrossModalDataset, column: str) -> np.ndarray:
    if not len(dataset):
        return np.zeros(0, dtype=np.int64)
    col = dataset.table.with_format("arrow")[column]  # honours an indices mapping (select)
    return np.asarray(pc.fill_null(pc.list_value_length(col), 0), dtype=np.int64)


def _describe_counts(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": float(values.mean()), "min": int(values.min()), "max": int(values.max())}


def _top_labels(names: list[str], counts: np.ndarray, n: int, k: int = 10) -> list[dict[str, Any]]:
    order = np.argsort(-counts, kind="stable")[:k]
    return [
        {
            "label": names[j] if j < len(names) else f"label_{j}",
            "count": int(counts[j]),
            "fraction": float(counts[j] / n) if n else 0.0,
        }
        for j in order
    ]


def expected_random_ap(n_relevant: np.ndarray | int, n_candidates: int) -> np.ndarray:
    """Expected average precision of a uniformly random ranking.

    With R relevant among M candidates: E[AP] = (H_M + (R - 1)(M - H_M) / (M - 1)) / M,
    H_M the M-th harmonic number; 0 when R = 0.
    """
    r = np.asarray(n_relevant, dtype=np.float64)
    m = int(n_candidates)
    if m <= 0:
        return np.zeros_like(r)
    if m == 1:
        return (r > 0).astype(np.float64)
    h = float(np.sum(1.0 / np.arange(1, m + 1)))
    ap = (h + (r - 1.0) * (m - h) / (m - 1.0)) / m
    return np.where(r > 0, ap, 0.0)


def random_baseline(dataset: CrossModalDataset, splits: Splits | None = None) -> dict[str, Any]:
    """``relevant_fraction``, ``random_map`` and ``relevance_scope`` for ``dataset``.

    With splits, queries are ``splits.query`` against ``splits.database``; without,
    every item against all the others. For captions-only data ("same image"
    relevance) a query has one relevant item among the searched set, which is the
    query set itself (text -> its image among the query images).
    """
    n = len(dataset)
    if dataset.info.relevance == RELEVANCE_IMAGE:
        m = len(splits.query) if splits is not None else n
        return {
            "relevant_fraction": 1.0 / m if m else 0.0,
            "random_map": float(expected_random_ap(1, m)) if m else 0.0,
            "relevance_scope": f"one relevant item among {m:,} (the query set)",
        }
    labels = dataset.labels_matrix()
    if splits is not None:
        q, d, self_pairs = labels[splits.query], labels[splits.database], False
    else:
        q, d, self_pairs = labels, labels, True
    rel_counts, weights = _relevant_counts(q, d, self_pairs)
    m = len(d) - (1 if self_pairs else 0)
    if m <= 0 or not len(weights):
        return {"relevant_fraction": 0.0, "random_map": 0.0, "relevance_scope": "empty"}
    scope = "query vs database" if splits is not None else "every item vs all others"
    return {
        "relevant_fraction": float(np.average(rel_counts / m, weights=weights)),
        "random_map": float(np.average(expected_random_ap(rel_counts, m), weights=weights)),
        "relevance_scope": scope,
    }


def unique_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows of a 0/1 matrix (as uint8) and how often each occurs; rows compared bit-packed."""
    if not len(m):
        return m.astype(np.uint8), np.zeros(0, dtype=np.int64)
    packed = np.ascontiguousarray(np.packbits(m > 0, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    return (m[first] > 0).astype(np.uint8), counts.astype(np.int64)


def _relevant_counts(q: np.ndarray, d: np.ndarray, self_pairs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct query label pattern: database items sharing a label, and pattern counts."""
    uq, wq = unique_rows(q)
    ud, wd = unique_rows(d)
    if len(uq) * max(len(ud), 1) > MAX_PATTERN_PAIRS:
        rng = np.random.default_rng(0)
        uq, wq = unique_rows(q[rng.choice(len(q), size=min(SAMPLE_QUERIES, len(q)), replace=False)])
    # float32 products go through BLAS; they are exact for counts of shared labels (< 2**24).
    shares = (uq.astype(np.float32) @ ud.T.astype(np.float32)) > 0  # [n_query_patterns, n_db_patterns]
    counts = shares.astype(np.float64) @ wd.astype(np.float64)
    if self_pairs:
        counts = counts - (uq.sum(axis=1) > 0)
    return counts.astype(np.float64), wq.astype(np.float64)


def describe(dataset: CrossModalDataset, splits: Splits | None = None) -> str:
    """A readable multi-line summary of ``dataset`` (see ``summary_stats`` for the numbers)."""
    s = summary_stats(dataset, splits)
    rel = "share at least one label" if s["relevance"] != RELEVANCE_IMAGE else "same image only"
    lines = [f"dataset {s['name']}: {s['n_items']:,} items; relevance: {s['relevance']} ({rel})"]
    if s["n_labels"]:
        lines.append(
            f"labels: {s['n_labels']}, mean {s['mean_labels_per_item']:.2f} per item, "
            f"{s['n_unlabeled']:,} items without labels"
        )
        top = ", ".join(
            f"{t['label']} {t['count']:,} ({t['fraction']:.1%})" for t in s["label_frequency_top10"]
        )
        lines.append(f"most frequent labels: {top}")
    c = s["captions_per_item"]
    lines.append(
        f"captions per item: mean {c['mean']:.2f} (min {c['min']}, max {c['max']}); "
        f"{s['n_without_captions']:,} items without captions"
    )
    if s["bow_dim"]:
        lines.append(f"bag-of-words text: {s['bow_dim']:,} words, mean {s['mean_bow_words']:.1f} per item")
    lines.append(
        f"relevant to a random query: {s['relevant_fraction']:.2%} of the candidates "
        f"({s['relevance_scope']}); "
        f"random-ranking mAP about {s['random_map']:.4f}"
    )
    if s["split_sizes"] is not None:
        sizes = ", ".join(f"{k} {v:,}" for k, v in s["split_sizes"].items())
        lines.append(f"splits (seed {splits.seed}): {sizes}")
    elif s["protocol"]:
        lines.append("default protocol: " + ", ".join(f"{k} {v:,}" for k, v in s["protocol"].items()))
    failed = s["build"].get("n_failed_images", 0)
    if failed:
        lines.append(f"build: {failed:,} images failed to decode and were skipped")
    return "\n".join(lines)
