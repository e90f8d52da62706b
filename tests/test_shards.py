"""``crossmodal.data.shards``: which ``hub`` sources the Ray workers read themselves, and the
metadata-only plan of their items (ids, captions, labels as ``load_hub`` reads them, no image).

The Ray jobs over such shards are in ``test_ray.py``; these run without a cluster.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossmodal.data.captions import load_hub
from crossmodal.data.records import DuplicateIdError
from crossmodal.data.shards import NO_IMAGE_KEYS, find_shards, plan_shards


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def parquet_dir(tmp_path: Path) -> Path:
    """Two Parquet files: a key, an image column of raw bytes (one row empty), a list of captions
    and lists of label names."""
    folder = tmp_path / "pq"
    folder.mkdir()
    rows = [{"key": f"k{i}", "image": png((40 * i, 0, 0)) if i != 3 else b"",
             "captions": [f"caption {i}", f"another {i}"] if i != 1 else [],
             "tags": ["red", "dark"] if i % 2 else ["red"]} for i in range(6)]  # fmt: skip
    for part in range(2):
        pq.write_table(pa.Table.from_pylist(rows[part * 3:(part + 1) * 3]), folder / f"part-{part}.parquet")
    return folder


def parquet_options(folder: Path, **extra) -> dict:
    return {"root": str(folder), "builder": "parquet", "text_column": "captions", "labels_column": "tags",
            "id_column": "key", **extra}  # fmt: skip


def test_a_plan_reads_what_load_hub_reads_but_the_images(parquet_dir, tmp_path):
    options = parquet_options(parquet_dir)
    shards = find_shards("hub", options)
    assert shards is not None and shards.format == "parquet"
    assert [Path(f).name for f in shards.files] == ["part-0.parquet", "part-1.parquet"]
    plan = plan_shards(shards, cache_dir=str(tmp_path / "cache"))
    built = load_hub(**options, cache_dir=str(tmp_path / "cache"))
    assert plan.ids == ["k0", "k1", "k2", "k3", "k4", "k5"]  # every row: the workers check the images
    assert built.ids == ["k0", "k1", "k2", "k4", "k5"]  # k3's empty image: no image data
    assert plan.info.label_names == built.info.label_names == ["dark", "red"]
    at = [plan.ids.index(k) for k in built.ids]
    assert plan.captions_of(np.array(at)) == built.captions_of()
    np.testing.assert_array_equal(plan.labels_matrix()[at], built.labels_matrix())
    assert all(not row["image_bytes"] and not row["image_path"] for row in plan.image_rows(np.arange(6)))


def test_a_webdataset_plan_reads_keys_and_small_members(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    samples = {f"sub/s{i}": {"jpg": png((40 * i, 0, 0)), "txt": f"square {i} blå".encode(),
                             "cls": str(i % 3).encode()} for i in range(6)}  # fmt: skip
    samples["t9"] = {"txt": b"no picture", "cls": b"0"}  # not among the first: datasets infers from those
    write_tar(folder / "a.tar", samples)
    options = {"root": str(folder), "builder": "webdataset", "image_column": "jpg", "text_column": "txt",
               "labels_column": "cls", "id_column": "__key__"}  # fmt: skip
    plan = plan_shards(find_shards("hub", options), cache_dir=str(tmp_path / "cache"))
    built = load_hub(**options, cache_dir=str(tmp_path / "cache"))
    assert plan.ids == [*built.ids, "t9"] and built.ids == [f"sub/s{i}" for i in range(6)]
    assert plan.info.stats[NO_IMAGE_KEYS] == ["t9"]  # no worker sees it: the driver leaves it out
    assert plan.info.label_names == built.info.label_names == ["label_0", "label_1", "label_2"]
    assert plan.captions_of(np.arange(6)) == built.captions_of()
    np.testing.assert_array_equal(plan.labels_matrix()[:6], built.labels_matrix())


@pytest.mark.parametrize(
    ("options", "why"),
    [({"id_column": None}, "no id_column is given"),
     ({"limit": "4"}, "a limit is set"),
     ({"builder": "json"}, None),
     ({"builder": "webdataset", "id_column": "key"}, "matched by id_column=__key__")],
)
def test_sources_the_workers_cannot_match_by_key_go_through_the_driver(parquet_dir, options, why, caplog):
    with caplog.at_level(logging.INFO, logger="crossmodal.data.shards"):
        assert find_shards("hub", {**parquet_options(parquet_dir), **options}) is None
    if why:
        assert why in caplog.text
    assert find_shards("openmoji", parquet_options(parquet_dir)) is None


def test_a_missing_column_is_named_with_the_files_columns(parquet_dir, tmp_path):
    shards = find_shards("hub", parquet_options(parquet_dir, text_column="caption"))
    with pytest.raises(KeyError, match=r"column .caption. not in the Parquet files of .*; columns: key, "
                                       r"image, captions, tags"):  # fmt: skip
        plan_shards(shards, cache_dir=str(tmp_path / "cache"))


def test_keys_twice_in_the_shards_are_refused(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    write_tar(folder / "a.tar", {"s0": {"jpg": png((1, 2, 3)), "txt": b"one"}})
    write_tar(folder / "b.tar", {"s0": {"jpg": png((1, 2, 3)), "txt": b"again"}})
    options = {"root": str(folder), "builder": "webdataset", "image_column": "jpg", "text_column": "txt",
               "id_column": "__key__"}  # fmt: skip
    with pytest.raises(DuplicateIdError, match="s0"):
        plan_shards(find_shards("hub", options), cache_dir=str(tmp_path / "cache"))


def test_a_parquet_column_of_raw_image_bytes_builds(parquet_dir, tmp_path):
    # load_hub took an Image struct or a path, and read raw bytes as "no image data"
    built = load_hub(**parquet_options(parquet_dir), cache_dir=str(tmp_path / "cache"))
    assert len(built) == 5
    assert Image.open(io.BytesIO(next(built.image_rows(np.array([0])))["image_bytes"])).size == (8, 8)


def test_parquet_files_with_other_columns_read_as_datasets_reads_them(tmp_path):
    # a column only some files have is empty in the rows of the others (datasets fills nulls)
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"key": "a", "image": png((1, 1, 1)), "text": "one", "lab": "x"}]),
                   folder / "a.parquet")  # fmt: skip
    pq.write_table(pa.Table.from_pylist([{"key": "b", "image": png((2, 2, 2)), "text": "two"}]),
                   folder / "b.parquet")  # fmt: skip
    options = {"root": str(folder), "builder": "parquet", "labels_column": "lab", "id_column": "key"}
    plan = plan_shards(find_shards("hub", options), cache_dir=str(tmp_path / "cache"))
    built = load_hub(**options, cache_dir=str(tmp_path / "cache"))
    assert plan.ids == built.ids == ["a", "b"]
    assert plan.info.label_names == built.info.label_names == ["x"]
    np.testing.assert_array_equal(plan.labels_matrix(), built.labels_matrix())


def test_a_column_no_sample_has_is_named_with_the_members_there_are(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    write_tar(folder / "a.tar", {f"s{i}": {"jpg": png((i, 0, 0)), "txt": b"a caption"} for i in range(3)})
    options = {"root": str(folder), "builder": "webdataset", "image_column": "png", "text_column": "txt",
               "id_column": "__key__"}  # fmt: skip
    with pytest.raises(ValueError, match=r"column 'png' not in the WebDataset samples of .*; their members' "
                                         r"extensions: jpg, txt, __key__$"):  # fmt: skip
        plan_shards(find_shards("hub", options), cache_dir=str(tmp_path / "cache"))


def test_hub_without_root_says_it_needs_one(parquet_dir):
    from crossmodal.data import create_dataset

    options = {k: v for k, v in parquet_options(parquet_dir).items() if k != "root"}
    assert find_shards("hub", {**options, "data_files": f"{parquet_dir}/*.parquet"}) is None  # as load_hub
    with pytest.raises(ValueError, match=r"dataset 'hub' needs the option\(s\) root \(-o root=...\)"):
        create_dataset("hub", **options)


@pytest.mark.parametrize(
    ("value", "captions"),
    [({"caption": "a red square", "id": 3}, ["a red square"]),
     ({"captions": ["one", "two"]}, ["one", "two"]),
     ({"text": "plain"}, ["plain"]),
     ({"url": "http://x", "width": 8}, [])],
)
def test_a_caption_object_gives_its_caption_not_its_keys(value, captions):
    # a WebDataset .json member: its keys ("caption", "id") were stored as the captions
    from crossmodal.data.captions import as_captions

    assert as_captions(value) == captions


def test_two_hub_sources_with_the_same_keys_are_both_added(tiny_run_copy, tmp_path, capsys):
    # every hub source was recorded as "hub": the second one's keys k0... counted as present
    from crossmodal.cli import main

    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        blue = 200 if name == "first" else 30
        rows = [{"key": f"k{i}", "image": png((60 * i, 90, blue)), "text": "a red circle"} for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
        args = ["index", "--run", str(tiny_run_copy), "--add", "hub", "-o", f"root={folder}",
                "-o", "builder=parquet", "-o", "id_column=key"]  # fmt: skip
        assert main(args) == 0
        assert capsys.readouterr().out.startswith(f"added 3 items and 3 texts from hub:{folder.resolve()} ")
    assert main(args) == 0  # the second source again: its items are in the run, and it is no folder
    assert capsys.readouterr().out.splitlines()[1] == (
        f"3 items of hub:{folder.resolve()} are in the run already (added before): skipped")
