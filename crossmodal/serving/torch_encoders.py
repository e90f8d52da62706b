"""The torch back end of the engine's query encoders: the run's model, rebuilt from ``model.json``.

Imported by ``crossmodal.serving.encoders`` only for runs without exported encoders (or when
asked for), so that serving an exported run never imports torch.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.runs.folder import RunError
from crossmodal.runs.model import MODEL_SPEC, WEIGHTS, load_model, read_spec


class TorchEncoders:
    """Texts and images -> continuous codes through the run's torch model."""

    backend = "torch"

    def __init__(self, model: TwoTowerHasher, files: tuple[str, ...]) -> None:
        self.model = model
        self.bits = int(model.bits)
        self.files = files
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    @classmethod
    def load(cls, run_dir: Path, manifest: dict[str, Any], threads: int | None = 1) -> TorchEncoders:
        """Rebuild the model of a checked run, with its image tower's batch norms folded.

        Args:
            threads: torch's intra-op threads, for the whole process (None: torch's default).

        Raises:
            RunError: ``model.json`` or the weights are missing, unreadable, or of another code
                length than the manifest.
        """
        spec = read_spec(run_dir)
        if spec.bits != manifest.get("bits"):
            raise RunError(
                f"{run_dir}: code length differs: {MODEL_SPEC} says {spec.bits} bits, "
                f"manifest.json {manifest.get('bits')} bits; re-run crossmodal train and index"
            )
        if threads:
            torch.set_num_threads(int(threads))
        model = load_model(run_dir)
        # the engine only encodes: batch norms folded (as when the features were cached)
        model.image_tower = model.image_tower.for_inference()
        return cls(model, (WEIGHTS, MODEL_SPEC, *spec.tower_files))

    @property
    def bit_weights(self) -> np.ndarray | None:
        weights = self.model.bit_weights
        return None if weights is None else weights.detach().cpu().numpy().astype(np.float64)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Continuous codes ``float32 [n, bits]`` of ``texts`` (not checked: see ``check_query``)."""
        if not texts:
            return np.zeros((0, self.bits), np.float32)
        with self._lock, torch.no_grad():
            return self.model.encode_text(self.model.text_tower.tokenize(list(texts))).float().numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Continuous codes ``float32 [n, bits]`` of decoded images."""
        if not images:
            return np.zeros((0, self.bits), np.float32)
        tower = self.model.image_tower
        x = torch.stack([tower.preprocess(img) for img in images])
        with self._lock, torch.no_grad():
            return self.model.encode_image(x).float().numpy()

    def check_query(self, text: str) -> None:
        self.model.text_tower.check_query(text)

    def unknown_words(self, text: str) -> list[str]:
        return self.model.text_tower.unknown_words(text)
