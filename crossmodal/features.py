"""Inputs for the towers, and the on-disk cache of frozen backbone features.

``ModalityInputs`` turns dataset positions into what a tower (or its head, when the
tower is frozen and its features are cached) takes. Frozen pretrained towers run once
over the whole dataset, with a progress bar, and their features are cached under
``train.cache_dir`` keyed by dataset fingerprint and tower, so a second run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crossmodal.data import CrossModalDataset
from crossmodal.images import ImageDecodeError, open_image
from crossmodal.io import atomic_path

log = logging.getLogger(__name__)


def item_texts(dataset: CrossModalDataset) -> list[str]:
    """One text per item: its captions joined (the text side of each training pair)."""
    return [" ; ".join(c) for c in dataset.table["captions"]]


def image_batch(dataset: CrossModalDataset, tower: Any, indices: np.ndarray) -> torch.Tensor:
    """Decode and preprocess the images of ``indices`` -> ``[b, 3, S, S]``.

    An image that fails to decode becomes a blank (white) image and is logged; the
    dataset builders already skip undecodable images, so this only guards files that
    changed on disk after the build.
    """
    rows = dataset.table.select(np.asarray(indices).tolist()).select_columns(
        ["id", "image_path", "image_bytes"]
    )
    out = []
    for row in rows:
        try:
            img = open_image(dataset.image_source(row))
        except ImageDecodeError as exc:
            log.warning("item %s: %s; using a blank image", row["id"], exc)
            from PIL import Image

            img = Image.new("RGB", (tower.image_size, tower.image_size), "white")
        out.append(tower.preprocess(img))
    return torch.stack(out)


class ModalityInputs:
    """Batches for one modality: cached features (frozen) or raw inputs for the tower."""

    def __init__(
        self,
        modality: str,
        dataset: CrossModalDataset,
        tower: Any,
        features: torch.Tensor | None = None,
        texts: list[str] | None = None,
    ) -> None:
        self.modality, self.dataset, self.tower = modality, dataset, tower
        self.features = features  # [n_items, f] when the tower is frozen and cached
        self.texts = texts

    @property
    def from_features(self) -> bool:
        return self.features is not None

    def batch(self, indices: np.ndarray, device: torch.device) -> Any:
        if self.features is not None:
            return self.features[torch.as_tensor(indices, dtype=torch.long)].to(device)
        if self.modality == "image":
            return image_batch(self.dataset, self.tower, indices).to(device)
        if self.dataset.info.bow_dim:
            return {"bow": torch.from_numpy(self.dataset.bow_matrix(indices)).to(device)}
        assert self.texts is not None
        batch = self.tower.tokenize([self.texts[int(i)] for i in indices])
        return {k: v.to(device) for k, v in batch.items()}


def cache_key(dataset: CrossModalDataset, modality: str, tower_desc: dict[str, Any]) -> str:
    blob = json.dumps({"data": dataset.fingerprint(), "modality": modality, **tower_desc}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@torch.no_grad()
def extract_features(
    dataset: CrossModalDataset,
    modality: str,
    tower: Any,
    tower_desc: dict[str, Any],
    cache_dir: str | Path | None,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Features of every item from a frozen tower, ``[n_items, feature_dim]`` float32, cached."""
    device = device or torch.device("cpu")
    path = None
    if cache_dir:
        key = cache_key(dataset, modality, tower_desc)
        path = Path(cache_dir) / f"{dataset.name}-{modality}-{tower_desc.get('name', 'tower')}-{key}.npy"
        if path.exists():
            feats = np.load(path, allow_pickle=False)
            if feats.shape == (len(dataset), tower.feature_dim):
                log.info("reusing cached %s features %s", modality, path)
                return torch.from_numpy(feats)
            log.warning("ignoring cache %s with shape %s", path, feats.shape)
    source = ModalityInputs(
        modality, dataset, tower, texts=item_texts(dataset) if modality == "text" else None
    )
    tower.eval().to(device)
    out = np.zeros((len(dataset), tower.feature_dim), dtype=np.float32)
    starts = range(0, len(dataset), batch_size)
    for s in tqdm(starts, desc=f"{modality} features", unit="batch", leave=False):
        idx = np.arange(s, min(s + batch_size, len(dataset)))
        x = source.batch(idx, device)
        y = tower(x) if modality == "image" else tower(**x)
        out[idx] = y.float().cpu().numpy()
    if path is not None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, out, allow_pickle=False)
    return torch.from_numpy(out)
