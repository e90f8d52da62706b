"""DCMH-format .mat loaders on tiny fixtures written the way MATLAB writes them."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from crossmodal.data import create_dataset
from crossmodal.data.mat import (
    MIRFLICKR25K_LABELS,
    SPECS,
    MatFormatError,
    find_mat_files,
    float_scale,
    inspect_layout,
    to_uint8_image,
)
from crossmodal.data.records import CrossModalDataset
from crossmodal.data.splits import fit_protocol, make_splits

N, H, W, BOW = 30, 6, 5, 12


def make_arrays(n_labels: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """MATLAB-order arrays: IAll H x W x 3 x N, YAll N x BOW, LAll N x labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(H, W, 3, N), dtype=np.uint8)
    text = (rng.random((N, BOW)) < 0.3) * rng.integers(1, 4, size=(N, BOW))
    labels = (rng.random((N, n_labels)) < 0.3).astype(np.float64)
    labels[np.arange(N), rng.integers(0, n_labels, size=N)] = 1  # every item has a label
    return {"IAll": images, "YAll": text.astype(np.float64), "LAll": labels}


def write_v73(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write a MATLAB v7.3 file: HDF5 with a 512-byte MAT header, arrays stored with reversed axes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        for key, arr in arrays.items():
            arr = np.asarray(arr)
            ds = f.create_dataset(key, data=arr.T)  # MATLAB is column-major: HDF5 sees axes reversed
            ds.attrs["MATLAB_class"] = np.bytes_("uint8" if arr.dtype == np.uint8 else "double")
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b" " * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header.ljust(512, b"\x00"))
    return path


def write_v5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, arrays)
    return path


def pixels(ds: CrossModalDataset, i: int) -> np.ndarray:
    img = ds.load_image(i)
    assert img.size == (W, H)  # PIL gives (width, height)
    return np.asarray(img)


def check_roundtrip(ds: CrossModalDataset, arrays: dict[str, np.ndarray], text_key: str = "YAll") -> None:
    assert len(ds) == N
    assert ds.info.bow_dim == BOW
    assert ds.info.relevance == "labels"
    np.testing.assert_array_equal(ds.labels_matrix(), arrays["LAll"] > 0)
    np.testing.assert_allclose(ds.bow_matrix(), arrays[text_key])
    for i in (0, 7, N - 1):
        np.testing.assert_array_equal(pixels(ds, i), arrays["IAll"][:, :, :, i])
    assert ds.ids[:2] == ["000000", "000001"]
    assert ds.captions(3) == []


def test_v73_single_file_roundtrip_with_builtin_names(tmp_path):
    arrays = make_arrays(n_labels=24)
    write_v73(tmp_path / "data" / "mirflickr25k.mat", arrays)
    with open(tmp_path / "data" / "mirflickr25k.mat", "rb") as fh:
        assert fh.read(10) == b"MATLAB 7.3"
    ds = create_dataset("mirflickr25k", root=tmp_path / "data", chunk_size=7, cache_dir=str(tmp_path / "c"))
    check_roundtrip(ds, arrays)
    assert ds.info.label_names == list(MIRFLICKR25K_LABELS)
    assert ds.info.stats["n_failed_images"] == 0
    assert ds.info.stats["image_shape"] == [H, W, 3]
    assert ds.info.protocol == {"n_query": 6, "n_train": 24}  # shrunk from 2000 / 10000 to fit 30 items


@pytest.mark.parametrize("layout", ["hwcn", "nhwc", "nchw"])
def test_item_and_channel_axes_found_by_size(tmp_path, layout):
    arrays = make_arrays()
    matlab = {"hwcn": (0, 1, 2, 3), "nhwc": (3, 0, 1, 2), "nchw": (3, 2, 0, 1)}[layout]
    stored = {**arrays, "IAll": arrays["IAll"].transpose(matlab), "LAll": arrays["LAll"].T}
    write_v73(tmp_path / "f.mat", stored)
    ds = create_dataset("iaprtc12", root=tmp_path / "f.mat", cache_dir=str(tmp_path / "c"))
    check_roundtrip(ds, arrays)
    assert ds.info.label_names == ["label_0", "label_1", "label_2", "label_3"]


def test_v5_file_with_tall_key(tmp_path):
    arrays = make_arrays(seed=1)
    arrays["TAll"] = arrays.pop("YAll")
    path = write_v5(tmp_path / "nus-wide.mat", arrays)
    ds = create_dataset("nuswide", root=path, cache_dir=str(tmp_path / "c"))
    check_roundtrip(ds, arrays, text_key="TAll")
    assert ds.info.protocol == {"n_query": 6, "n_train": 24}  # NUS-WIDE's 2100 / 10500, shrunk to fit
    splits = make_splits(ds, n_query=5, n_train=20, seed=3)
    assert (len(splits.query), len(splits.train) + len(splits.val)) == (5, 20)


def test_three_file_variant_in_subfolders_with_names_and_vocab(tmp_path):
    arrays = make_arrays(seed=2)
    root = tmp_path / "Cleared-Set"
    write_v73(root / "IAll" / "mirflickr25k-iall.mat", {"IAll": arrays["IAll"]})
    write_v5(root / "YAll" / "mirflickr25k-yall.mat", {"YAll": arrays["YAll"]})
    write_v5(root / "LAll" / "mirflickr25k-lall.mat", {"LAll": arrays["LAll"]})
    (tmp_path / "labels.txt").write_text("cat\ndog\nsky\nsea\n")
    vocab = [f"w{k}" for k in range(BOW)]
    files = find_mat_files(root, "mirflickr25k")
    assert [p.name for p in files] == [
        "mirflickr25k-iall.mat",
        "mirflickr25k-yall.mat",
        "mirflickr25k-lall.mat",
    ]
    ds = create_dataset(
        "mirflickr25k",
        root=root,
        label_names=str(tmp_path / "labels.txt"),
        vocab=vocab,
        cache_dir=str(tmp_path / "c"),
    )
    np.testing.assert_array_equal(pixels(ds, 4), arrays["IAll"][:, :, :, 4])
    assert ds.info.label_names == ["cat", "dog", "sky", "sea"]
    words = [vocab[k] for k in np.flatnonzero(arrays["YAll"][9])]
    assert ds.captions(9) == [" ".join(words)]
    assert ds.info.bow_vocab == vocab


def test_saved_dataset_is_self_contained(tmp_path):
    arrays = make_arrays()
    write_v73(tmp_path / "mirflickr25k.mat", arrays)
    ds = create_dataset("mirflickr25k", root=tmp_path, cache_dir=str(tmp_path / "c"))
    ds.save(tmp_path / "built")
    (tmp_path / "mirflickr25k.mat").unlink()
    again = CrossModalDataset.load(tmp_path / "built")
    assert again.ids == ds.ids
    assert again.info.label_names == ds.info.label_names
    np.testing.assert_array_equal(pixels(again, 11), arrays["IAll"][:, :, :, 11])


def test_rebuild_sees_changed_file(tmp_path):
    write_v73(tmp_path / "mirflickr25k.mat", make_arrays(seed=0))
    first = create_dataset("mirflickr25k", root=tmp_path, cache_dir=str(tmp_path / "c"))
    changed = make_arrays(seed=5)
    write_v73(tmp_path / "mirflickr25k.mat", changed)
    second = create_dataset("mirflickr25k", root=tmp_path, cache_dir=str(tmp_path / "c"))
    np.testing.assert_array_equal(second.labels_matrix(), changed["LAll"] > 0)
    assert first.fingerprint() != second.fingerprint()


def test_float_images_scaled_and_bad_images_skipped(tmp_path, caplog):
    arrays = make_arrays()
    images = arrays["IAll"].astype(np.float64) / 255.0
    images[0, 0, 0, 4] = np.nan
    write_v73(tmp_path / "mirflickr25k.mat", {**arrays, "IAll": images})
    with caplog.at_level(logging.WARNING):
        ds = create_dataset("mirflickr25k", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert len(ds) == N - 1
    assert "000004" not in ds.ids
    assert ds.info.stats["failed_images"] == ["000004"]
    assert "000004" in caplog.text
    np.testing.assert_array_equal(pixels(ds, 5), arrays["IAll"][:, :, :, 6])  # row 5 is item 6


def test_limit(tmp_path):
    write_v73(tmp_path / "mirflickr25k.mat", make_arrays())
    ds = create_dataset("mirflickr25k", root=tmp_path, limit=10, cache_dir=str(tmp_path / "c"))
    assert len(ds) == 10


def test_missing_file_names_path_and_readme(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        create_dataset("mirflickr25k", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value)
    assert "data/README.md" in str(err.value)
    assert "mirflickr25k-iall.mat" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .mat files"):
        create_dataset("nuswide", root=tmp_path / "empty")


def test_missing_keys_are_listed(tmp_path):
    arrays = make_arrays()
    path = write_v73(
        tmp_path / "x.mat", {"IAll": arrays["IAll"], "Words": arrays["YAll"], "LAll": arrays["LAll"]}
    )
    with pytest.raises(MatFormatError) as err:
        inspect_layout([path])
    assert "Words" in str(err.value) and "YAll" in str(err.value) and "text_key" in str(err.value)
    layout = inspect_layout([path], text_key="Words")
    assert layout.n_items == N


def test_misshapen_arrays(tmp_path):
    arrays = make_arrays()
    bad_n = write_v5(tmp_path / "a.mat", {**arrays, "LAll": arrays["LAll"][:-1]})
    with pytest.raises(MatFormatError, match="no common length"):
        inspect_layout([bad_n])
    no_rgb = write_v5(tmp_path / "b.mat", {**arrays, "IAll": arrays["IAll"][:, :, :2, :]})
    with pytest.raises(MatFormatError, match="no axis of size 3"):
        inspect_layout([no_rgb])
    flat = write_v5(tmp_path / "c.mat", {**arrays, "IAll": arrays["IAll"].reshape(-1, N)})
    with pytest.raises(MatFormatError, match="expected 4 axes"):
        inspect_layout([flat])


def test_wrong_label_name_count(tmp_path):
    write_v73(tmp_path / "mirflickr25k.mat", make_arrays())
    with pytest.raises(ValueError, match="3 names but the labels array has 4"):
        create_dataset("mirflickr25k", root=tmp_path, label_names=["a", "b", "c"])


def test_default_protocols():
    assert (SPECS["mirflickr25k"].n_query, SPECS["mirflickr25k"].n_train) == (2000, 10000)
    assert (SPECS["nuswide"].n_query, SPECS["nuswide"].n_train) == (2100, 10500)
    assert (SPECS["iaprtc12"].n_query, SPECS["iaprtc12"].n_train) == (2000, 10000)
    assert fit_protocol(20015, 2000, 10000) == {"n_query": 2000, "n_train": 10000}


def test_float_scale_is_judged_per_chunk():
    dark = np.full((2, 2, 3), 0.5)  # a dark image of a 0-255 float array must not be scaled up
    assert float_scale(np.stack([dark, np.full((2, 2, 3), 200.0)])) == 1.0
    assert float_scale(np.stack([dark, np.full((2, 2, 3), 1.0)])) == 255.0
    assert to_uint8_image(dark, 1.0).max() == 0 and to_uint8_image(dark, 255.0).max() == 128
    assert float_scale(np.zeros((1, 2, 2, 3), np.uint8)) == 1.0
