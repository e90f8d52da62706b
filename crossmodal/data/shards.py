"""Image shards read where they lie: the local Parquet or WebDataset (``.tar``) files of a ``hub`` source.

``load_hub`` copies every image's bytes into the dataset cache of the machine that builds it.
For ``crossmodal index --add hub ... --ray`` that is the one step that does not scale: every
image would pass through the driver. ``find_shards`` names the files behind such a source, and
``plan_shards`` reads their metadata only (ids, captions, labels: a Parquet column projection,
the small members and headers of a tar), as a dataset whose items have no image yet. The
workers read the image bytes themselves (``crossmodal.jobs.ray_encode``), check them as
``load_hub`` would (``check_image`` with the same mode, and the same messages) and write the
thumbnails.

Only sources whose rows the workers can match by key are planned so: ``builder`` parquet or
webdataset, an ``id_column`` (``__key__`` for WebDataset), no ``limit``, and every data file on
local (or shared, mounted) storage; others are built by ``load_hub`` as without Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.data.captions import (
    DEFAULT_CHECK,
    Problems,
    as_captions,
    check_mode,
    hub_label_names,
    listify,
)
from crossmodal.data.records import (
    RELEVANCE_IMAGE,
    RELEVANCE_LABELS,
    ColumnError,
    CrossModalDataset,
    DatasetInfo,
    EmptyDatasetError,
    check_unique_ids,
    make_record,
)
from crossmodal.data.splits import fit_protocol

log = logging.getLogger(__name__)

FORMATS = ("parquet", "webdataset")
NO_IMAGE = "no image data"  # load_hub's words for a row without image bytes
NO_IMAGE_KEYS = "no_image_keys"  # a plan's stats: the keys of samples without an image member
# How the webdataset builder of ``datasets`` decodes a member by its extension (the rest: UTF-8 text).
_INT_EXTENSIONS = ("cls", "cls2", "index", "inx", "id")
_JSON_EXTENSIONS = ("json", "jsn")


@dataclass(frozen=True)
class Shards:
    """The local files of a ``hub`` source and how its rows map to items.

    Attributes:
        format: ``"parquet"`` or ``"webdataset"``.
        files: absolute paths, in the order ``datasets`` reads them (so items keep its order).
        image_column, text_column, labels_column, id_column: as ``load_hub``'s (a WebDataset
            column is a member's extension, e.g. ``png``; its id column is ``__key__``).
        check_images: ``load_hub``'s check of the image bytes (``CHECK_MODES``).
        base: the folder relative image paths in a Parquet image column are read from.
    """

    format: str
    files: tuple[str, ...]
    image_column: str
    text_column: str
    labels_column: str | None
    id_column: str
    check_images: str
    base: str


def find_shards(name: str, options: dict[str, Any]) -> Shards | None:
    """The shards behind dataset ``name`` with ``options`` when the workers can read their images
    themselves, else None (the reason is logged).

    Raises:
        ValueError: a bad ``check_images`` mode.
    """
    builder = options.get("builder")
    if name != "hub" or builder not in FORMATS or not options.get("root"):  # load_hub says what a root is for
        return None
    id_column, why = options.get("id_column"), None
    if not id_column:  # items are then numbered by row, which no worker can tell from its block
        why = "no id_column is given (a WebDataset's is __key__)"
    elif builder == "webdataset" and id_column != "__key__":
        why = "a WebDataset's samples are matched by id_column=__key__"
    elif options.get("limit") is not None:
        why = "a limit is set"
    if why:
        log.info("the images of %s go through the driver: the workers match rows by key, and %s",
                 options.get("root"), why)  # fmt: skip
        return None
    files = _data_files(options)
    if not files:
        return None
    return Shards(
        format=builder, files=tuple(files), image_column=str(options.get("image_column", "image")),
        text_column=str(options.get("text_column", "text")), labels_column=options.get("labels_column"),
        id_column=str(id_column), check_images=check_mode(options.get("check_images", DEFAULT_CHECK)),
        base=str(Path(options["root"]).resolve()),
    )  # fmt: skip


def _data_files(options: dict[str, Any]) -> list[str]:
    """The files ``datasets.load_dataset(builder, ...)`` would read for the split, resolved by
    ``datasets`` itself; empty when one of them is not a local file."""
    import datasets

    kwargs: dict[str, Any] = {"cache_dir": options.get("cache_dir"), "revision": options.get("revision")}
    if options.get("data_files") is not None:
        kwargs["data_files"] = options["data_files"]
    else:
        kwargs["data_dir"] = str(options["root"])
    builder = datasets.load_dataset_builder(options["builder"], options.get("config"), **kwargs)
    split = options.get("split", "train")
    files = [str(f) for f in (builder.config.data_files or {}).get(split, [])]
    if not files or not all(Path(f).is_file() for f in files):
        log.info("the images of %s go through the driver: its %s files are not all local",
                 options.get("root"), options["builder"])  # fmt: skip
        return []
    return [str(Path(f).resolve()) for f in files]


def plan_shards(
    shards: Shards, split: str = "train", name: str = "hub", cache_dir: str | None = None
) -> CrossModalDataset:
    """The items of ``shards`` without their images: ids, captions and labels as ``load_hub``
    reads them, in its order; ``image_bytes`` and ``image_path`` are empty.

    Every row is an item, as a build sees them before it checks their images: the workers check
    each image they read, and the keys of WebDataset samples without an image member (no worker
    sees those) are listed in ``info.stats[NO_IMAGE_KEYS]``.

    Raises:
        ColumnError: a column is not in the files (the message lists theirs).
        DuplicateIdError: two rows share an id.
        EmptyDatasetError: the files hold no row.
    """
    problems = Problems(f"{shards.format}[{split}]")
    reader = _ParquetMeta(shards) if shards.format == "parquet" else _TarMeta(shards)
    keys = reader.keys()
    check_unique_ids(keys, f"{shards.files[0]} ... (column {shards.id_column!r})")
    label_names = None
    if shards.labels_column:
        label_names = hub_label_names(reader.label_feature(), lambda: reader.column(shards.labels_column))
    index = {lab: k for k, lab in enumerate(label_names or [])}

    def rows() -> Iterator[dict[str, Any]]:
        labels_of = reader.column(shards.labels_column) if shards.labels_column else None
        for j, (key, text) in enumerate(zip(keys, reader.column(shards.text_column))):
            labels = None
            if label_names is not None:
                labels = np.zeros(len(label_names), dtype=np.uint8)
                for v in listify(labels_of[j]):
                    labels[index[label_names[int(v)] if isinstance(v, (int, np.integer)) else str(v)]] = 1
            # items without a caption are not warned of here: some of them may be left out yet
            yield make_record(key, as_captions(text), labels=labels)

    relevance = RELEVANCE_LABELS if label_names is not None else RELEVANCE_IMAGE
    source = {"shards": shards.format, "files": list(shards.files), "split": split}
    info = DatasetInfo(name=name, label_names=label_names or [], relevance=relevance, source=source)
    try:
        ds = CrossModalDataset.from_records(rows, info, cache_dir, _fingerprint(shards, split, label_names))
    except EmptyDatasetError:
        raise problems.no_items() from None
    ds.info.stats = {"n_items": len(ds), "n_rows": reader.n_rows, NO_IMAGE_KEYS: reader.no_image}
    ds.info.protocol = fit_protocol(len(ds), 1000, 10000, ds.name, published=False)
    return ds


def _fingerprint(shards: Shards, split: str, label_names: list[str] | None) -> str:
    """What a plan's rows depend on: the options, and each file's path, size and modification time."""
    stamps = [(f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in shards.files]
    blob = json.dumps([asdict(shards), split, label_names, stamps], default=str)
    return "shards-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


class _ParquetMeta:
    """The metadata columns of Parquet files (their image column is never read)."""

    def __init__(self, shards: Shards) -> None:
        import pyarrow.parquet as pq

        self.shards, self.files = shards, [pq.ParquetFile(f) for f in shards.files]
        names = list(dict.fromkeys(n for f in self.files for n in f.schema_arrow.names))  # of every file
        _check_columns(shards, names, f"the Parquet files of {Path(shards.files[0]).parent}", "columns")
        self.n_rows = sum(f.metadata.num_rows for f in self.files)
        self.no_image: list[str] = []  # an empty image is found by the worker that reads it
        self.read: dict[str, list[Any]] = {}

    def column(self, name: str) -> list[Any]:
        """The column's values in every file; None in the rows of a file without it (as
        ``datasets`` reads files whose schemas differ). Read once (the labels are asked twice)."""
        if name not in self.read:
            out: list[Any] = []
            for f in self.files:
                has = name in f.schema_arrow.names
                out += f.read(columns=[name]).column(0).to_pylist() if has else [None] * f.metadata.num_rows
            self.read[name] = out
        return self.read[name]

    def keys(self) -> list[str]:
        return [str(v) for v in self.column(self.shards.id_column)]

    def label_feature(self) -> Any:
        import datasets

        name = self.shards.labels_column
        schema = next(f.schema_arrow for f in self.files if name in f.schema_arrow.names)
        return datasets.Features.from_arrow_schema(schema)[name]  # keeps ClassLabel names


class _TarMeta:
    """The samples of WebDataset tar files: keys, and the members of the text and labels columns,
    decoded as ``datasets`` decodes them; image members are skipped by their headers."""

    def __init__(self, shards: Shards) -> None:
        self.shards = shards
        wanted = {c for c in (shards.text_column, shards.labels_column) if c}
        samples: dict[str, dict[str, Any]] = {}
        fields: dict[str, None] = {}  # every member extension seen, in order
        self.runs: list[str] = []  # each sample's key once per run of its members: twice is a repeat
        for path in shards.files:
            with tarfile.open(path) as tar:
                previous = None  # a sample does not go on into the next file
                for member in tar:
                    key, field = _key_and_field(member)
                    if key is None:
                        continue
                    if key != previous:
                        self.runs.append(key)
                        previous = key
                    sample = samples.setdefault(key, {})
                    fields.setdefault(field)
                    if field == shards.image_column:
                        sample[field] = True
                    elif field in wanted:
                        sample[field] = _decode_member(field, tar.extractfile(member).read())
        self.n_rows, self.samples = len(samples), samples
        if samples:  # the columns of a WebDataset are its members' extensions, and its keys
            where = f"the WebDataset samples of {Path(shards.files[0]).parent}"
            _check_columns(shards, [*fields, "__key__"], where, "their members' extensions")
        self.no_image = [key for key, sample in samples.items() if shards.image_column not in sample]

    def column(self, name: str) -> list[Any]:
        return [s.get(name) for s in self.samples.values()]

    def keys(self) -> list[str]:
        return self.runs if len(self.runs) != len(self.samples) else list(self.samples)

    def label_feature(self) -> Any:
        return None


def _check_columns(shards: Shards, names: list[str], where: str, what: str) -> None:
    """Raises ``ColumnError`` naming the first of the shards' columns not in ``names``."""
    for col in (shards.image_column, shards.text_column, shards.labels_column, shards.id_column):
        if col and col not in names:
            raise ColumnError(f"column {col!r} not in {where}; {what}: {', '.join(names)}")


def _key_and_field(member: tarfile.TarInfo) -> tuple[str | None, str]:
    """A tar member's sample key (its path up to the first dot of its file name) and field (the
    rest), as WebDataset names them; ``(None, "")`` for what is not a sample's file."""
    if not member.isreg():
        return None, ""
    folder, _, filename = member.name.rpartition("/")
    if filename.startswith((".", "__")) or "." not in filename[1:]:
        return None, ""
    stem, _, field = filename.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def _decode_member(field: str, data: bytes) -> Any:
    extension = field.rsplit(".", 1)[-1].lower()
    if extension in _INT_EXTENSIONS:
        return int(data.decode("utf-8"))
    if extension in _JSON_EXTENSIONS:
        return json.loads(data)
    return data.decode("utf-8")
