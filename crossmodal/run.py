"""The run folder: manifest, checks on loading, and rebuilding a trained model.

``runs/<name>/`` holds ``config.yaml``, ``model.safetensors``, tower state such as
``vocab.json``, ``splits.json``, ``image.index``, ``text.index``, ``store.sqlite``,
``manifest.json`` and ``eval/``. The manifest is written last and records the code
length, the towers, the format version and a checksum of every file, so a run from
another version, or one whose files changed underneath, is refused with a message
that says what differs.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

from crossmodal import RUN_FORMAT_VERSION, __version__
from crossmodal.config import Config, load_config
from crossmodal.io import sha256_file, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class RunError(RuntimeError):
    """A run folder is missing, incomplete or incompatible; the message says what to run."""


def read_manifest(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise RunError(
            f"{run_dir} is not a trained run (no {MANIFEST}); "
            f"train one with: crossmodal train --config configs/openmoji.yaml"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{path} is corrupt ({exc}); re-run: crossmodal train") from None


def update_manifest(run_dir: str | os.PathLike[str], files: list[str], **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into the manifest, re-checksum ``files``, write it atomically (last)."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    manifest.update(fields)
    manifest["format_version"] = RUN_FORMAT_VERSION
    manifest["crossmodal_version"] = __version__
    manifest.setdefault("python", platform.python_version())
    checksums = manifest.setdefault("files", {})
    for name in files:
        checksums[name] = sha256_file(run_dir / name)
    write_json_atomic(path, manifest)
    return manifest


def check_run(
    run_dir: str | os.PathLike[str],
    need: tuple[str, ...] = (),
    bits: int | None = None,
    verify: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Read and check the manifest of ``run_dir``; return it.

    Args:
        need: files that must be present and listed (e.g. the indexes).
        bits: the code length the caller expects, if any.
        verify: files whose checksum is compared with the manifest.
    Raises:
        RunError: naming what is missing or what differs.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder not found: {run_dir}; create it with: crossmodal train --config ...")
    manifest = read_manifest(run_dir)
    version = manifest.get("format_version")
    if version != RUN_FORMAT_VERSION:
        raise RunError(
            f"{run_dir} was written with run format {version} (crossmodal "
            f"{manifest.get('crossmodal_version')}); this crossmodal {__version__} reads format "
            f"{RUN_FORMAT_VERSION}: re-train it with crossmodal train"
        )
    if bits is not None and manifest.get("bits") != bits:
        raise RunError(f"{run_dir} has {manifest.get('bits')}-bit codes, expected {bits}")
    for name in need:
        if name not in manifest.get("files", {}) or not (run_dir / name).exists():
            hint = (
                "crossmodal index --run" if name.endswith((".index", ".sqlite")) else "crossmodal train --run"
            )
            raise RunError(f"{run_dir} has no {name}; create it with: {hint} {run_dir}")
    for name in verify:
        expected = manifest.get("files", {}).get(name)
        if expected and sha256_file(run_dir / name) != expected:
            raise RunError(
                f"{run_dir / name} does not match the checksum in {MANIFEST}: it changed or is damaged"
            )
    return manifest


def load_run_config(run_dir: str | os.PathLike[str]) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunError(f"{run_dir} has no config.yaml; it is not a crossmodal run")
    return load_config(path)
