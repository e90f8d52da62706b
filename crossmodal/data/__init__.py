"""Datasets: one record type, a registry of builders, seeded splits.

``create_dataset(name, **options)`` returns a ``CrossModalDataset``. Builders register
themselves with ``@register_dataset("name")``; each module below is imported here so
that the registry is complete once ``crossmodal.data`` is imported.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

from crossmodal.data.records import (
    RELEVANCE_IMAGE,
    RELEVANCE_LABELS,
    CrossModalDataset,
    DatasetInfo,
    build_guard,
    make_record,
)
from crossmodal.io import built_data_dir, write_json_atomic
from crossmodal.registry import Registry

DATASETS: Registry[CrossModalDataset] = Registry("dataset")
register_dataset = DATASETS.register

DATA_README = "data/README.md"


def create_dataset(name: str, /, **options: Any) -> CrossModalDataset:
    """Build or load the dataset registered as ``name`` with builder ``options``.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the valid names).
        ValueError: an option the builder does not take, or one it needs is missing (the message
            lists those it takes).
    """
    factory = DATASETS.get(name)
    try:
        inspect.signature(factory).bind(**options)
    except TypeError:
        signature = inspect.signature(factory)
        params = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        unknown = sorted(set(options) - set(params))
        required = [p for p, v in signature.parameters.items() if v.default is inspect.Parameter.empty
                    and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL)]  # fmt: skip
        needed = [p for p in required if p not in options]
        if needed and not unknown:
            raise ValueError(f"dataset {name!r} needs the option(s) {', '.join(needed)} "
                             f"(-o {needed[0]}=...); its options: {', '.join(params)}") from None  # fmt: skip
        raise ValueError(
            f"dataset {name!r} does not take the option(s) {', '.join(unknown) or '(as given)'}; "
            f"its options: {', '.join(params) or 'none'}"
        ) from None
    return factory(**options)


def list_datasets() -> list[str]:
    return DATASETS.names()


# Builders that keep their own on-disk cache; the others are cached by ``open_dataset``.
SELF_CACHING = {"openmoji"}


def data_dir() -> Path:
    """Where built datasets are cached: ``$CROSSMODAL_DATA_DIR``, else ``data/`` in the user
    cache folder (``crossmodal.io.cache_home``), found again from any working folder."""
    return built_data_dir()


def open_dataset(name: str, options: dict[str, Any] | None = None) -> CrossModalDataset:
    """Create dataset ``name``; builds of file-backed datasets are cached under ``data_dir()``.

    The cache key holds the options and the modification time of ``root`` (which changes
    when a file is added, removed or renamed there); the size and modification time of each
    annotation file the build read (the files named in ``info.source``) are kept beside the
    build and compared, so an annotation file edited in place is read again. An image
    rewritten in place is not seen: ``force=True`` rebuilds regardless. A build first
    sweeps what killed builds left under ``data_dir()`` (``records.build_guard``).

    Raises:
        UnknownNameError: ``name`` is not a registered dataset.
        FileNotFoundError, ValueError: the builder's own errors (missing files, bad options).
    """
    options = dict(options or {})
    if name in SELF_CACHING:
        return create_dataset(name, **options)
    force = bool(options.pop("force", False))
    root = options.get("root")
    stamp = os.stat(root).st_mtime_ns if root and os.path.exists(root) else None
    blob = json.dumps({"name": name, "stamp": stamp, **options}, sort_keys=True, default=str)
    path = data_dir() / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if (path / "info.json").exists() and not force and _sources_unchanged(path):
        return CrossModalDataset.load(path)
    targets = rf"(?:{'|'.join(map(re.escape, list_datasets()))})-[0-9a-f]{{12}}"
    with build_guard(data_dir(), targets):
        dataset = create_dataset(name, **options)
        dataset.save(path)
        write_json_atomic(path / SOURCE_STAMPS, source_stamps(dataset.info.source))
    return CrossModalDataset.load(path)


SOURCE_STAMPS = "sources.json"


def source_stamps(source: Any) -> dict[str, list[int]]:
    """``{absolute path: [size, mtime_ns]}`` of every existing file named in ``source``
    (a builder's ``info.source``: strings, lists and dicts of them)."""
    stamps: dict[str, list[int]] = {}
    values = list(source.values()) if isinstance(source, dict) else [source]
    for value in values:
        if isinstance(value, dict | list | tuple):
            for v in value.values() if isinstance(value, dict) else value:
                stamps.update(source_stamps(v))
        elif isinstance(value, str) and value and os.path.isfile(value):
            st = os.stat(value)
            stamps[os.path.abspath(value)] = [st.st_size, st.st_mtime_ns]
    return stamps


def _sources_unchanged(path: Path) -> bool:
    """Whether the annotation files a cached build read are as they were (see ``open_dataset``)."""
    try:
        stamps = json.loads((path / SOURCE_STAMPS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # a build of an older version, or one killed before its stamps were written
    for file, stamp in stamps.items():
        try:
            st = os.stat(file)
        except OSError:
            return False
        if [st.st_size, st.st_mtime_ns] != stamp:
            return False
    return True


def _import_builders() -> None:

    for module in ("openmoji", "mat", "captions"):
        try:
            importlib.import_module(f"crossmodal.data.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"crossmodal.data.{module}":
                raise


_import_builders()

__all__ = [
    "CrossModalDataset",
    "DatasetInfo",
    "RELEVANCE_IMAGE",
    "RELEVANCE_LABELS",
    "create_dataset",
    "list_datasets",
    "make_record",
    "open_dataset",
    "register_dataset",
]
