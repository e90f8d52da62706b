"""The engine's query encoders: one interface, two back ends.

- ``onnx``: the run's exported encoders (``crossmodal export``), run by onnxruntime with the
  tokenizer from ``tokenizers`` or the saved vocabulary (``crossmodal.runs.exported``).
  Nothing on this path imports torch, transformers or datasets.
- ``torch``: the run's model rebuilt from ``model.json`` (``crossmodal.serving.torch_encoders``),
  imported only for runs without exported encoders, or when asked for.

Both give ``encode_texts(list[str]) -> float32 [n, bits]`` and ``encode_images(list[PIL.Image])
-> float32 [n, bits]`` (continuous codes: the model's output before the sign), check queries
with the same rules and messages (``check_query``, ``unknown_words``), and say which files
they read (``files``, for the engine's checksum check) and the run's per-bit weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from crossmodal.runs.exported import ENCODERS_FILE, SOURCE_FILES, EncoderFileError, OnnxEncoders
from crossmodal.runs.folder import RunError

BACKENDS = ("auto", "onnx", "torch")


class QueryEncoders(Protocol):
    """What the engine asks of a back end."""

    backend: str
    bits: int
    bit_weights: np.ndarray | None  # float64 [bits], or None for plain Hamming
    files: tuple[str, ...]  # the run files it read

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images(self, images: list[Image.Image]) -> np.ndarray: ...

    def check_query(self, text: str) -> None: ...

    def unknown_words(self, text: str) -> list[str]: ...


def choose_backend(manifest: dict[str, Any], backend: str = "auto") -> str:
    """``"onnx"`` when ``backend`` is ``"auto"`` and the run lists exported encoders, else ``"torch"``;
    an explicit ``"onnx"`` or ``"torch"`` as it is.

    Raises:
        ValueError: an unknown ``backend``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown encoder backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    files = manifest.get("files")
    return "onnx" if isinstance(files, dict) and ENCODERS_FILE in files else "torch"


def required_files(backend: str) -> tuple[str, ...]:
    """The files a run must list for ``backend``, checked before loading (the model's for torch;
    the exported encoders say themselves what they read)."""
    return SOURCE_FILES if backend == "torch" else ()


def load_encoders(
    run_dir: str | os.PathLike[str],
    manifest: dict[str, Any],
    backend: str,
    threads: int | None = 1,
    precision: str = "fp32",
) -> QueryEncoders:
    """The query encoders of a checked run.

    Args:
        manifest: the run's manifest (``check_run``).
        backend: ``"onnx"`` or ``"torch"`` (``choose_backend``).
        threads: intra-op threads of the encoder (None: the library's default).
        precision: ``"fp32"``, or ``"int8"`` for the quantised exported encoders (onnx only).

    Raises:
        RunError: files missing, damaged, of another model or code length; the message says
            what to re-run.
    """
    run_dir = Path(run_dir)
    if backend == "torch":
        if precision != "fp32":
            raise ValueError(f"precision {precision!r} needs exported encoders (backend 'onnx')")
        from crossmodal.serving.torch_encoders import TorchEncoders

        return TorchEncoders.load(run_dir, manifest, threads)
    return load_onnx(run_dir, manifest, threads, precision)


def load_onnx(run_dir: Path, manifest: dict[str, Any], threads: int | None, precision: str) -> OnnxEncoders:
    """The run's exported encoders, refused when they are not of the run's current model."""
    command = f"crossmodal export --run {run_dir}"
    hint = f"re-run: {command}"
    if ENCODERS_FILE not in manifest.get("files", {}):
        raise RunError(f"{run_dir} has no exported encoders; create them with: {command}")
    try:
        encoders = OnnxEncoders.load(run_dir, threads=threads, precision=precision)
    except EncoderFileError as exc:
        raise RunError(f"{run_dir}: {exc}; {hint}") from None
    except ImportError as exc:
        raise RunError(f"{run_dir} is served by its exported encoders: {exc}; or encode with torch "
                       "(crossmodal search --encoders torch)") from None  # fmt: skip
    stale = [name for name, sha in encoders.spec.source.items() if manifest["files"].get(name) != sha]
    if stale:
        raise RunError(f"{run_dir}: the exported encoders were made from another {' and '.join(stale)} "
                       f"than the run's; {hint}")  # fmt: skip
    if encoders.bits != manifest.get("bits"):
        raise RunError(f"{run_dir}: code length differs: {ENCODERS_FILE} says {encoders.bits} bits, "
                       f"manifest.json {manifest.get('bits')} bits; {hint}")  # fmt: skip
    return encoders
