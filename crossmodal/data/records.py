"""The one record type every dataset yields, kept as a Hugging Face ``datasets.Dataset``.

Columns (``FEATURES``):
    id           stable string id, unique within the dataset
    image_path   path of the image relative to ``CrossModalDataset.image_root``, or ""
    image_bytes  the encoded image (PNG/JPEG bytes) when it is stored inline, else None
    captions     the captions, NFKC-normalised (``crossmodal.text.normalize_text``), without
                 blank ones; empty for an image-only item or a bag-of-words-only dataset
    labels       multi-hot vector over ``label_names`` (uint8, fixed length; empty
                 when the dataset has no labels and relevance is "same image")
    bow_idx      indices of the non-zero words of a fixed bag-of-words text
                 (the DCMH .mat datasets); empty otherwise
    bow_val      the values at ``bow_idx``
    group        items sharing a group always land in the same split (for example
                 the skin-tone and gender variants of one emoji)

Images are decoded lazily with ``crossmodal.images.open_image``.

Builds write into hidden temporary folders beside their destination and rename them into
place (``crossmodal.io.atomic_dir``); ``build_guard`` sweeps what a killed build left of
them before the next build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from crossmodal.images import open_image
from crossmodal.io import atomic_dir, write_json_atomic
from crossmodal.text import is_blank, normalize_text

try:
    import fcntl
except ImportError:  # no advisory file locks (Windows): builds there sweep nothing
    fcntl = None

logger = logging.getLogger(__name__)

DATASET_FORMAT_VERSION = 1

RELEVANCE_LABELS = "labels"  # relevant when two items share at least one label
RELEVANCE_IMAGE = "image"  # relevant only to the same item (captions-only datasets)
BUILD_LOCK = ".build.lock"
MAX_NAMED_IDS = 10

@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """``datasets``' own progress bars off for a while ("Generating train split", "Saving the
    dataset"): the builders show one bar of their own, and an add of 20 images shows none."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()



class EmptyDatasetError(ValueError):
    """A build in which no row survived; the builder's message says why."""


class DuplicateIdError(ValueError):
    """Item ids repeated in a source; the message names them and the source."""


class ColumnError(KeyError, ValueError):
    """A column a builder was told to read is not in the source; the message lists the ones it
    has. A ``KeyError`` for code that looks columns up, a ``ValueError`` (one line, no traceback)
    for the command line."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Byte-order marks of the Unicode encodings annotation files come in, longest first (the
# UTF-32 LE mark begins with the UTF-16 LE one). Spreadsheet programs write "CSV UTF-8" with
# the UTF-8 mark and "Unicode text" as UTF-16; Windows PowerShell writes UTF-16 by default.
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def text_encoding(path: str | os.PathLike[str]) -> str:
    """The encoding to read annotation file ``path`` with: the one its byte-order mark names
    (UTF-8, UTF-16 or UTF-32, the mark itself dropped), else UTF-8.

    Raises:
        ValueError: the file has no byte-order mark but its start holds NUL bytes (UTF-16
            or UTF-32 without a mark, or a binary file); the message names the file.
    """
    with open(path, "rb") as fh:
        head = fh.read(4096)
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    if b"\x00" in head:
        raise ValueError(
            f"{path}: not a UTF-8 text file (it holds NUL bytes: UTF-16 or UTF-32 without a "
            "byte-order mark, or not text at all); save it as UTF-8"
        )
    return "utf-8-sig"


def open_text(path: str | os.PathLike[str], **kwargs: Any):
    """Open annotation file ``path`` for reading as text in its encoding (``text_encoding``)."""
    return open(path, encoding=text_encoding(path), **kwargs)


def check_unique_ids(ids: Iterable[str], where: str) -> None:
    """Refuse repeated item ids: captions and labels point at ids, so they cannot be renumbered.

    Raises:
        DuplicateIdError: naming the first repeated ids, how often each occurs, and ``where``.
    """
    counts = Counter(ids)
    repeated = [(i, n) for i, n in counts.items() if n > 1]
    if repeated:
        shown = ", ".join(f"{i!r} ({n} times)" for i, n in repeated[:MAX_NAMED_IDS])
        more = f" and {len(repeated) - MAX_NAMED_IDS} more" if len(repeated) > MAX_NAMED_IDS else ""
        raise DuplicateIdError(
            f"{where}: duplicate item ids {shown}{more}; every item needs its own id, since "
            "captions and labels refer to items by id: fix the ids in the source"
        )


def make_features(n_labels: int) -> datasets.Features:
    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "image_path": datasets.Value("string"),
            "image_bytes": datasets.Value("binary"),
            "captions": datasets.Sequence(datasets.Value("string")),
            "labels": datasets.Sequence(datasets.Value("uint8"), length=n_labels if n_labels else -1),
            "bow_idx": datasets.Sequence(datasets.Value("int32")),
            "bow_val": datasets.Sequence(datasets.Value("float32")),
            "group": datasets.Value("string"),
        }
    )


def make_record(
    id: str,
    captions: Iterable[str],
    labels: np.ndarray | list[int] | None = None,
    image_path: str = "",
    image_bytes: bytes | None = None,
    bow: np.ndarray | None = None,
    group: str = "",
) -> dict[str, Any]:
    """Build one row. ``labels`` is a multi-hot vector; ``bow`` a dense word vector.

    Captions are normalised to NFKC here, the one entrance every builder's text passes;
    blank captions (whitespace, control and zero-width characters) are dropped.
    """
    if bow is not None:
        bow = np.asarray(bow).ravel()
        nz = np.flatnonzero(bow)
        bow_idx, bow_val = nz.astype(np.int32).tolist(), bow[nz].astype(np.float32).tolist()
    else:
        bow_idx, bow_val = [], []
    return {
        "id": str(id),
        "image_path": image_path,
        "image_bytes": image_bytes,
        "captions": _clean_captions(captions),
        "labels": [] if labels is None else np.asarray(labels, dtype=np.uint8).tolist(),
        "bow_idx": bow_idx,
        "bow_val": bow_val,
        "group": group or str(id),
    }


def _clean_captions(captions: Iterable[str]) -> list[str]:
    """NFKC, stripped, without blank captions, in their order."""
    texts = (normalize_text(str(c)).strip() for c in captions)
    return [t for t in texts if not is_blank(t)]


@dataclass
class DatasetInfo:
    """What a dataset is, apart from its rows. Saved as ``info.json`` beside the Arrow data."""

    name: str
    label_names: list[str] = field(default_factory=list)
    relevance: str = RELEVANCE_LABELS
    bow_dim: int = 0  # > 0 when text comes as a fixed bag-of-words of this size
    bow_vocab: list[str] = field(default_factory=list)  # names of the bag-of-words entries, if known
    image_root: str = ""  # folder that image_path is relative to
    protocol: dict[str, int] = field(default_factory=dict)  # default n_query / n_train
    source: dict[str, Any] = field(default_factory=dict)  # options it was built from
    stats: dict[str, Any] = field(default_factory=dict)  # counts reported by the build
    format_version: int = DATASET_FORMAT_VERSION


class CrossModalDataset:
    """A dataset of image-text items in the one record type, plus its ``DatasetInfo``."""

    def __init__(self, table: datasets.Dataset, info: DatasetInfo) -> None:
        missing = set(make_features(0)) - set(table.column_names)
        if missing:
            raise ValueError(f"dataset {info.name!r} lacks columns: {sorted(missing)}")
        self.table = table
        self.info = info
        self._labels: np.ndarray | None = None

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_records(
        cls,
        records: Iterable[dict[str, Any]] | Any,
        info: DatasetInfo,
        cache_dir: str | None = None,
        fingerprint: str | None = None,
    ) -> CrossModalDataset:
        """Build from an iterable of ``make_record`` rows (or a generator function).

        Rows are streamed to Arrow on disk, so memory stays flat in the dataset size.

        Args:
            fingerprint: a hash of everything the rows depend on (source files, options).
                ``datasets`` caches generator output under a hash of the generator's code
                and closure, which does not change when a source file's contents do; a
                builder that reads files should pass a fingerprint that does.

        Raises:
            EmptyDatasetError: the rows were empty (``datasets`` itself would only say that a
                split "corresponds to no data").
            DuplicateIdError: two rows share an id.
        """
        features = make_features(len(info.label_names) if info.relevance == RELEVANCE_LABELS else 0)
        gen = records if callable(records) else _replay(list(records))
        seen = [0]

        def counted() -> Iterator[dict[str, Any]]:
            for row in gen():
                seen[0] += 1
                yield row

        try:
            with quiet_datasets():
                table = datasets.Dataset.from_generator(
                    counted, features=features, cache_dir=cache_dir, fingerprint=fingerprint
                )
        except ValueError:
            if seen[0] == 0:
                message = f"dataset {info.name!r}: no usable item; every row was left out"
                raise EmptyDatasetError(message) from None
            raise
        check_unique_ids(table.with_format("arrow")["id"].to_pylist(), f"dataset {info.name!r}")
        return cls(table, info)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/arrow`` and ``path/info.json`` atomically (all or nothing)."""
        path = Path(path)
        with atomic_dir(path) as tmp, quiet_datasets():
            self.table.save_to_disk(str(tmp / "arrow"))
            write_json_atomic(tmp / "info.json", asdict(self.info))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CrossModalDataset:
        path = Path(path)
        info_file = path / "info.json"
        if not info_file.exists():
            raise FileNotFoundError(f"no built dataset at {path} (expected {info_file})")
        raw = json.loads(info_file.read_text(encoding="utf-8"))
        if raw.get("format_version") != DATASET_FORMAT_VERSION:
            raise ValueError(
                f"dataset at {path} has format version {raw.get('format_version')}, "
                f"this crossmodal reads {DATASET_FORMAT_VERSION}; rebuild it"
            )
        table = datasets.load_from_disk(str(path / "arrow"))
        return cls(table, DatasetInfo(**raw))

    # -- access -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> list[str]:
        # Through Arrow: iterating the datasets Column row by row takes seconds per 100k rows.
        return self.table.with_format("arrow")["id"].to_pylist()

    def labels_matrix(self) -> np.ndarray:
        """Multi-hot labels, ``[n, n_labels]`` uint8 (``[n, 0]`` for captions-only data)."""
        if self._labels is None:
            n_labels = len(self.info.label_names) if self.info.relevance == RELEVANCE_LABELS else 0
            if n_labels == 0:
                self._labels = np.zeros((len(self), 0), dtype=np.uint8)
            else:
                # Flat Arrow values: converting the Column row by row takes minutes on 200k rows.
                col = self.table.with_format("arrow")["labels"].combine_chunks()
                values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.uint8)
                self._labels = values.reshape(len(self), n_labels)
        return self._labels

    def captions(self, i: int) -> list[str]:
        return self.table[int(i)]["captions"]

    def captions_of(self, indices: np.ndarray | None = None) -> list[list[str]]:
        """The captions of items ``indices`` (all items when None), in that order."""
        if indices is None:
            return self.table["captions"]
        return self.table.select(np.asarray(indices).tolist())["captions"]

    def ids_of(self, indices: np.ndarray | None = None) -> list[str]:
        """The keys of items ``indices`` (all items when None), in that order."""
        if indices is None:
            return self.ids
        return self.table.select(np.asarray(indices).tolist())["id"]

    def image_rows(self, indices: np.ndarray) -> Iterator[dict[str, Any]]:
        """``{"id", "image_path", "image_bytes"}`` of items ``indices``, in that order."""
        rows = self.table.select(np.asarray(indices).tolist())
        yield from rows.select_columns(["id", "image_path", "image_bytes"])

    def subset(self, indices: np.ndarray | range) -> CrossModalDataset:
        """A dataset of items ``indices`` only (same info), e.g. for small experiments."""
        return CrossModalDataset(self.table.select(list(indices)), self.info)

    def image_source(self, row: dict[str, Any]) -> bytes | Path:
        if row["image_bytes"]:
            return row["image_bytes"]
        return Path(self.info.image_root) / row["image_path"]

    def load_image(self, i: int) -> Image.Image:
        return open_image(self.image_source(self.table[int(i)]))

    def bow_matrix(self, indices: np.ndarray | None = None) -> np.ndarray:
        """Dense bag-of-words rows ``[len(indices), bow_dim]`` float32."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        out = np.zeros((len(idx), self.info.bow_dim), dtype=np.float32)
        sub = self.table.select(idx.tolist()).select_columns(["bow_idx", "bow_val"])
        for r, row in enumerate(sub):
            out[r, row["bow_idx"]] = row["bow_val"]
        return out

    def fingerprint(self) -> str:
        """A short hash of the content, stable across processes and across rebuilds.

        Covers the info (without build statistics such as timings), the ids, captions,
        labels, bag-of-words, groups, image paths and the size of every inline image, so
        rebuilding the same data gives the same fingerprint and runs trained on it stay valid.
        """
        if getattr(self, "_fp", None) is None:
            import pyarrow.compute as pc

            h = hashlib.sha256()
            info = {k: v for k, v in asdict(self.info).items() if k != "stats"}
            h.update(json.dumps(info, sort_keys=True, default=str).encode())
            table = self.table.with_format("arrow")[:]  # the rows as one Arrow table
            for name in ("id", "image_path", "captions", "bow_idx", "bow_val", "group"):
                h.update(json.dumps(table.column(name).to_pylist()).encode())
            h.update(self.labels_matrix().tobytes())
            sizes = pc.binary_length(table.column("image_bytes")).to_numpy(zero_copy_only=False)
            h.update(np.nan_to_num(sizes.astype(np.float64), nan=-1).tobytes())
            self._fp = h.hexdigest()[:16]
        return self._fp


def sweep_leftovers(folder: Path, target_re: str) -> list[str]:
    """Remove what killed builds left in ``folder`` of targets whose name matches ``target_re``.

    ``atomic_dir`` writes a target ``T`` into ``.T.<random>.tmp`` and, when ``T`` exists,
    moves it to ``.T.old`` for the moment of the swap. Both are removed; an ``.T.old`` whose
    ``T`` is missing (a build killed between the two renames) is the previous complete build
    and is renamed back. Nothing else in ``folder`` is touched. Call it only while no build
    writes there (``build_guard``).

    Returns:
        The names removed or restored.
    """
    pattern = re.compile(rf"\.(?P<target>{target_re})\.(?:[a-z0-9_]+\.tmp|old)")
    swept = []
    for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        target = folder / match["target"]
        if entry.name.endswith(".old") and entry.is_dir() and not target.exists():
            os.replace(entry, target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        swept.append(entry.name)
    if swept:
        logger.info("%s: swept %d leftovers of interrupted builds: %s", folder, len(swept), ", ".join(swept))
    return swept


@contextlib.contextmanager
def build_guard(folder: str | os.PathLike[str], target_re: str) -> Iterator[None]:
    """Hold ``folder`` for a dataset build: first sweep what killed builds left there
    (``sweep_leftovers``) unless another build is running, then keep a shared lock on
    ``folder/.build.lock`` until the build is done, so that no other build sweeps this one's
    temporary folder. Builds in one folder still run side by side.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(folder / BUILD_LOCK, "a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            logger.debug("%s: another build is running; leftovers are swept by a later build", folder)
        else:
            sweep_leftovers(folder, target_re)
        fcntl.flock(lock, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replay(rows: list[dict[str, Any]]):
    def gen() -> Iterator[dict[str, Any]]:
        yield from rows

    return gen
