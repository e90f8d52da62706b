"""Faults in real-world inputs, one kind per section: each is fixed where every loader, tower
or query passes, and each case states its expected outcome.

Byte-order marks, truncated images, items without captions, duplicate ids, deep and float
images, colour-key transparency, Unicode normal forms, unusable queries, and leftovers of
killed dataset builds. Every case names in a comment the kind of public report it comes from.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal.data import create_dataset, open_dataset
from crossmodal.data.records import (
    CrossModalDataset,
    DatasetInfo,
    DuplicateIdError,
    EmptyDatasetError,
    build_guard,
    make_record,
)
from crossmodal.images import ImageDecodeError, open_image
from crossmodal.text import EMPTY_QUERY_MESSAGE, BowVocabulary, QueryError, normalize_text, tokenize_words

BOM = b"\xef\xbb\xbf"
RED, BLUE = (220, 30, 30), (40, 60, 220)


def png(folder: Path, name: str, colour=RED, size=(8, 8)) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def cut_jpeg(fraction: float = 0.6) -> bytes:
    """A noisy 96 x 96 JPEG cut to ``fraction`` of its bytes: its header and first scans are whole."""
    rng = np.random.default_rng(1)
    data = encoded(Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)), "JPEG")
    return data[: int(len(data) * fraction)]


# -- 1. byte-order marks ---------------------------------------------------------------------------
def test_bom_csv_metadata_keeps_its_first_column(tmp_path):
    # reported against hashing repos' loaders: a BOM from spreadsheet "CSV UTF-8" export hides file_name
    png(tmp_path, "a.png")
    (tmp_path / "metadata.csv").write_bytes(BOM + b"file_name,text\na.png,a red tile\n")
    ds = create_dataset("imagefolder", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["a.png"] and ds.captions(0) == ["a red tile"]
    assert ds.info.stats["n_items"] == 1 and "bad_lines" not in ds.info.stats


def test_bom_csv_metadata_through_data_info(tmp_path, monkeypatch, capsys):
    # reported against hashing repos' loaders: the issue's own input, `crossmodal data-info imagefolder`
    from crossmodal.cli import main

    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(tmp_path / "built"))
    png(tmp_path, "a.png")
    (tmp_path / "metadata.csv").write_bytes(BOM + b"file_name,text\na.png,a red tile\n")
    assert main(["data-info", "imagefolder", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "dataset imagefolder: 1 items" in out and "captions per item: mean 1.00" in out


def test_bom_jsonl_metadata(tmp_path):
    # reported against caption loaders: Windows editors save JSON Lines with a BOM before the first "{"
    png(tmp_path, "a.png")
    png(tmp_path, "b.png", BLUE)
    lines = [json.dumps({"file_name": n, "text": t}) for n, t in (("a.png", "red"), ("b.png", "blue"))]
    (tmp_path / "metadata.jsonl").write_bytes(BOM + "\n".join(lines).encode() + b"\n")
    ds = create_dataset("imagefolder", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["a.png", "b.png"] and ds.captions(0) == ["red"]
    assert "bad_lines" not in ds.info.stats


def test_bom_coco_captions_json(tmp_path):
    # reported against COCO loaders: json.load refuses a BOM ("Unexpected UTF-8 BOM")
    png(tmp_path / "val2017", "1.jpg")
    captions = {"images": [{"id": 1, "file_name": "1.jpg"}],
                "annotations": [{"id": 5, "image_id": 1, "caption": "a red tile"}]}  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_bytes(BOM + json.dumps(captions).encode())
    ds = create_dataset("coco", root=tmp_path, labels=False, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["1"] and ds.captions(0) == ["a red tile"]


def test_bom_flickr_results_csv_header_is_recognised(tmp_path):
    # reported against Flickr30k loaders: the BOM makes the header line look like a caption line
    png(tmp_path / "flickr30k_images", "1.jpg")
    (tmp_path / "results.csv").write_bytes(
        BOM + b"image_name| comment_number| comment\n1.jpg| 0| a red tile\n"
    )
    ds = create_dataset("flickr30k", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["1.jpg"] and ds.captions(0) == ["a red tile"]
    assert "bad_lines" not in ds.info.stats


def test_bom_label_names_file_of_a_mat_dataset(tmp_path):
    # reported against DCMH-format loaders: a label list saved by Notepad names its first label "\ufeffsky"
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    savemat(tmp_path / "mirflickr25k.mat", {"IAll": rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8),
                                            "YAll": np.eye(3), "LAll": np.eye(3, 2)})  # fmt: skip
    (tmp_path / "names.txt").write_bytes(BOM + b"sky\nsea\n")
    ds = create_dataset("mirflickr25k", root=tmp_path, label_names=str(tmp_path / "names.txt"),
                        cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert ds.info.label_names == ["sky", "sea"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le-bom", "utf-16-be-bom", "utf-32"])
@pytest.mark.parametrize("kind", ["metadata.csv", "metadata.jsonl"])
def test_utf16_and_utf32_metadata_with_a_bom(tmp_path, encoding, kind):
    # reported against hashing repos' loaders: spreadsheet "Unicode text" and Windows PowerShell save
    # UTF-16 with a byte-order mark; read as UTF-8 every row was "no 'file_name' value"
    png(tmp_path, "a.png")
    text = ("file_name,text\na.png,a red tile\n" if kind.endswith(".csv")
            else json.dumps({"file_name": "a.png", "text": "a red tile"}) + "\n")  # fmt: skip
    codec = {"utf-16-le-bom": "utf-16-le", "utf-16-be-bom": "utf-16-be"}.get(encoding, encoding)
    mark = "\ufeff" if codec != encoding else ""  # utf-16 and utf-32 write their own mark
    (tmp_path / kind).write_bytes((mark + text).encode(codec))
    ds = create_dataset("imagefolder", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["a.png"] and ds.captions(0) == ["a red tile"]
    assert "bad_lines" not in ds.info.stats


def test_utf16_coco_json_and_flickr_results_csv(tmp_path):
    # reported against COCO and Flickr30k loaders: annotation files re-saved as UTF-16 by Windows tools
    png(tmp_path / "coco" / "val2017", "1.jpg")
    captions = {"images": [{"id": 1, "file_name": "1.jpg"}],
                "annotations": [{"id": 5, "image_id": 1, "caption": "a red tile"}]}  # fmt: skip
    (tmp_path / "coco" / "annotations").mkdir()
    (tmp_path / "coco" / "annotations" / "captions_val2017.json").write_text(json.dumps(captions), "utf-16")
    coco = create_dataset("coco", root=tmp_path / "coco", labels=False, cache_dir=str(tmp_path / "c"))
    assert coco.ids == ["1"] and coco.captions(0) == ["a red tile"]
    png(tmp_path / "f" / "flickr30k_images", "1.jpg")
    (tmp_path / "f" / "results.csv").write_text("image_name| comment_number| comment\n1.jpg| 0| a red tile\n",
                                                "utf-16")  # fmt: skip
    flickr = create_dataset("flickr30k", root=tmp_path / "f", cache_dir=str(tmp_path / "c"))
    assert flickr.ids == ["1.jpg"] and flickr.captions(0) == ["a red tile"]
    assert "bad_lines" not in flickr.info.stats


def test_utf16_without_a_bom_is_refused_by_name(tmp_path):
    # reported against caption loaders: UTF-16 without a mark, read as UTF-8, gives NUL-separated letters
    png(tmp_path, "a.png")
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,a red tile\n".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"metadata.csv: not a UTF-8 text file .*save it as UTF-8"):
        create_dataset("imagefolder", root=tmp_path, cache_dir=str(tmp_path / "c"))


def test_metadata_edited_in_place_is_read_again(tmp_path, monkeypatch):
    # reported against dataset caches keyed by the folder's time: a line appended to metadata.jsonl (the
    # folder's own time unchanged) was not seen until the cache was deleted by hand
    from crossmodal.data import open_dataset

    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(tmp_path / "built"))
    folder = tmp_path / "f"
    png(folder, "a.png")
    png(folder, "b.png", BLUE)
    meta = folder / "metadata.jsonl"
    meta.write_text(json.dumps({"file_name": "a.png", "text": "red"}) + "\n")
    assert open_dataset("imagefolder", {"root": str(folder)}).ids == ["a.png"]
    stamp = os.stat(folder).st_mtime_ns
    with open(meta, "a") as fh:
        fh.write(json.dumps({"file_name": "b.png", "text": "blue"}) + "\n")
    os.utime(folder, ns=(stamp, stamp))
    assert open_dataset("imagefolder", {"root": str(folder)}).ids == ["a.png", "b.png"]


def test_every_row_rejected_is_a_clear_error_before_datasets(tmp_path):
    # reported against hashing repos' loaders: "Instruction "train" corresponds to no data!", no reason
    png(tmp_path, "a.png")
    (tmp_path / "metadata.csv").write_text("filename,text\na.png,a red tile\n")
    with pytest.raises(EmptyDatasetError) as err:
        create_dataset("imagefolder", root=tmp_path, cache_dir=str(tmp_path / "c"))
    message = str(err.value)
    assert "metadata.csv: no usable item" in message
    assert "metadata.csv line 2: no 'file_name' value (columns: filename, text)" in message
    assert "corresponds to no data" not in message


def test_hub_with_every_image_broken_says_why(tmp_path):
    # reported against hub loaders: a column of paths whose files are all gone ends inside datasets
    rows = [{"path": f"img/{i}.png", "text": "x", "key": f"k{i}"} for i in range(2)]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(EmptyDatasetError, match=r"no usable item; 2 undecodable images \(k0: no image data"):
        create_dataset("hub", root=tmp_path, builder="json", data_files=str(tmp_path / "rows.jsonl"),
                       image_column="path", id_column="key", cache_dir=str(tmp_path / "c"))  # fmt: skip


# -- 2. truncated images ---------------------------------------------------------------------------
def test_truncated_jpeg_is_left_out_by_the_default_check(tmp_path):
    # reported against image-text loaders: Image.verify() passes a JPEG cut short inside its pixel data
    png(tmp_path, "ok.png")
    (tmp_path / "cut.jpg").write_bytes(cut_jpeg(0.6))
    meta = [{"file_name": "ok.png", "text": "a red tile"}, {"file_name": "cut.jpg", "text": "noise"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    ds = create_dataset("imagefolder", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["ok.png"]
    assert ds.info.stats["n_failed_images"] == 1 and ds.info.stats["failed_images"] == ["cut.jpg"]
    assert "cut.jpg: image is truncated or corrupt" in ds.info.stats["undecodable_images"][0]


def test_truncated_jpeg_passes_only_the_header_check_and_then_stops_training_by_name(tmp_path):
    # reported against training loops: a truncated image silently became a blank white training image
    import tinyrun  # noqa: F401  (registers the tiny_pool image tower)

    from crossmodal.features import image_batch
    from crossmodal.models import create_image_tower

    (tmp_path / "cut.jpg").write_bytes(cut_jpeg(0.6))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "cut.jpg", "text": "noise"}) + "\n")
    ds = create_dataset("imagefolder", root=tmp_path, check_images="header", cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["cut.jpg"]  # "header" reads the structure only, as its documentation says
    tower = create_image_tower("tiny_pool", image_size=32)
    with pytest.raises(ImageDecodeError, match=r"item cut\.jpg of dataset 'imagefolder': image is truncated"):
        image_batch(ds, tower, np.array([0]))


def test_truncated_jpeg_query_is_refused_with_a_message(tmp_path, engine):
    # reported against retrieval demos: an upload cut short by the network was answered from a blank image
    path = tmp_path / "upload.jpg"
    path.write_bytes(cut_jpeg(0.6))
    with pytest.raises(ImageDecodeError, match=r"image is truncated or corrupt: .*upload\.jpg"):
        engine.search_image(path, k=3)


def test_hub_default_check_leaves_out_truncated_bytes(tmp_path):
    # reported against hub loaders: image bytes cut short in a parquet or JSON export
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "cut.jpg").write_bytes(cut_jpeg(0.6))
    png(tmp_path / "img", "ok.png")
    rows = [{"path": "img/ok.png", "text": "red"}, {"path": "img/cut.jpg", "text": "noise"}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = create_dataset("hub", root=tmp_path, builder="json", data_files=str(tmp_path / "rows.jsonl"),
                        image_column="path", cache_dir=str(tmp_path / "c"))  # fmt: skip
    assert ds.ids == ["0"] and ds.info.stats["failed_images"] == ["1"]


# -- 3. items without captions ---------------------------------------------------------------------
def _folder_with_an_empty_caption(root: Path, labels: bool) -> Path:
    for name, colour in (("a.png", RED), ("b.png", BLUE), ("c.png", RED)):
        png(root, name, colour)
    texts = {"a.png": ["a red tile", "red"], "b.png": "", "c.png": "another red tile"}
    rows = [{"file_name": n, "text": t, **({"labels": ["x"]} if labels else {})} for n, t in texts.items()]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("labels", [False, True], ids=["same_image", "labelled"])
def test_item_without_caption_is_kept_image_only_and_reported(labels, tmp_path, caplog):
    # reported against hashing repos' loaders: a row with "text": "" crashed indexing (duplicate ids)
    # or was indexed as an empty caption returned for every image query
    from crossmodal.jobs.index import text_units

    root = _folder_with_an_empty_caption(tmp_path / "f", labels)
    ds = create_dataset("imagefolder", root=root, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["a.png", "b.png", "c.png"] and ds.captions(1) == []
    assert ds.info.stats["n_without_captions"] == 1 and ds.info.stats["without_captions"] == ["b.png"]
    assert "1 items have no caption; kept as image-only items (no text entry): b.png" in caplog.text
    units = text_units(ds, np.arange(3))
    if labels:  # one text per item, whose id is the item's
        assert [(u["text_id"], u["item_id"]) for u in units] == [(0, 0), (2, 2)]
    else:  # one text per caption, numbered in order
        assert [(u["text_id"], u["item_id"], u["caption"]) for u in units] == [
            (0, 0, "a red tile"), (1, 0, "red"), (2, 2, "another red tile")]  # fmt: skip
    assert all(u["caption"] for u in units)


def test_blank_captions_are_no_captions_in_every_builder():
    # reported against caption datasets: whitespace-only and zero-width captions counted as text
    row = make_record("x", ["", "  ", "\u200b", "a cat", " \u00a0", " a dog "])
    assert row["captions"] == ["a cat", "a dog"]


def test_mat_item_with_no_words_has_no_caption():
    # reported against DCMH-format loaders: an all-zero tag vector became the caption ""
    from crossmodal.data.mat import _make_row

    img = np.zeros((4, 4, 3), np.uint8)
    row = _make_row(0, img, np.zeros(3), np.ones(2), ("sky", "sea", "sun"), 1.0)
    assert row["captions"] == [] and row["bow_idx"] == []
    row = _make_row(1, img, np.array([0, 1, 1]), np.ones(2), ("sky", "sea", "sun"), 1.0)
    assert row["captions"] == ["sea sun"]


def test_adding_a_folder_with_an_uncaptioned_image_to_a_run(tiny_run_copy, tmp_path):
    # reported against hashing repos' demos: a folder of photos without captions must stay indexable
    from crossmodal.jobs.index import add_to_run
    from crossmodal.serving import RetrievalEngine

    folder = tmp_path / "new"
    png(folder, "plain.png", BLUE)
    png(folder, "named.png", RED)
    rows = [{"file_name": "plain.png", "text": ""}, {"file_name": "named.png", "text": "a new red tile"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = RetrievalEngine.load(tiny_run_copy)
    n_items, n_texts = engine.indexes["image"].ntotal, engine.indexes["text"].ntotal
    engine.close()
    add_to_run(tiny_run_copy, str(folder), progress=False)
    engine = RetrievalEngine.load(tiny_run_copy)
    try:
        assert engine.indexes["image"].ntotal == n_items + 2 and engine.indexes["text"].ntotal == n_texts + 1
        hits = engine.search_image(Image.new("RGB", (16, 16), BLUE), k=n_texts + 1).hits
        assert len(hits) == n_texts + 1 and all(h.caption for h in hits)
        assert "plain.png" in {
            h.key for h in engine.similar_images(Image.new("RGB", (16, 16), BLUE), k=200).hits
        }
    finally:
        engine.close()


@pytest.mark.parametrize("caption", ["\u0301\u0308\u0302", "\U0001F600\U0001F431"])
def test_a_caption_the_model_cannot_read_is_not_indexed(tiny_run_copy, tmp_path, caption):
    # reported against caption datasets: captions of only combining marks or only emoji came
    # back as image -> captions hits; to the model they are empty, like an empty query
    from crossmodal.jobs.index import add_to_run
    from crossmodal.serving import RetrievalEngine

    folder = tmp_path / "new"
    png(folder, "marks.png", BLUE)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "marks.png", "text": caption}) + "\n")
    engine = RetrievalEngine.load(tiny_run_copy)
    n_items, n_texts = engine.indexes["image"].ntotal, engine.indexes["text"].ntotal
    engine.close()
    add_to_run(tiny_run_copy, str(folder), progress=False)
    engine = RetrievalEngine.load(tiny_run_copy)
    try:  # the image is added and findable; its unreadable caption is not a text entry
        assert engine.indexes["image"].ntotal == n_items + 1 and engine.indexes["text"].ntotal == n_texts
        hits = engine.search_image(Image.new("RGB", (16, 16), BLUE), k=n_texts).hits
        assert caption not in {h.caption for h in hits}
    finally:
        engine.close()


# -- 4. duplicate ids --------------------------------------------------------------------------------
def test_coco_duplicate_image_ids_are_refused(tmp_path):
    # reported against COCO loaders: two image entries sharing "id": 3 loaded as two items with id "3"
    for name in ("a.jpg", "b.jpg"):
        png(tmp_path / "val2017", name)
    captions = {"images": [{"id": 3, "file_name": "a.jpg"}, {"id": 3, "file_name": "b.jpg"}],
                "annotations": [{"id": 1, "image_id": 3, "caption": "which one?"}]}  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    with pytest.raises(DuplicateIdError) as err:
        create_dataset("coco", root=tmp_path, labels=False, cache_dir=str(tmp_path / "c"))
    assert "captions_val2017.json: duplicate item ids '3' (2 times)" in str(err.value)


@pytest.mark.parametrize("other", [3.0, "3"])
def test_coco_ids_that_spell_one_number_two_ways_are_one_id(tmp_path, other):
    # reported against COCO loaders: ids written 3 and 3.0 (a file re-saved by another tool)
    for name in ("a.jpg", "b.jpg"):
        png(tmp_path / "val2017", name)
    captions = {"images": [{"id": 3, "file_name": "a.jpg"}, {"id": other, "file_name": "b.jpg"}],
                "annotations": [{"id": 1, "image_id": 3, "caption": "which one?"}]}  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    with pytest.raises(DuplicateIdError, match="duplicate item ids '3' \\(2 times\\)"):
        create_dataset("coco", root=tmp_path, labels=False, cache_dir=str(tmp_path / "c"))


def test_coco_captions_find_their_image_whatever_the_ids_spelling(tmp_path):
    png(tmp_path / "val2017", "a.jpg")
    captions = {"images": [{"id": "7", "file_name": "a.jpg"}],
                "annotations": [{"id": 1, "image_id": 7.0, "caption": "a red tile"}]}  # fmt: skip
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps(captions))
    ds = create_dataset("coco", root=tmp_path, labels=False, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["7"] and ds.captions(0) == ["a red tile"]


def test_karpathy_duplicate_file_names_are_refused(tmp_path):
    # reported against Flickr30k loaders: a split file listing one image twice (with other sentences)
    png(tmp_path / "flickr30k_images", "1.jpg")
    images = [{"filename": "1.jpg", "split": s, "sentences": [{"raw": f"in {s}"}]} for s in ("train", "test")]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    expected = r"dataset_flickr30k\.json: duplicate item ids '1\.jpg' \(2 times\)"
    with pytest.raises(DuplicateIdError, match=expected):
        create_dataset("flickr30k", root=tmp_path, cache_dir=str(tmp_path / "c"))


def test_hub_duplicate_ids_in_the_id_column_are_refused(tmp_path):
    # reported against hub loaders: an id column with repeated keys after a merge of two exports
    png(tmp_path / "img", "0.png")
    rows = [{"path": "img/0.png", "text": t, "key": "k1"} for t in ("one", "two")]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    expected = r"rows\.jsonl \(column 'key'\): duplicate item ids 'k1' \(2 times\)"
    with pytest.raises(DuplicateIdError, match=expected):
        create_dataset("hub", root=tmp_path, builder="json", data_files=str(tmp_path / "rows.jsonl"),
                       image_column="path", id_column="key", cache_dir=str(tmp_path / "c"))  # fmt: skip


def test_any_builder_with_repeated_ids_is_refused_by_the_record_layer():
    # reported against custom dataset builders: ids repeated by a builder that numbers files itself
    rows = [make_record("7", ["a"]), make_record("8", ["b"]), make_record("7", ["c"])]
    with pytest.raises(DuplicateIdError, match=r"dataset 'mine': duplicate item ids '7' \(2 times\)"):
        CrossModalDataset.from_records(rows, DatasetInfo("mine", relevance="image"))


# -- 5. high bit depth and float images --------------------------------------------------------------
def deep(mode: str, value) -> Image.Image:
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    return Image.frombytes(mode, (4, 3), np.full(12, value, dtype).tobytes())


@pytest.mark.parametrize(
    ("make", "grey"),
    [
        # reported against hashing repos' loaders: a big-endian 16-bit TIFF refused as "truncated or corrupt"
        (lambda: encoded(Image.fromarray(np.full((8, 8), 30000, ">u2")), "TIFF"), 117),
        # reported against medical and satellite image sets: 16-bit layouts of every byte order
        (lambda: deep("I;16", 30000), 117),
        (lambda: deep("I;16L", 65535), 255),
        (lambda: deep("I;16B", 256), 1),
        # reported against 16-bit PNG readers: a 16-bit grey PNG file (opened as I;16 or, by older
        # Pillow versions, as 32-bit "I")
        (lambda: encoded(Image.fromarray(np.full((4, 4), 40000, np.uint16)), "PNG"), 156),
        (lambda: deep("I", 30000), 117),
        # reported against numpy exports: int32 arrays of 8-bit values came out black
        (lambda: deep("I", 200), 200),
        # reported against float exports (TIFF, numpy): 0..1 floats came out black
        (lambda: deep("F", 0.5), 128),
        (lambda: deep("F", 200.0), 200),
        (lambda: deep("F", 30000.0), 117),
    ],
    ids=["tiff_i16b_issue", "i16", "i16l_max", "i16b", "png16", "i32", "i32_8bit", "f_unit", "f_255",
         "f_16bit"],
)
def test_deep_and_float_greyscale_is_scaled(make, grey):
    a = np.asarray(open_image(make()))
    assert a.shape[2] == 3 and (a == grey).all(), a[0, 0]


@pytest.mark.parametrize(
    ("name", "img", "message"),
    [
        ("neg.tif", deep("F", -5.0), "F image with values -5..-5"),
        ("big.tif", deep("I", 70000), "I image with values 70000..70000"),
    ],
)
def test_default_check_leaves_out_deep_images_the_run_would_refuse(tmp_path, name, img, message):
    # reported against scientific image sets: a float TIFF with negative values passed the dataset
    # check, then stopped `index --add` at encoding time with advice to rebuild with the same check
    png(tmp_path, "ok.png")
    img.save(tmp_path / name)
    meta = [{"file_name": "ok.png", "text": "a red tile"}, {"file_name": name, "text": "deep"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    ds = create_dataset("imagefolder", root=tmp_path, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["ok.png"] and ds.info.stats["failed_images"] == [name]
    assert message in ds.info.stats["undecodable_images"][0]


@pytest.mark.parametrize(
    ("img", "message"),
    [
        (deep("F", float("nan")), "F image holds NaN or infinite values"),
        (deep("F", -2.0), "F image with values -2..-2"),
        (deep("I", 70000), "I image with values 70000..70000: only 0..65535"),
    ],
    ids=["nan", "negative", "beyond_16bit"],
)
def test_deep_images_out_of_range_are_refused_by_mode(img, message):
    # reported against scientific image sets: values no 8-bit scaling can show became all black
    with pytest.raises(ImageDecodeError, match=re.escape(message)):
        open_image(img)


# -- 6. transparency by colour key ---------------------------------------------------------------------
def _palette(mode: str) -> Image.Image:
    img = Image.new(mode, (6, 4), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.paste(1, (0, 0, 3, 4))
    return img


def _with_alpha(mode: str) -> Image.Image:
    base = Image.new("RGB", (6, 4), (0, 0, 0))
    base.paste(RED if mode != "LA" else (90, 90, 90), (0, 0, 3, 4))
    alpha = Image.new("L", (6, 4), 0)
    alpha.paste(255, (0, 0, 3, 4))
    if mode == "LA":
        return Image.merge("LA", (base.convert("L"), alpha))
    if mode == "PA":
        return Image.merge("PA", (_palette("P"), alpha))
    return Image.merge("RGBA", (*base.split(), alpha))


def _keyed16() -> Image.Image:
    arr = np.zeros((4, 6), np.uint16)
    arr[:, :3] = 30000
    return Image.fromarray(arr)


def _keyed(mode: str) -> Image.Image:
    img = Image.new(mode, (6, 4), 0)
    img.paste(RED if mode == "RGB" else 90, (0, 0, 3, 4))
    return img


TRANSPARENCY_CASES = {
    # reported against icon and emoji sets: a palette PNG with a transparent entry
    "png_palette": (lambda: encoded(_palette("P"), "PNG", transparency=0), RED),
    # reported against GIF thumbnails: the GIF transparent index
    "gif_palette": (lambda: encoded(_palette("P"), "GIF", transparency=0), RED),
    # reported against scanned line art: a grey PNG with a transparent grey value (tRNS)
    "png_l_key": (lambda: encoded(_keyed("L"), "PNG", transparency=0), (90, 90, 90)),
    # reported against hashing repos' loaders: an RGB PNG saved with transparency=(0, 0, 0) came out black
    "png_rgb_key": (lambda: encoded(_keyed("RGB"), "PNG", transparency=(0, 0, 0)), RED),
    # reported against 16-bit PNG readers: a 16-bit grey PNG with a transparent value
    "png_i16_key": (lambda: encoded(_keyed16(), "PNG", transparency=0), (117, 117, 117)),
    # reported against sticker sets: alpha channels of every layout
    "png_la": (lambda: encoded(_with_alpha("LA"), "PNG"), (90, 90, 90)),
    "png_rgba": (lambda: encoded(_with_alpha("RGBA"), "PNG"), RED),
    "image_pa": (lambda: _with_alpha("PA"), RED),
}


@pytest.mark.parametrize("case", list(TRANSPARENCY_CASES))
def test_every_form_of_transparency_is_composited_on_white(case):
    make, opaque = TRANSPARENCY_CASES[case]
    a = np.asarray(open_image(make()))
    assert (a[:, 3:] == 255).all(), a[0, 5]  # the transparent right half is white
    assert (a[:, :3] == opaque).all(), a[0, 0]  # the opaque left half keeps its colour


# -- 7. Unicode normalisation ---------------------------------------------------------------------------
def test_words_are_the_same_in_every_normal_form():
    # reported against bag-of-words hashing code: NFD "crème" split into unknown words "cre", "me"
    nfc, nfd = "crème brûlée", normalize_text("crème brûlée").replace("è", "e\u0300").replace("û", "u\u0302")
    assert nfd != nfc and tokenize_words(nfd) == tokenize_words(nfc) == ["crème", "brûlée"]
    # reported against caption sets typed on East Asian keyboards: full-width letters and ligatures
    assert tokenize_words("ＲＥＤ ﬁsh") == ["red", "fish"]
    # reported against multilingual caption sets: marks with no composed form split Devanagari words
    assert tokenize_words("लाल सेब") == ["लाल", "सेब"]


def test_vocabulary_and_query_agree_across_normal_forms():
    # reported against bag-of-words hashing code: a query in the other normal form got another code
    vocab = BowVocabulary.fit(["une cre\u0300me rouge", "un chat"])
    assert "crème" in vocab.words
    np.testing.assert_array_equal(vocab.encode_bow(["crème"]), vocab.encode_bow(["cre\u0300me"]))
    assert vocab.oov_words("CRE\u0300ME ｃｈａｔ") == []


def test_a_vocabulary_saved_before_normalisation_still_loads():
    # reported against saved models: a vocab.json written by an older tokenizer must keep loading
    old = json.dumps({"format_version": 1, "words": ["cre\u0300me", "red", "ﬁsh", "fish"]})
    vocab = BowVocabulary.from_json(old)
    assert len(vocab) == 4 and vocab.words[0] == "cre\u0300me"  # the model's input size is kept
    assert vocab.encode_bow(["crème fish"])[0].tolist() == [1, 0, 1, 0]  # "fish" answers to "ﬁsh"'s column


def test_captions_are_normalised_when_built():
    # reported against caption loaders: the same caption in two normal forms was two texts
    row = make_record("x", ["cre\u0300me", "ＲＥＤ", "ﬁsh"])
    assert row["captions"] == ["crème", "RED", "fish"]


def test_engine_answers_compatibility_forms_like_plain_ones(engine):
    # reported against retrieval demos: full-width input from an IME found nothing
    plain = [h.item_id for h in engine.search_text("red", k=10).hits]
    assert [h.item_id for h in engine.search_text("ｒｅｄ", k=10).hits] == plain


# -- 8. unusable queries ----------------------------------------------------------------------------------
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "green", "blue", "cr", "##eme"]


@pytest.fixture(scope="module")
def bert_tower(tmp_path_factory):
    """An hf: tower on a 12-token BERT with 64 features (the tiny run's text head takes 64)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from crossmodal.models import create_text_tower

    folder = tmp_path_factory.mktemp("bert")
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    vocab_file = str(folder / "vocab.txt")
    try:  # transformers 5 takes the word list as ``vocab``, 4 as ``vocab_file``
        tokenizer = BertTokenizerFast(vocab=vocab_file)
    except TypeError:
        tokenizer = BertTokenizerFast(vocab_file=vocab_file)
    assert len(tokenizer.get_vocab()) == len(TINY_VOCAB)
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    return create_text_tower(f"hf:{folder}", local_files_only=True).eval()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        # reported against transformer retrieval demos: a zero-width space was answered with arbitrary hits
        ("\u200b", EMPTY_QUERY_MESSAGE),
        ("\u200b \ufeff\u00ad\t", EMPTY_QUERY_MESSAGE),
        ("\x00\x07", EMPTY_QUERY_MESSAGE),
        ("", EMPTY_QUERY_MESSAGE),
        # reported against transformer towers: a query of nothing but [UNK] tokens encoded as noise
        ("🍎 zebra", "none of the query's words are in the model's vocabulary: 🍎, zebra"),
        # reported against transformer towers: text the tokenizer drops entirely (a lone combining mark)
        ("\u0301", "has no words"),
    ],
    ids=["zero_width_space", "format_chars", "control_chars", "empty", "only_unknown", "lone_mark"],
)
def test_transformer_tower_refuses_what_it_cannot_read(query, message, bert_tower):
    with pytest.raises(QueryError) as err:
        bert_tower.check_query(query)
    assert message in str(err.value)


def test_transformer_tower_names_unknown_words_of_a_usable_query(bert_tower):
    # reported against transformer retrieval demos: unknown words were dropped without a word
    bert_tower.check_query("red zebra")
    assert bert_tower.unknown_words("red zebra 🍎 zebra") == ["zebra", "🍎"]
    assert bert_tower.unknown_words("cre\u0300me") == []  # NFKC before the tokenizer: one known word
    nfd, nfc = bert_tower.tokenize(["cre\u0300me"]), bert_tower.tokenize(["crème"])
    assert nfd["input_ids"].tolist() == nfc["input_ids"].tolist()


@pytest.mark.parametrize("tower", ["bow", "transformer"])
def test_one_query_check_in_the_engine_for_every_tower(tower, tiny_run, bert_tower):
    # reported against transformer retrieval demos: only the bag-of-words tower refused a zero-width query
    from crossmodal.serving import RetrievalEngine

    engine = RetrievalEngine.load(tiny_run)
    try:
        if tower == "transformer":
            engine.model.text_tower = bert_tower
        for query in ("", "\u200b"):
            with pytest.raises(QueryError, match=f"^{re.escape(EMPTY_QUERY_MESSAGE)}$"):
                engine.search_text(query, k=3)
        unknown = r"^none of the query's words are in the model's vocabulary: zebra; try other keywords$"
        with pytest.raises(QueryError, match=unknown):
            engine.similar_texts("zebra", k=3)
        assert len(engine.search_text("red zebra", k=3).hits) == 3
        assert engine.ignored_words("red zebra") == ["zebra"] and engine.ignored_words("\u200b") == []
    finally:
        engine.close()


def test_zero_width_query_in_the_cli_and_the_app_reads_as_empty(tiny_run, engine, capsys):
    # reported against retrieval demos: a pasted zero-width space got hits instead of "type a few words"
    import importlib

    from crossmodal.cli import main

    app = importlib.import_module("crossmodal.app")
    for query in ("", "\u200b"):
        assert main(["search", "--run", str(tiny_run), "--text", query]) == 2
        assert capsys.readouterr().err.strip() == f"crossmodal search: {EMPTY_QUERY_MESSAGE}"
        assert app.run_search(engine, app.TABS[0], query, 5) == "Type one or more keywords first."
    assert main(["search", "--run", str(tiny_run), "--text", "red zebra", "-k", "2"]) == 0
    assert "crossmodal search: ignored, not in the model's vocabulary: zebra" in capsys.readouterr().err


# -- leftovers of killed builds ------------------------------------------------------------------------------
def test_leftovers_of_killed_builds_are_swept_by_the_next_build(tmp_path, monkeypatch):
    # reported against dataset caches: hidden temporary folders of killed builds piled up in data/built
    built = tmp_path / "built"
    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(built))
    png(tmp_path / "f", "a.png")
    (tmp_path / "f" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "red"}) + "\n")
    killed = built / ".imagefolder-0123456789ab.k1ll3d_x.tmp"
    (killed / "arrow").mkdir(parents=True)
    (killed / "arrow" / "data-00000-of-00001.arrow").write_bytes(b"half")
    swapped = built / ".hub-aaaaaaaaaaaa.old"  # killed between the two renames: the previous build
    (swapped / "arrow").mkdir(parents=True)
    (built / ".hub-bbbbbbbbbbbb.old").mkdir()  # killed while deleting the old copy: the build is in place
    (built / "hub-bbbbbbbbbbbb").mkdir()
    strangers = [built / ".notes.tmp", built / "mine.tmp", built / ".imagefolder-xyz.abc.tmp"]
    for path in strangers:
        path.write_text("not ours")
    ds = open_dataset("imagefolder", {"root": str(tmp_path / "f")})
    assert ds.ids == ["a.png"]
    assert not killed.exists() and not swapped.exists() and not (built / ".hub-bbbbbbbbbbbb.old").exists()
    assert (built / "hub-aaaaaaaaaaaa" / "arrow").is_dir()  # renamed back into place
    assert all(p.read_text() == "not ours" for p in strangers)
    assert sorted(p.name for p in built.glob(".*.tmp")) == [".imagefolder-xyz.abc.tmp", ".notes.tmp"]


def test_a_running_build_is_never_swept(tmp_path):
    # reported against dataset caches: a second process deleted the temporary folder of a running build
    running = tmp_path / ".imagefolder-0123456789ab.running.tmp"
    targets = r"imagefolder-[0-9a-f]{12}"
    with build_guard(tmp_path, targets):  # this build holds the folder while it writes
        running.mkdir()
        with build_guard(tmp_path, targets):  # another build starts meanwhile: it sweeps nothing
            assert running.is_dir()
    with open(tmp_path / ".build.lock", "rb") as lock:  # every lock is released
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with build_guard(tmp_path, targets):  # the next build alone: it sweeps what the first left
        assert not running.exists()


def test_openmoji_build_sweeps_its_own_leftovers(tmp_path, monkeypatch):
    # reported against dataset caches: an interrupted `crossmodal build-data` left its folder behind
    from crossmodal.data.openmoji import build_openmoji

    monkeypatch.setenv("CROSSMODAL_DATA_DIR", str(tmp_path))
    killed = tmp_path / ".openmoji-64-limit2.t3mp0rry.tmp"
    killed.mkdir()
    ds = build_openmoji(size=64, limit=2)
    assert len(ds) == 2 and not killed.exists() and (tmp_path / "openmoji-64-limit2" / "info.json").is_file()
    assert sorted(os.listdir(tmp_path)) == [".build.lock", "openmoji-64-limit2"]
