"""``BinaryIndex``: FAISS binary indexes behind one API, with stable ids, removal and safe files.

Kinds (``list_index_kinds()``), built by name with ``create_index(kind, bits, **params)``:

* ``flat``: IndexBinaryIDMap2(IndexBinaryFlat); exact; native removal; exact range search.
* ``ivf``: IndexBinaryIVF holding the external ids itself; params ``nlist`` (default
  ``default_nlist(n)`` = ~4 sqrt(n) of the training set) and ``nprobe`` (default 8, per
  call via ``search(..., nprobe=)``); native removal; range search over ``nprobe`` lists
  (exact when ``nprobe >= nlist``).
* ``hnsw``: IndexBinaryIDMap2(IndexBinaryHNSW); params ``M``, ``ef_construction``,
  ``ef_search``; removal by tombstones; no range search.
* ``multihash``: IndexBinaryIDMap2(IndexBinaryMultiHash); params ``nhash``, ``b`` (default:
  16-bit substrings covering the code) and ``nflip`` (default 2); removal by tombstones;
  range search (it finds items whose distance is small in at least one substring).

FAISS cannot remove from HNSW or MultiHash indexes. There ``remove(ids)`` records the ids
in a tombstone set; searches over-fetch (``k`` plus up to ``4k``, growing 4x for queries
left short) and drop the dead ones, so a removed id never comes back. Tombstones are saved
with the index (in the JSON sidecar). When they pass half of the stored codes, or when a
dead id is added again, the index is rebuilt from its live codes (compaction).

IVF is not wrapped in an IDMap because ``IndexIDMap.remove_ids`` assumes the inner index
renumbers its items after a removal, which IVF does not; IVF stores the external ids itself.

Files: ``save(path)`` writes the FAISS file and a sidecar ``<path>.json`` (kind, bits,
params, ntotal, file size, tombstones), each atomically. ``BinaryIndex.load`` checks the
file against the sidecar before FAISS reads it and raises ``IndexFileError`` for a missing,
empty, truncated, foreign or wrong-length file. An index loaded with ``mmap=True`` is
read-only (memory mapping only saves memory for ``ivf``; see ``BinaryIndex.load``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from crossmodal.io import atomic_path, write_json_atomic
from crossmodal.registry import Registry

logger = logging.getLogger(__name__)

SIDECAR_FORMAT_VERSION = 1
PAD_DISTANCE = np.iinfo(np.int32).max  # distance reported for padded (-1) results

# Four-byte headers FAISS writes first in a binary index file.
_BINARY_FOURCCS = {b"IBxF", b"IBwF", b"IBHf", b"IBMp", b"IBM2", b"IBHh", b"IBHm", b"IBFf"}


# FAISS' C++ assertion text: "Error in void faiss::... at index_read.cpp:3322: Error: '...' failed: why"
_FAISS_ASSERT = re.compile(r"Error in .*? at \S+: Error: '.*?' failed(?:: (.*))?", re.DOTALL)


def faiss_error_in_words(exc: BaseException) -> str:
    """What a FAISS read error means, for a user: its C++ assertion text (function signature,
    source line, failed expression) becomes "the file is damaged ...", keeping the assertion's
    own explanation when it gives one; other errors keep their first line."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    match = _FAISS_ASSERT.search(text)
    if match is None:
        return text.splitlines()[0]
    why = (match.group(1) or "").strip().splitlines()[0] if match.group(1) else ""
    return "the file is damaged (its contents do not parse as a FAISS index" + (f": {why})" if why else ")")


class IndexFileError(RuntimeError):
    """An index file is missing, empty, truncated, foreign, or has an unexpected code length."""


class ReadOnlyIndexError(RuntimeError):
    """Raised when modifying an index loaded with ``mmap=True``."""


# --------------------------------------------------------------------------- kinds


class IndexKind:
    """How one kind of index is built and what it can do; subclasses register by name."""

    name = ""
    native_remove = True
    supports_range = True
    defaults: dict[str, Any] = {}

    def resolve_params(self, bits: int, params: dict[str, Any]) -> dict[str, Any]:
        """Fill defaults and reject unknown parameter names."""
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for index kind {self.name!r}; "
                f"valid: {sorted(self.defaults) or 'none'}"
            )
        return {**self.defaults, **params}

    def build(self, bits: int, params: dict[str, Any], n_train: int = 0) -> faiss.IndexBinary:
        """Return an empty FAISS index, ready for ``add_with_ids`` (IVF: untrained)."""
        raise NotImplementedError


INDEX_KINDS: Registry[IndexKind] = Registry("index kind")


@INDEX_KINDS.register("flat")
class FlatKind(IndexKind):
    name = "flat"

    def build(self, bits: int, params: dict[str, Any], n_train: int = 0) -> faiss.IndexBinary:
        return faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(bits))


def default_nlist(n: int) -> int:
    """``~4 sqrt(n)`` lists, at most ``n // 39`` (FAISS wants >= 39 training points a list)."""
    return int(max(1, min(4 * math.sqrt(max(n, 1)), n // 39, 65536)))


@INDEX_KINDS.register("ivf")
class IVFKind(IndexKind):
    name = "ivf"
    defaults = {"nlist": None, "nprobe": 8}

    def build(self, bits: int, params: dict[str, Any], n_train: int = 0) -> faiss.IndexBinary:
        nlist = params["nlist"] or default_nlist(n_train)
        index = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(bits), bits, int(nlist))
        index.nprobe = int(params["nprobe"])
        return index


@INDEX_KINDS.register("hnsw")
class HNSWKind(IndexKind):
    name = "hnsw"
    native_remove = False
    supports_range = False
    defaults = {"M": 32, "ef_construction": 64, "ef_search": 64}

    def build(self, bits: int, params: dict[str, Any], n_train: int = 0) -> faiss.IndexBinary:
        inner = faiss.IndexBinaryHNSW(bits, int(params["M"]))
        inner.hnsw.efConstruction = int(params["ef_construction"])
        inner.hnsw.efSearch = int(params["ef_search"])
        return faiss.IndexBinaryIDMap2(inner)


@INDEX_KINDS.register("multihash")
class MultiHashKind(IndexKind):
    name = "multihash"
    native_remove = False
    defaults = {"nhash": None, "b": None, "nflip": 2}

    def resolve_params(self, bits: int, params: dict[str, Any]) -> dict[str, Any]:
        out = super().resolve_params(bits, params)
        # Default: the code cut into 16-bit substrings, one hash table each.
        out["b"] = int(out["b"] or min(16, bits))
        out["nhash"] = int(out["nhash"] or max(1, bits // out["b"]))
        if out["nhash"] * out["b"] > bits:
            raise ValueError(f"multihash needs nhash * b <= bits, got {out['nhash']} * {out['b']} > {bits}")
        return out

    def build(self, bits: int, params: dict[str, Any], n_train: int = 0) -> faiss.IndexBinary:
        inner = faiss.IndexBinaryMultiHash(bits, int(params["nhash"]), int(params["b"]))
        inner.nflip = int(params["nflip"])
        return faiss.IndexBinaryIDMap2(inner)


def list_index_kinds() -> list[str]:
    """Names accepted by ``create_index``."""
    return INDEX_KINDS.names()


def range_search_kinds() -> list[str]:
    """Kinds whose ``BinaryIndex.range_search`` works."""
    return [k for k in INDEX_KINDS.names() if INDEX_KINDS.create(k).supports_range]


def create_index(kind: str, bits: int, **params: Any) -> BinaryIndex:
    """Build an empty ``BinaryIndex`` of ``kind`` for ``bits``-bit codes.

    Args:
        kind: one of ``list_index_kinds()``.
        bits: code length, a positive multiple of 8.
        **params: kind parameters (see the module docstring); unknown names raise.
    """
    return BinaryIndex(kind, bits, **params)


# --------------------------------------------------------------------------- helpers


def _as_ids(ids: Any, n: int | None = None) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).ravel()
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"got {arr.shape[0]} ids for {n} codes")
    if arr.size and arr.min() < 0:
        raise ValueError(f"ids must be >= 0 (-1 marks padding), got {int(arr.min())}")
    return arr


def _pad(dist: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise FAISS padding: id -1 gets distance ``PAD_DISTANCE``."""
    dist = dist.astype(np.int32, copy=True)
    dist[ids < 0] = PAD_DISTANCE
    return dist, ids.astype(np.int64, copy=False)


def _ivf_ids(ivf: faiss.IndexBinaryIVF) -> np.ndarray:
    invlists = ivf.invlists
    parts = []
    for list_no in range(ivf.nlist):
        size = invlists.list_size(list_no)
        if size:
            ptr = invlists.get_ids(list_no)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            invlists.release_ids(list_no, ptr)
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def _kind_of(index: faiss.IndexBinary) -> str:
    """Derive the kind name of a FAISS object (for files written without a sidecar)."""
    index = faiss.downcast_IndexBinary(index)
    if isinstance(index, faiss.IndexBinaryIDMap2 | faiss.IndexBinaryIDMap):
        index = faiss.downcast_IndexBinary(index.index)
    for cls, name in (
        (faiss.IndexBinaryFlat, "flat"),
        (faiss.IndexBinaryIVF, "ivf"),
        (faiss.IndexBinaryHNSW, "hnsw"),
        (faiss.IndexBinaryMultiHash, "multihash"),
    ):
        if isinstance(index, cls):
            return name
    raise IndexFileError(f"unsupported FAISS binary index type {type(index).__name__}")


# --------------------------------------------------------------------------- the index


class BinaryIndex:
    """A FAISS binary index with stable int64 ids, removal, range search and safe files.

    Args:
        kind: one of ``list_index_kinds()``.
        bits: code length, a positive multiple of 8.
        **params: kind parameters; see the module docstring.
    """

    def __init__(self, kind: str, bits: int, **params: Any) -> None:
        if bits <= 0 or bits % 8:
            raise ValueError(f"code length bits={bits} must be a positive multiple of 8")
        self._spec = INDEX_KINDS.create(kind)
        self.kind = kind
        self.bits = int(bits)
        self.params = self._spec.resolve_params(self.bits, dict(params))
        self._faiss: faiss.IndexBinary | None = None
        if kind != "ivf":  # IVF is built at training time, when nlist can follow the data size
            self._faiss = self._spec.build(self.bits, self.params)
        self._tombstones: set[int] = set()
        self._ids_cache: np.ndarray | None = None
        self._rows_cache: tuple[np.ndarray, np.ndarray] | None = None  # see _stored_rows
        self.read_only = False
        self._lock = threading.Lock()

    # ---- properties

    @property
    def code_size(self) -> int:
        """Bytes per packed code (``bits // 8``)."""
        return self.bits // 8

    @property
    def ntotal(self) -> int:
        """Number of live (searchable, not removed) items."""
        stored = 0 if self._faiss is None else int(self._faiss.ntotal)
        return stored - len(self._tombstones)

    @property
    def is_trained(self) -> bool:
        return self._faiss is not None and bool(self._faiss.is_trained)

    @property
    def faiss_index(self) -> faiss.IndexBinary | None:
        """The underlying FAISS object (``None`` for an untrained IVF index)."""
        return self._faiss

    def __repr__(self) -> str:
        return (
            f"BinaryIndex(kind={self.kind!r}, bits={self.bits}, ntotal={self.ntotal}, params={self.params})"
        )

    def __len__(self) -> int:
        return self.ntotal

    # ---- validation

    def _check_codes(self, packed: Any, what: str = "codes") -> np.ndarray:
        arr = np.asarray(packed)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != self.code_size:
            raise ValueError(
                f"{what} must be packed uint8 [n, {self.code_size}] for {self.bits}-bit codes, "
                f"got {arr.dtype} {arr.shape}"
            )
        return np.ascontiguousarray(arr)

    def reconstruct(self, ids: Any) -> np.ndarray:
        """Packed codes ``uint8 [n, bits // 8]`` of stored ids (for re-ranking a shortlist).

        Raises:
            KeyError: an id is not in the index.
        """
        wanted = _as_ids(ids)
        live = self.ids()  # sorted: a binary search per id, not a pass over the whole index
        pos = np.minimum(np.searchsorted(live, wanted), max(live.size - 1, 0))
        missing = wanted if not live.size else wanted[live[pos] != wanted]
        if missing.size:
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        if not wanted.size:
            return np.empty((0, self.code_size), dtype=np.uint8)
        if self.kind == "ivf":  # codes live in the inverted lists: one look-up per id
            index = self._faiss
            with self._lock:  # built once; concurrent searches must not see it half made
                if index.direct_map.type != faiss.DirectMap.Hashtable:
                    index.set_direct_map_type(faiss.DirectMap.Hashtable)
            return np.stack([index.reconstruct(int(item)) for item in wanted])
        stored, rows = self._stored_rows()
        return self._flat_storage()[rows[np.searchsorted(stored, wanted)]]

    def _stored_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids of an IDMap2-wrapped index, sorted, and the storage row of each (cached)."""
        if self._rows_cache is None:
            id_map = faiss.vector_to_array(self._faiss.id_map).astype(np.int64)
            order = np.argsort(id_map, kind="stable")
            self._rows_cache = (id_map[order], order)
        return self._rows_cache

    def _flat_storage(self) -> np.ndarray:
        """A view ``uint8 [stored, bits // 8]`` of the codes of a flat, hnsw or multihash index,
        row ``i`` holding the code of ``id_map[i]``; valid until the index changes."""
        inner = faiss.downcast_IndexBinary(self._faiss.index)
        flat = inner if self.kind == "flat" else faiss.downcast_IndexBinary(inner.storage)
        n = int(flat.ntotal)
        return faiss.rev_swig_ptr(flat.xb.data(), n * self.code_size).reshape(n, self.code_size)

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyIndexError(
                "this index was loaded with mmap=True and is read-only; load it without mmap"
            )

    # ---- ids

    def ids(self) -> np.ndarray:
        """Sorted int64 array of the live ids."""
        if self._ids_cache is None:
            if self._faiss is None:
                stored = np.empty(0, dtype=np.int64)
            elif self.kind == "ivf":
                stored = _ivf_ids(self._faiss)
            else:
                stored = faiss.vector_to_array(self._faiss.id_map).astype(np.int64)
            if self._tombstones:
                stored = stored[~np.isin(stored, self._tombstone_array())]
            self._ids_cache = np.sort(stored)
        return self._ids_cache

    def __contains__(self, item_id: object) -> bool:
        ids = self.ids()
        pos = np.searchsorted(ids, item_id)
        return bool(pos < ids.shape[0] and ids[pos] == item_id)

    def _tombstone_array(self) -> np.ndarray:
        return np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))

    # ---- building

    def train(self, packed: Any) -> None:
        """Train the coarse quantiser (IVF) on representative codes; a no-op for other kinds.

        With ``nlist`` unset, IVF picks ``default_nlist(len(packed))`` lists.
        """
        self._check_writable()
        codes = self._check_codes(packed, "training codes")
        if self.kind != "ivf":
            return
        if self._faiss is not None and self._faiss.ntotal:
            raise ValueError("cannot retrain an ivf index that already holds items")
        index = self._spec.build(self.bits, self.params, n_train=codes.shape[0])
        if codes.shape[0] < index.nlist:
            raise ValueError(f"ivf needs at least nlist={index.nlist} training codes, got {codes.shape[0]}")
        logger.info("training ivf: %d lists on %d codes", index.nlist, codes.shape[0])
        index.train(codes)
        self._faiss = index
        self.params["nlist"] = int(index.nlist)
        self._ids_cache = self._rows_cache = None

    def add(self, packed: Any, ids: Any) -> None:
        """Add packed codes under external ids (int64 >= 0, unique, not already present).

        An untrained IVF index trains itself on the first batch added.
        """
        self._check_writable()
        codes = self._check_codes(packed)
        new_ids = _as_ids(ids, codes.shape[0])
        if not codes.shape[0]:
            return
        self._check_new_ids(new_ids)
        if not self.is_trained:
            self.train(codes)
        if self._tombstones and np.isin(new_ids, self._tombstone_array()).any():
            self.compact()  # a dead copy of a re-added id must go before the id is reused
        self._faiss.add_with_ids(codes, new_ids)
        self._ids_cache = self._rows_cache = None

    def _check_new_ids(self, new_ids: np.ndarray) -> None:
        uniq, counts = np.unique(new_ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"duplicate ids in one add: {uniq[counts > 1][:10].tolist()}")
        present = new_ids[np.isin(new_ids, self.ids())]
        if present.size:
            raise ValueError(f"{present.size} id(s) already in the index, e.g. {present[:10].tolist()}")

    def remove(self, ids: Any, missing_ok: bool = False) -> int:
        """Remove items by id; removed ids never appear in later results.

        Args:
            ids: external ids.
            missing_ok: ignore ids not in the index instead of raising ``KeyError``.

        Returns:
            The number of items removed.
        """
        self._check_writable()
        rm = np.unique(_as_ids(ids))
        found = rm[np.isin(rm, self.ids())]
        if found.size < rm.size and not missing_ok:
            missing = np.setdiff1d(rm, found)
            raise KeyError(f"{missing.size} id(s) not in the index, e.g. {missing[:10].tolist()}")
        if not found.size:
            return 0
        if self._spec.native_remove:
            hashed = self.kind == "ivf" and self._faiss.direct_map.type == faiss.DirectMap.Hashtable
            # an IVF direct map (set by reconstruct) accepts only an array selector
            selector = faiss.IDSelectorArray(found) if hashed else faiss.IDSelectorBatch(found)
            removed = int(self._faiss.remove_ids(selector))
        else:
            self._tombstones.update(found.tolist())
            removed = int(found.size)
            if len(self._tombstones) > self._faiss.ntotal // 2:
                self.compact()
        self._ids_cache = self._rows_cache = None
        return removed

    def compact(self) -> None:
        """Rebuild a tombstoned index (hnsw, multihash) from its live codes."""
        self._check_writable()
        if not self._tombstones:
            return
        stored_ids = faiss.vector_to_array(self._faiss.id_map).astype(np.int64)
        storage = faiss.downcast_IndexBinary(self._faiss.index).storage
        codes = storage.reconstruct_n(0, storage.ntotal)  # row i holds the code of stored_ids[i]
        keep = ~np.isin(stored_ids, self._tombstone_array())
        logger.info("compacting %s index: %d live of %d stored", self.kind, int(keep.sum()), stored_ids.size)
        fresh = self._spec.build(self.bits, self.params)
        if keep.any():
            fresh.add_with_ids(np.ascontiguousarray(codes[keep]), stored_ids[keep])
        self._faiss = fresh
        self._tombstones = set()
        self._ids_cache = self._rows_cache = None

    # ---- searching

    def _search_params(self, nprobe: int | None, ef_search: int | None) -> faiss.SearchParameters | None:
        # Passed per call rather than set on the shared FAISS object, so threads do not race.
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=int(nprobe or self.params["nprobe"]))
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=int(ef_search or self.params["ef_search"]))
        return None

    def search(
        self, q_packed: Any, k: int, nprobe: int | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items of each query by Hamming distance.

        Args:
            q_packed: ``uint8 [nq, bits // 8]`` (or one code as ``[bits // 8]``).
            k: neighbours per query.
            nprobe: lists visited (ivf only; other kinds ignore it). Default: ``params["nprobe"]``.
            ef_search: HNSW search breadth (hnsw only). Default: ``params["ef_search"]``.

        Returns:
            ``(dist int32 [nq, k], ids int64 [nq, k])`` sorted by distance; rows with fewer than
            ``k`` results are padded with id -1 and distance ``PAD_DISTANCE``.
        """
        q = self._check_codes(q_packed, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if self._faiss is None or self._faiss.ntotal == 0:
            return (np.full((q.shape[0], k), PAD_DISTANCE, np.int32), np.full((q.shape[0], k), -1, np.int64))
        params = self._search_params(nprobe, ef_search)
        if self._tombstones:
            dist, ids = self._search_live(q, k, params)
        else:
            dist, ids = _pad(*self._raw_search(q, k, params))
        if ids.shape[1] < k:
            extra = k - ids.shape[1]
            dist = np.pad(dist, ((0, 0), (0, extra)), constant_values=PAD_DISTANCE)
            ids = np.pad(ids, ((0, 0), (0, extra)), constant_values=-1)
        return dist, ids

    def _raw_search(
        self, q: np.ndarray, k: int, params: faiss.SearchParameters | None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._faiss.search(q, k, params=params) if params else self._faiss.search(q, k)

    def _search_live(
        self, q: np.ndarray, k: int, params: faiss.SearchParameters | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search past tombstones: over-fetch, drop the dead, and fetch 4x more for rows left short."""
        dead = self._tombstone_array()
        stored = int(self._faiss.ntotal)
        dist = np.full((q.shape[0], k), PAD_DISTANCE, np.int32)
        ids = np.full((q.shape[0], k), -1, np.int64)
        rows = np.arange(q.shape[0])
        fetch = min(stored, k + min(dead.size, 4 * k))
        while rows.size:
            d, i = _pad(*self._raw_search(q[rows], fetch, params))
            full = (i >= 0).all(axis=1)  # FAISS had more to give for these rows
            is_dead = np.isin(i, dead)
            i, d = np.where(is_dead, -1, i), np.where(is_dead, PAD_DISTANCE, d).astype(np.int32)
            order = np.argsort(i < 0, axis=1, kind="stable")[:, :k]  # live results first, in order
            d, i = np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1)
            dist[rows, : d.shape[1]], ids[rows, : i.shape[1]] = d, i
            short = ((i >= 0).sum(axis=1) < k) & full
            if fetch >= stored or not short.any():
                break
            rows, fetch = rows[short], min(stored, fetch * 4)
        return dist, ids

    def range_search(
        self, q_packed: Any, radius: int, inclusive: bool = True, nprobe: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """All items within ``radius`` of each query (flat: exact; ivf: within ``nprobe`` lists).

        Args:
            q_packed: ``uint8 [nq, bits // 8]``.
            radius: Hamming radius.
            inclusive: ``True`` returns distances ``<= radius``; ``False`` returns ``< radius``
                (FAISS' own convention).
            nprobe: lists visited (ivf only).

        Returns:
            One ``(dist int32 [m], ids int64 [m])`` pair per query, sorted by distance then id.
        """
        if not self._spec.supports_range:
            raise NotImplementedError(
                f"range_search is not supported by index kind {self.kind!r}; "
                f"kinds that support it: {', '.join(range_search_kinds())}"
            )
        q = self._check_codes(q_packed, "queries")
        if self._faiss is None or self._faiss.ntotal == 0:
            return [(np.empty(0, np.int32), np.empty(0, np.int64)) for _ in range(q.shape[0])]
        faiss_radius = int(radius) + 1 if inclusive else int(radius)  # FAISS keeps d < radius
        with self._lock:  # binary IVF range_search takes no SearchParameters: set nprobe briefly
            saved = self._faiss.nprobe if self.kind == "ivf" else None
            if saved is not None and nprobe is not None:
                self._faiss.nprobe = int(nprobe)
            try:
                lims, dist, ids = self._faiss.range_search(q, faiss_radius)
            finally:
                if saved is not None:
                    self._faiss.nprobe = saved
        return self._split_range(lims, dist, ids)

    def _split_range(
        self, lims: np.ndarray, dist: np.ndarray, ids: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        dead = self._tombstone_array() if self._tombstones else None
        out = []
        for i in range(lims.shape[0] - 1):
            d, j = dist[lims[i] : lims[i + 1]].astype(np.int32), ids[lims[i] : lims[i + 1]].astype(np.int64)
            if dead is not None:
                live = ~np.isin(j, dead)
                d, j = d[live], j[live]
            order = np.lexsort((j, d))
            out.append((d[order], j[order]))
        return out

    # ---- files

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the FAISS file at ``path`` and the sidecar ``<path>.json``, each atomically."""
        if self._faiss is None:
            raise ValueError(f"cannot save an untrained {self.kind} index to {path}: add or train first")
        path = Path(path)
        with atomic_path(path) as tmp:
            faiss.write_index_binary(self._faiss, str(tmp))
            size = tmp.stat().st_size
        meta = {
            "format_version": SIDECAR_FORMAT_VERSION,
            "kind": self.kind,
            "bits": self.bits,
            "params": self.params,
            "ntotal": int(self._faiss.ntotal),
            "file_size": size,
            "tombstones": sorted(self._tombstones),
            "faiss_version": faiss.__version__,
        }
        write_json_atomic(sidecar_path(path), meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], mmap: bool = False, expected_bits: int | None = None
    ) -> BinaryIndex:
        """Read an index written by ``save`` (or a bare FAISS file of a supported layout).

        Args:
            path: the FAISS file; its sidecar ``<path>.json`` is used when present.
            mmap: open with ``faiss.IO_FLAG_MMAP``; the index is then read-only. Measured
                with faiss 1.15: for ``ivf`` the inverted lists stay on disk (a 240 MB index
                added 0.2 MB of resident memory); ``flat``, ``hnsw`` and ``multihash`` are still
                read into memory (no saving), but results are identical.
            expected_bits: refuse a file whose code length differs.

        Raises:
            IndexFileError: the file is missing, empty, truncated, not a FAISS binary index,
                inconsistent with its sidecar, or has another code length than ``expected_bits``.
        """
        path = Path(path)
        meta = _read_sidecar(path)
        _check_file(path, meta)
        try:
            raw = faiss.read_index_binary(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        except (RuntimeError, MemoryError) as exc:
            why = faiss_error_in_words(exc)
            raise IndexFileError(f"cannot read FAISS binary index {path}: {why}") from None
        # read_index_binary already returns the concrete subclass; downcasting again would hand
        # back a non-owning wrapper and let the object be freed.
        if expected_bits is not None and raw.d != expected_bits:
            raise IndexFileError(f"index file {path} holds {raw.d}-bit codes, expected {expected_bits} bits")
        self = cls._from_faiss(raw, meta, path)
        self.read_only = bool(mmap)
        return self

    @classmethod
    def _from_faiss(cls, raw: faiss.IndexBinary, meta: dict[str, Any] | None, path: Path) -> BinaryIndex:
        kind = _kind_of(raw)
        wrapped = isinstance(raw, faiss.IndexBinaryIDMap2)
        if wrapped != (kind != "ivf"):
            raise IndexFileError(
                f"index file {path}: a bare {kind} index without ids; not written by BinaryIndex"
            )
        if meta is None:
            params = _params_from_faiss(raw, kind)
            meta = {"kind": kind, "bits": raw.d, "params": params, "ntotal": raw.ntotal, "tombstones": []}
        problems = []
        if meta.get("kind") != kind:
            problems.append(f"sidecar says kind {meta.get('kind')!r}, the file holds {kind!r}")
        if meta.get("bits") != raw.d:
            problems.append(f"sidecar says {meta.get('bits')} bits, the file holds {raw.d}")
        if meta.get("ntotal") != raw.ntotal:
            problems.append(f"sidecar says {meta.get('ntotal')} items, the file holds {raw.ntotal}")
        if problems:
            raise IndexFileError(f"index file {path} does not match its sidecar: {'; '.join(problems)}")
        self = cls(kind, int(raw.d), **meta["params"])
        self._faiss = raw
        self._tombstones = {int(i) for i in meta.get("tombstones", [])}
        return self


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar next to an index file: ``<path>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFileError(f"unreadable index sidecar {side}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != SIDECAR_FORMAT_VERSION:
        raise IndexFileError(
            f"index sidecar {side} has an unknown format (expected version {SIDECAR_FORMAT_VERSION})"
        )
    return meta


def _check_file(path: Path, meta: dict[str, Any] | None) -> None:
    """Cheap checks before FAISS parses the file: exists, not empty, right header and size."""
    if not path.is_file():
        raise IndexFileError(f"index file {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise IndexFileError(f"index file {path} is empty (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head not in _BINARY_FOURCCS:
        raise IndexFileError(f"index file {path} is not a FAISS binary index (header {head!r})")
    if meta is not None and meta.get("file_size") != size:
        raise IndexFileError(
            f"index file {path} is {size} bytes but its sidecar expects {meta.get('file_size')}: "
            "truncated or overwritten"
        )


def _params_from_faiss(raw: faiss.IndexBinary, kind: str) -> dict[str, Any]:
    inner = faiss.downcast_IndexBinary(raw.index) if isinstance(raw, faiss.IndexBinaryIDMap2) else raw
    if kind == "ivf":
        return {"nlist": int(inner.nlist), "nprobe": int(inner.nprobe)}
    if kind == "hnsw":
        h = inner.hnsw
        return {
            "M": int(h.nb_neighbors(1)),
            "ef_construction": int(h.efConstruction),
            "ef_search": int(h.efSearch),
        }
    if kind == "multihash":
        return {"nhash": int(inner.nhash), "b": int(inner.b), "nflip": int(inner.nflip)}
    return {}
