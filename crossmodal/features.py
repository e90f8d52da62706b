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


def join_captions(captions: list[str]) -> str:
    """An item's one text: its captions joined (the text side of each training pair)."""
    return " ; ".join(captions)


def item_texts(dataset: CrossModalDataset) -> list[str]:
    """One text per item: its captions joined (the text side of each training pair)."""
    return [join_captions(c) for c in dataset.table["captions"]]


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
        offsets: np.ndarray | None = None,
    ) -> None:
        self.modality, self.dataset, self.tower = modality, dataset, tower
        self.features = features  # [n_items, f] (or [n_texts, f] with offsets) when frozen and cached
        self.texts = texts
        self.offsets = offsets  # text variants: rows offsets[i]:offsets[i+1] belong to item i

    @property
    def from_features(self) -> bool:
        return self.features is not None

    def batch(self, indices: np.ndarray, device: torch.device, rng: np.random.Generator | None = None) -> Any:
        """Inputs for ``indices``; with ``rng`` and text variants, a random variant per item."""
        if self.features is not None:
            rows = np.asarray(indices)
            if self.offsets is not None:
                start, count = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
                rows = start + (rng.integers(0, count) if rng is not None else 0)
            return self.features[torch.as_tensor(rows, dtype=torch.long)].to(device)
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


def text_variants(dataset: CrossModalDataset) -> tuple[list[str], np.ndarray]:
    """Every text an item can be trained on: its captions joined, then each caption alone.

    Returns the texts and ``offsets [n_items + 1]``: rows ``offsets[i]:offsets[i+1]`` belong
    to item i, and row ``offsets[i]`` is its joined text (what evaluation and indexing use).
    Training on single captions too teaches the text side short, keyword-like queries.
    """
    texts: list[str] = []
    offsets = [0]
    for captions in dataset.table["captions"]:
        texts.append(join_captions(captions))
        if len(captions) > 1:
            texts.extend(captions)
        offsets.append(len(texts))
    return texts, np.asarray(offsets, dtype=np.int64)


@torch.no_grad()
def extract_features(
    dataset: CrossModalDataset,
    modality: str,
    tower: Any,
    tower_desc: dict[str, Any],
    cache_dir: str | Path | None,
    batch_size: int = 64,
    device: torch.device | None = None,
    variants: bool = False,
) -> Any:
    """Features of every item from a frozen tower, ``[n_items, feature_dim]`` float32, cached.

    For text, the features of all ``text_variants`` are computed and cached; with
    ``variants=True`` they are returned whole with their offsets, else one row per item.
    """
    device = device or torch.device("cpu")
    texts, offsets = (None, None)
    if modality == "text" and not dataset.info.bow_dim:
        texts, offsets = text_variants(dataset)
    n = len(texts) if texts is not None else len(dataset)
    path = None
    if cache_dir:
        desc = {**tower_desc, "variants": True} if texts is not None else tower_desc
        key = cache_key(dataset, modality, desc)
        path = Path(cache_dir) / f"{dataset.name}-{modality}-{tower_desc.get('name', 'tower')}-{key}.npy"
    feats = _load_cache(path, (n, tower.feature_dim))
    if feats is None:
        feats = _compute(ModalityInputs(modality, dataset, tower, texts=texts), tower, n, batch_size, device)
        if path is not None:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, feats, allow_pickle=False)
    out = torch.from_numpy(feats)
    if offsets is None:
        return (out, None) if variants else out
    return (out, offsets) if variants else out[torch.from_numpy(offsets[:-1])]


def _load_cache(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    if path is None or not path.exists():
        return None
    try:  # never unpickled: a cache file holding objects is refused and recomputed
        feats = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        log.warning("ignoring unreadable feature cache %s: %s", path, exc)
        return None
    if feats.shape != shape:
        log.warning("ignoring cache %s with shape %s (expected %s)", path, feats.shape, shape)
        return None
    log.info("reusing cached features %s", path)
    return feats


def _compute(source: ModalityInputs, tower: Any, n: int, batch_size: int, device: torch.device) -> np.ndarray:
    tower.eval().to(device)
    out = np.zeros((n, tower.feature_dim), dtype=np.float32)
    for s in tqdm(range(0, n, batch_size), desc=f"{source.modality} features", unit="batch", leave=False):
        idx = np.arange(s, min(s + batch_size, n))
        x = source.batch(idx, device)
        y = tower(x) if source.modality == "image" else tower(**x)
        out[idx] = y.float().cpu().numpy()
    return out
