"""Seeded query / database / train / val splits, saved with a run as ``splits.json``.

The protocol of the DCMH papers: queries are drawn from the whole dataset and the rest
is the retrieval database; training items are drawn from the database; a validation
set, for choosing epochs and hyper-parameters, is carved out of the training draw so
the test queries never steer model selection. Items sharing a ``group`` always land
together, so variants of one item never sit on both sides of a query.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.data.records import CrossModalDataset
from crossmodal.io import write_json_atomic

logger = logging.getLogger(__name__)

SPLITS_FORMAT_VERSION = 1
SPLITS_FILE = "splits.json"
SPLIT_NAMES = ("query", "database", "train", "val")

# Used when a dataset declares no protocol.
FALLBACK_QUERY = 1000
FALLBACK_TRAIN = 10000


def fit_protocol(
    n_items: int,
    n_query: int = FALLBACK_QUERY,
    n_train: int = FALLBACK_TRAIN,
    name: str = "dataset",
    published: bool = True,
) -> dict[str, int]:
    """A dataset's default protocol: ``n_query`` / ``n_train``, shrunk to fit ``n_items``.

    A small dataset gets at most a fifth of its items as queries and the rest at most for
    training. These are defaults for ``make_splits``; a run sets its own sizes with
    ``data.n_query`` / ``data.n_train``, which are never shrunk. Shrinking a ``published``
    protocol (a benchmark's sizes, from its papers) is warned about; for a user's own
    collection (``published=False``: an image folder, a hub dataset) the shrunk sizes are
    the documented rule itself and are only logged.
    """
    q, t = int(n_query), int(n_train)
    if q + t > n_items:
        q = min(q, max(1, n_items // 5))
        t = max(0, min(t, n_items - q))
        if n_items:
            logger.log(logging.WARNING if published else logging.INFO,
                "%s has %d items, fewer than the default protocol (%d queries, %d train) needs; "
                "using %d queries and %d train",
                name,
                n_items,
                n_query,
                n_train,
                q,
                t,
            )
    return {"n_query": q, "n_train": t}


def default_n_val(n_train: int) -> int:
    """10% of the training draw, at least a few items (5, or half of a tiny draw), at most 1,000."""
    if n_train < 2:
        return 0
    return min(1000, max(min(5, n_train // 2), n_train // 10))


@dataclass
class Splits:
    """Index arrays into a dataset (sorted, int64) and what they were drawn from.

    ``train`` and ``val`` are disjoint and together form the ``n_train`` items drawn from
    the database; ``database`` contains both (it is every item that is not a query).
    """

    query: np.ndarray
    database: np.ndarray
    train: np.ndarray
    val: np.ndarray
    seed: int
    dataset_name: str = ""
    fingerprint: str = ""
    ids: list[str] = field(default_factory=list, repr=False)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: int(len(getattr(self, name))) for name in SPLIT_NAMES}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: split members as dataset ids, plus seed, sizes and fingerprint."""
        if not self.ids:
            raise ValueError("these splits carry no dataset ids; build them with make_splits or Splits.load")
        out: dict[str, Any] = {
            "format_version": SPLITS_FORMAT_VERSION,
            "dataset": self.dataset_name,
            "fingerprint": self.fingerprint,
            "n_items": len(self.ids),
            "seed": self.seed,
            "sizes": self.sizes,
        }
        for name in SPLIT_NAMES:
            out[name] = [self.ids[i] for i in getattr(self, name)]
        return out

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``splits.json`` atomically; ``path`` is the file or the folder to hold it."""
        target = _splits_path(path)
        write_json_atomic(target, self.to_dict())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], dataset: CrossModalDataset) -> Splits:
        """Read ``splits.json`` and check it was made for ``dataset``.

        Raises:
            FileNotFoundError: no splits file at ``path``.
            ValueError: the file belongs to another dataset (fingerprint or ids differ).
        """
        target = _splits_path(path)
        if not target.is_file():
            raise FileNotFoundError(f"no splits file at {target}")
        raw = json.loads(target.read_text(encoding="utf-8"))
        if raw.get("format_version") != SPLITS_FORMAT_VERSION:
            raise ValueError(
                f"{target} has format version {raw.get('format_version')}, expected {SPLITS_FORMAT_VERSION}"
            )
        fp = dataset.fingerprint()
        if raw.get("fingerprint") != fp:
            raise ValueError(
                f"{target} was made for dataset {raw.get('dataset')!r} "
                f"with fingerprint {raw.get('fingerprint')}, "
                f"but dataset {dataset.name!r} has fingerprint {fp} ({len(dataset)} items, the file expects "
                f"{raw.get('n_items')}); rebuild the splits or load the dataset they were made from"
            )
        ids = list(dataset.ids)
        position = {item: i for i, item in enumerate(ids)}
        arrays = {}
        for name in SPLIT_NAMES:
            missing = [item for item in raw[name] if item not in position]
            if missing:
                raise ValueError(
                    f"{target}: {len(missing)} {name} ids are not in the dataset, e.g. {missing[:5]}"
                )
            arrays[name] = np.sort(np.array([position[item] for item in raw[name]], dtype=np.int64))
        return cls(**arrays, seed=int(raw["seed"]), dataset_name=dataset.name, fingerprint=fp, ids=ids)


def _splits_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path if path.suffix.lower() == ".json" else path / SPLITS_FILE


def make_splits(
    dataset: CrossModalDataset,
    n_query: int | None = None,
    n_train: int | None = None,
    seed: int = 0,
    n_val: int | None = None,
) -> Splits:
    """Draw query, database, train and val index sets from ``dataset``, reproducibly.

    Args:
        dataset: the dataset to split; its ``group`` column keeps variants together.
        n_query: number of queries (default ``dataset.info.protocol["n_query"]``).
        n_train: items drawn from the database for training, val included
            (default ``dataset.info.protocol["n_train"]``).
        seed: the same seed gives the same splits.
        n_val: items of the training draw held out for model selection
            (default ``default_n_val(n_train)``; 0 for none).

    Raises:
        ValueError: the sizes are negative or do not fit the dataset.
    """
    n = len(dataset)
    proto = dataset.info.protocol or fit_protocol(n, name=dataset.name)
    n_query = int(proto.get("n_query", FALLBACK_QUERY) if n_query is None else n_query)
    n_train = int(proto.get("n_train", FALLBACK_TRAIN) if n_train is None else n_train)
    n_val = default_n_val(n_train) if n_val is None else int(n_val)
    _check_sizes(dataset.name, n, n_query, n_train, n_val)
    ids = list(dataset.ids)
    codes = _group_codes(dataset, ids)
    sizes = np.bincount(codes) if len(codes) else np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    query_groups, rest = _take(rng.permutation(len(sizes)), sizes, n_query, "query")
    train_groups, _ = _take(rng.permutation(rest), sizes, n_train, "train")
    val_groups, train_groups = _take(rng.permutation(train_groups), sizes, n_val, "val")
    query = _items(codes, query_groups)
    splits = Splits(
        query=query,
        database=np.setdiff1d(np.arange(n, dtype=np.int64), query),
        train=_items(codes, train_groups),
        val=_items(codes, val_groups),
        seed=int(seed),
        dataset_name=dataset.name,
        fingerprint=dataset.fingerprint(),
        ids=ids,
    )
    logger.info("splits of %s (seed %d): %s", dataset.name, seed, splits.sizes)
    return splits


def _check_sizes(name: str, n: int, n_query: int, n_train: int, n_val: int) -> None:
    if n_query < 1 or n_train < 0 or n_val < 0:
        raise ValueError(
            f"split sizes must be n_query >= 1, n_train >= 0, n_val >= 0; got {n_query}, {n_train}, {n_val}"
        )
    if n_query + n_train > n:
        raise ValueError(
            f"n_query={n_query} + n_train={n_train} = {n_query + n_train} items needed, but dataset {name!r} "
            f"has only {n}; pass smaller n_query / n_train"
        )
    if n_train and n_val >= n_train:
        raise ValueError(f"n_val={n_val} must be smaller than n_train={n_train} (val is carved out of train)")
    if not n_train and n_val:
        raise ValueError(f"n_val={n_val} needs n_train > 0 (val is carved out of train)")


def _group_codes(dataset: CrossModalDataset, ids: list[str]) -> np.ndarray:
    """Group number (0..G-1) of each item; an item without a group is its own (as ``make_record`` does)."""
    column = dataset.table.with_format("arrow")["group"].to_pylist()
    groups = [g or i for g, i in zip(column, ids, strict=True)]
    if not groups:
        return np.zeros(0, dtype=np.int64)
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    return codes.astype(np.int64)


def _take(order: np.ndarray, sizes: np.ndarray, n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Walk groups in ``order`` and take those that fit until ``n`` items; return (taken, rest)."""
    ordered = sizes[order]
    if not len(ordered) or ordered.max() == 1:
        k = min(n, len(order))
        return order[:k], order[k:]
    taken = np.zeros(len(order), dtype=bool)
    remaining = n
    for pos, size in enumerate(ordered.tolist()):
        if remaining == 0:
            break
        if size <= remaining:
            taken[pos] = True
            remaining -= size
    if remaining:
        logger.warning("groups allow only %d of the %d %s items asked for", n - remaining, n, what)
    return order[taken], order[~taken]


def _items(codes: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sorted indices of the items whose group is in ``groups``."""
    return np.flatnonzero(np.isin(codes, groups)).astype(np.int64)
