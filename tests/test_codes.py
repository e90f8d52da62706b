from __future__ import annotations

import numpy as np
import pytest
import torch

from crossmodal.codes import (
    codes_to_hex,
    hamming_distances,
    pack_codes,
    popcount,
    sign,
    unpack_codes,
    weighted_hamming,
)


def test_sign_numpy_zero_is_plus_one():
    out = sign(np.array([-2.0, -0.0, 0.0, 1e-9, 3.0]))
    assert out.dtype == np.int8
    assert out.tolist() == [-1, 1, 1, 1, 1]


def test_sign_torch_keeps_float_dtype_and_zero_is_plus_one():
    x = torch.tensor([[-1.5, 0.0], [2.0, -0.0]], dtype=torch.float64)
    out = sign(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert out.tolist() == [[-1.0, 1.0], [1.0, 1.0]]
    assert sign(torch.tensor([0, -3])).tolist() == [1.0, -1.0]


def test_pack_bit_order_hand_written():
    # bit j -> byte j // 8, position j % 8 from the least significant bit, +1 -> 1
    codes = -np.ones((3, 16), dtype=np.int8)
    codes[0, 0] = 1  # byte 0 = 0x01
    codes[1, 7] = 1  # byte 0 = 0x80
    codes[2, [8, 9, 15]] = 1  # byte 1 = 0b1000_0011 = 0x83
    packed = pack_codes(codes)
    assert packed.dtype == np.uint8 and packed.shape == (3, 2)
    assert packed.tolist() == [[0x01, 0x00], [0x80, 0x00], [0x00, 0x83]]
    assert codes_to_hex(packed[2]) == "0083"


def test_pack_unpack_round_trip_numpy_and_torch():
    rng = np.random.default_rng(0)
    codes = rng.choice(np.array([-1, 1], dtype=np.int8), size=(50, 64))
    packed = pack_codes(codes)
    assert packed.shape == (50, 8)
    back = unpack_codes(packed, 64)
    assert back.dtype == np.int8
    np.testing.assert_array_equal(back, codes)
    np.testing.assert_array_equal(pack_codes(torch.from_numpy(codes.astype(np.float32))), packed)


@pytest.mark.parametrize("d", [0, 12, 63])
def test_bad_code_length_names_d(d):
    with pytest.raises(ValueError, match=f"d={d}"):
        pack_codes(np.ones((2, d)) if d else np.ones((2, 0)))
    with pytest.raises(ValueError, match=f"d={d}"):
        unpack_codes(np.zeros((2, 1), dtype=np.uint8), d)


def test_unpack_rejects_wrong_width():
    with pytest.raises(ValueError, match=r"uint8 \[n, 2\]"):
        unpack_codes(np.zeros((2, 3), dtype=np.uint8), 16)


def test_popcount_matches_python():
    x = np.arange(256, dtype=np.uint8)
    assert popcount(x).tolist() == [bin(i).count("1") for i in range(256)]


def test_hamming_distances_against_unpacked_count():
    rng = np.random.default_rng(1)
    q = rng.choice([-1, 1], size=(7, 32))
    db = rng.choice([-1, 1], size=(300, 32))
    expected = (q[:, None, :] != db[None, :, :]).sum(axis=2)
    got = hamming_distances(pack_codes(q), pack_codes(db), chunk=3)
    assert got.dtype == np.int32 and got.shape == (7, 300)
    np.testing.assert_array_equal(got, expected)


def test_hamming_distances_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="code lengths differ"):
        hamming_distances(np.zeros((1, 2), np.uint8), np.zeros((1, 4), np.uint8))


def test_weighted_hamming_hand_case_and_unit_weights():
    q = np.array([[1, 1, -1, -1]])
    db = np.array([[1, -1, -1, 1], [-1, -1, 1, 1]])
    w = np.array([0.5, 2.0, 1.0, 0.25])
    np.testing.assert_allclose(weighted_hamming(q, db, w), [[2.25, 3.75]])
    rng = np.random.default_rng(2)
    a, b = rng.choice([-1, 1], size=(4, 16)), rng.choice([-1, 1], size=(5, 16))
    np.testing.assert_allclose(
        weighted_hamming(a, b, np.ones(16)), hamming_distances(pack_codes(a), pack_codes(b))
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_popcount_without_numpy_2_matches(monkeypatch, dtype):
    """pyproject allows NumPy 1.24: the lookup-table path must equal np.bitwise_count."""
    from crossmodal import codes, evaluate

    rng = np.random.default_rng(0)
    x = rng.integers(0, np.iinfo(dtype).max, size=(7, 5), dtype=dtype, endpoint=True)
    expected = np.array([[bin(int(v)).count("1") for v in row] for row in x])
    assert np.array_equal(codes.popcount(x), expected)
    q = rng.choice([-1, 1], size=(6, 64)).astype(np.int8)
    db = rng.choice([-1, 1], size=(40, 64)).astype(np.int8)
    lab = rng.integers(0, 2, size=(46, 5))
    before = evaluate.map_at_all(q, db, query_labels=lab[:6], db_labels=lab[6:])
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert np.array_equal(codes.popcount(x), expected)
    assert evaluate.map_at_all(q, db, query_labels=lab[:6], db_labels=lab[6:]) == before
    with pytest.raises(ValueError, match="unsigned"):
        codes.popcount(np.array([1, 2], dtype=np.int32))
