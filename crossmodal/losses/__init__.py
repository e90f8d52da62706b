"""Hashing objectives, one file each, in a registry: ``create_loss(name, **params)``."""

from __future__ import annotations

import importlib
from typing import Any

from crossmodal.losses.base import HashLoss, LossBatch, Similarity, pairwise_nll, softplus_stable
from crossmodal.registry import Registry

LOSSES: Registry[HashLoss] = Registry("loss")
register_loss = LOSSES.register

_MODULES = ("dcmh", "dpsh", "dsh", "dhn", "dnnh", "dsrh", "dlbhc", "drsch", "cnnh", "lsh")


def _import_all() -> None:
    for module in _MODULES:
        try:
            importlib.import_module(f"crossmodal.losses.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"crossmodal.losses.{module}":
                raise


def create_loss(name: str, **params: Any) -> HashLoss:
    """Build the objective registered as ``name``; unknown parameters are refused."""
    _import_all()
    factory = LOSSES.get(name)
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for loss {name!r}: {exc}") from None


def list_losses() -> list[str]:
    _import_all()
    return LOSSES.names()


__all__ = [
    "HashLoss",
    "LossBatch",
    "Similarity",
    "create_loss",
    "list_losses",
    "pairwise_nll",
    "register_loss",
    "softplus_stable",
]
