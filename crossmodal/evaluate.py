"""Retrieval metrics on hash codes (and float embeddings), pure numpy, chunked over queries.

Everything here is computed one block of queries at a time, so memory stays bounded by
``chunk_size * n_db`` elements whatever the number of queries; the full ``[n_query, n_db]``
distance matrix is never allocated for large inputs.

Ranking
-------
* **Hamming** (default): codes in {-1, +1} (``[n, bits]``, any signed dtype) or packed
  ``uint8 [n, bits // 8]`` (``crossmodal.codes`` bit order). A ``uint8`` array is always read
  as packed codes.
* **Weighted Hamming**: ``d(q, b) = sum_j w_j [q_j != b_j]`` with per-bit weights ``w``
  (DRSCH). Distances are rounded to 9 decimals so that equal sums tie despite float
  rounding.
* **Cosine**: float embeddings ranked by cosine similarity, highest first (the "float upper
  bound" of a model: its continuous outputs before the sign).

Two orderings of tied items are reported:

* **stable**: ties broken by database order (MATLAB's stable sort, as the DCMH reference
  code does); keys without suffix (``"map"``, ``"p@100"``...).
* **tie-aware**: the expected value over all orderings of tied items, each equally likely
  (McSherry & Najork, "Computing Information Retrieval Performance Measures Efficiently in
  the Presence of Tied Scores", ECIR 2008; for Hamming ranking, He, Cakir, Bargal &
  Sclaroff, "Hashing as Tie-Aware Learning to Rank", CVPR 2018); keys ending ``_tie``.

Relevance
---------
Multi-hot labels (relevant when sharing at least one label; the graded relevance used by
NDCG is the number of shared labels), item keys (relevant only when keys are equal, the
"same image" protocol of captions-only datasets), or an explicit graded matrix for tiny
cases. Every metric but NDCG is binary: an item is relevant when its graded relevance is
``> 0`` (a matrix entry of 0.5 is relevant); NDCG alone uses the graded values themselves,
fractions included. A matrix entry ``<= 0`` is not relevant; NaN or inf is refused.

Metric definitions (R = number of relevant database items of a query, rel_i = 1 when the
item at rank i is relevant, cum_i = rel_1 + ... + rel_i):

* ``map`` (mAP@all, DCMH protocol): AP = (1/R) sum_i rel_i cum_i / i over the whole database;
  a query with R = 0 has AP = 0 and still counts in the mean.
* ``map@k``: AP@k = (1/R_k) sum_{i<=k} rel_i cum_i / i with R_k = cum_k, the number of
  relevant items retrieved in the top k (the convention behind published NUS-WIDE
  mAP@5000 numbers); AP@k = 0 when R_k = 0. With ``map_k_norm="min_rk"`` the divisor is
  min(R, k) instead. Never "the first k relevant hits wherever they rank".
* ``p@k`` = cum_k / k; ``r@k`` = cum_k / R (0 when R = 0). ``k`` larger than the database is
  clipped to the database size (also in the divisor).
* ``ndcg@k``: DCG@k = sum_{i<=k} g_i / log2(i + 1) with gain g = number of shared labels
  (``ndcg_gain="exp"``: 2^g - 1), divided by the DCG of the ideal ordering; 0 when the
  ideal DCG is 0.
* ``pr_radius``: for radius r = 0..bits, precision(r) = (relevant with d <= r) / (items
  with d <= r) and recall(r) = (relevant with d <= r) / R, each averaged over queries;
  precision is 0 for a query with nothing within r (recall 0 when R = 0).
  ``p_radius2`` is precision(2), the usual "precision within Hamming radius 2" with that
  same convention (0 for a query that retrieves nothing). Unweighted Hamming only;
  these are sets, so stable and tie-aware agree.
* ``pr_radius_pooled``: the same curve over all (query, item) pairs at once, as DCMH's
  reference code and the older hashing code it builds on compute it: precision(r) =
  (relevant pairs with d <= r, summed over queries) / (pairs with d <= r), recall(r) =
  (relevant pairs with d <= r) / (all relevant pairs); 0 where the denominator is 0. A query
  that retrieves many items weighs more here than in ``pr_radius``. ``pr_by_radius(...,
  pooled=True)`` gives it alone; the run report plots ``pr_radius`` (the mean over queries).

What a user sees
----------------
``rank_top_k`` gives the stable top-k lists themselves; ``keyword_precision`` scores typed
words (``concept_words`` of the label names, relevant when a caption holds the word,
``word_relevance``) as text queries with P@k; ``code_statistics`` counts distinct codes,
the largest group sharing one code and the per-bit entropy; ``self_rank`` is the rank of
each item when its own code is the query ("is my own image first?").

Tie-aware closed forms
----------------------
Ties form groups of equal distance. Take a group of n items, r of them relevant, that
occupies ranks s+1..s+n, with R_b relevant items ranked before it. Under a uniformly random
order of the group, position s+t (t = 1..n) holds a relevant item with probability r/n,
and given that it does, the expected number of relevant items at positions s+1..s+t-1 is
(t-1)(r-1)/(n-1) (a hypergeometric draw of t-1 of the other n-1 items, r-1 relevant).
By linearity, the expected sum of precisions at relevant ranks over the first m positions
of the group is

    E_m = sum_{t=1}^{m} (r/n) [R_b + 1 + (t-1)(r-1)/(n-1)] / (s+t)
        = (r/n) [ (R_b + 1) dH + (r-1)/(n-1) (m - (s+1) dH) ],   dH = H(s+m) - H(s),

with H the harmonic numbers ((r-1)/(n-1) read as 0 when n = 1). Expected AP@all is
(1/R) sum over groups of E_n, because R does not depend on the order. Expected AP@k with
divisor min(R, k) truncates each group at m = clip(k - s, 0, n). With divisor R_k (random
when the cut at k splits a group), the split group's relevant count X in its first
m = k - s positions is hypergeometric(n, r, m); given X = x those x items are uniformly
placed among the m positions, so the expectation is sum_x P(X = x) (A + E_m(n=m, r=x)) /
(R_b + x), with A the (independent) expected sum of the groups above the cut. Expected
precision/recall at k use the expected relevant count sum r * m / n; expected DCG uses the
group's mean gain at each of its positions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from crossmodal.codes import pack_codes, popcount, unpack_codes, weighted_hamming
from crossmodal.text import tokenize_words

logger = logging.getLogger(__name__)

DIRECTIONS = ("i2t", "t2i", "i2i", "t2t")
DIRECTION_SIDES = {"i2t": ("image", "text"), "t2i": ("text", "image"),
                   "i2i": ("image", "image"), "t2t": ("text", "text")}
METRICS = ("hamming", "cosine")
MAP_K_NORMS = ("retrieved", "min_rk")
NDCG_GAINS = ("linear", "exp")
DEFAULT_MAX_CHUNK_ELEMENTS = 1 << 21


# ----------------------------------------------------------------------------------------
# Code conversions
# ----------------------------------------------------------------------------------------
def as_packed(codes: np.ndarray, name: str = "codes") -> np.ndarray:
    """Return ``uint8 [n, bits // 8]`` packed codes from packed or {-1, +1} input."""
    arr = np.atleast_2d(np.asarray(codes))
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, bits] or [n, bits // 8], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    _check_signs(arr, name)
    # Any length is accepted here (tests use 4-bit codes): the zero padding of the last
    # byte is the same in queries and database, so it adds nothing to Hamming distances.
    return pack_codes(arr, pad=True)


def as_signs(codes: np.ndarray, bits: int | None = None, name: str = "codes") -> np.ndarray:
    """Return ``int8 [n, bits]`` codes in {-1, +1} from packed or {-1, +1} input."""
    arr = np.atleast_2d(np.asarray(codes))
    if arr.dtype == np.uint8:
        return unpack_codes(arr, bits or arr.shape[1] * 8)
    _check_signs(arr, name)
    return arr.astype(np.int8)


def _check_signs(arr: np.ndarray, name: str) -> None:
    if arr.dtype == np.bool_:
        raise ValueError(f"{name}: boolean codes are ambiguous; pass {{-1,+1}} int8 or packed uint8")
    if arr.size and not np.isin(arr, (-1, 1)).all():
        raise ValueError(
            f"{name} must hold only -1/+1 (or be packed uint8); got values like "
            f"{np.unique(arr)[:5].tolist()}. For float embeddings use metric='cosine'."
        )


def code_bits(codes: np.ndarray) -> int:
    """Code length in bits of packed or {-1, +1} codes."""
    arr = np.atleast_2d(np.asarray(codes))
    return arr.shape[1] * 8 if arr.dtype == np.uint8 else arr.shape[1]


# ----------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------
class _Scorer:
    """Prepares the database once; ``distances(queries)`` gives one chunk ``[c, n_db]``.

    ``n_groups`` is the number of distinct integer distances (bits + 1) for plain Hamming,
    or None when distances are floats (ties found by sorting).
    """

    def __init__(self, query: np.ndarray, db: np.ndarray, metric: str, weights: np.ndarray | None) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
        self.metric, self.n_groups = metric, None
        if metric == "cosine":
            self.query, self.db = _normalise(query, "query"), _normalise(db, "database")
            if self.query.shape[1] != self.db.shape[1]:
                raise ValueError(
                    f"embedding sizes differ: query {self.query.shape[1]}, database {self.db.shape[1]}")
            return
        bits = code_bits(query)
        if code_bits(db) != bits:
            raise ValueError(f"code lengths differ: query {bits} bits, database {code_bits(db)} bits")
        if weights is not None:
            self.weights = np.asarray(weights, dtype=np.float64).ravel()
            if self.weights.shape[0] != bits:
                raise ValueError(f"bit_weights has {self.weights.shape[0]} entries for {bits}-bit codes")
            self.query = as_signs(query, bits, "query codes")
            self.db = as_signs(db, bits, "database codes")
            self.metric = "weighted"
            return
        self.n_groups = bits + 1
        self.query = _as_words(as_packed(query, "query codes"))
        self.db = _as_words(as_packed(db, "database codes"))

    @property
    def n_query(self) -> int:
        return self.query.shape[0]

    @property
    def n_db(self) -> int:
        return self.db.shape[0]

    def distances(self, rows: slice) -> np.ndarray:
        q = self.query[rows]
        if self.metric == "cosine":
            return -(q @ self.db.T)  # [c, n_db] float32, smaller is closer
        if self.metric == "weighted":
            return np.round(weighted_hamming(q, self.db, self.weights), 9)  # [c, n_db]
        if self.db.shape[1] == 1:
            return popcount(q[:, :1] ^ self.db[None, :, 0])  # [c, n_db] uint8
        counts = popcount(q[:, None, :] ^ self.db[None, :, :])  # [c, n_db, words]
        return counts.sum(axis=2, dtype=np.uint8 if self.n_groups <= 256 else np.uint16)


def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.atleast_2d(np.asarray(x, dtype=np.float32))
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} embeddings contain NaN or inf")
    return arr / np.maximum(norms, 1e-12)


def _as_words(packed: np.ndarray) -> np.ndarray:
    """View packed bytes as the widest unsigned words that divide the row (fewer popcounts)."""
    nbytes = packed.shape[1]
    for size, dtype in ((8, np.uint64), (4, np.uint32), (2, np.uint16)):
        if nbytes % size == 0:
            return np.ascontiguousarray(packed).view(dtype)
    return packed


# ----------------------------------------------------------------------------------------
# Relevance
# ----------------------------------------------------------------------------------------
class _Relevance:
    """Relevance of a block of queries against the database.

    ``block(rows, graded=True)`` gives ``[c, n_db]`` small unsigned grade indices (shared-label
    counts, 0/1 for keys, or positions in ``values`` for a matrix); ``graded=False`` gives a
    bool matrix (relevant: grade > 0), which is cheaper. ``values[g]`` is the graded relevance
    of grade index ``g`` (``None``: the index is the value), used only by NDCG.
    """

    values: np.ndarray | None = None

    def __init__(self, n_query: int, n_db: int, *, query_labels: Any = None, db_labels: Any = None,
                 query_keys: Any = None, db_keys: Any = None, relevance: Any = None) -> None:
        given = [x is not None for x in (query_labels, query_keys, relevance)]
        if sum(given) != 1:
            raise ValueError("give exactly one of: query_labels/db_labels, query_keys/db_keys, relevance")
        self.kind = ("labels", "keys", "matrix")[given.index(True)]
        if self.kind == "labels":
            q = _check_rows(query_labels, n_query, "query_labels")
            db = _check_rows(db_labels, n_db, "db_labels")
            if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
                raise ValueError(
                    f"labels must be [n, n_labels] with equal n_labels; got {q.shape}, {db.shape}")
            self.n_labels = q.shape[1]
            self.q, self.db = _pack_labels(q > 0), _pack_labels(db > 0)
        elif self.kind == "keys":
            q, db = _check_rows(query_keys, n_query, "query_keys"), _check_rows(db_keys, n_db, "db_keys")
            _, inv = np.unique(np.concatenate([q.ravel(), db.ravel()]), return_inverse=True)
            self.q, self.db = inv[:n_query], inv[n_query:]
        else:
            self.matrix = np.asarray(relevance)
            if self.matrix.shape != (n_query, n_db):
                raise ValueError(f"relevance must be [{n_query}, {n_db}], got {self.matrix.shape}")
            if self.matrix.dtype == object or not np.isfinite(self.matrix.astype(np.float64)).all():
                raise ValueError("relevance must hold finite numbers (got NaN, inf or non-numbers)")
            levels = np.unique(self.matrix[self.matrix > 0]).astype(np.float64)
            if levels.size > 65535:
                raise ValueError(f"relevance has {levels.size} distinct positive values; at most 65535")
            self.values = np.concatenate([[0.0], levels])  # grade index -> graded value

    def block(self, rows: slice, graded: bool = True) -> np.ndarray:
        if self.kind == "keys":
            eq = self.q[rows, None] == self.db[None, :]  # [c, n_db]
            return eq.astype(np.uint8) if graded else eq
        if self.kind == "matrix":
            m = np.asarray(self.matrix[rows])
            if not graded:
                return m > 0
            assert self.values is not None
            dtype = np.uint8 if self.values.size <= 256 else np.uint16
            return np.searchsorted(self.values, np.where(m > 0, m, 0.0)).astype(dtype)
        both = self.q[rows, None, :] & self.db[None, :, :]  # [c, n_db, words]
        if not graded:
            return both[..., 0] != 0 if both.shape[2] == 1 else both.any(axis=2)
        dtype = np.uint8 if self.n_labels < 256 else np.uint16
        return popcount(both).sum(axis=2, dtype=dtype)


def _pack_labels(multi_hot: np.ndarray) -> np.ndarray:
    """Multi-hot ``bool [n, L]`` as ``[n, words]`` unsigned words (so overlap is one AND)."""
    packed = np.packbits(multi_hot, axis=1, bitorder="little")  # [n, ceil(L / 8)]
    nbytes = packed.shape[1]
    size = 1 if nbytes <= 1 else 2 if nbytes <= 2 else 4 if nbytes <= 4 else 8
    width = -(-nbytes // size) * size
    padded = np.zeros((packed.shape[0], width), dtype=np.uint8)
    padded[:, :nbytes] = packed
    return padded.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[size])


def _check_rows(x: Any, n: int, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} is missing")
    arr = np.asarray(x)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows but there are {n} items")
    return arr


# ----------------------------------------------------------------------------------------
# Closed forms and lookup tables
# ----------------------------------------------------------------------------------------
def expected_precision_sum(n: Any, r: Any, s: Any, r_before: Any, m: Any = None,
                           harmonic: np.ndarray | None = None) -> np.ndarray:
    """Expected sum of precision at the relevant ranks among the first ``m`` positions of a tie group.

    The group has ``n`` items, ``r`` relevant, occupies ranks ``s+1..s+n`` and has
    ``r_before`` relevant items ranked before it; the expectation is over all orders of the
    group (formula in the module docstring). Arguments broadcast.

    Args:
        n, r, s, r_before: group size, relevant count, items before, relevant before.
        m: positions counted from the group's start (default ``n``, the whole group).
        harmonic: precomputed ``H[0..N]`` with ``N >= s + m`` (built when omitted).

    Returns:
        ``float64`` array of the broadcast shape.
    """
    n, r, s, rb = (np.asarray(v, dtype=np.int64) for v in (n, r, s, r_before))
    m = n if m is None else np.asarray(m, dtype=np.int64)
    if harmonic is None:
        harmonic = harmonic_numbers(int(np.max(s + m)) if np.size(s + m) else 0)
    dh = harmonic[s + m] - harmonic[s]
    frac = r / np.maximum(n, 1)
    inner = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
    return frac * ((rb + 1) * dh + inner * (m - (s + 1) * dh))


def harmonic_numbers(n: int) -> np.ndarray:
    """``H[0..n]`` with ``H[0] = 0`` and ``H[p] = sum_{i<=p} 1/i``."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n + 1))])


def _cumulative_discount(n: int) -> np.ndarray:
    """``L[0..n]`` with ``L[p] = sum_{i<=p} 1 / log2(i + 1)``."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, n + 2)))])


def _tables(n_db: int) -> dict[str, np.ndarray]:
    discount = _cumulative_discount(n_db)
    return {"harmonic": harmonic_numbers(n_db), "discount": discount, "discount_step": np.diff(discount)}


def _gain(graded: np.ndarray, kind: str) -> np.ndarray:
    return graded.astype(np.float64) if kind == "linear" else np.exp2(graded) - 1.0


# ----------------------------------------------------------------------------------------
# Per-chunk metric computation
# ----------------------------------------------------------------------------------------
@dataclass
class _Spec:
    ks: tuple[int, ...] = (100,)
    map_ks: tuple[int, ...] = ()
    ndcg_ks: tuple[int, ...] = ()
    stable: bool = True
    tie_aware: bool = True
    pr_radius: bool = True
    radius: int = 2
    map_k_norm: str = "retrieved"
    ndcg_gain: str = "linear"
    n_db: int = 0
    tables: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def k_max(self) -> int:
        return min(max((*self.ks, *self.map_ks, *self.ndcg_ks, 1)), self.n_db)


@dataclass
class _Groups:
    """Tie-group statistics per query, ``[c, G]``: size, relevant, start, relevant before, gain sum.

    Groups are in ranking order; empty groups (size 0) are allowed and contribute nothing.
    """

    n: np.ndarray
    r: np.ndarray
    gain: np.ndarray | None
    s: np.ndarray = field(init=False)
    rb: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.s = np.cumsum(self.n, axis=1) - self.n
        self.rb = np.cumsum(self.r, axis=1) - self.r


def _row_groups(d: np.ndarray, grade: np.ndarray, n_groups: int | None, order: np.ndarray | None,
                gains: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One query's tie groups: sizes, relevant counts and gain sums, each ``[G]``.

    Integer distances (``n_groups`` given): group = distance, counted with one bincount of
    ``distance * n_grades + grade``. Float distances: groups are runs of equal values in
    the sorted order (``G = n_db``, padded with empty groups).
    """
    n_grades = len(gains) if gains is not None else 2
    if n_groups is not None and n_grades > 256:  # many graded values: one bincount per statistic
        size = np.bincount(d, minlength=n_groups)
        rel = np.bincount(d[grade > 0], minlength=n_groups)
        return size, rel, None if gains is None else np.bincount(d, weights=gains[grade], minlength=n_groups)
    if n_groups is not None:
        bins = n_groups * n_grades
        dtype = np.uint8 if bins <= 256 else np.uint16 if bins <= 65536 else np.intp
        key = d.astype(dtype) * dtype(n_grades) + grade.astype(dtype)
        counts = np.bincount(key, minlength=n_groups * n_grades).reshape(n_groups, n_grades)
        size = counts.sum(axis=1)
        return size, size - counts[:, 0], None if gains is None else counts @ gains
    ds, gs = d[order], grade[order]
    gid = np.zeros(ds.shape[0], dtype=np.intp)
    np.cumsum(ds[1:] != ds[:-1], out=gid[1:])
    n_db = ds.shape[0]
    size = np.bincount(gid, minlength=n_db)
    rel = np.bincount(gid[gs > 0], minlength=n_db)
    return size, rel, None if gains is None else np.bincount(gid, weights=gains[gs], minlength=n_db)


def _stable_row(rel_sorted: np.ndarray, gain_top: np.ndarray | None, spec: _Spec) -> dict[str, float]:
    """Metrics of one ranking with ties broken by database order (``rel_sorted``: bool ``[n_db]``)."""
    pos = np.flatnonzero(rel_sorted) + 1.0  # ranks of the relevant items
    n_rel = pos.size
    prec = np.arange(1, n_rel + 1) / pos  # precision at each relevant rank
    out = {"map": float(prec.sum()) / n_rel if n_rel else 0.0}
    csum = np.concatenate([[0.0], np.cumsum(prec)])
    for k in spec.map_ks:
        kk = min(k, spec.n_db)
        hits = int(np.searchsorted(pos, kk, side="right"))
        den = hits if spec.map_k_norm == "retrieved" else min(n_rel, kk)
        out[f"map@{k}"] = float(csum[hits]) / den if den else 0.0
    for k in spec.ks:
        kk = min(k, spec.n_db)
        hits = int(np.searchsorted(pos, kk, side="right"))
        out[f"p@{k}"] = hits / kk
        out[f"r@{k}"] = hits / n_rel if n_rel else 0.0
    if gain_top is not None:
        disc = spec.tables["discount_step"]
        for k in spec.ndcg_ks:
            kk = min(k, spec.n_db)
            out[f"ndcg@{k}"] = float(gain_top[:kk] @ disc[:kk])  # DCG; divided by the ideal DCG later
    return out


def _chunk_metrics(d: np.ndarray, rel_block: np.ndarray, spec: _Spec, n_groups: int | None,
                   values: np.ndarray | None = None) -> dict[str, Any]:
    """All per-query metrics of one chunk: ``{key: [c] or [c, G] array}``.

    ``rel_block`` holds grade indices (relevant: > 0); ``values[g]`` is the graded relevance of
    index ``g`` (default: ``g`` itself), which only NDCG's gains read.
    """
    c = d.shape[0]
    grade = rel_block.view(np.uint8) if rel_block.dtype == np.bool_ else rel_block  # [c, n_db]
    top_grade = int(grade.max(initial=0))
    levels = np.arange(top_grade + 1) if values is None else values[: top_grade + 1]
    gains = _gain(levels, spec.ndcg_gain) if spec.ndcg_ks else None  # [grades]
    need_order = spec.stable or (n_groups is None and spec.tie_aware)
    need_groups = spec.tie_aware or spec.pr_radius
    order = np.argsort(d, axis=1, kind="stable") if need_order else None  # [c, n_db]
    rows, groups, grade_counts = [], [], []
    for i in range(c):
        o = None if order is None else order[i]
        if spec.stable:
            top = None if gains is None else gains[grade[i][o[: spec.k_max]]]
            rows.append(_stable_row(grade[i][o] > 0, top, spec))
        if need_groups:
            groups.append(_row_groups(d[i], grade[i], n_groups, o, gains))
        if gains is not None:
            grade_counts.append(np.bincount(grade[i], minlength=len(gains)))
    out: dict[str, Any] = {"n_rel": np.count_nonzero(grade, axis=1)}
    out.update({key: np.array([r[key] for r in rows]) for key in (rows[0] if rows else {})})
    idcg = ({k: _ideal_dcg(np.stack(grade_counts), k, spec, gains) for k in spec.ndcg_ks}
            if gains is not None else {})
    if need_groups:
        g = _Groups(*(None if x[0] is None else np.stack(x) for x in zip(*groups, strict=True)))
        if spec.tie_aware:
            out.update(_tie_metrics(g, out["n_rel"], spec, idcg))
        if spec.pr_radius:
            out.update(_radius_metrics(g, out["n_rel"]))
    for k in spec.ndcg_ks if spec.stable else ():
        out[f"ndcg@{k}"] = _safe_div(out[f"ndcg@{k}"], idcg[k])
    return out


def _safe_div(num: Any, den: Any) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _ideal_dcg(grade_counts: np.ndarray, k: int, spec: _Spec, gains: np.ndarray) -> np.ndarray:
    """DCG@k of the ideal ordering, from the count of each relevance grade per query ``[c, grades]``
    (grades in increasing order of gain, ``gains[g]`` the gain of grade ``g``)."""
    disc = spec.tables["discount"]
    kk = min(k, spec.n_db)
    idcg = np.zeros(grade_counts.shape[0])
    start = np.zeros(grade_counts.shape[0], dtype=np.int64)
    for v in range(grade_counts.shape[1] - 1, 0, -1):  # best grade first
        end = np.minimum(start + grade_counts[:, v], kk)
        idcg += gains[v] * (disc[end] - disc[np.minimum(start, kk)])
        start = start + grade_counts[:, v]
    return idcg


def _tie_metrics(g: _Groups, n_rel: np.ndarray, spec: _Spec, idcg: dict[int, np.ndarray]) -> dict[str, Any]:
    """Expected metrics over all orderings of tied items (closed forms: module docstring)."""
    h, n_db = spec.tables["harmonic"], spec.n_db
    out = {"map_tie": _safe_div(expected_precision_sum(g.n, g.r, g.s, g.rb, harmonic=h).sum(axis=1), n_rel)}
    for k in spec.map_ks:
        kk = min(k, n_db)
        if spec.map_k_norm == "min_rk":
            m = np.clip(kk - g.s, 0, g.n)
            num = expected_precision_sum(g.n, g.r, g.s, g.rb, m, harmonic=h).sum(axis=1)
            out[f"map@{k}_tie"] = _safe_div(num, np.minimum(n_rel, kk))
        else:
            out[f"map@{k}_tie"] = _tie_map_at_k_retrieved(g, kk, h)
    for k in spec.ks:
        kk = min(k, n_db)
        m = np.clip(kk - g.s, 0, g.n)
        hits = (g.r * _safe_div(m, g.n)).sum(axis=1)  # expected relevant items in the top k
        out[f"p@{k}_tie"] = hits / kk
        out[f"r@{k}_tie"] = _safe_div(hits, n_rel)
    if g.gain is not None:
        disc = spec.tables["discount"]
        for k in spec.ndcg_ks:
            m = np.clip(min(k, n_db) - g.s, 0, g.n)
            dcg = (_safe_div(g.gain, g.n) * (disc[g.s + m] - disc[g.s])).sum(axis=1)
            out[f"ndcg@{k}_tie"] = _safe_div(dcg, idcg[k])
    return out


def _tie_map_at_k_retrieved(g: _Groups, k: int, harmonic: np.ndarray) -> np.ndarray:
    """Expected AP@k divided by the (random) number of relevant items in the top k."""
    inside = (g.s + g.n <= k) & (g.n > 0)
    part = np.where(inside, expected_precision_sum(g.n, g.r, g.s, g.rb, harmonic=harmonic), 0.0).sum(axis=1)
    r_in = np.where(inside, g.r, 0).sum(axis=1)
    out = _safe_div(part, r_in)
    split = (g.s < k) & (g.s + g.n > k)
    for i in np.flatnonzero(split.any(axis=1)):
        j = int(np.flatnonzero(split[i])[0])
        n, r, s, m = int(g.n[i, j]), int(g.r[i, j]), int(g.s[i, j]), k - int(g.s[i, j])
        x = np.arange(max(0, m - (n - r)), min(r, m) + 1)
        p = _hypergeom_pmf(x, n, r, m)
        head = expected_precision_sum(m, x, s, r_in[i], m, harmonic=harmonic)
        out[i] = float(np.sum(p * _safe_div(part[i] + head, r_in[i] + x)))
    return out


def _hypergeom_pmf(x: np.ndarray, n: int, r: int, m: int) -> np.ndarray:
    """P(X = x) for X relevant items among m drawn without replacement from n items, r relevant."""
    from scipy.special import gammaln

    def log_choose(a: Any, b: Any) -> Any:
        return gammaln(a + 1.0) - gammaln(b + 1.0) - gammaln(a - b + 1.0)

    return np.exp(log_choose(r, x) + log_choose(n - r, m - x) - log_choose(n, m))


def _radius_metrics(g: _Groups, n_rel: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query precision and recall of the items within each Hamming radius ``[c, bits + 1]``,
    and the counts behind them (items and relevant items within each radius) for pooling."""
    within = np.cumsum(g.n, axis=1)
    hits = np.cumsum(g.r, axis=1)
    return {"_pr_precision": _safe_div(hits, within), "_pr_recall": _safe_div(hits, n_rel[:, None]),
            "_pr_within": within, "_pr_hits": hits}


# ----------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------
def _chunks(n_query: int, n_db: int, chunk_size: int | None, max_elements: int) -> Iterator[slice]:
    size = chunk_size if chunk_size else max(1, max_elements // max(n_db, 1))
    if size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n_query, size):
        yield slice(start, min(start + size, n_query))


def evaluate_retrieval(
    query: np.ndarray,
    db: np.ndarray,
    *,
    query_labels: np.ndarray | None = None,
    db_labels: np.ndarray | None = None,
    query_keys: np.ndarray | Sequence[Any] | None = None,
    db_keys: np.ndarray | Sequence[Any] | None = None,
    relevance: np.ndarray | None = None,
    metric: str = "hamming",
    bit_weights: np.ndarray | None = None,
    ks: Sequence[int] = (100,),
    map_ks: Sequence[int] = (),
    ndcg_ks: Sequence[int] | None = None,
    stable: bool = True,
    tie_aware: bool = True,
    pr_radius: bool = True,
    radius: int = 2,
    map_k_norm: str = "retrieved",
    ndcg_gain: str = "linear",
    chunk_size: int | None = None,
    max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    per_query: bool = False,
) -> dict[str, Any]:
    """Evaluate one retrieval direction: every query against the whole database.

    Args:
        query: query codes (``{-1,+1}`` or packed ``uint8``) or float embeddings (cosine).
        db: database codes or embeddings, same kind as ``query``.
        query_labels, db_labels: multi-hot labels ``[n, n_labels]`` (relevant: >= 1 shared).
        query_keys, db_keys: item keys (relevant: equal keys; "same image").
        relevance: explicit graded relevance ``[n_query, n_db]`` (small cases only): relevant
            where ``> 0`` for every metric; the values themselves grade NDCG.
        metric: ``"hamming"`` or ``"cosine"``.
        bit_weights: per-bit weights for weighted Hamming (``metric="hamming"`` only).
        ks: cut-offs for precision@k and recall@k.
        map_ks: cut-offs for mAP@k (definition and ``map_k_norm``: module docstring).
        ndcg_ks: cut-offs for NDCG@k (default: ``ks``).
        stable, tie_aware: which orderings of ties to report (``key`` and ``key_tie``).
        pr_radius: also compute precision/recall by Hamming radius (plain Hamming only).
        radius: the radius of ``p_radius{radius}`` (default: precision within radius 2).
        map_k_norm: ``"retrieved"`` (divide by relevant items in the top k) or ``"min_rk"``.
        ndcg_gain: ``"linear"`` (gain = shared labels) or ``"exp"`` (2^g - 1).
        chunk_size: queries per block (default: ``max_chunk_elements // n_db``).
        max_chunk_elements: bound on ``chunk_size * n_db`` when ``chunk_size`` is None.
        per_query: also return the per-query values under ``"per_query"``.

    Returns:
        A JSON-ready dict of means: ``map``, ``map_tie``, ``map@k``, ``p@k``, ``r@k``,
        ``ndcg@k`` (each with ``_tie``), ``p_radius2``, ``pr_radius`` (``radius``,
        ``precision``, ``recall`` lists, averaged over queries), ``pr_radius_pooled`` (the
        same over all pairs), ``n_query``, ``n_db``, ``n_query_no_relevant``.
    """
    if map_k_norm not in MAP_K_NORMS:
        raise ValueError(f"unknown map_k_norm {map_k_norm!r}; valid: {', '.join(MAP_K_NORMS)}")
    if ndcg_gain not in NDCG_GAINS:
        raise ValueError(f"unknown ndcg_gain {ndcg_gain!r}; valid: {', '.join(NDCG_GAINS)}")
    if bit_weights is not None and metric != "hamming":
        raise ValueError("bit_weights applies to metric='hamming' only")
    scorer = _Scorer(query, db, metric, bit_weights)
    rel = _Relevance(scorer.n_query, scorer.n_db, query_labels=query_labels, db_labels=db_labels,
                     query_keys=query_keys, db_keys=db_keys, relevance=relevance)
    all_ks = [int(k) for k in (*ks, *map_ks, *(ndcg_ks or ()))]
    if any(k < 1 for k in all_ks):
        raise ValueError(f"cut-offs must be >= 1, got {all_ks}")
    if scorer.n_db == 0:
        raise ValueError("the database is empty")
    spec = _Spec(tuple(ks), tuple(map_ks), tuple(ks if ndcg_ks is None else ndcg_ks), stable, tie_aware,
                 pr_radius and scorer.n_groups is not None, radius, map_k_norm, ndcg_gain, scorer.n_db,
                 _tables(scorer.n_db))
    parts: dict[str, list[np.ndarray]] = {}
    blocks = list(_chunks(scorer.n_query, scorer.n_db, chunk_size, max_chunk_elements))
    for rows in tqdm(blocks, desc="evaluate", disable=None, leave=False):
        block = rel.block(rows, graded=bool(spec.ndcg_ks))
        values = _chunk_metrics(scorer.distances(rows), block, spec, scorer.n_groups, rel.values)
        for key, v in values.items():
            parts.setdefault(key, []).append(v)
    per = {key: np.concatenate(v) for key, v in parts.items()} if parts else {}
    return _summarise(per, spec, scorer, per_query)


def _summarise(per: dict[str, np.ndarray], spec: _Spec, scorer: _Scorer, per_query: bool) -> dict[str, Any]:
    n_rel = per.get("n_rel", np.zeros(0))
    out: dict[str, Any] = {"n_query": scorer.n_query, "n_db": scorer.n_db,
                           "n_query_no_relevant": int(np.sum(n_rel == 0))}
    for key, v in per.items():
        if not key.startswith("_") and key != "n_rel":
            out[key] = float(v.mean()) if v.size else 0.0
    if "_pr_precision" in per:
        prec, rec = per["_pr_precision"].mean(axis=0), per["_pr_recall"].mean(axis=0)
        radii = list(range(len(prec)))
        out["pr_radius"] = {"radius": radii, "precision": prec.tolist(), "recall": rec.tolist()}
        out[f"p_radius{spec.radius}"] = float(prec[min(spec.radius, len(prec) - 1)])
        hits = per["_pr_hits"].sum(axis=0)  # relevant pairs within each radius, all queries
        pooled_prec = _safe_div(hits, per["_pr_within"].sum(axis=0))
        out["pr_radius_pooled"] = {"radius": radii, "precision": pooled_prec.tolist(),
                                   "recall": _safe_div(hits, n_rel.sum()).tolist()}
    if per_query:
        out["per_query"] = {k.lstrip("_"): v for k, v in per.items()}
    logger.debug("evaluated %d queries x %d items: map=%s", scorer.n_query, scorer.n_db, out.get("map"))
    return out


def _side(value: Any, modality: str, name: str) -> Any:
    """Per-modality value: ``value[modality]`` for a mapping, else ``value`` itself."""
    if isinstance(value, Mapping):
        if modality not in value:
            raise KeyError(f"{name} has no entry {modality!r}; keys: {', '.join(map(str, value))}")
        return value[modality]
    return value


def relevance_args(labels: np.ndarray, q_idx: np.ndarray, db_idx: np.ndarray) -> dict[str, np.ndarray]:
    """Relevance arguments of ``evaluate_directions`` for items at positions ``q_idx`` / ``db_idx``.

    ``labels [n, L]``: "shares a label" (``query_labels`` / ``db_labels``); with ``L = 0``
    (captions-only data), "same item" (``query_keys`` / ``db_keys``: the positions).
    """
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1]:
        return {"query_labels": labels[q_idx], "db_labels": labels[db_idx]}
    return {"query_keys": np.asarray(q_idx), "db_keys": np.asarray(db_idx)}


def evaluate_directions(
    codes: Mapping[str, np.ndarray] | None = None,
    *,
    query_image: np.ndarray | None = None,
    query_text: np.ndarray | None = None,
    db_image: np.ndarray | None = None,
    db_text: np.ndarray | None = None,
    query_labels: Any = None,
    db_labels: Any = None,
    query_keys: Any = None,
    db_keys: Any = None,
    directions: Sequence[str] = DIRECTIONS,
    **options: Any,
) -> dict[str, dict[str, Any]]:
    """Evaluate the cross-modal (i2t, t2i) and single-modal (i2i, t2t) directions.

    Direction ``x2y`` ranks the ``db_y`` items for each ``query_x`` item; i2t is image
    queries against the text database.

    Args:
        codes: optional mapping with keys ``query_image``, ``query_text``, ``db_image``,
            ``db_text`` (the same arrays can be given as keyword arguments instead).
        query_image, query_text, db_image, db_text: codes (``{-1,+1}`` or packed) or float
            embeddings with ``metric="cosine"``; only those the directions need.
        query_labels, db_labels: multi-hot labels, one array shared by both modalities
            (paired data), or a mapping ``{"image": ..., "text": ...}`` when the two
            modalities have different items (e.g. several captions per image).
        query_keys, db_keys: item keys ("same image" relevance), array or mapping as above.
        directions: a subset of ``("i2t", "t2i", "i2i", "t2t")``.
        **options: passed to ``evaluate_retrieval`` (``ks``, ``map_ks``, ``metric``,
            ``bit_weights``, ``tie_aware``, ``chunk_size``...).

    Returns:
        ``{direction: evaluate_retrieval result}``.
    """
    given = {"query_image": query_image, "query_text": query_text, "db_image": db_image, "db_text": db_text}
    arrays = {**dict(codes or {}), **{k: v for k, v in given.items() if v is not None}}
    unknown = set(arrays) - set(given)
    if unknown:
        raise KeyError(f"unknown code keys {sorted(unknown)}; valid keys: {', '.join(given)}")
    results: dict[str, dict[str, Any]] = {}
    for direction in directions:
        if direction not in DIRECTION_SIDES:
            raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
        q_mod, db_mod = DIRECTION_SIDES[direction]
        for key in (f"query_{q_mod}", f"db_{db_mod}"):
            if arrays.get(key) is None:
                raise KeyError(
                    f"direction {direction} needs codes {key!r}; given: {', '.join(sorted(arrays))}")
        targets = {
            "query_labels": _side(query_labels, q_mod, "query_labels"),
            "db_labels": _side(db_labels, db_mod, "db_labels"),
            "query_keys": _side(query_keys, q_mod, "query_keys"),
            "db_keys": _side(db_keys, db_mod, "db_keys"),
        }
        results[direction] = evaluate_retrieval(arrays[f"query_{q_mod}"], arrays[f"db_{db_mod}"],
                                                **targets, **options)
        logger.info("%s: mAP %.4f", direction, results[direction].get("map", float("nan")))
    return results


# ----------------------------------------------------------------------------------------
# One-metric conveniences (each runs evaluate_retrieval with only what it needs)
# ----------------------------------------------------------------------------------------
def _select(tie_aware: bool) -> dict[str, bool]:
    return {"stable": not tie_aware, "tie_aware": tie_aware}


def map_at_all(query: np.ndarray, db: np.ndarray, *, tie_aware: bool = False, **kw: Any) -> float:
    """mAP over the whole database (DCMH protocol); ``tie_aware`` for the expected value over ties.

    ``kw``: relevance (``query_labels``/``db_labels``, ``query_keys``/``db_keys`` or
    ``relevance``) and other ``evaluate_retrieval`` options.
    """
    res = evaluate_retrieval(query, db, ks=(), pr_radius=False, **_select(tie_aware), **kw)
    return res["map_tie" if tie_aware else "map"]


def map_at_k(query: np.ndarray, db: np.ndarray, k: int, *, tie_aware: bool = False,
             norm: str = "retrieved", **kw: Any) -> float:
    """mAP@k: AP over the top k divided by the relevant items retrieved there (``norm="retrieved"``)
    or by min(R, k) (``norm="min_rk"``)."""
    res = evaluate_retrieval(query, db, ks=(), map_ks=(k,), map_k_norm=norm, pr_radius=False,
                             **_select(tie_aware), **kw)
    return res[f"map@{k}" + ("_tie" if tie_aware else "")]


def precision_at_k(query: np.ndarray, db: np.ndarray, k: int, *, tie_aware: bool = False, **kw: Any) -> float:
    """Mean fraction of relevant items among the top k."""
    res = evaluate_retrieval(query, db, ks=(k,), ndcg_ks=(), pr_radius=False, **_select(tie_aware), **kw)
    return res[f"p@{k}" + ("_tie" if tie_aware else "")]


def recall_at_k(query: np.ndarray, db: np.ndarray, k: int, *, tie_aware: bool = False, **kw: Any) -> float:
    """Mean fraction of a query's relevant items found in the top k (0 when it has none)."""
    res = evaluate_retrieval(query, db, ks=(k,), ndcg_ks=(), pr_radius=False, **_select(tie_aware), **kw)
    return res[f"r@{k}" + ("_tie" if tie_aware else "")]


def ndcg_at_k(query: np.ndarray, db: np.ndarray, k: int, *, tie_aware: bool = False, **kw: Any) -> float:
    """NDCG@k with graded relevance (number of shared labels)."""
    res = evaluate_retrieval(query, db, ks=(), ndcg_ks=(k,), pr_radius=False, **_select(tie_aware), **kw)
    return res[f"ndcg@{k}" + ("_tie" if tie_aware else "")]


def pr_by_radius(query: np.ndarray, db: np.ndarray, *, pooled: bool = False,
                 **kw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of the items within Hamming radius 0..bits: two ``[bits + 1]`` arrays.

    Args:
        pooled: False (default) averages each query's precision and recall (``pr_radius``);
            True pools all (query, item) pairs first, as DCMH's reference code does
            (``pr_radius_pooled``). Definitions: module docstring.
        kw: relevance and other ``evaluate_retrieval`` options.
    """
    res = evaluate_retrieval(query, db, ks=(), ndcg_ks=(), stable=False, tie_aware=False, pr_radius=True,
                             **kw)
    if "pr_radius" not in res:
        raise ValueError("precision-recall by radius needs plain Hamming codes (no bit_weights, no cosine)")
    curve = res["pr_radius_pooled" if pooled else "pr_radius"]
    return np.asarray(curve["precision"]), np.asarray(curve["recall"])


def precision_within_radius(query: np.ndarray, db: np.ndarray, radius: int = 2, *, pooled: bool = False,
                            **kw: Any) -> float:
    """Precision of the items within Hamming distance <= ``radius``: the mean over queries (0 for a
    query with none), or with ``pooled`` the fraction of relevant pairs among all pairs within it."""
    precision, _ = pr_by_radius(query, db, pooled=pooled, **kw)
    return float(precision[min(radius, len(precision) - 1)])


def average_precision(rel_sorted: Sequence[int] | np.ndarray, k: int | None = None,
                      norm: str = "retrieved") -> float:
    """AP of one ranked list of 0/1 relevance (a reference for tests and docs).

    ``k=None`` gives AP@all (divided by all relevant items in the list); with ``k`` the sum
    runs over the top k and is divided as ``map_k_norm`` says (``"min_rk"`` needs the whole
    list to know R).
    """
    rel = np.asarray(rel_sorted, dtype=bool)
    top = rel if k is None else rel[:k]
    hits = np.cumsum(top)
    num = float(np.sum(hits[top] / (np.flatnonzero(top) + 1)))
    if k is None:
        den = rel.sum()
    else:
        den = top.sum() if norm == "retrieved" else min(int(rel.sum()), k)
    return num / den if den else 0.0


# ----------------------------------------------------------------------------------------
# What a user sees: ranked lists, typed keywords, the codes themselves
# ----------------------------------------------------------------------------------------
def rank_top_k(query: np.ndarray, db: np.ndarray, k: int, *, metric: str = "hamming",
               bit_weights: np.ndarray | None = None, chunk_size: int | None = None,
               max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database items of each query, ties broken by database order (stable).

    Args:
        query, db: codes (or float embeddings with ``metric="cosine"``), as ``evaluate_retrieval``.
        k: how many items per query (clipped to the database size).
        metric, bit_weights: the ranking, as ``evaluate_retrieval``.

    Returns:
        ``(indices, distances)``, each ``[n_query, min(k, n_db)]``: database positions, and
        their distances (Hamming, weighted Hamming, or minus the cosine similarity).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scorer = _Scorer(query, db, metric, bit_weights)
    kk = min(int(k), scorer.n_db)
    idx = np.zeros((scorer.n_query, kk), dtype=np.int64)
    dist = np.zeros((scorer.n_query, kk), dtype=np.float64)
    for rows in _chunks(scorer.n_query, scorer.n_db, chunk_size, max_chunk_elements):
        d = scorer.distances(rows)  # [c, n_db]
        order = np.argsort(d, axis=1, kind="stable")[:, :kk]
        idx[rows], dist[rows] = order, np.take_along_axis(d, order, axis=1)
    return idx, dist


def concept_words(label_names: Sequence[str]) -> list[str]:
    """The label names that are one word: ``kind:`` prefix dropped, lower-cased, letters only.

    ``word:cat`` -> ``cat``, ``animals`` -> ``animals``; ``subgroup:face-smiling`` (a hyphen)
    and ``label_0`` (an underscore, a digit) are not words. Each word is also exactly one token
    of ``crossmodal.text.tokenize_words``, so that it can be matched against captions.
    Returned in order of first appearance, without repeats.
    """
    words: dict[str, None] = {}
    for name in label_names:
        word = str(name).split(":", 1)[-1].strip().lower()
        if word.isalpha() and tokenize_words(word) == [word]:
            words.setdefault(word, None)
    return list(words)


def word_relevance(captions: Sequence[Sequence[str] | str], words: Sequence[str]) -> np.ndarray:
    """``bool [n_words, n_items]``: item j is relevant to word i when one of its captions holds
    the word as a whole word (``tokenize_words``: ``cat`` matches "black cat", not "cats")."""
    column = {w: i for i, w in enumerate(words)}
    out = np.zeros((len(words), len(captions)), dtype=bool)
    for j, caps in enumerate(captions):
        texts = [caps] if isinstance(caps, str) else caps
        for token in {t for text in texts for t in tokenize_words(text)}:
            i = column.get(token)
            if i is not None:
                out[i, j] = True
    return out


def keyword_precision(word_codes: np.ndarray, db_codes: np.ndarray, relevance: np.ndarray, k: int = 10,
                      **options: Any) -> dict[str, Any]:
    """Precision@k of typed words used as text queries against database images.

    ``relevance`` is ``[n_words, n_db]`` (``word_relevance``); ranking is ``evaluate_retrieval``'s
    (stable by database order, plus the tie-aware expectation). A word without any relevant
    item cannot be judged: it is left out of the means (and counted).

    Args:
        word_codes: codes of the words ``[n_words, bits]``; db_codes: ``[n_db, bits]``.
        relevance: bool or 0/1 ``[n_words, n_db]``.
        k: the cut-off.
        **options: ``metric``, ``bit_weights``, ``chunk_size`` (as ``evaluate_retrieval``).

    Returns:
        ``{"p@k", "p@k_tie", "ceiling" (mean of min(R, k) / k, the best possible P@k),
        "n_words" (judged), "n_words_no_relevant", "n_db", "per_word": {"n_relevant", "p@k",
        "p@k_tie"} (arrays over all words)}``.
    """
    rel = np.asarray(relevance, dtype=bool)
    res = evaluate_retrieval(word_codes, db_codes, relevance=rel, ks=(k,), ndcg_ks=(), pr_radius=False,
                             per_query=True, **options)
    per = res["per_query"]
    n_rel = np.asarray(per["n_rel"], dtype=np.int64)
    judged = n_rel > 0
    kk = min(k, rel.shape[1])

    def mean(values: np.ndarray) -> float:
        return float(values[judged].mean()) if judged.any() else 0.0

    return {
        f"p@{k}": mean(per[f"p@{k}"]), f"p@{k}_tie": mean(per[f"p@{k}_tie"]),
        "ceiling": mean(np.minimum(n_rel, kk) / max(kk, 1)),
        "n_words": int(judged.sum()), "n_words_no_relevant": int((~judged).sum()), "n_db": int(rel.shape[1]),
        "per_word": {"n_relevant": n_rel, f"p@{k}": per[f"p@{k}"], f"p@{k}_tie": per[f"p@{k}_tie"]},
    }  # fmt: skip


def code_statistics(codes: np.ndarray, bits: int | None = None) -> dict[str, Any]:
    """How a set of codes uses the code space.

    Args:
        codes: ``[n, bits]`` in {-1, +1}, or packed ``uint8`` (then ``bits``, default 8 per byte).

    Returns:
        ``n_items``, ``bits``, ``n_distinct`` (distinct codes), ``largest_group`` (most items
        sharing one code), ``bit_entropy`` (mean over bits of the binary entropy of the
        fraction of +1, in bits: 1.0 when every bit is +1 for half the items) and
        ``bit_entropy_min`` (the least informative bit).
    """
    signs = as_signs(codes, bits, "codes")  # [n, bits]
    n, b = signs.shape
    if n == 0:
        return {"n_items": 0, "bits": b, "n_distinct": 0, "largest_group": 0, "bit_entropy": 0.0,
                "bit_entropy_min": 0.0}
    _, counts = np.unique(as_packed(signs), axis=0, return_counts=True)
    p = (signs > 0).mean(axis=0)  # [bits] fraction of +1
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.nan_to_num(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))  # 0 log 0 = 0
    return {"n_items": int(n), "bits": int(b), "n_distinct": int(counts.size),
            "largest_group": int(counts.max()), "bit_entropy": float(entropy.mean()),
            "bit_entropy_min": float(entropy.min())}  # fmt: skip


def self_rank(codes: np.ndarray, ks: Sequence[int] = (1, 10), *, metric: str = "hamming",
              bit_weights: np.ndarray | None = None, chunk_size: int | None = None,
              max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS, per_item: bool = False) -> dict[str, Any]:
    """Where each item ranks when its own code queries the set it belongs to ("own-image rank").

    With ``c`` items strictly closer than the item's own distance and ``t`` items at that
    distance (the item itself included), the stable rank (ties by database order) is
    ``1 + c + (tied items before it)``; over random orders of the tie the expected rank is
    ``1 + c + (t - 1) / 2`` and P(rank <= k) is ``clip(k - c, 0, t) / t``. With Hamming
    distances the own distance is 0, so ``c = 0`` and the items at distance 0 share one code:
    averaged over all items, the stable and tie-aware summaries then agree (a group of t
    items fills ranks 1..t either way); they differ per item.

    Args:
        codes: ``[n, bits]`` codes (or embeddings with ``metric="cosine"``).
        ks: cut-offs for the fraction of items within the top k.
        metric, bit_weights: the ranking, as ``evaluate_retrieval``.
        per_item: also return ``per_item`` arrays ``rank``, ``rank_tie``, ``closer``, ``tied``.

    Returns:
        ``n_items``, ``top{k}`` and ``top{k}_tie`` (fraction of items at rank <= k),
        ``mean_rank``, ``mean_rank_tie``, ``median_rank``.
    """
    scorer = _Scorer(codes, codes, metric, bit_weights)
    n = scorer.n_db
    closer, tied, before = (np.zeros(n, dtype=np.int64) for _ in range(3))
    cols = np.arange(n)
    for rows in _chunks(n, n, chunk_size, max_chunk_elements):
        d = scorer.distances(rows)  # [c, n]
        own_pos = cols[rows]
        own = d[np.arange(d.shape[0]), own_pos][:, None]
        same = d == own
        closer[rows] = np.count_nonzero(d < own, axis=1)
        tied[rows] = np.count_nonzero(same, axis=1)
        before[rows] = np.count_nonzero(same & (cols[None, :] < own_pos[:, None]), axis=1)
    rank, rank_tie = 1 + closer + before, 1 + closer + (tied - 1) / 2
    out: dict[str, Any] = {"n_items": int(n)}
    for k in ks:
        out[f"top{k}"] = float(np.mean(rank <= k)) if n else 0.0
        out[f"top{k}_tie"] = float(np.mean(np.clip(k - closer, 0, tied) / np.maximum(tied, 1))) if n else 0.0
    out.update(mean_rank=float(rank.mean()) if n else 0.0, mean_rank_tie=float(rank_tie.mean()) if n else 0.0,
               median_rank=float(np.median(rank)) if n else 0.0)
    if per_item:
        out["per_item"] = {"rank": rank, "rank_tie": rank_tie, "closer": closer, "tied": tied}
    return out
