"""DCMH-format ``.mat`` datasets: MIRFlickr-25K, NUS-WIDE and IAPR TC-12.

The public DCMH releases hold images (``IAll`` or ``images``), a bag-of-words text
(``YAll`` or ``TAll``) and multi-hot labels (``LAll``), either in one file or in three
(``mirflickr25k-iall.mat``, ``mirflickr25k-yall.mat``, ``mirflickr25k-lall.mat``, often
in ``IAll/``, ``YAll/``, ``LAll/`` subfolders). Files are MATLAB v7.3 (HDF5, read with
h5py) or v5 (read with scipy). Every array is handled in MATLAB's axis order: h5py shows
a v7.3 array with its axes reversed, so they are reversed back, and the item axis is the
one whose length is common to the three arrays.

Images are read in chunks (h5py slicing) and stored as PNG bytes, so the built dataset
is self-contained and memory stays flat. A v5 file is loaded whole by scipy, one array
at a time (v5 arrays are limited to 2 GB anyway).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crossmodal.data import DATA_README, register_dataset
from crossmodal.data.records import (
    RELEVANCE_LABELS,
    CrossModalDataset,
    DatasetInfo,
    EmptyDatasetError,
    make_record,
    open_text,
)
from crossmodal.data.splits import fit_protocol

logger = logging.getLogger(__name__)

LOADER_VERSION = 1

IMAGE_KEYS = ("IAll", "images", "I")
TEXT_KEYS = ("YAll", "TAll", "tags", "texts", "Y", "T")
LABEL_KEYS = ("LAll", "labels", "L")

# The 24 MIRFlickr-25K concepts and NUS-WIDE's 21 most frequent concepts, in the
# (alphabetical) column order public DCMH code uses for ``LAll``.
MIRFLICKR25K_LABELS = tuple(
    "animals baby bird car clouds dog female flower food indoor lake male "
    "night people plant_life portrait river sea sky structures sunset transport tree water".split()
)
NUSWIDE21_LABELS = tuple(
    "animal beach buildings clouds flowers grass lake mountain ocean person plants "
    "reflection road rocks sky snow sunset tree vehicle water window".split()
)


@dataclass(frozen=True)
class MatSpec:
    """Defaults for one DCMH-format dataset."""

    title: str
    n_query: int
    n_train: int
    stems: tuple[str, ...]  # file-name stems, lower case, most specific first
    label_names: tuple[str, ...] = ()


SPECS = {
    "mirflickr25k": MatSpec(
        "MIRFlickr-25K",
        2000,
        10000,
        ("mirflickr25k", "mirflickr-25k", "flickr-25k", "flickr25k", "mirflickr"),
        MIRFLICKR25K_LABELS,
    ),
    "nuswide": MatSpec(
        "NUS-WIDE", 2100, 10500, ("nus-wide-tc21", "nuswide-tc21", "nus-wide", "nuswide"), NUSWIDE21_LABELS
    ),
    "iaprtc12": MatSpec("IAPR TC-12", 2000, 10000, ("iapr-tc12", "iaprtc12", "iapr-tc-12", "iapr")),
}


class MatFormatError(ValueError):
    """A .mat file lacks the expected keys or holds arrays of an unexpected shape."""


@dataclass(frozen=True)
class MatVar:
    """One array in a .mat file, its shape in MATLAB axis order."""

    path: str
    key: str
    shape: tuple[int, ...]
    hdf5: bool
    sparse: bool = False


@dataclass(frozen=True)
class MatLayout:
    """Where the three arrays are and how their axes map to items, channels, pixels."""

    images: MatVar
    text: MatVar
    labels: MatVar
    n_items: int
    image_axes: tuple[int, int, int]  # MATLAB axes of (height, width, channel)
    image_item_axis: int
    text_item_axis: int
    label_item_axis: int
    extra_keys: tuple[str, ...] = field(default=())


# -- finding the files -----------------------------------------------------------------------


def find_mat_files(root: str | os.PathLike[str], name: str) -> list[Path]:
    """Locate the one .mat file or the three-file variant for dataset ``name`` under ``root``.

    Raises:
        FileNotFoundError: nothing suitable was found; the message names what was expected.
    """
    spec = SPECS[name]
    root = Path(root).expanduser()
    if root.is_file():
        return [root]
    if not root.exists():
        raise FileNotFoundError(
            f"{spec.title} data not found: {root} does not exist. {_expected(spec, root)}"
        )
    mats = sorted(p for p in _walk_mats(root))
    triple = _find_triple(mats, spec)
    if triple:
        return triple
    singles = [p for p in mats if not _role(p)]
    preferred = [p for stem in spec.stems for p in singles if _norm(p.stem) == _norm(stem)]
    if preferred:
        return [preferred[0]]
    if len(singles) == 1:
        return singles
    found = ", ".join(str(p.relative_to(root)) for p in mats) or "no .mat files"
    raise FileNotFoundError(
        f"{spec.title} data not found under {root} (found: {found}). {_expected(spec, root)}"
    )


def _expected(spec: MatSpec, root: Path) -> str:
    stem = spec.stems[0]
    return (
        f"Expected a single {stem}.mat (keys IAll/YAll/LAll) or the three files {stem}-iall.mat, "
        f"{stem}-yall.mat, {stem}-lall.mat in {root}; see {DATA_README}."
    )


def _walk_mats(root: Path, depth: int = 2) -> Iterator[Path]:
    for path in root.iterdir():
        if path.is_file() and path.suffix.lower() == ".mat":
            yield path
        elif path.is_dir() and depth > 0 and not path.name.startswith("."):
            yield from _walk_mats(path, depth - 1)


def _norm(text: str) -> str:
    return text.lower().replace("_", "-")


def _role(path: Path) -> str:
    stem = _norm(path.stem)
    for role, suffixes in (("images", ("iall",)), ("text", ("yall", "tall")), ("labels", ("lall",))):
        if any(stem.endswith(s) for s in suffixes):
            return role
    return ""


def _find_triple(mats: list[Path], spec: MatSpec) -> list[Path]:
    by_role: dict[str, list[Path]] = {"images": [], "text": [], "labels": []}
    for p in mats:
        if _role(p):
            by_role[_role(p)].append(p)
    if not all(by_role.values()):
        return []
    chosen = []
    for role in ("images", "text", "labels"):
        cands = by_role[role]
        for stem in spec.stems:
            matching = [p for p in cands if _norm(p.stem).startswith(_norm(stem))]
            if matching:
                cands = matching
                break
        if len(cands) > 1:
            raise FileNotFoundError(
                f"several {role} files for {spec.title}: {', '.join(map(str, cands))}; "
                "pass the one file or folder to use as root"
            )
        chosen.append(cands[0])
    return chosen


# -- reading the arrays ----------------------------------------------------------------------


def list_vars(path: Path) -> list[MatVar]:
    """List the arrays in a .mat file (v7.3 or v5) without loading them."""
    import h5py

    if h5py.is_hdf5(path):
        out = []
        with h5py.File(path, "r") as f:
            for key, obj in f.items():
                if key.startswith("#"):
                    continue
                if isinstance(obj, h5py.Group) and "MATLAB_sparse" in obj.attrs:
                    shape = (int(obj.attrs["MATLAB_sparse"]), len(obj["jc"]) - 1)
                    out.append(MatVar(str(path), key, shape, True, sparse=True))
                elif isinstance(obj, h5py.Dataset):
                    out.append(MatVar(str(path), key, tuple(reversed(obj.shape)), True))
        return out
    import scipy.io

    try:
        entries = scipy.io.whosmat(str(path))
    except Exception as exc:  # scipy raises several types for files it cannot parse
        raise MatFormatError(f"cannot read {path} as a MATLAB .mat file: {exc}") from None
    return [MatVar(str(path), k, tuple(s), False, sparse=cls == "sparse") for k, s, cls in entries]


class MatReader:
    """Reads slices of ``MatVar`` arrays in MATLAB axis order; keeps files open until closed."""

    def __init__(self) -> None:
        self._h5: dict[str, Any] = {}
        self._loaded: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> MatReader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._h5.values():
            f.close()
        self._h5.clear()
        self._loaded.clear()

    def read(self, var: MatVar, axis: int, start: int, stop: int) -> np.ndarray:
        """Items ``start:stop`` along MATLAB axis ``axis``, as a dense array in MATLAB order."""
        if var.hdf5 and not var.sparse:
            ds = self._file(var.path)[var.key]
            index = [slice(None)] * len(var.shape)
            index[len(var.shape) - 1 - axis] = slice(start, stop)
            return np.asarray(ds[tuple(index)]).transpose()
        arr = self._whole(var)
        index = [slice(None)] * len(var.shape)
        index[axis] = slice(start, stop)
        part = arr[tuple(index)]
        return np.asarray(part.toarray() if hasattr(part, "toarray") else part)

    def _file(self, path: str) -> Any:
        import h5py

        if path not in self._h5:
            self._h5[path] = h5py.File(path, "r")
        return self._h5[path]

    def _whole(self, var: MatVar) -> Any:
        key = (var.path, var.key)
        if key not in self._loaded:
            if var.hdf5:
                import scipy.sparse

                g = self._file(var.path)[var.key]
                data = g["data"][()] if "data" in g else np.ones(len(g["ir"]), dtype=np.float32)
                self._loaded[key] = scipy.sparse.csc_matrix((data, g["ir"][()], g["jc"][()]), shape=var.shape)
            else:
                import scipy.io

                self._loaded[key] = scipy.io.loadmat(var.path, variable_names=[var.key])[var.key]
            if hasattr(self._loaded[key], "tocsr"):
                self._loaded[key] = self._loaded[key].tocsr()
        return self._loaded[key]


# -- working out the layout ------------------------------------------------------------------


def inspect_layout(
    files: Sequence[Path],
    image_key: str | None = None,
    text_key: str | None = None,
    label_key: str | None = None,
) -> MatLayout:
    """Find the image, text and label arrays in ``files`` and the axis of each that indexes items.

    Raises:
        MatFormatError: a key is missing (the message lists the keys found), the arrays
            share no common length, or the image array has no 3-channel axis.
    """
    found: dict[str, MatVar] = {}
    for path in files:
        for var in list_vars(path):
            found.setdefault(var.key, var)
    images = _pick(found, "images", (image_key,) if image_key else IMAGE_KEYS, files)
    text = _pick(found, "text", (text_key,) if text_key else TEXT_KEYS, files)
    labels = _pick(found, "labels", (label_key,) if label_key else LABEL_KEYS, files)
    if images.sparse or len(images.shape) != 4:
        raise MatFormatError(
            f"image array {images.key!r} in {images.path} has shape {images.shape}; expected 4 axes "
            "(height, width, 3 channels, items) in some order"
        )
    for var in (text, labels):
        if len(var.shape) != 2:
            raise MatFormatError(f"array {var.key!r} in {var.path} has shape {var.shape}; expected 2 axes")
    n = _common_length(images, text, labels)
    img_item = _item_axis(images, n, prefer_last=True)
    image_axes = _image_axes(images, img_item)
    used = {images.key, text.key, labels.key}
    return MatLayout(
        images=images,
        text=text,
        labels=labels,
        n_items=n,
        image_axes=image_axes,
        image_item_axis=img_item,
        text_item_axis=_item_axis(text, n),
        label_item_axis=_item_axis(labels, n),
        extra_keys=tuple(sorted(k for k in found if k not in used)),
    )


def _pick(found: dict[str, MatVar], role: str, keys: Sequence[str], files: Sequence[Path]) -> MatVar:
    for key in keys:
        if key in found:
            return found[key]
    names = ", ".join(map(str, files))
    raise MatFormatError(
        f"no {role} array in {names}: looked for key {' or '.join(keys)}, found keys "
        f"{sorted(found) or 'none'}; pass {role[:-1] if role != 'text' else role}_key=... to name it"
    )


def _common_length(images: MatVar, text: MatVar, labels: MatVar) -> int:
    common = set(images.shape) & set(text.shape) & set(labels.shape)
    if not common:
        raise MatFormatError(
            "the image, text and label arrays share no common length, so the item axis is unknown: "
            f"{images.key}{images.shape}, {text.key}{text.shape}, {labels.key}{labels.shape}"
        )
    if len(common) == 1:
        return common.pop()
    # DCMH stores text and labels as items x dims in MATLAB order.
    if labels.shape[0] in common and text.shape[0] == labels.shape[0]:
        return labels.shape[0]
    raise MatFormatError(
        f"ambiguous item count: lengths {sorted(common)} are common to {images.key}{images.shape}, "
        f"{text.key}{text.shape}, {labels.key}{labels.shape}"
    )


def _item_axis(var: MatVar, n: int, prefer_last: bool = False) -> int:
    axes = [a for a, size in enumerate(var.shape) if size == n]
    return axes[-1] if prefer_last else axes[0]


def _image_axes(images: MatVar, item_axis: int) -> tuple[int, int, int]:
    rest = [a for a in range(4) if a != item_axis]
    channel = [a for a in rest if images.shape[a] == 3]
    if not channel:
        raise MatFormatError(
            f"image array {images.key!r} in {images.path} has shape {images.shape} (MATLAB order) with "
            f"items on axis {item_axis}, but no axis of size 3 for the RGB channels"
        )
    # MATLAB images are height x width x channels: take the last size-3 axis as channels.
    c = channel[-1]
    h, w = (a for a in rest if a != c)
    return h, w, c


# -- building the dataset --------------------------------------------------------------------


def to_uint8_image(arr: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Convert one HxWx3 image array of any numeric type to uint8, multiplying floats by ``scale``.

    Raises:
        ValueError: the array holds NaN or infinite values.
    """
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise ValueError("image holds NaN or infinite values")
        arr = np.rint(arr * scale)
    return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))


def float_scale(chunk: np.ndarray) -> float:
    """255 for float images stored in [0, 1] (judged on a whole chunk, not one dark image), else 1."""
    if chunk.dtype.kind != "f":
        return 1.0
    finite = chunk[np.isfinite(chunk)]
    return 255.0 if finite.size and finite.max() <= 1.0 and finite.min() >= 0.0 else 1.0


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _row_generator(layout: MatLayout, n_items: int, chunk_size: int, vocab: tuple[str, ...]):
    h, w, c = layout.image_axes
    order = (layout.image_item_axis, h, w, c)

    def generate() -> Iterator[dict[str, Any]]:
        from tqdm.auto import tqdm

        scale = None
        with MatReader() as reader, tqdm(total=n_items, desc="reading .mat", unit="item") as bar:
            for start in range(0, n_items, chunk_size):
                stop = min(start + chunk_size, n_items)
                imgs = reader.read(layout.images, layout.image_item_axis, start, stop).transpose(order)
                scale = float_scale(imgs) if scale is None else scale
                text = _items_first(
                    reader.read(layout.text, layout.text_item_axis, start, stop), layout.text_item_axis
                )
                labels = _items_first(
                    reader.read(layout.labels, layout.label_item_axis, start, stop), layout.label_item_axis
                )
                for j in range(stop - start):
                    row = _make_row(start + j, imgs[j], text[j], labels[j], vocab, scale)
                    if row is not None:
                        yield row
                bar.update(stop - start)

    return generate


def _items_first(arr: np.ndarray, item_axis: int) -> np.ndarray:
    return arr if item_axis == 0 else arr.T


def item_id(i: int) -> str:
    return f"{i:06d}"


def _make_row(
    i: int, img: np.ndarray, bow: np.ndarray, labels: np.ndarray, vocab: tuple[str, ...], scale: float
):
    try:
        png = encode_png(to_uint8_image(img, scale))
    except (ValueError, OSError) as exc:
        logger.debug("image %s cannot be encoded: %s", item_id(i), exc)
        return None
    bow = np.asarray(bow, dtype=np.float32)
    words = [vocab[k] for k in np.flatnonzero(bow)] if vocab else []
    captions = [" ".join(words)] if words else []  # no caption rather than an empty one
    return make_record(item_id(i), captions, labels=(labels > 0).astype(np.uint8), image_bytes=png, bow=bow)


def _read_names(value: Sequence[str] | str | os.PathLike[str], what: str) -> list[str]:
    if not isinstance(value, (str, os.PathLike)):
        return [str(v) for v in value]
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open_text(path) as fh:  # a byte-order mark is not part of the first name
        text = fh.read()
    if path.suffix.lower() == ".json":
        return [str(v) for v in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _label_names(name: str, option: Sequence[str] | str | None, n_labels: int) -> list[str]:
    builtin = SPECS[name].label_names
    if option is None and len(builtin) == n_labels:
        return list(builtin)
    if option is None or option == "generic":
        if option is None and builtin:
            logger.warning(
                "%s: file has %d labels, not the %d known names; using generic names",
                name,
                n_labels,
                len(builtin),
            )
        return [f"label_{k}" for k in range(n_labels)]
    names = _read_names(option, "label names")
    if len(names) != n_labels:
        raise ValueError(f"label_names gives {len(names)} names but the labels array has {n_labels} columns")
    return names


def _source_fingerprint(files: Sequence[Path], options: dict[str, Any]) -> str:
    h = hashlib.sha256(f"mat-v{LOADER_VERSION}".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def load_mat_dataset(
    root: str | os.PathLike[str],
    name: str = "mirflickr25k",
    label_names: Sequence[str] | str | None = None,
    vocab: Sequence[str] | str | None = None,
    image_key: str | None = None,
    text_key: str | None = None,
    label_key: str | None = None,
    chunk_size: int = 256,
    limit: int | None = None,
    cache_dir: str | None = None,
) -> CrossModalDataset:
    """Build a DCMH-format dataset from one .mat file or the three-file variant.

    Args:
        root: a .mat file, or a folder holding one (e.g. ``FLICKR-25K.mat``) or the three
            ``<name>-iall.mat`` / ``-yall.mat`` / ``-lall.mat`` files (subfolders allowed).
        name: ``mirflickr25k``, ``nuswide`` or ``iaprtc12``; sets the defaults, the default
            protocol (``SPECS``) among them. A run sets other split sizes with ``data.n_query``,
            ``data.n_train``, ``data.n_val``.
        label_names: a list, a file (one name per line, or a JSON list), ``"generic"``
            for ``label_0...``, or None for the built-in names where known.
        vocab: the words of the bag-of-words columns (list or file); when given, each
            item's caption is its words.
        image_key: key of the image array (default: first of IAll, images, I).
        text_key: key of the bag-of-words array (default: first of YAll, TAll, tags, ...).
        label_key: key of the label array (default: first of LAll, labels, L).
        chunk_size: images read per slice.
        limit: keep only the first ``limit`` items (quick runs).
        cache_dir: where ``datasets`` keeps the Arrow files (default: its own cache).
    """
    if name not in SPECS:
        raise ValueError(f"unknown .mat dataset {name!r}; known: {', '.join(SPECS)}")
    files = find_mat_files(root, name)
    layout = inspect_layout(files, image_key, text_key, label_key)
    n_items = layout.n_items if limit is None else min(limit, layout.n_items)
    n_labels = layout.labels.shape[1 - layout.label_item_axis]
    bow_dim = layout.text.shape[1 - layout.text_item_axis]
    words = tuple(_read_names(vocab, "vocabulary")) if vocab is not None else ()
    if words and len(words) != bow_dim:
        raise ValueError(f"vocab has {len(words)} words but the text array has {bow_dim} columns")
    spec = SPECS[name]
    source = {
        "root": str(root),
        "files": [str(p) for p in files],
        "image_key": layout.images.key,
        "text_key": layout.text.key,
        "label_key": layout.labels.key,
        "limit": limit,
    }
    info = DatasetInfo(
        name=name,
        label_names=_label_names(name, label_names, n_labels),
        relevance=RELEVANCE_LABELS,
        bow_dim=bow_dim,
        bow_vocab=list(words),
        source=source,
    )
    gen = _row_generator(layout, n_items, max(1, chunk_size), words)
    fp = _source_fingerprint(files, {**source, "labels": info.label_names, "vocab": words})
    try:
        ds = CrossModalDataset.from_records(gen, info, cache_dir=cache_dir, fingerprint=fp)
    except EmptyDatasetError:
        raise EmptyDatasetError(
            f"{', '.join(map(str, files))}: no usable item; none of the {n_items} images in "
            f"{layout.images.key!r} could be encoded (NaN or infinite values?)"
        ) from None
    _finish_info(ds, n_items, layout, spec)
    return ds


def _finish_info(ds: CrossModalDataset, n_items: int, layout: MatLayout, spec: MatSpec) -> None:

    present = set(ds.ids) if len(ds) != n_items else None
    failed = [] if present is None else [item_id(i) for i in range(n_items) if item_id(i) not in present]
    if failed:
        logger.warning(
            "%d images could not be encoded and were skipped: %s", len(failed), ", ".join(failed[:20])
        )
    labels = ds.labels_matrix()
    ds.info.stats = {
        "n_items": len(ds),
        "n_in_file": layout.n_items,
        "n_failed_images": len(failed),
        "failed_images": failed,
        "n_unlabeled": int((labels.sum(1) == 0).sum()),
        "unused_keys": list(layout.extra_keys),
        "image_shape": [layout.images.shape[a] for a in layout.image_axes],
    }
    ds.info.protocol = fit_protocol(len(ds), spec.n_query, spec.n_train, ds.name)


def _register(name: str) -> None:
    def build(root: str | os.PathLike[str], **options: Any) -> CrossModalDataset:
        return load_mat_dataset(root, name=name, **options)

    build.__name__ = f"load_{name}"
    build.__doc__ = f"Build {SPECS[name].title} from DCMH .mat files; options as ``load_mat_dataset``."
    register_dataset(name)(build)


for _name in SPECS:
    _register(_name)
