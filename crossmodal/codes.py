"""Binary codes: sign, bit packing and a plain numpy Hamming reference.

Codes live in two forms:

* **unpacked**: ``[n, d]`` arrays of -1/+1 (numpy or torch), what the models produce;
* **packed**: ``uint8 [n, d // 8]``, what FAISS binary indexes store.

Bit order (fixed, part of the on-disk format): bit ``j`` of a code goes to byte ``j // 8``
at bit position ``j % 8`` counted from the least significant bit, and ``+1 -> 1``,
``-1 -> 0``. So the 8-bit code ``[+1, -1, -1, -1, -1, -1, -1, -1]`` packs to ``0x01`` and
``[-1, -1, -1, -1, -1, -1, -1, +1]`` packs to ``0x80``. This is ``np.packbits(...,
bitorder="little")``, the same order FAISS uses when it builds codes from floats
(``faiss.real_to_binary``), so Hamming distances agree either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _is_torch(x: Any) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch")


def sign(x: Any) -> Any:
    """Map values to -1/+1, with 0 mapped to +1 (``np.sign`` would give 0).

    Args:
        x: a numpy array, a torch tensor or anything ``np.asarray`` accepts.

    Returns:
        The same kind of object: an ``int8`` numpy array, or for a torch tensor a tensor of
        the input's floating dtype (float32 for integer input) on the same device, so that
        it can be used in losses directly.
    """
    if _is_torch(x):
        import torch

        dtype = x.dtype if x.is_floating_point() else torch.float32
        return torch.where(x >= 0, 1.0, -1.0).to(dtype)
    arr = np.asarray(x)
    return np.where(arr >= 0, 1, -1).astype(np.int8)


def _check_bits(d: int) -> None:
    if d <= 0 or d % 8:
        raise ValueError(f"code length d={d} must be a positive multiple of 8")


def pack_codes(codes: Any, pad: bool = False) -> np.ndarray:
    """Pack ``[n, d]`` codes in {-1, +1} into ``uint8 [n, ceil(d / 8)]`` (bit order: module docstring).

    Any value ``>= 0`` counts as +1 (so 0/1 bits and raw real-valued outputs also pack as
    ``sign`` would). ``d`` must be a multiple of 8 unless ``pad``, which fills the last
    byte with zero bits (equal in every code, so they add nothing to Hamming distances).

    Raises:
        ValueError: codes that are not 2-D, or a ``d`` that is not a multiple of 8.
    """
    if _is_torch(codes):
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"codes must be [n, d], got shape {arr.shape}")
    if not pad:
        _check_bits(arr.shape[1])
    return np.packbits(arr >= 0, axis=1, bitorder="little")


def unpack_codes(packed: np.ndarray, d: int) -> np.ndarray:
    """Unpack ``uint8 [n, d // 8]`` into ``int8 [n, d]`` codes in {-1, +1}."""
    _check_bits(d)
    packed = np.asarray(packed)
    if packed.ndim == 1:
        packed = packed[None, :]
    if packed.dtype != np.uint8 or packed.ndim != 2 or packed.shape[1] != d // 8:
        raise ValueError(
            f"packed codes must be uint8 [n, {d // 8}] for d={d}, got {packed.dtype} {packed.shape}"
        )
    bits = np.unpackbits(packed, axis=1, bitorder="little")
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


def popcount(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each element of an unsigned integer array (same shape, ``uint8``).

    Uses ``np.bitwise_count`` (NumPy >= 2) when present, else a byte lookup table.

    Raises:
        ValueError: ``x`` is not of an unsigned integer dtype.
    """
    x = np.asarray(x)
    if x.dtype.kind != "u":
        raise ValueError(f"popcount needs unsigned integers, got {x.dtype}")
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    if x.dtype == np.uint8:
        return _POPCOUNT_TABLE[x]
    as_bytes = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, x.dtype.itemsize)
    return _POPCOUNT_TABLE[as_bytes].sum(axis=-1, dtype=np.uint8)


def _check_packed_pair(q: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = np.atleast_2d(np.asarray(q))
    db = np.atleast_2d(np.asarray(db))
    if q.dtype != np.uint8 or db.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got {q.dtype} and {db.dtype}")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"code lengths differ: queries {q.shape[1]} bytes, database {db.shape[1]} bytes")
    return q, db


def hamming_distances(q_packed: np.ndarray, db_packed: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Exact Hamming distances between packed codes, the reference for every index.

    Args:
        q_packed: ``uint8 [nq, B]``.
        db_packed: ``uint8 [n, B]``.
        chunk: queries processed at once (bounds memory to ``chunk * n * B`` bytes).

    Returns:
        ``int32 [nq, n]``.
    """
    q, db = _check_packed_pair(q_packed, db_packed)
    out = np.empty((q.shape[0], db.shape[0]), dtype=np.int32)
    for start in range(0, q.shape[0], chunk):
        block = np.bitwise_xor(q[start : start + chunk, None, :], db[None, :, :])  # [c, n, B]
        out[start : start + chunk] = popcount(block).sum(axis=2, dtype=np.int32)
    return out


def weighted_hamming(q_codes: Any, db_codes: Any, weights: Any) -> Any:
    """Weighted Hamming distance ``sum_j w_j [q_j != b_j]`` on unpacked codes (DRSCH, Zhang et al.,
    TIP 2015).

    Args:
        q_codes: ``[nq, d]`` codes in {-1, +1} (values ``>= 0`` count as +1).
        db_codes: ``[n, d]`` codes in {-1, +1}.
        weights: ``[d]`` per-bit weights.

    Returns:
        ``float64 [nq, n]``; with all weights 1 it equals ``hamming_distances``. For torch
        tensors, the differentiable surrogate ``sum_j w_j (q_j - b_j)^2 / 4`` ``[nq, n]`` on
        the values as they are (equal to the weighted Hamming distance on {-1, +1} codes),
        for losses on continuous codes.

    Raises:
        ValueError: the code lengths or the number of weights disagree.
    """
    if _is_torch(q_codes):
        qw = q_codes * weights
        return ((qw * q_codes).sum(1, keepdim=True) + (weights * db_codes * db_codes).sum(1)
                - 2 * qw @ db_codes.T) / 4  # fmt: skip
    q = np.atleast_2d(np.asarray(q_codes)) >= 0
    db = np.atleast_2d(np.asarray(db_codes)) >= 0
    w = np.asarray(weights, dtype=np.float64).ravel()
    if q.shape[1] != db.shape[1] or w.shape[0] != q.shape[1]:
        raise ValueError(f"shapes disagree: queries {q.shape}, database {db.shape}, weights {w.shape}")
    # Mismatch indicator via +-1 products: [q != b] = (1 - s_q s_b) / 2.
    sq = q.astype(np.float64) * 2 - 1
    sb = db.astype(np.float64) * 2 - 1
    return 0.5 * (w.sum() - (sq * w) @ sb.T)  # [nq, n]


def codes_to_hex(packed_row: np.ndarray) -> str:
    """Hex string of one packed code, byte 0 first (e.g. ``"01ff"``)."""
    row = np.asarray(packed_row, dtype=np.uint8).ravel()
    return row.tobytes().hex()
