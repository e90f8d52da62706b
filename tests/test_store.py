from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from crossmodal.store import STORE_FORMAT_VERSION, MetadataStore, StoreError, UnknownIdError

ITEMS = [
    {"item_id": 0, "key": "cat", "image_path": "img/cat.png", "labels": ["animal"], "source": "toy"},
    {"item_id": 1, "key": "dog", "image_path": "img/dog.png", "labels": ["animal", "pet"], "source": "toy"},
    {"item_id": 5, "key": "car", "image_path": "img/car.png", "labels": [np.int64(2)], "source": "toy"},
]
TEXTS = [
    {"text_id": 0, "item_id": 0, "caption": "a cat"},
    {"text_id": 1, "item_id": 0, "caption": "a small cat sleeping"},
    {"text_id": 2, "item_id": 1, "caption": "a dog"},
    {"text_id": 3, "item_id": 5, "caption": "a red car"},
    {"text_id": 4, "item_id": 0, "caption": "kitten"},
]


@pytest.fixture
def store(tmp_path):
    s = MetadataStore.create(tmp_path / "store.sqlite")
    assert s.add_items(iter(ITEMS), batch_size=2) == 3
    assert s.add_texts(TEXTS, batch_size=2) == 5
    s.set_meta("label_names", ["animal", "pet", "vehicle"])
    yield s
    s.close()


def test_batched_lookups_preserve_order_and_repeats(store):
    items = store.get_items([5, 0, 5, 1])
    assert [it["key"] for it in items] == ["car", "cat", "car", "dog"]
    assert items[3] == ITEMS[1]
    assert items[0]["labels"] == [2]
    texts = store.get_texts([4, 2, 0])
    assert [(t["item_id"], t["caption"]) for t in texts] == [(0, "kitten"), (1, "a dog"), (0, "a cat")]
    assert store.get_items([]) == []


def test_several_captions_map_to_their_item(store):
    assert store.item_of_text([1, 3, 4, 0, 2]) == [0, 5, 0, 0, 1]
    captions = store.texts_of_items([0, 7, 5])
    assert [t["caption"] for t in captions[0]] == ["a cat", "a small cat sleeping", "kitten"]
    assert captions[1] == [] and [t["text_id"] for t in captions[2]] == [3]


def test_unknown_ids_error_or_none(store):
    with pytest.raises(UnknownIdError, match=r"\[3, 99\]"):
        store.get_items([0, 3, 99])
    assert store.get_items([3, 1], missing="none")[0] is None
    assert store.get_texts([9], missing="none") == [None]
    with pytest.raises(KeyError):
        store.item_of_text([42])


def test_counts_meta_and_max_id(store, tmp_path):
    assert (store.count_items(), store.count_texts(), store.max_item_id(), store.max_text_id()) == (
        3,
        5,
        5,
        4,
    )
    assert store.get_meta("label_names") == ["animal", "pet", "vehicle"]
    assert store.meta()["format_version"] == STORE_FORMAT_VERSION
    assert store.get_meta("absent", 7) == 7
    empty = MetadataStore.create(tmp_path / "empty.sqlite")
    assert (empty.max_item_id(), empty.count_texts()) == (-1, 0)


def test_remove_items_removes_their_texts(store):
    assert store.remove_items([0, 123]) == 1
    assert store.count_items() == 2 and store.count_texts() == 2
    assert store.get_texts([1], missing="none") == [None]


def test_duplicate_item_write_is_all_or_nothing(store):
    with pytest.raises(sqlite3.IntegrityError):
        store.add_items([{"item_id": 10}, {"item_id": 0}])
    assert store.count_items() == 3  # item 10 rolled back with the failed batch
    with pytest.raises(sqlite3.IntegrityError):
        store.add_texts([{"item_id": 99, "caption": "orphan"}])  # no such item
    with pytest.raises(ValueError, match="item_id"):
        store.add_items([{"key": "no id"}])


def test_readonly_reopen_and_errors(store, tmp_path):
    path = store.path
    store.close()
    ro = MetadataStore.open(path)
    assert ro.get_items([1])[0]["key"] == "dog"
    with pytest.raises(StoreError, match="read-only"):
        ro.add_items([{"item_id": 9}])
    with pytest.raises(sqlite3.OperationalError):
        ro._conn.execute("DELETE FROM items")  # the connection itself is read-only
    ro.close()
    with pytest.raises(FileExistsError):
        MetadataStore.create(path)
    with pytest.raises(StoreError, match="does not exist"):
        MetadataStore.open(tmp_path / "nope.sqlite")
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="not a crossmodal metadata store"):
        MetadataStore.open(junk)


def test_build_writes_complete_store_atomically(tmp_path):
    path = tmp_path / "run" / "store.sqlite"
    store = MetadataStore.build(path, ITEMS, TEXTS, meta={"label_names": ["a"]})
    assert store.readonly and store.count_texts() == 5 and store.get_meta("label_names") == ["a"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.sqlite"]
    store.close()
    with pytest.raises(ValueError):
        MetadataStore.build(tmp_path / "bad.sqlite", [{"item_id": 1, "colour": "red"}])
    assert not (tmp_path / "bad.sqlite").exists()
    assert not [p for p in tmp_path.iterdir() if "bad" in p.name]  # no temp files left behind
