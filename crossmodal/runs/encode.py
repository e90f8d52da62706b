"""A dataset through a run's model: the run's data and splits, frozen features, codes.

The index and eval jobs both open a trained run's dataset (refusing one that changed
since training), read its splits, reuse the cached features of frozen towers and encode
items chunk by chunk; this module is where they do it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crossmodal.codes import sign
from crossmodal.config import Config
from crossmodal.data import CrossModalDataset, open_dataset
from crossmodal.data.splits import Splits
from crossmodal.features import FeatureRequest, ModalityInputs, extract_all, join_captions, tower_description
from crossmodal.io import feature_cache_dir
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.models.image import CachedTrunk, create_image_tower
from crossmodal.models.text import create_text_tower
from crossmodal.runs.folder import RunError, check_run, load_run_config
from crossmodal.runs.model import MODALITIES, WEIGHTS

__all__ = ["RunData", "ZeroShot", "continuous_codes", "dataset_features", "encode_items", "encode_texts",
           "frozen_features", "open_run_data", "zero_shot_features"]


@dataclass
class RunData:
    """A trained run's recipe, manifest, dataset and split positions."""

    run_dir: Path
    cfg: Config
    manifest: dict[str, Any]
    dataset: CrossModalDataset
    splits: dict[str, np.ndarray]  # "query", "database", "train", "val" -> positions


def open_run_data(run_dir: str | os.PathLike[str]) -> RunData:
    """Open the dataset a run was trained on, and the run's splits of it.

    Raises:
        RunError: the run is untrained or damaged, or its dataset changed since training.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    manifest = check_run(run_dir, need=(WEIGHTS, "splits.json"))
    dataset = open_dataset(cfg.data.name, cfg.data.options)
    trained_on = manifest.get("dataset", {}).get("fingerprint")
    if dataset.fingerprint() != trained_on:
        raise RunError(
            f"the dataset {dataset.name!r} changed since {run_dir} was trained "
            f"(fingerprint {dataset.fingerprint()} != {trained_on}); re-train the run"
        )
    s = Splits.load(run_dir / "splits.json", dataset)
    splits = {"query": s.query, "database": s.database, "train": s.train, "val": s.val}
    return RunData(run_dir, cfg, manifest, dataset, splits)


def frozen_features(data: RunData, model: TwoTowerHasher) -> dict[str, torch.Tensor | None]:
    """Cached features of the run's frozen towers: ``{"image": [n, f] or None, "text": ...}``."""
    return dataset_features(data, model, data.dataset)


def dataset_features(
    data: RunData, model: TwoTowerHasher, dataset: CrossModalDataset, progress: bool = True
) -> dict[str, torch.Tensor | None]:
    """Features of ``dataset`` (the run's own, or another one scored with the run's model)
    through the run's frozen towers, cached like the training's: ``{"image": [n, f] or None, ...}``."""
    towers = {"image": model.image_tower, "text": model.text_tower}
    requests = [
        FeatureRequest(m, towers[m], tower_description(data.cfg, m))
        for m, frozen in data.manifest.get("frozen", {}).items()
        if frozen
    ]
    if data.cfg.train.mode == "partial":  # the maps entering the trained blocks, cached like training's
        trunk = CachedTrunk(model.image_tower, data.cfg.train.partial_blocks)
        requests.append(FeatureRequest("image", trunk, tower_description(data.cfg, "image")))
    train = data.cfg.train
    cache = feature_cache_dir(train.cache_dir)
    feats = extract_all(dataset, requests, cache, train.feature_batch_size, progress=progress)
    return {"image": feats.get("image"), "text": feats.get("text")}


@dataclass
class ZeroShot:
    """A dual encoder's own embeddings of a run's dataset, before any hashing or training.

    Attributes:
        features: ``{"image": [n, d], "text": [n, d]}`` for every item (its joined captions).
        text_tower: the pretrained text tower that gives them (to embed typed words alike).
    """

    features: dict[str, torch.Tensor]
    text_tower: Any


def zero_shot_features(data: RunData, model: TwoTowerHasher,
                       feats: dict[str, torch.Tensor | None]) -> ZeroShot | None:  # fmt: skip
    """The pretrained embeddings of a run whose towers are the two halves of one dual encoder
    (``clip:``): its cached frozen features, or, for a tower that was trained, those of the
    pretrained tower loaded again (cached like a frozen tower's). None for other towers.
    """
    towers = {"image": model.image_tower, "text": model.text_tower}
    if not all(getattr(t, "zero_shot", False) for t in towers.values()):
        return None
    if towers["image"].feature_dim != towers["text"].feature_dim:
        return None
    out = {m: feats.get(m) for m in MODALITIES}
    m_cfg = data.cfg.model
    if out["text"] is None:
        towers["text"] = create_text_tower(m_cfg.text_tower, pretrained=True, **dict(m_cfg.text_options))
    if out["image"] is None:
        towers["image"] = create_image_tower(m_cfg.image_tower, pretrained=True, image_size=m_cfg.image_size)
    requests = []
    for m in [m for m in MODALITIES if out[m] is None]:
        desc = {k: v for k, v in tower_description(data.cfg, m).items() if k != "trunk"}
        towers[m].set_trainable(0)
        requests.append(FeatureRequest(m, towers[m], desc))
    train = data.cfg.train
    cache = feature_cache_dir(train.cache_dir)
    out.update(extract_all(data.dataset, requests, cache, train.feature_batch_size, progress=False))
    return ZeroShot({m: out[m] for m in MODALITIES}, towers["text"].eval())


@torch.no_grad()
def encode_items(
    model: TwoTowerHasher,
    dataset: CrossModalDataset | None,
    indices: np.ndarray,
    modality: str,
    features: torch.Tensor | None = None,
    texts: list[str] | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(positions, continuous codes [b, bits])`` chunk by chunk, so memory stays flat.

    ``features`` are cached tower features of the whole dataset (frozen towers). With
    ``texts``, those texts are encoded instead of the items (positions index ``texts``;
    ``dataset`` may then be None).
    """
    tower = model.image_tower if modality == "image" else model.text_tower
    source = ModalityInputs(modality, dataset, tower, features, None)
    enc = model.encode_image if modality == "image" else model.encode_text
    n = len(texts) if texts is not None else len(indices)
    for s in tqdm(range(0, n, batch_size), desc=f"encode {modality}", disable=not progress, leave=False):
        pos = np.arange(s, min(s + batch_size, n))
        if texts is not None:
            yield pos, enc(tower.tokenize([texts[int(p)] for p in pos]))
        else:
            x = source.batch(indices[pos], torch.device("cpu"))
            yield pos, enc(x, from_features=source.from_features)


def continuous_codes(
    model: TwoTowerHasher,
    dataset: CrossModalDataset,
    indices: np.ndarray,
    feats: dict[str, torch.Tensor | None],
) -> dict[str, np.ndarray]:
    """Continuous codes ``[len(indices), bits]`` of both modalities (one text per item)."""
    out = {}
    for m in MODALITIES:
        own = None
        if m == "text" and feats[m] is None:  # an unfrozen text tower encodes the joined captions
            own = [join_captions(c) for c in dataset.captions_of(indices)]
        parts = [
            c.numpy() for _, c in encode_items(model, dataset, indices, m, feats[m], own, progress=False)
        ]
        out[m] = np.concatenate(parts) if parts else np.zeros((0, model.bits), np.float32)
    return out


def encode_texts(model: TwoTowerHasher, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Binary codes ``int8 [len(texts), bits]`` of typed texts, as a search query encodes them."""
    parts = [
        sign(c.numpy())
        for _, c in encode_items(model, None, np.zeros(0, np.int64), "text", texts=texts,
                                 batch_size=batch_size, progress=False)
    ]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros((0, model.bits), np.int8)
