"""Composing the library into the jobs the CLI runs: open data, build models, train a run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from crossmodal.config import Config
from crossmodal.data import CrossModalDataset, DatasetInfo, create_dataset
from crossmodal.io import write_json_atomic, write_text_atomic
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.run import RunError, check_run, invalidate_products, load_run_config, update_manifest

log = logging.getLogger(__name__)

# Builders that keep their own on-disk cache; the others are cached here after a first build.
SELF_CACHING = {"openmoji"}


def data_dir() -> Path:
    return Path(os.environ.get("CROSSMODAL_DATA_DIR", "data/built"))


def open_dataset(name: str, options: dict[str, Any] | None = None) -> CrossModalDataset:
    """Create dataset ``name``; builds of file-backed datasets are cached under ``data/built``.

    The cache key holds the options and the modification time of ``root``, so a dataset
    whose files changed is rebuilt; ``force=True`` rebuilds regardless.
    """
    options = dict(options or {})
    if name in SELF_CACHING:
        return create_dataset(name, **options)
    force = bool(options.pop("force", False))
    root = options.get("root")
    stamp = os.stat(root).st_mtime_ns if root and os.path.exists(root) else None
    blob = json.dumps({"name": name, "stamp": stamp, **options}, sort_keys=True, default=str)
    path = data_dir() / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if (path / "info.json").exists() and not force:
        return CrossModalDataset.load(path)
    dataset = create_dataset(name, **options)
    dataset.save(path)
    return CrossModalDataset.load(path)


def check_names(cfg: Config) -> None:
    """Fail before any work when the config names an unknown dataset, tower or loss."""
    from crossmodal.data import DATASETS
    from crossmodal.losses import LOSSES, list_losses
    from crossmodal.models.image import IMAGE_TOWERS
    from crossmodal.models.text import TEXT_TOWERS

    list_losses()
    DATASETS.get(cfg.data.name)
    IMAGE_TOWERS.get(cfg.model.image_tower)
    if not cfg.model.text_tower.startswith("hf:"):
        TEXT_TOWERS.get(cfg.model.text_tower)
    LOSSES.get(cfg.loss.name)


def build_model(
    cfg: Config, info: DatasetInfo | None = None, pretrained: bool | None = None
) -> TwoTowerHasher:
    """The towers and heads a config names (weights of pretrained towers included)."""
    from crossmodal.models.image import create_image_tower
    from crossmodal.models.text import create_text_tower

    m = cfg.model
    pre = m.pretrained if pretrained is None else pretrained
    image = create_image_tower(
        m.image_tower, pretrained=pre, weights=m.image_weights, image_size=m.image_size
    )
    text_options = dict(m.text_options)
    if info is not None and info.bow_dim and m.text_tower == "bow_mlp":
        text_options.setdefault("vocab_size", info.bow_dim)
    text = create_text_tower(m.text_tower, pretrained=pre, **text_options)
    return TwoTowerHasher(image, text, m.bits, head=m.head, head_hidden=m.head_hidden)


def load_model(run_dir: str | os.PathLike[str], cfg: Config | None = None) -> tuple[TwoTowerHasher, Any]:
    """Rebuild the trained model (and its loss, for bit weights) of a run folder."""
    from crossmodal.losses import Similarity, create_loss
    from crossmodal.train import load_trainable_state

    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    manifest = check_run(run_dir, need=("model.safetensors",))
    info = DatasetInfo(**manifest["dataset_info"]) if "dataset_info" in manifest else None
    model = build_model(cfg, info)
    try:
        extra = {
            name: (run_dir / name).read_text(encoding="utf-8") for name in manifest.get("tower_files", [])
        }
        if extra:
            model.text_tower.load_extra_state(extra)
    except (OSError, ValueError) as exc:  # a missing, binary or malformed vocab.json
        raise RunError(
            f"{run_dir}: cannot read the text tower's files {manifest.get('tower_files')}: {exc}"
        ) from None
    loss = create_loss(cfg.loss.name, **cfg.loss.params)
    try:  # safetensors holds tensors only: nothing in the file can run code
        state = load_file(str(run_dir / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise RunError(
            f"{run_dir}/model.safetensors is not a valid safetensors file ({exc}); re-run crossmodal train"
        ) from None
    try:
        n_labels = len(info.label_names) if info is not None and info.relevance == "labels" else 0
        loss.prepare(1, model.bits, Similarity(torch.zeros(1, n_labels) if n_labels else None, 1))
        load_trainable_state(model, loss, state)
    except (ValueError, RuntimeError) as exc:
        raise RunError(f"{run_dir}/model.safetensors does not fit the model in config.yaml: {exc}") from None
    model.activation = loss.activation
    model.eval()
    return model, loss


def train_run(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the recipe ``cfg`` into ``cfg.run_dir`` and return the run folder."""
    from crossmodal.data.splits import make_splits
    from crossmodal.train import Trainer, save_model, trainable_state

    check_names(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    invalidate_products(run_dir, model=True)
    if not resume and (run_dir / "checkpoint").is_dir():  # another training's: never resumed by mistake
        shutil.rmtree(run_dir / "checkpoint")
    torch.manual_seed(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    started = time.perf_counter()
    dataset = open_dataset(cfg.data.name, cfg.data.options)
    d = cfg.data
    splits = make_splits(dataset, n_query=d.n_query, n_train=d.n_train, seed=d.seed, n_val=d.n_val)
    splits.save(run_dir / "splits.json")
    cfg.dump(run_dir / "config.yaml")
    model = build_model(cfg, dataset.info)
    trainer = Trainer(cfg, model, dataset, splits.train, splits.val, run_dir)
    state = trainer.fit(resume=resume, progress=progress)
    seconds = time.perf_counter() - started
    files = ["config.yaml", "splits.json", "model.safetensors"]
    tower_files = []
    for name, text in model.text_tower.extra_state_files().items():
        write_text_atomic(run_dir / name, text)
        tower_files.append(name)
    files += tower_files
    save_model(
        run_dir / "model.safetensors",
        trainable_state(model, trainer.loss, trainer.frozen),
        {"bits": str(model.bits), "image_tower": cfg.model.image_tower, "text_tower": cfg.model.text_tower},
    )
    write_json_atomic(
        run_dir / "train_log.json",
        {
            "history": state.history,
            "best_epoch": state.best_epoch + 1,
            "best_val_map": state.best_score,
            "seconds": seconds,
            "timings": trainer.timings,
        },
    )
    update_manifest(
        run_dir,
        files + ["train_log.json"],
        bits=model.bits,
        image_tower=cfg.model.image_tower,
        text_tower=cfg.model.text_tower,
        loss=cfg.loss.name,
        dataset={"name": dataset.name, "fingerprint": dataset.fingerprint(), "items": len(dataset)},
        dataset_info={k: v for k, v in dataset.info.__dict__.items() if k not in ("stats",)},
        tower_files=tower_files,
        train_seconds=round(seconds, 2),
        best_val_map=state.best_score,
        frozen=trainer.frozen,
    )
    log.info("trained %s in %.1f s; best validation mAP %.4f", run_dir, seconds, state.best_score)
    return run_dir


def split_indices(run_dir: Path, dataset: CrossModalDataset) -> dict[str, np.ndarray]:
    from crossmodal.data.splits import Splits

    s = Splits.load(run_dir / "splits.json", dataset)
    return {"query": s.query, "database": s.database, "train": s.train, "val": s.val}
