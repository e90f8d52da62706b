"""``MetadataStore``: what an index id means, kept in SQLite (``store.sqlite`` in a run folder).

Tables:

* ``items(item_id INTEGER PRIMARY KEY, key TEXT, image_path TEXT, labels TEXT, source TEXT)``:
  one row per image; ``item_id`` is the id in the image index, ``key`` the dataset's string
  id, ``labels`` a JSON list (label names or indices), ``source`` the dataset name (for items
  added to a run later: the folder's absolute path, or the dataset name, they came from).
* ``texts(text_id INTEGER PRIMARY KEY, item_id INTEGER, caption TEXT)``: one row per
  caption; ``text_id`` is the id in the text index. An item with several captions has
  several rows pointing at it. Removing an item removes its texts.
* ``meta(key TEXT PRIMARY KEY, value TEXT)``: JSON values, e.g. ``format_version`` and
  ``label_names``.
* ``stamps(item_id INTEGER PRIMARY KEY, size INTEGER, mtime_ns INTEGER, record TEXT)``: for
  items added from a folder, the size and modification time of the image file and a digest of
  the captions and labels its metadata gave, when it was added; ``crossmodal index --sync``
  compares them with the folder. Removing an item removes its stamp. A store written before
  this table existed gets it on its first ``set_stamps``; reading one finds no stamps.

Look-ups of many ids run as ONE query (the ids travel as a JSON array through
``json_each``, so there is no limit on their number) and return rows in the order of the
ids asked for, repeats included. Unknown ids raise ``UnknownIdError`` (a ``KeyError``)
naming them, unless ``missing="none"`` is passed, which puts ``None`` in their place.

Writes run in one transaction each. ``create`` builds the empty schema in a temporary file
and renames it into place; ``build`` fills a whole store that way, so a crash never
leaves a half-written store at the final path.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from crossmodal.io import atomic_path

logger = logging.getLogger(__name__)

STORE_FORMAT_VERSION = 1
STORE_FILENAME = "store.sqlite"

_SCHEMA = """
CREATE TABLE items (
    item_id INTEGER PRIMARY KEY,
    key TEXT NOT NULL DEFAULT '',
    image_path TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '[]',
    source TEXT NOT NULL DEFAULT ''
);
CREATE TABLE texts (
    text_id INTEGER PRIMARY KEY,
    item_id INTEGER NOT NULL REFERENCES items(item_id) ON DELETE CASCADE,
    caption TEXT NOT NULL
);
CREATE INDEX texts_item ON texts(item_id);
CREATE INDEX items_key ON items(key);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_STAMPS_SCHEMA = """
CREATE TABLE IF NOT EXISTS stamps (
    item_id INTEGER PRIMARY KEY REFERENCES items(item_id) ON DELETE CASCADE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    record TEXT NOT NULL DEFAULT ''
);
"""

_ITEM_COLUMNS = ("item_id", "key", "image_path", "labels", "source")
_TEXT_COLUMNS = ("text_id", "item_id", "caption")
Missing = Literal["error", "none"]


class StoreError(RuntimeError):
    """The store file is missing, not a store, or of another format version."""


class UnknownIdError(KeyError):
    """Some ids asked for are not in the store."""

    def __str__(self) -> str:
        return str(self.args[0])


def _batches(rows: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(rows)
    while batch := list(islice(it, size)):
        yield batch


def _item_tuple(row: dict[str, Any]) -> tuple[Any, ...]:
    unknown = set(row) - set(_ITEM_COLUMNS)
    if unknown or "item_id" not in row:
        raise ValueError(f"item rows need 'item_id' and only {list(_ITEM_COLUMNS)}; got keys {sorted(row)}")
    labels = row.get("labels") or []
    labels = [int(v) if not isinstance(v, str) else v for v in labels]  # numpy ints -> JSON ints
    return (
        int(row["item_id"]),
        str(row.get("key", "")),
        str(row.get("image_path", "")),
        json.dumps(labels, ensure_ascii=False),
        str(row.get("source", "")),
    )


def _text_tuple(row: dict[str, Any]) -> tuple[Any, ...]:
    unknown = set(row) - set(_TEXT_COLUMNS)
    if unknown or "item_id" not in row or "caption" not in row:
        raise ValueError(
            f"text rows need 'item_id', 'caption' and optionally 'text_id'; got keys {sorted(row)}"
        )
    text_id = row.get("text_id")
    return (None if text_id is None else int(text_id), int(row["item_id"]), str(row["caption"]))


class MetadataStore:
    """Item and caption metadata behind index ids. Build with ``create``/``build``, read with ``open``.

    Safe to share between threads (one connection guarded by a lock).
    """

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._lock = threading.Lock()

    # ---- opening and creating

    @classmethod
    def create(cls, path: str | os.PathLike[str], overwrite: bool = False) -> MetadataStore:
        """Create an empty store at ``path`` (schema built in a temp file, then renamed) and open it.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is false.
        """
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"store {path} already exists (pass overwrite=True to replace it)")
        with atomic_path(path) as tmp:
            conn = sqlite3.connect(tmp)
            try:
                cls._init_schema(conn)
            finally:
                conn.close()
        return cls.open(path, readonly=False)

    @classmethod
    def build(
        cls,
        path: str | os.PathLike[str],
        items: Iterable[dict[str, Any]],
        texts: Iterable[dict[str, Any]] = (),
        meta: dict[str, Any] | None = None,
    ) -> MetadataStore:
        """Write a complete store in a temp file and rename it onto ``path``; return it read-only."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.unlink()  # sqlite wants to create the file itself
            store = cls.create(tmp)
            try:
                store.add_items(items)
                store.add_texts(texts)
                for key, value in (meta or {}).items():
                    store.set_meta(key, value)
            finally:
                store.close()
        return cls.open(path)

    @staticmethod
    def _init_schema(conn: sqlite3.Connection) -> None:
        with conn:
            conn.executescript(_SCHEMA + _STAMPS_SCHEMA)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('format_version', ?)",
                (json.dumps(STORE_FORMAT_VERSION),),
            )

    @classmethod
    def open(cls, path: str | os.PathLike[str], readonly: bool = True) -> MetadataStore:
        """Open an existing store.

        Raises:
            StoreError: the file is missing, not an SQLite store of ours, or of another version.
        """
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"metadata store {path} does not exist")
        uri = path.resolve().as_uri() + ("?mode=ro" if readonly else "?mode=rw")
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            row = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{path} is not a crossmodal metadata store: {exc}") from None
        version = None if row is None else json.loads(row[0])
        if version != STORE_FORMAT_VERSION:
            conn.close()
            raise StoreError(
                f"metadata store {path} has format version {version}, expected {STORE_FORMAT_VERSION}"
            )
        return cls(conn, path, readonly)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetadataStore({str(self.path)!r}, readonly={self.readonly})"

    # ---- writing

    def _write(self, sql: str, rows: Iterable[tuple[Any, ...]], batch_size: int) -> int:
        if self.readonly:
            raise StoreError(f"metadata store {self.path} is open read-only")
        n = 0
        with self._lock, self._conn:  # one transaction for all batches
            for batch in _batches(rows, batch_size):
                self._conn.executemany(sql, batch)
                n += len(batch)
        return n

    def add_items(self, rows: Iterable[dict[str, Any]], batch_size: int = 10_000) -> int:
        """Insert item rows (keys: ``item_id`` and optionally ``key``, ``image_path``, ``labels``,
        ``source``) in one transaction; an existing ``item_id`` raises ``sqlite3.IntegrityError``
        and nothing is written. Returns the number of rows added."""
        sql = "INSERT INTO items(item_id, key, image_path, labels, source) VALUES (?, ?, ?, ?, ?)"
        return self._write(sql, (_item_tuple(r) for r in rows), batch_size)

    def add_texts(self, rows: Iterable[dict[str, Any]], batch_size: int = 10_000) -> int:
        """Insert caption rows (keys: ``item_id``, ``caption``, optionally ``text_id``; without it
        SQLite assigns the next id). The item must exist. Returns the number of rows added."""
        sql = "INSERT INTO texts(text_id, item_id, caption) VALUES (?, ?, ?)"
        return self._write(sql, (_text_tuple(r) for r in rows), batch_size)

    def remove_items(self, ids: Iterable[int]) -> int:
        """Delete items and their captions; returns the number of items deleted (unknown ids are ignored)."""
        if self.readonly:
            raise StoreError(f"metadata store {self.path} is open read-only")
        payload = json.dumps([int(i) for i in ids])
        with self._lock, self._conn:
            cur = self._conn.execute(
                "DELETE FROM items WHERE item_id IN (SELECT value FROM json_each(?))", (payload,)
            )
        return cur.rowcount

    def set_stamps(self, rows: Iterable[dict[str, Any]]) -> int:
        """Record (or replace) items' file stamps: rows of ``item_id``, ``size``, ``mtime_ns`` and
        optionally ``record`` (see the module's ``stamps`` table). Returns the number of rows."""
        if self.readonly:
            raise StoreError(f"metadata store {self.path} is open read-only")
        with self._lock, self._conn:
            self._conn.executescript(_STAMPS_SCHEMA)
        sql = "INSERT OR REPLACE INTO stamps(item_id, size, mtime_ns, record) VALUES (?, ?, ?, ?)"
        tuples = ((int(r["item_id"]), int(r["size"]), int(r["mtime_ns"]), str(r.get("record", "")))
                  for r in rows)  # fmt: skip
        return self._write(sql, tuples, 10_000)

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON-serialisable value under ``key``."""
        self._write("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [(key, json.dumps(value))], 1)

    # ---- reading

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _lookup(
        self, table: str, id_col: str, columns: tuple[str, ...], ids: Iterable[int], missing: Missing
    ) -> list[tuple[Any, ...] | None]:
        """Rows of ``table`` for ``ids`` in their order, by one ``json_each`` join."""
        if missing not in ("error", "none"):
            raise ValueError(f"missing must be 'error' or 'none', got {missing!r}")
        wanted = [int(i) for i in ids]
        cols = ", ".join(f"t.{c}" for c in columns)
        rows = self._query(
            f"SELECT j.key, {cols} FROM json_each(?) AS j "
            f"LEFT JOIN {table} AS t ON t.{id_col} = j.value ORDER BY j.key",
            (json.dumps(wanted),),
        )
        out = [None if r[1] is None else r[1:] for r in rows]  # the id column is NULL when unknown
        unknown = [i for i, r in zip(wanted, out, strict=True) if r is None]
        if unknown and missing == "error":
            raise UnknownIdError(f"{len(unknown)} unknown {id_col}(s) in {self.path}, e.g. {unknown[:10]}")
        return out

    def get_items(self, ids: Iterable[int], missing: Missing = "error") -> list[dict[str, Any] | None]:
        """Item rows for ``ids`` (one query), in the order given; ``labels`` decoded from JSON.

        Args:
            ids: item ids, repeats allowed.
            missing: ``"error"`` raises ``UnknownIdError`` for unknown ids; ``"none"`` returns
                ``None`` in their place.
        """
        rows = self._lookup("items", "item_id", _ITEM_COLUMNS, ids, missing)
        return [None if r is None else self._item_dict(r) for r in rows]

    @staticmethod
    def _item_dict(row: tuple[Any, ...]) -> dict[str, Any]:
        item = dict(zip(_ITEM_COLUMNS, row, strict=True))
        item["labels"] = json.loads(item["labels"])
        return item

    def get_texts(self, ids: Iterable[int], missing: Missing = "error") -> list[dict[str, Any] | None]:
        """Caption rows (``text_id``, ``item_id``, ``caption``) for ``ids``, like ``get_items``."""
        rows = self._lookup("texts", "text_id", _TEXT_COLUMNS, ids, missing)
        return [None if r is None else dict(zip(_TEXT_COLUMNS, r, strict=True)) for r in rows]

    def item_of_text(self, text_ids: Iterable[int], missing: Missing = "error") -> list[int | None]:
        """The item id each caption belongs to, in the order given."""
        rows = self._lookup("texts", "text_id", ("text_id", "item_id"), text_ids, missing)
        return [None if r is None else int(r[1]) for r in rows]

    def texts_of_items(self, item_ids: Iterable[int]) -> list[list[dict[str, Any]]]:
        """All captions of each item (one query), in the order of ``item_ids``; ``[]`` if none."""
        wanted = [int(i) for i in item_ids]
        rows = self._query(
            "SELECT j.key, t.text_id, t.item_id, t.caption FROM json_each(?) AS j "
            "JOIN texts AS t ON t.item_id = j.value ORDER BY j.key, t.text_id",
            (json.dumps(wanted),),
        )
        out: list[list[dict[str, Any]]] = [[] for _ in wanted]
        for pos, *row in rows:
            out[pos].append(dict(zip(_TEXT_COLUMNS, row, strict=True)))
        return out

    def get_stamps(self, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """``{item_id: {"size", "mtime_ns", "record"}}`` of the ``ids`` that have a stamp (one query)."""
        if not self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'stamps'"):
            return {}
        rows = self._query(
            "SELECT s.item_id, s.size, s.mtime_ns, s.record FROM json_each(?) AS j "
            "JOIN stamps AS s ON s.item_id = j.value", (json.dumps([int(i) for i in ids]),)
        )
        return {int(i): {"size": int(n), "mtime_ns": int(t), "record": r} for i, n, t, r in rows}

    def items_of_source(self, source: str) -> list[dict[str, Any]]:
        """Every item row whose ``source`` is ``source`` (a folder added to the run), by item id."""
        rows = self._query(
            f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items WHERE source = ? ORDER BY item_id", (source,)
        )
        return [self._item_dict(r) for r in rows]

    def item_ids(self) -> list[int]:
        """Every item id, in increasing order."""
        return [int(r[0]) for r in self._query("SELECT item_id FROM items ORDER BY item_id")]

    def find_keys(self, keys: Iterable[str], source: str | None = None) -> dict[str, list[int]]:
        """The item ids of each key that is in the store (one query), optionally only items of ``source``.

        Returns:
            ``{key: [item ids]}`` for the keys found (a key may name several items, e.g. the same
            file name added from two folders); keys not in the store are absent.
        """
        payload = json.dumps(list(dict.fromkeys(str(k) for k in keys)))
        sql = ("SELECT t.key, t.item_id FROM json_each(?) AS j JOIN items AS t ON t.key = j.value"
               + ("" if source is None else " WHERE t.source = ?") + " ORDER BY t.item_id")
        rows = self._query(sql, (payload,) if source is None else (payload, source))
        out: dict[str, list[int]] = {}
        for key, item_id in rows:
            out.setdefault(key, []).append(int(item_id))
        return out

    def count_items(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM items")[0][0])

    def count_texts(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM texts")[0][0])

    def max_item_id(self) -> int:
        """The largest item id, or -1 for an empty store (so ``max_item_id() + 1`` is the next free id)."""
        value = self._query("SELECT MAX(item_id) FROM items")[0][0]
        return -1 if value is None else int(value)

    def max_text_id(self) -> int:
        """The largest text id, or -1 for a store without texts."""
        value = self._query("SELECT MAX(text_id) FROM texts")[0][0]
        return -1 if value is None else int(value)

    def get_meta(self, key: str, default: Any = None) -> Any:
        """The JSON value stored under ``key``, or ``default``."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def meta(self) -> dict[str, Any]:
        """All meta entries."""
        return {k: json.loads(v) for k, v in self._query("SELECT key, value FROM meta")}
