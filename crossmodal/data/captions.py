"""Captioned image datasets: an image folder with metadata, MS-COCO, Flickr30k, hub datasets.

Images stay where they are: rows store their path relative to ``info.image_root``
(hub datasets, whose images live in the hub cache, store the encoded bytes instead).
Problems in the annotations (a bad metadata line, a caption for a missing image, a path
that escapes the folder, an image that does not decode) are reported with where they
occurred, counted in ``info.stats`` and skipped; the rest loads. Items without a caption
are kept as image-only items and reported. Annotation files are read as UTF-8, or as the
UTF-8, UTF-16 or UTF-32 that a byte-order mark names (``records.open_text``). Ids taken
from the data (COCO image ids, Karpathy file names, a hub id column) must be unique:
captions and labels point at them, so a file that repeats one is refused, naming the ids.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pyarrow.compute as pc

from crossmodal.data import DATA_README, register_dataset
from crossmodal.data.records import (
    RELEVANCE_IMAGE,
    RELEVANCE_LABELS,
    ColumnError,
    CrossModalDataset,
    DatasetInfo,
    EmptyDatasetError,
    check_unique_ids,
    make_record,
    open_text,
    quiet_datasets,
)
from crossmodal.data.splits import fit_protocol
from crossmodal.images import ImageDecodeError, check_decodes, check_header, open_image
from crossmodal.text import is_blank, normalize_text

logger = logging.getLogger(__name__)

LOADER_VERSION = 1
# none: no check; header: Image.verify (fast, but an image cut short inside its pixel data
# passes); decode: decode the pixels once (the default); full: open_image (also converts).
CHECK_MODES = ("none", "header", "decode", "full")
DEFAULT_CHECK = "decode"
TEXT_COLUMNS = ("text", "caption", "captions")
MAX_REPORTED = 20  # problems listed by name in logs and stats; all are counted
_INVALID_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that errors="surrogateescape" could not decode


@dataclass
class Entry:
    """One image and what the annotations say about it."""

    captions: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    id: str = ""


class Problems:
    """Collects what was skipped, by kind, for the log and ``info.stats``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.items: dict[str, list[str]] = {}
        self.failed_ids: list[str] = []  # ids of images that did not decode
        self.uncaptioned: list[str] = []  # ids of items kept without a caption (image-only)

    def add(self, kind: str, message: str, failed_id: str | None = None) -> None:
        self.items.setdefault(kind, []).append(message)
        if failed_id is not None:
            self.failed_ids.append(failed_id)
        if len(self.items[kind]) <= MAX_REPORTED:
            logger.debug("%s: %s: %s", self.source, kind, message)

    def count(self, kind: str) -> int:
        return len(self.items.get(kind, []))

    def summary(self) -> str:
        """One line: the count of each kind of problem and its first messages."""
        parts = [
            f"{len(m)} {kind.replace('_', ' ')} ({'; '.join(m[:3])}{' ...' if len(m) > 3 else ''})"
            for kind, m in self.items.items()
        ]
        return ", ".join(parts) or "the annotations list no image"

    def report(self) -> dict[str, Any]:
        """Log one warning per kind and return the stats entries."""
        out: dict[str, Any] = {}
        for kind, messages in self.items.items():
            shown = "; ".join(messages[:MAX_REPORTED]) + (" ..." if len(messages) > MAX_REPORTED else "")
            logger.warning("%s: %d %s skipped: %s", self.source, len(messages), kind.replace("_", " "), shown)
            out[f"n_{kind}"] = len(messages)
            out[kind] = messages[:MAX_REPORTED]
        if self.uncaptioned:
            ids = self.uncaptioned
            shown = ", ".join(ids[:MAX_REPORTED]) + (" ..." if len(ids) > MAX_REPORTED else "")
            logger.warning(
                "%s: %d items have no caption; kept as image-only items (no text entry): %s",
                self.source, len(ids), shown,
            )  # fmt: skip
        out["n_without_captions"] = len(self.uncaptioned)
        out["without_captions"] = self.uncaptioned[:MAX_REPORTED]
        return out

    def no_items(self) -> EmptyDatasetError:
        """The error for a build where every row was rejected, saying why."""
        return EmptyDatasetError(f"{self.source}: no usable item; {self.summary()}; see {DATA_README}")


# -- shared helpers --------------------------------------------------------------------------


def safe_relpath(root: Path, name: str) -> str | None:
    """``name`` as a clean relative POSIX path inside ``root``, or None if it escapes it."""
    if not name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute():
        return None
    if PureWindowsPath(name).drive:
        return None
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        return None
    rel = "/".join(p for p in parts if p not in ("", "."))
    if not rel:
        return None
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root.resolve()):
        return None  # a symlink pointing outside the folder
    return rel


def check_image(source: Path | bytes, mode: str) -> str | None:
    """Return why ``source`` is not a usable image, or None if it is (per ``mode``, see ``CHECK_MODES``)."""
    if mode == "none":
        return None
    check = {"header": check_header, "decode": check_decodes, "full": open_image}[mode]
    try:
        check(source)
    except ImageDecodeError as exc:
        return str(exc)
    return None


def check_mode(mode: str) -> str:
    """``mode`` itself when it is one of ``CHECK_MODES``.

    Raises:
        ValueError: naming the modes.
    """
    if mode not in CHECK_MODES:
        raise ValueError(f"check_images must be one of {', '.join(CHECK_MODES)}; got {mode!r}")
    return mode


CAPTION_FIELDS = ("caption", "captions", "text", "texts")  # of a caption object, in this order


def as_captions(value: Any) -> list[str]:
    """A caption column's value as a list of captions: a string (or a JSON list in one), a list
    of them, an object with a ``caption``/``captions``/``text`` field (a WebDataset ``.json``
    member), or None (no caption); blank ones dropped. An object with none of those fields has
    no caption (its keys are not captions)."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        field = next((k for k in CAPTION_FIELDS if k in value), None)
        return as_captions(value[field]) if field else []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                return as_captions(json.loads(text))
            except json.JSONDecodeError:
                pass
        return [] if is_blank(text) else [text]
    if isinstance(value, Iterable):
        return [c for v in value for c in as_captions(v)]
    return [str(value)]


def _as_labels(value: Any, separator: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                return _as_labels(json.loads(text), separator)
            except json.JSONDecodeError:
                pass
        parts = text.split(separator) if separator else re.split(r"[,;|]", text)
        return [normalize_text(p.strip()) for p in parts if p.strip()]
    if isinstance(value, Iterable):
        return [lab for v in value for lab in _as_labels(v, separator)]
    return [str(value)]


def _merge(entries: dict[str, Entry], key: str, captions: list[str], labels: list[str]) -> None:
    entry = entries.setdefault(key, Entry(id=key))
    entry.captions.extend(c for c in captions if c not in entry.captions)
    entry.labels.extend(lab for lab in labels if lab not in entry.labels)


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256(f"captions-v{LOADER_VERSION}".encode())
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _path_rows(rows: list[tuple[str, str, list[str], list[int]]], n_labels: int):
    """Generator function over (id, image_path, captions, label indices) tuples."""

    def generate() -> Iterator[dict[str, Any]]:
        for item_id, rel, captions, label_idx in rows:
            labels = None
            if n_labels:
                labels = np.zeros(n_labels, dtype=np.uint8)
                labels[label_idx] = 1
            yield make_record(item_id, captions, labels=labels, image_path=rel)

    return generate


@dataclass
class PathBuild:
    """Everything ``build_path_dataset`` needs besides the entries."""

    name: str
    image_root: Path
    label_names: list[str] | None  # None: relevance "image"
    default_query: int
    default_train: int
    source: dict[str, Any]
    check_images: str = DEFAULT_CHECK
    limit: int | None = None
    cache_dir: str | None = None
    drop_unlabeled: bool = False
    published: bool = True  # the default sizes are a benchmark's (False: the imagefolder rule)


def build_path_dataset(entries: dict[str, Entry], build: PathBuild, problems: Problems) -> CrossModalDataset:
    """Check the images of ``entries`` (keyed by path relative to the image root) and build the dataset."""
    from tqdm.auto import tqdm

    names = build.label_names
    index = {lab: k for k, lab in enumerate(names or [])}
    rows: list[tuple[str, str, list[str], list[int]]] = []
    # disable=None: a bar on a terminal only, so scripts and logs get no carriage-return lines
    bar = tqdm(entries.items(), desc=f"checking {build.name} images", unit="image", disable=None)
    for rel, entry in bar:
        if build.limit is not None and len(rows) >= build.limit:
            break
        path = build.image_root / rel
        if not path.is_file():
            problems.add("missing_images", f"{entry.id}: {path}")
            continue
        label_idx = [index[lab] for lab in entry.labels if lab in index]
        if names is not None and build.drop_unlabeled and not label_idx:
            problems.add("unlabeled_images", entry.id)
            continue
        why = check_image(path, build.check_images)
        if why:
            problems.add("undecodable_images", f"{entry.id}: {why}", failed_id=entry.id)
            continue
        if not entry.captions:
            problems.uncaptioned.append(entry.id)
        rows.append((entry.id, rel, entry.captions, label_idx))
    return _finish(rows, build, problems)


def _finish(rows: list, build: PathBuild, problems: Problems) -> CrossModalDataset:
    if not rows:  # before datasets, whose own message ("corresponds to no data") says nothing of why
        raise problems.no_items()
    names = build.label_names
    info = DatasetInfo(
        name=build.name,
        label_names=list(names or []),
        relevance=RELEVANCE_LABELS if names is not None else RELEVANCE_IMAGE,
        image_root=str(build.image_root.resolve()),
        source=build.source,
    )
    fp = _fingerprint(build.name, info.label_names, info.relevance, info.image_root, rows)
    ds = CrossModalDataset.from_records(_path_rows(rows, len(info.label_names)), info, build.cache_dir, fp)
    stats: dict[str, Any] = {"n_items": len(ds), "n_captions": sum(len(r[2]) for r in rows)}
    stats.update(problems.report())
    stats["n_failed_images"] = len(problems.failed_ids)
    stats["failed_images"] = problems.failed_ids
    ds.info.stats = stats
    ds.info.protocol = fit_protocol(len(ds), build.default_query, build.default_train, build.name,
                                    published=build.published)
    return ds


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: expected a folder at {path}; see {DATA_README}")
    return path


# -- imagefolder -----------------------------------------------------------------------------


def read_metadata(
    path: Path,
    root: Path,
    problems: Problems,
    file_column: str = "file_name",
    text_column: str | None = None,
    labels_column: str = "labels",
    label_separator: str | None = None,
) -> tuple[dict[str, Entry], bool]:
    """Parse ``metadata.jsonl`` / ``.csv`` into entries keyed by safe relative path.

    Returns the entries and whether any row had labels.
    """
    entries: dict[str, Entry] = {}
    has_labels = False
    text_cols = (text_column,) if text_column else TEXT_COLUMNS
    for where, row in _metadata_rows(path, problems):
        name = row.get(file_column)
        if not isinstance(name, str) or not name.strip():
            columns = ", ".join(map(str, row))
            problems.add("bad_lines", f"{where}: no {file_column!r} value (columns: {columns})")
            continue
        rel = safe_relpath(root, name.strip())
        if rel is None:
            problems.add("unsafe_paths", f"{where}: {name!r} points outside {root}; refused")
            continue
        text = next((row[c] for c in text_cols if row.get(c) is not None), None)
        labels = _as_labels(row.get(labels_column), label_separator)
        has_labels = has_labels or row.get(labels_column) is not None
        _merge(entries, rel, as_captions(text), labels)
    return entries, has_labels


def _metadata_rows(path: Path, problems: Problems) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(path, problems)
        return
    with open_text(path, errors="surrogateescape") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path.name} line {lineno}"
            if _INVALID_UTF8.search(line):
                problems.add("bad_lines", f"{where}: not valid UTF-8")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.add("bad_lines", f"{where}: invalid JSON ({exc.msg})")
                continue
            if not isinstance(row, dict):
                problems.add("bad_lines", f"{where}: expected a JSON object, got {type(row).__name__}")
                continue
            yield where, row


def _csv_rows(path: Path, problems: Problems) -> Iterator[tuple[str, dict[str, Any]]]:
    with open_text(path, errors="surrogateescape", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                problems.add("bad_lines", f"{path.name} line {reader.line_num}: {exc}")
                continue
            where = f"{path.name} line {reader.line_num}"
            if None in row or any(row.get(h) is None for h in header):
                problems.add("bad_lines", f"{where}: {len(header)} fields expected ({', '.join(header)})")
                continue
            if any(_INVALID_UTF8.search(v) for v in row.values() if isinstance(v, str)):
                problems.add("bad_lines", f"{where}: not valid UTF-8")
                continue
            yield where, row


def find_metadata(root: Path, metadata: str | os.PathLike[str] | None) -> Path:
    """The metadata file: ``metadata`` if given (relative to ``root``), else metadata.jsonl or .csv."""
    if metadata is not None:
        path = Path(metadata)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise FileNotFoundError(f"metadata file not found: {path}")
        return path
    for candidate in ("metadata.jsonl", "metadata.csv"):
        if (root / candidate).is_file():
            return root / candidate
    raise FileNotFoundError(
        f"no metadata.jsonl or metadata.csv in {root}; the image folder needs one with columns "
        f"file_name, text and optionally labels; see {DATA_README}"
    )


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _has_metadata(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("metadata.jsonl", "metadata.csv"))


def list_images(folder: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``folder`` (by suffix, hidden ones skipped), sorted."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.suffix.lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in rel.parts) \
                and path.is_file():  # fmt: skip
            found.append(rel.as_posix())
    return sorted(found)


@register_dataset("imagefolder")
def load_imagefolder(
    root: str | os.PathLike[str],
    metadata: str | os.PathLike[str] | None = None,
    file_column: str = "file_name",
    text_column: str | None = None,
    labels_column: str = "labels",
    label_separator: str | None = None,
    check_images: str = DEFAULT_CHECK,
    limit: int | None = None,
    cache_dir: str | None = None,
    name: str = "imagefolder",
) -> CrossModalDataset:
    """A folder of images with ``metadata.jsonl`` or ``metadata.csv`` (Hugging Face imagefolder layout).

    Without a metadata file every image under the folder (by suffix: ``IMAGE_SUFFIXES``) is an
    item with no caption and no label, keyed by its relative path: enough for a zero-shot CLIP
    run (``train.mode: zeroshot``), whose keyword search needs neither.

    The default protocol is a fifth of the items as queries (at most 1,000) and the rest
    for training (at most 10,000); a run sets other split sizes with ``data.n_query``,
    ``data.n_train``, ``data.n_val``, not with builder options.

    Args:
        root: the folder; ``file_name`` values are relative to it and may not leave it.
        metadata: the metadata file (default: metadata.jsonl, else metadata.csv in root, else none).
        file_column: column with the image path.
        text_column: column with the caption(s), a string or a list (default: first of
            text, caption, captions).
        labels_column: column with labels, a list of names or a separated string; when
            present, relevance is "labels" over the sorted label set, else "image".
        label_separator: separator of label strings (default: any of , ; |).
        check_images: "decode" (decode the pixels once: finds files cut short, the default),
            "header" (open and verify only, faster, but an image truncated inside its pixel
            data passes), "full" (decode and convert as training does) or "none".
        limit: keep only the first ``limit`` images.
        cache_dir: where ``datasets`` keeps the Arrow files.
        name: the dataset name recorded in ``info``.
    """
    folder = _require_dir(Path(root).expanduser(), "image folder")
    meta = find_metadata(folder, metadata) if metadata is not None or _has_metadata(folder) else None
    problems = Problems(str(meta or folder))
    if meta is None:  # a folder of images alone: each image an item without caption or label
        images = list_images(folder)
        if not images:
            raise FileNotFoundError(f"no metadata.jsonl or metadata.csv in {folder}, and no image file "
                                    f"({' '.join(IMAGE_SUFFIXES)}) under it; see {DATA_README}")
        entries, has_labels = {rel: Entry(id=rel) for rel in images}, False
    else:
        entries, has_labels = read_metadata(
            meta, folder, problems, file_column, text_column, labels_column, label_separator
        )
    seen = sorted({lab for e in entries.values() for lab in e.labels})
    label_names = seen if has_labels and seen else None  # no label anywhere: relevance 'image'
    source = {
        "root": str(root),
        "metadata": str(meta) if meta is not None else None,
        "file_column": file_column,
        "text_column": text_column,
        "labels_column": labels_column,
        "label_separator": label_separator,
        "limit": limit,
    }
    build = PathBuild(
        name,
        folder,
        label_names,
        1000,
        10000,
        source,
        check_mode(check_images),
        limit,
        cache_dir,
        published=False,
    )
    return build_path_dataset(entries, build, problems)


# -- MS-COCO ---------------------------------------------------------------------------------

COCO_SPLITS = ("train2017", "val2017", "train2014", "val2014")


def _coco_files(root: Path, split: str | None, annotations_dir: str | None) -> tuple[str, Path]:
    ann_dirs = [Path(annotations_dir)] if annotations_dir else [root / "annotations", root]
    splits = [split] if split else list(COCO_SPLITS)
    for s in splits:
        for d in ann_dirs:
            if (d / f"captions_{s}.json").is_file():
                return s, d
    expected = ", ".join(str(d / f"captions_{s}.json") for s in splits for d in ann_dirs)
    raise FileNotFoundError(f"MS-COCO captions not found: expected one of {expected}; see {DATA_README}")


def _coco_images_dir(root: Path, split: str, images_dir: str | None) -> Path:
    if images_dir:
        return _require_dir(Path(images_dir).expanduser(), "MS-COCO images folder")
    for cand in (root / split, root / "images" / split, root / "images"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"MS-COCO images not found: expected a folder {root / split} or {root / 'images' / split}; "
        f"see {DATA_README}"
    )


def _read_json(path: Path) -> Any:
    try:
        with open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def coco_id(value: Any) -> int | str:
    """An image id of a COCO-style file in one spelling: ``3``, ``3.0`` and ``"3"`` are all
    ``3`` (captions and labels point at images by id, so two spellings of one number are one
    image); other strings stay strings. Booleans and ``None`` are not ids: ``None`` is returned
    as the string ``"None"`` so that a missing id is reported, never merged with another."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return str(value)


def _coco_entries(
    captions: dict, image_dir: Path, problems: Problems
) -> tuple[dict[str, Entry], dict[int | str, str]]:
    by_id: dict[int | str, str] = {}
    entries: dict[str, Entry] = {}
    images = captions.get("images", [])
    check_unique_ids((str(coco_id(img.get("id"))) for img in images), problems.source)
    for img in sorted(images, key=lambda im: str(coco_id(im.get("id"))).zfill(20)):
        key = coco_id(img.get("id"))
        rel = safe_relpath(image_dir, str(img.get("file_name", "")))
        if rel is None:
            problems.add("unsafe_paths", f"image {img.get('id')}: {img.get('file_name')!r} refused")
            continue
        by_id[key] = rel
        entries[rel] = Entry(id=str(key))
    for ann in captions.get("annotations", []):
        rel = by_id.get(coco_id(ann.get("image_id")))
        if rel is None:
            problems.add(
                "orphan_captions", f"caption {ann.get('id')}: unknown image_id {ann.get('image_id')}"
            )
            continue
        _merge(entries, rel, as_captions(ann.get("caption")), [])
    return entries, by_id


def _coco_labels(instances: dict, entries: dict[str, Entry], by_id: dict[int | str, str]) -> list[str]:
    cats = sorted(instances.get("categories", []), key=lambda c: c["id"])
    name_of = {c["id"]: c["name"] for c in cats}
    for ann in instances.get("annotations", []):
        rel = by_id.get(coco_id(ann.get("image_id")))
        label = name_of.get(ann.get("category_id"))
        if rel is not None and label is not None:
            _merge(entries, rel, [], [label])
    return [c["name"] for c in cats]


@register_dataset("coco")
def load_coco(
    root: str | os.PathLike[str],
    split: str | None = None,
    annotations_dir: str | None = None,
    images_dir: str | None = None,
    labels: bool | None = None,
    drop_unlabeled: bool = True,
    check_images: str = DEFAULT_CHECK,
    limit: int | None = None,
    cache_dir: str | None = None,
) -> CrossModalDataset:
    """MS-COCO captions, with the 80 object categories of ``instances_<split>.json`` as labels.

    Args:
        root: the COCO folder (``annotations/``, ``train2017/``, ``val2017/``).
        split: e.g. ``train2017``; default the first of train2017, val2017, train2014,
            val2014 whose captions file exists.
        annotations_dir: folder of the JSON files (default ``root/annotations`` or ``root``).
        images_dir: folder of the split's images (default ``root/<split>`` or ``root/images/<split>``).
        labels: use the instances file (True: required; False: relevance "image"; None:
            when the file exists).
        drop_unlabeled: skip images with no object annotation when labels are used.
        check_images, limit, cache_dir: as ``load_imagefolder``
            (default protocol 5,000 queries, 10,000 train).
    """
    folder = _require_dir(Path(root).expanduser(), "MS-COCO folder")
    split, ann_dir = _coco_files(folder, split, annotations_dir)
    image_dir = _coco_images_dir(folder, split, images_dir)
    cap_path, inst_path = ann_dir / f"captions_{split}.json", ann_dir / f"instances_{split}.json"
    if labels and not inst_path.is_file():
        raise FileNotFoundError(f"MS-COCO labels not found: expected {inst_path}; see {DATA_README}")
    use_labels = inst_path.is_file() if labels is None else labels
    if labels is None and not use_labels:
        logger.warning("no %s: MS-COCO loads without labels (relevance 'same image')", inst_path)
    problems = Problems(str(cap_path))
    entries, by_id = _coco_entries(_read_json(cap_path), image_dir, problems)
    label_names = _coco_labels(_read_json(inst_path), entries, by_id) if use_labels else None
    source = {
        "root": str(root),
        "split": split,
        "captions": str(cap_path),
        "instances": str(inst_path) if use_labels else None,
        "limit": limit,
    }
    build = PathBuild(
        "coco",
        image_dir,
        label_names,
        5000,
        10000,
        source,
        check_mode(check_images),
        limit,
        cache_dir,
        drop_unlabeled,
    )
    return build_path_dataset(entries, build, problems)


# -- Flickr30k -------------------------------------------------------------------------------

KARPATHY_SPLITS = ("train", "val", "test", "restval")


def _flickr_annotations(root: Path, annotations: str | None) -> Path:
    if annotations:
        path = Path(annotations).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise FileNotFoundError(f"Flickr30k annotations not found: {path}; see {DATA_README}")
        return path
    cands = [root / "dataset_flickr30k.json", root / "results.csv", root / "flickr30k_images" / "results.csv"]
    for cand in cands:
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"Flickr30k annotations not found: expected one of {', '.join(map(str, cands))}; see {DATA_README}"
    )


def _flickr_images_dir(root: Path, images_dir: str | None, first: str | None) -> Path:
    if images_dir:
        return _require_dir(Path(images_dir).expanduser(), "Flickr30k images folder")
    cands = [root / "flickr30k_images" / "flickr30k_images", root / "flickr30k_images", root / "images", root]
    existing = [c for c in cands if c.is_dir()]
    for cand in existing:
        if first is None or (cand / first).is_file():
            return cand
    if existing[:-1]:
        return existing[0]
    raise FileNotFoundError(f"Flickr30k images not found: expected a folder {cands[1]}; see {DATA_README}")


def _karpathy_entries(path: Path, split: str | None, problems: Problems) -> dict[str, Entry]:
    data = _read_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{path} is not a Karpathy split file (no 'images' list)")
    check_unique_ids((str(img["filename"]) for img in data["images"] if img.get("filename")), str(path))
    entries: dict[str, Entry] = {}
    for k, img in enumerate(data["images"]):
        if split and img.get("split") != split:
            continue
        name = str(img.get("filename", ""))
        if not name:
            problems.add("bad_lines", f"{path.name} image #{k}: no filename")
            continue
        caps = [s.get("raw") or " ".join(s.get("tokens", [])) for s in img.get("sentences", [])]
        _merge(entries, name, as_captions(caps), [])
    return entries


_CSV_GLUED = re.compile(r"^\s*\d+\s+(.*)$")


def _results_csv_entries(path: Path, problems: Problems) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 and line.lower().startswith("image_name"):
                continue
            if not line.strip():
                continue
            parts = [p.strip() for p in line.rstrip("\n").split("|", 2)]
            if len(parts) == 2 and _CSV_GLUED.match(parts[1]):  # "name.jpg| 4 A dog ..." (a known glitch)
                parts = [parts[0], "", _CSV_GLUED.match(parts[1]).group(1)]
            if len(parts) != 3 or not parts[0] or not parts[2]:
                problems.add(
                    "bad_lines", f"{path.name} line {lineno}: expected 'image_name| comment_number| comment'"
                )
                continue
            _merge(entries, parts[0], [parts[2]], [])
    return entries


@register_dataset("flickr30k")
def load_flickr30k(
    root: str | os.PathLike[str],
    annotations: str | None = None,
    images_dir: str | None = None,
    split: str | None = None,
    check_images: str = DEFAULT_CHECK,
    limit: int | None = None,
    cache_dir: str | None = None,
) -> CrossModalDataset:
    """Flickr30k captions (Karpathy ``dataset_flickr30k.json`` or Kaggle ``results.csv``); relevance "image".

    Args:
        root: the Flickr30k folder.
        annotations: the annotation file (default: dataset_flickr30k.json, else results.csv,
            in root or root/flickr30k_images).
        images_dir: the image folder (default: root/flickr30k_images, or the nested
            root/flickr30k_images/flickr30k_images of the Kaggle archive).
        split: with the Karpathy file, keep only train, val, test or restval images.
        check_images, limit, cache_dir: as ``load_imagefolder``
            (default protocol 1,000 queries, 29,000 train).
    """
    folder = _require_dir(Path(root).expanduser(), "Flickr30k folder")
    ann = _flickr_annotations(folder, annotations)
    problems = Problems(str(ann))
    if ann.suffix.lower() == ".json":
        if split is not None and split not in KARPATHY_SPLITS:
            raise ValueError(f"unknown Flickr30k split {split!r}; known: {', '.join(KARPATHY_SPLITS)}")
        raw = _karpathy_entries(ann, split, problems)
    else:
        if split is not None:
            raise ValueError(f"split={split!r} needs the Karpathy dataset_flickr30k.json, not {ann.name}")
        raw = _results_csv_entries(ann, problems)
    image_dir = _flickr_images_dir(folder, images_dir, next(iter(raw), None))
    entries: dict[str, Entry] = {}
    for name, entry in raw.items():
        rel = safe_relpath(image_dir, name)
        if rel is None:
            problems.add("unsafe_paths", f"{name!r} points outside {image_dir}; refused")
            continue
        entries[rel] = Entry(entry.captions, [], id=rel)
    source = {"root": str(root), "annotations": str(ann), "split": split, "limit": limit}
    build = PathBuild(
        "flickr30k",
        image_dir,
        None,
        1000,
        29000,
        source,
        check_mode(check_images),
        limit,
        cache_dir,
    )
    return build_path_dataset(entries, build, problems)


# -- Hugging Face hub (or any datasets.load_dataset source) ----------------------------------


@register_dataset("hub")
def load_hub(
    root: str | os.PathLike[str],
    split: str = "train",
    builder: str | None = None,
    config: str | None = None,
    data_files: str | Sequence[str] | None = None,
    revision: str | None = None,
    image_column: str = "image",
    text_column: str = "text",
    labels_column: str | None = None,
    id_column: str | None = None,
    check_images: str = DEFAULT_CHECK,
    limit: int | None = None,
    cache_dir: str | None = None,
    name: str = "hub",
) -> CrossModalDataset:
    """Any dataset ``datasets.load_dataset`` can open, mapped by column names.

    ``load_dataset(root, config, split=...)``, or with ``builder`` (e.g. "imagefolder",
    "parquet", "json") ``load_dataset(builder, data_dir=root, split=...)`` (or
    ``data_files=...``). This reaches the network only if ``root`` names a hub dataset
    that is not cached. Images are stored as bytes, so the built dataset is self-contained.

    Args:
        root: hub dataset name, or local folder / file with ``builder``.
        split, builder, config, data_files, revision: passed to ``load_dataset``.
        image_column: an ``Image`` column, or a column of local file paths.
        text_column: caption string or list of strings.
        labels_column: optional; class ids (``ClassLabel``, or lists of them), names, or
            lists of names. Without it relevance is "image".
        id_column: optional stable ids (default: the row number).
        check_images, limit, cache_dir, name: as ``load_imagefolder`` (default protocol too).
    """
    table = _load_hub_table(root, split, builder, config, data_files, revision, cache_dir)
    for col in [image_column, text_column] + [c for c in (labels_column, id_column) if c]:
        if col not in table.column_names:
            raise ColumnError(f"column {col!r} not in the dataset; columns: {', '.join(table.column_names)}")
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    if id_column:
        where = f"{data_files if data_files is not None else root} (column {id_column!r})"
        check_unique_ids((str(v) for v in table[id_column]), where)
    table = _undecoded_images(table, image_column)
    label_names = None
    if labels_column:
        label_names = hub_label_names(table.features[labels_column], lambda: table[labels_column])
    problems = Problems(f"{builder or root}[{split}]")
    columns = (image_column, text_column, labels_column, id_column)
    opts = {
        "root": str(root),
        "split": split,
        "builder": builder,
        "config": config,
        "data_files": data_files,
        "revision": revision,
        "columns": columns,
        "limit": limit,
    }
    base = Path(root) if builder else Path(".")
    rows = _hub_rows(table, columns, label_names, check_mode(check_images), base, problems)
    info = DatasetInfo(
        name=name,
        label_names=label_names or [],
        relevance=RELEVANCE_LABELS if label_names is not None else RELEVANCE_IMAGE,
        source=opts,
    )
    fp = _fingerprint("hub", table._fingerprint, opts, label_names, check_images)
    try:
        ds = CrossModalDataset.from_records(rows, info, cache_dir, fp)
    except EmptyDatasetError:
        raise problems.no_items() from None
    _hub_stats(ds, table, id_column, problems)
    return ds


def _load_hub_table(root, split, builder, config, data_files, revision, cache_dir) -> Any:
    import datasets

    kwargs: dict[str, Any] = {"split": split, "revision": revision, "cache_dir": cache_dir}
    if data_files is not None:
        kwargs["data_files"] = data_files
    with quiet_datasets():  # its "Generating train split" bar: the build says what it did
        if builder:
            if data_files is None:
                kwargs["data_dir"] = str(root)
            table = datasets.load_dataset(builder, config, **kwargs)
        else:
            table = datasets.load_dataset(str(root), config, **kwargs)
    if not isinstance(table, datasets.Dataset):
        raise TypeError(
            f"load_dataset returned {type(table).__name__}; pass a single split, e.g. split='train'"
        )
    return table


def _undecoded_images(table: Any, column: str) -> Any:
    import datasets

    if isinstance(table.features[column], datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    return table


def hub_label_names(feature: Any, values: Callable[[], Iterable[Any]]) -> list[str]:
    """The label names of a ``hub`` labels column: a ``ClassLabel`` feature's (or its lists'),
    else ``label_K`` up to the largest class id when every value is an integer, else the sorted
    distinct values. ``values()``: the column's values (scalars or lists), read only when the
    feature names none."""
    import datasets

    inner = getattr(feature, "feature", feature)
    if isinstance(inner, datasets.ClassLabel):
        return list(inner.names)
    found = set()
    for v in values():
        found.update(v if isinstance(v, list) else [v])
    found.discard(None)
    if found and all(isinstance(v, (int, np.integer)) for v in found):
        return [f"label_{k}" for k in range(int(max(found)) + 1)]
    return sorted(str(v) for v in found)


def hub_image(value: Any, base: Path) -> bytes | None:
    """The image bytes of a ``hub`` image column's value: an ``Image`` struct's bytes, else its
    file (a path relative to ``base``); raw bytes; a path string. None when there are none."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value) or None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, str) and value:
        path = Path(value) if Path(value).is_absolute() else base / value
        return path.read_bytes() if path.is_file() else None
    return None


def _hub_rows(table, columns, label_names, check_mode, base: Path, problems: Problems):
    image_col, text_col, labels_col, id_col = columns
    index = {lab: k for k, lab in enumerate(label_names or [])}

    def generate() -> Iterator[dict[str, Any]]:
        for i, row in enumerate(table):
            item_id = str(row[id_col]) if id_col else str(i)
            data = hub_image(row[image_col], base)
            why = "no image data" if data is None else check_image(data, check_mode)
            if why:
                problems.add("undecodable_images", f"{item_id}: {why}", failed_id=item_id)
                continue
            labels = None
            if label_names is not None:
                labels = np.zeros(len(label_names), dtype=np.uint8)
                for v in listify(row[labels_col]):
                    key = label_names[int(v)] if isinstance(v, (int, np.integer)) else str(v)
                    labels[index[key]] = 1
            captions = as_captions(row[text_col])
            if not captions:
                problems.uncaptioned.append(item_id)
            yield make_record(item_id, captions, labels=labels, image_bytes=data)

    return generate


def listify(value: Any) -> list[Any]:
    """A labels column's value as a list: None is empty, a scalar one value."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _hub_stats(ds: CrossModalDataset, table: Any, id_column: str | None, problems: Problems) -> None:
    n_rows = len(table)
    stats: dict[str, Any] = {"n_items": len(ds), "n_rows": n_rows}
    if not problems.uncaptioned and len(ds):  # built from the cache: the generator did not run
        lengths = pc.fill_null(pc.list_value_length(ds.table.with_format("arrow")["captions"]), 0)
        problems.uncaptioned = [i for i, n in zip(ds.ids, lengths.to_pylist()) if n == 0]
    stats.update(problems.report())
    failed = n_rows - len(ds)
    stats["n_failed_images"] = failed
    stats["failed_images"] = problems.failed_ids
    if failed and not problems.failed_ids:  # built from the cache: the generator did not run
        present = set(ds.ids)
        all_ids = [str(v) for v in table[id_column]] if id_column else [str(i) for i in range(n_rows)]
        stats["failed_images"] = [i for i in all_ids if i not in present]
    ds.info.stats = stats
    ds.info.protocol = fit_protocol(len(ds), 1000, 10000, ds.name, published=False)
