"""Datasets: one record type, a registry of builders, seeded splits.

``create_dataset(name, **options)`` returns a ``CrossModalDataset``. Builders register
themselves with ``@register_dataset("name")``; each module below is imported here so
that the registry is complete once ``crossmodal.data`` is imported.
"""

from __future__ import annotations

from typing import Any

from crossmodal.data.records import (
    RELEVANCE_IMAGE,
    RELEVANCE_LABELS,
    CrossModalDataset,
    DatasetInfo,
    make_record,
)
from crossmodal.registry import Registry

DATASETS: Registry[CrossModalDataset] = Registry("dataset")
register_dataset = DATASETS.register

DATA_README = "data/README.md"


def create_dataset(name: str, **options: Any) -> CrossModalDataset:
    """Build or load the dataset registered as ``name`` with builder ``options``."""
    return DATASETS.create(name, **options)


def list_datasets() -> list[str]:
    return DATASETS.names()


def _import_builders() -> None:
    import importlib

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
    "register_dataset",
]
