"""Captioned image loaders: image folder (jsonl / csv), COCO, Flickr30k, hub, on tiny fixtures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal.data import create_dataset
from crossmodal.data.captions import safe_relpath
from crossmodal.data.records import CrossModalDataset
from crossmodal.data.splits import make_splits

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "gray": (90, 90, 90)}


def make_image(path: Path, color: str, size: tuple[int, int] = (8, 6)) -> Path:
    """A solid image with one black pixel at (1, 2), so orientation is checkable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, COLORS[color])
    img.putpixel((1, 2), (0, 0, 0))
    img.save(path)
    return path


def check_pixels(ds: CrossModalDataset, i: int, color: str, size: tuple[int, int] = (8, 6)) -> None:
    """Size and pixels of item ``i``: exact for PNG, the corner colour within JPEG error for JPEG."""
    img = ds.load_image(i)
    assert img.size == size
    arr = np.asarray(img).astype(int)
    if ds.table[int(i)]["image_path"].endswith(".jpg"):
        assert np.abs(arr[0, 0] - COLORS[color]).max() < 40
        return
    assert tuple(arr[0, 0]) == COLORS[color]
    assert tuple(arr[2, 1]) == (0, 0, 0)


def index_of(ds: CrossModalDataset, item_id: str) -> int:
    return ds.ids.index(item_id)


# -- imagefolder -----------------------------------------------------------------------------


@pytest.fixture
def jsonl_folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    make_image(root / "a.png", "red")
    make_image(root / "sub" / "b.jpg", "blue")
    make_image(root / "c.png", "green")
    (root / "broken.png").write_bytes(b"this is not an image")
    make_image(tmp_path / "outside.png", "gray")
    lines = [
        {"file_name": "a.png", "text": "a red square", "labels": ["red", "square"]},
        {"file_name": "sub/b.jpg", "text": ["a blue thing", "blue"], "labels": "blue|square"},
        "{this line is broken",
        {"file_name": "missing.png", "text": "never here", "labels": ["red"]},
        {"file_name": "../outside.png", "text": "escapes", "labels": ["gray"]},
        {"file_name": str(tmp_path / "outside.png"), "text": "absolute", "labels": ["gray"]},
        {"file_name": "a.png", "text": "scarlet box", "labels": ["bright"]},
        {"file_name": "c.png", "text": "green"},
        {"file_name": "broken.png", "text": "broken", "labels": ["red"]},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (root / "metadata.jsonl").write_text(text + "\n")
    return root


def test_imagefolder_jsonl(jsonl_folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        ds = create_dataset("imagefolder", root=jsonl_folder, cache_dir=str(tmp_path / "c"))
    assert ds.ids == ["a.png", "sub/b.jpg", "c.png"]
    assert ds.info.relevance == "labels"
    assert ds.info.label_names == ["blue", "bright", "red", "square"]
    a, b, c = (index_of(ds, i) for i in ("a.png", "sub/b.jpg", "c.png"))
    assert ds.captions(a) == ["a red square", "scarlet box"]  # two lines for one image merge
    assert ds.captions(b) == ["a blue thing", "blue"]
    np.testing.assert_array_equal(ds.labels_matrix()[[a, b, c]], [[0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]])
    check_pixels(ds, a, "red")
    check_pixels(ds, c, "green")
    check_pixels(ds, b, "blue")
    assert ds.table[a]["image_path"] == "a.png" and ds.table[a]["image_bytes"] is None
    assert Path(ds.info.image_root) == jsonl_folder.resolve()
    stats = ds.info.stats
    assert stats["n_bad_lines"] == 1 and "metadata.jsonl line 3" in stats["bad_lines"][0]
    assert stats["n_missing_images"] == 1 and "missing.png" in stats["missing_images"][0]
    assert stats["n_unsafe_paths"] == 2
    assert stats["n_failed_images"] == 1 and stats["failed_images"] == ["broken.png"]
    assert "not a readable image (unknown format)" in stats["undecodable_images"][0]  # the reason is kept too
    assert "line 3" in caplog.text and "missing.png" in caplog.text and "outside" in caplog.text
    assert "broken.png" in caplog.text


def test_imagefolder_csv_without_labels(tmp_path):
    root = tmp_path / "csvfolder"
    for k, color in enumerate(["red", "green", "blue"]):
        make_image(root / f"{k}.png", color)
    (root / "metadata.csv").write_text(
        'file_name,text\n0.png,first red\n1.png,second green\n2.png,"blue, with a comma"\n'
        "nothere.png,missing image\n1.png,too,many,fields\n1.png,another green\n"
    )
    ds = create_dataset("imagefolder", root=root, check_images="full", cache_dir=str(tmp_path / "c"))
    assert ds.info.relevance == "image"
    assert ds.labels_matrix().shape == (3, 0)
    assert ds.captions(index_of(ds, "1.png")) == ["second green", "another green"]
    assert ds.captions(index_of(ds, "2.png")) == ["blue, with a comma"]
    assert ds.info.stats["n_bad_lines"] == 1 and "metadata.csv line 6" in ds.info.stats["bad_lines"][0]
    assert ds.info.stats["n_missing_images"] == 1
    check_pixels(ds, index_of(ds, "2.png"), "blue")


def test_imagefolder_csv_with_label_strings(tmp_path):
    root = tmp_path / "labelled"
    make_image(root / "x.png", "red")
    make_image(root / "y.png", "gray")
    (root / "metadata.csv").write_text(
        'file_name,text,labels\nx.png,"[""one"", ""two""]",warm;red\ny.png,dull,\n'
    )
    ds = create_dataset("imagefolder", root=root, cache_dir=str(tmp_path / "c"))
    assert ds.info.label_names == ["red", "warm"]
    assert ds.captions(0) == ["one", "two"]  # a JSON list in a CSV cell is a list of captions
    np.testing.assert_array_equal(ds.labels_matrix(), [[1, 1], [0, 0]])


def test_imagefolder_without_metadata(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.jsonl or metadata.csv.*data/README.md"):
        create_dataset("imagefolder", root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        create_dataset("imagefolder", root=tmp_path / "absent")
    with pytest.raises(ValueError, match="check_images must be one of"):
        (tmp_path / "empty" / "metadata.jsonl").write_text("")
        create_dataset("imagefolder", root=tmp_path / "empty", check_images="maybe")


def test_safe_relpath(tmp_path):
    assert safe_relpath(tmp_path, "a/./b.png") == "a/b.png"
    assert safe_relpath(tmp_path, "a\\b.png") == "a/b.png"
    for bad in ("../x.png", "a/../../x.png", "/etc/passwd", "C:\\x.png", "", "."):
        assert safe_relpath(tmp_path, bad) is None
    (tmp_path / "link").symlink_to(tmp_path.parent)
    assert safe_relpath(tmp_path, "link/x.png") is None


def test_splits_deterministic_on_a_caption_dataset(jsonl_folder, tmp_path):
    ds = create_dataset("imagefolder", root=jsonl_folder, cache_dir=str(tmp_path / "c"))
    a = make_splits(ds, n_query=1, n_train=2, seed=4, n_val=1)
    b = make_splits(ds, n_query=1, n_train=2, seed=4, n_val=1)
    assert a.query.tolist() == b.query.tolist() and a.val.tolist() == b.val.tolist()
    assert ds.info.protocol == {"n_query": 1, "n_train": 2}


# -- COCO ------------------------------------------------------------------------------------


def make_coco(root: Path, split: str = "val2017") -> Path:
    make_image(root / split / "000000000001.jpg", "red", (10, 7))
    make_image(root / split / "000000000002.png", "green", (10, 7))
    make_image(root / split / "000000000003.png", "blue", (10, 7))
    images = [{"id": i, "file_name": f"00000000000{i}.{'jpg' if i == 1 else 'png'}"} for i in (3, 1, 2)]
    images.append({"id": 4, "file_name": "000000000004.png"})  # no such file
    caps = [
        {"id": 10, "image_id": 1, "caption": "A red thing. "},
        {"id": 11, "image_id": 1, "caption": "Something red."},
        {"id": 12, "image_id": 2, "caption": "A green thing."},
        {"id": 13, "image_id": 3, "caption": "A blue thing."},
        {"id": 14, "image_id": 4, "caption": "Nobody sees this."},
        {"id": 15, "image_id": 99, "caption": "No such image."},
    ]
    cats = [{"id": 7, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    inst = [
        {"image_id": 1, "category_id": 7},
        {"image_id": 1, "category_id": 1},
        {"image_id": 2, "category_id": 3},
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"captions_{split}.json").write_text(
        json.dumps({"images": images, "annotations": caps})
    )
    (root / "annotations" / f"instances_{split}.json").write_text(
        json.dumps({"images": images, "annotations": inst, "categories": cats})
    )
    return root


def test_coco(tmp_path):
    root = make_coco(tmp_path / "coco")
    ds = create_dataset("coco", root=root, cache_dir=str(tmp_path / "c"))
    assert ds.info.label_names == ["person", "car", "zebra"]  # category id order
    assert ds.ids == ["1", "2"]  # image 3 has no objects, image 4 no file
    assert ds.captions(0) == ["A red thing.", "Something red."]
    np.testing.assert_array_equal(ds.labels_matrix(), [[1, 0, 1], [0, 1, 0]])
    check_pixels(ds, 1, "green", (10, 7))
    assert ds.table[0]["image_path"] == "000000000001.jpg"
    assert ds.info.source["split"] == "val2017"
    stats = ds.info.stats
    assert (stats["n_unlabeled_images"], stats["n_missing_images"], stats["n_orphan_captions"]) == (1, 1, 1)
    keep = create_dataset("coco", root=root, drop_unlabeled=False, cache_dir=str(tmp_path / "c"))
    assert keep.ids == ["1", "2", "3"]
    plain = create_dataset("coco", root=root, labels=False, cache_dir=str(tmp_path / "c"))
    assert plain.info.relevance == "image" and len(plain) == 3


def test_coco_errors(tmp_path):
    root = make_coco(tmp_path / "coco")
    with pytest.raises(FileNotFoundError, match="captions_train2017.json.*data/README.md"):
        create_dataset("coco", root=root, split="train2017")
    (root / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        create_dataset("coco", root=root, labels=True)
    ds = create_dataset("coco", root=root, cache_dir=str(tmp_path / "c"))
    assert ds.info.relevance == "image" and len(ds) == 3


# -- Flickr30k -------------------------------------------------------------------------------


def test_flickr30k_results_csv_nested_images(tmp_path):
    root = tmp_path / "f30k"
    images = root / "flickr30k_images" / "flickr30k_images"
    make_image(images / "100.jpg", "red")
    make_image(images / "200.jpg", "green")
    (root / "flickr30k_images" / "results.csv").write_text(
        "image_name| comment_number| comment\n"
        "100.jpg| 0| A red card .\n100.jpg| 1| Something red .\n"
        "200.jpg| 0| A green card .\n200.jpg| 4 A glued comment .\n"
        "a line with no separators\n300.jpg| 0| Missing image .\n"
    )
    ds = create_dataset("flickr30k", root=root, cache_dir=str(tmp_path / "c"))
    assert ds.info.relevance == "image"
    assert ds.ids == ["100.jpg", "200.jpg"]
    assert ds.captions(1) == ["A green card .", "A glued comment ."]
    assert Path(ds.info.image_root) == images.resolve()
    assert ds.info.stats["n_bad_lines"] == 1 and "line 6" in ds.info.stats["bad_lines"][0]
    assert ds.info.stats["n_missing_images"] == 1
    check_pixels(ds, 0, "red")


def test_flickr30k_karpathy_split(tmp_path):
    root = tmp_path / "f30k"
    make_image(root / "flickr30k_images" / "1.jpg", "red")
    make_image(root / "flickr30k_images" / "2.jpg", "blue")
    karpathy = {
        "dataset": "flickr30k",
        "images": [
            {
                "filename": "1.jpg",
                "split": "train",
                "sentences": [{"raw": "red one", "tokens": ["red", "one"]}],
            },
            {
                "filename": "2.jpg",
                "split": "test",
                "sentences": [{"raw": "blue one"}, {"tokens": ["blue", "x"]}],
            },
        ],
    }
    (root / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    everything = create_dataset("flickr30k", root=root, cache_dir=str(tmp_path / "c"))
    assert everything.ids == ["1.jpg", "2.jpg"]
    test = create_dataset("flickr30k", root=root, split="test", cache_dir=str(tmp_path / "c"))
    assert test.ids == ["2.jpg"] and test.captions(0) == ["blue one", "blue x"]
    with pytest.raises(ValueError, match="unknown Flickr30k split"):
        create_dataset("flickr30k", root=root, split="dev")


def test_flickr30k_missing_annotations(tmp_path):
    (tmp_path / "f").mkdir()
    with pytest.raises(FileNotFoundError, match="dataset_flickr30k.json.*results.csv.*data/README.md"):
        create_dataset("flickr30k", root=tmp_path / "f")


# -- hub -------------------------------------------------------------------------------------


def test_hub_local_imagefolder(tmp_path):
    data = tmp_path / "hubdata"
    make_image(data / "p.png", "red")
    make_image(data / "q.png", "blue")
    rows = [
        {"file_name": "p.png", "caption": "red square", "tags": ["warm", "square"]},
        {"file_name": "q.png", "caption": "blue square", "tags": ["square"]},
    ]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = create_dataset(
        "hub",
        root=data,
        builder="imagefolder",
        text_column="caption",
        labels_column="tags",
        cache_dir=str(tmp_path / "c"),
    )
    assert len(ds) == 2 and ds.info.relevance == "labels"
    assert ds.info.label_names == ["square", "warm"]
    by_caption = {ds.captions(i)[0]: i for i in range(2)}
    red = by_caption["red square"]
    np.testing.assert_array_equal(ds.labels_matrix()[red], [1, 1])
    assert ds.table[red]["image_bytes"]  # stored inline: self-contained
    check_pixels(ds, red, "red")
    with pytest.raises(KeyError, match="column 'text' not in the dataset"):
        create_dataset("hub", root=data, builder="imagefolder", cache_dir=str(tmp_path / "c"))


def test_hub_json_with_path_column_int_labels_and_a_broken_image(tmp_path, caplog):
    data = tmp_path / "jsondata"
    make_image(data / "img" / "0.png", "green")
    make_image(data / "img" / "1.png", "blue")
    (data / "img" / "2.png").write_bytes(b"\x89PNG broken")
    rows = [
        {"path": f"img/{i}.png", "text": [f"caption {i}"], "cls": i % 2, "key": f"k{i}"} for i in range(3)
    ]
    (data / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with caplog.at_level(logging.WARNING):
        ds = create_dataset(
            "hub",
            root=data,
            builder="json",
            data_files=str(data / "rows.jsonl"),
            image_column="path",
            labels_column="cls",
            id_column="key",
            cache_dir=str(tmp_path / "c"),
        )
    assert ds.ids == ["k0", "k1"]
    assert ds.info.label_names == ["label_0", "label_1"]
    np.testing.assert_array_equal(ds.labels_matrix(), [[1, 0], [0, 1]])
    assert ds.captions(1) == ["caption 1"]
    check_pixels(ds, 1, "blue")
    assert ds.info.stats["failed_images"] == ["k2"] and "k2" in caplog.text


def test_an_option_the_builder_does_not_take_is_named(tmp_path):
    from crossmodal.cli import main

    with pytest.raises(ValueError, match=r"does not take the option\(s\) n_query; its options: root"):
        create_dataset("imagefolder", root=str(tmp_path), n_query=5)
    assert main(["data-info", "imagefolder", "--root", str(tmp_path), "-o", "n_query=5"]) == 2


def test_a_build_shows_none_of_the_datasets_librarys_own_bars(tmp_path, capfd):
    """An add of a few images prints what it added, not "Generating train split" and
    "Saving the dataset" bars of the storage library underneath."""
    import datasets

    from crossmodal.data import open_dataset

    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"tile {i}"}) + "\n" for i in range(3)))  # fmt: skip
    assert len(open_dataset("imagefolder", {"root": str(tmp_path)})) == 3
    err = capfd.readouterr().err
    assert "Generating" not in err and "Saving the dataset" not in err
    assert datasets.is_progress_bar_enabled()  # given back as it was
