"""The one set of "is this step done?" checks on a run folder.

``crossmodal prepare``, the ``--if-missing`` flags of the CLI and the grid all ask these,
so they agree: a step is done when the manifest lists its files and they exist. A file
left on disk but no longer listed (as after ``invalidate_products``) does not count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crossmodal.io import sha256_file
from crossmodal.runs.folder import EVAL_FILES, JOURNAL, MANIFEST, check_run
from crossmodal.runs.model import MODEL_SPEC, WEIGHTS

INDEX_PARTS = ("image.index", "text.index", "store.sqlite")


def _trained(run_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished training, or None (none, or an update interrupted: nothing is
    done until recover_run has rolled it back)."""
    if not (run_dir / MANIFEST).exists() or (run_dir / JOURNAL).exists():
        return None
    manifest = check_run(run_dir)
    return manifest if _has(run_dir, manifest, (WEIGHTS, MODEL_SPEC)) else None


def _has(run_dir: Path, manifest: dict[str, Any], names: tuple[str, ...], verify: bool = False) -> bool:
    files = manifest.get("files", {})

    def ok(name: str) -> bool:
        path = run_dir / name
        return name in files and path.is_file() and (not verify or sha256_file(path) == files[name])

    return all(ok(name) for name in names)


def is_trained(run_dir: str | os.PathLike[str]) -> bool:
    """A finished training: the manifest lists the model's weights and spec, and both exist.

    Raises:
        RunError: the run folder is from another version, or its manifest is corrupt.
    """
    return _trained(Path(run_dir)) is not None


def is_indexed(run_dir: str | os.PathLike[str], kind: str | None = None) -> bool:
    """Trained and indexed (with an index of ``kind``, when given: another kind is re-indexed)."""
    run_dir = Path(run_dir)
    manifest = _trained(run_dir)
    info = manifest.get("index") if manifest else None
    return (isinstance(info, dict) and (kind is None or info.get("kind") == kind)
            and _has(run_dir, manifest, INDEX_PARTS))  # fmt: skip


def is_evaluated(run_dir: str | os.PathLike[str]) -> bool:
    """Trained and evaluated: the manifest lists the report of the current model, unchanged."""
    run_dir = Path(run_dir)
    manifest = _trained(run_dir)
    return bool(manifest) and "eval" in manifest and _has(run_dir, manifest, EVAL_FILES, verify=True)
