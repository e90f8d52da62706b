"""The train job: a recipe into a run folder, around the library's ``fit``.

It opens the dataset, makes and saves the splits, fits a text vocabulary when the text
tower has one, extracts (or reuses) the cached features of frozen towers, calls
``crossmodal.fit.fit``, checkpoints every ``train.checkpoint_every`` epochs so that
``--resume`` can continue, and finally writes the model and the manifest in one
``RunUpdate``.

Under ``torchrun`` (``torchrun --nproc_per_node=N -m crossmodal train ...``) every process
runs this job in one process group (``crossmodal.distributed``): rank 0 builds the dataset
and the feature cache first and the others then read them, all train together
(``train.batch_size`` is the global batch), and only rank 0 holds the run's lock and writes
the run folder, the checkpoints and the logs.

``train.mode: zeroshot`` trains nothing: the two frozen towers of one dual encoder (``clip:``)
already share an embedding space, and the linear heads are set to ITQ on the database
items' image embeddings (``baselines.shared_itq``), text inputs centred by the text mean.
Such a run needs no labels and no captions: a folder of images is enough.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from crossmodal import distributed
from crossmodal.baselines import Baseline, shared_itq
from crossmodal.config import Config, settings_differences, training_settings
from crossmodal.data import DATASETS, CrossModalDataset, open_dataset
from crossmodal.data.splits import make_splits
from crossmodal.features import (
    FeatureRequest,
    ModalityInputs,
    extract_all,
    item_texts,
    label_name_inputs,
    tower_description,
)
from crossmodal.fit import (
    MODALITIES,
    FitOptions,
    Progress,
    ResumeError,
    TrainData,
    TrainState,
    fit,
    frozen_towers,
    resolve_device,
    trainable_state,
    validate,
)
from crossmodal.io import atomic_path, feature_cache_dir, write_json_atomic
from crossmodal.losses import LOSSES, create_loss, list_losses
from crossmodal.models.clip import NEUTRAL_TEXTS
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.models.image import IMAGE_TOWERS, CachedTrunk
from crossmodal.models.text import TEXT_TOWERS
from crossmodal.runs.folder import RunError, RunUpdate, invalidate_products, lock_run
from crossmodal.runs.model import build_model, model_spec, save_model

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"


def check_names(cfg: Config) -> None:
    """Fail before any work when the config names an unknown dataset, tower or loss."""
    list_losses()
    DATASETS.get(cfg.data.name)
    IMAGE_TOWERS.get(cfg.model.image_tower)
    if not cfg.model.text_tower.startswith("hf:"):
        TEXT_TOWERS.get(cfg.model.text_tower)
    LOSSES.get(cfg.loss.name)


def train_run(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the recipe ``cfg`` into ``cfg.run_dir`` and return the run folder.

    Raises:
        UnknownNameError: the recipe names an unknown dataset, tower or loss (before any work).
        RunError: ``resume`` with a checkpoint that is torn or from another recipe.
        RunBusyError: another process is writing the run.
        ValueError: ``train.mode: zeroshot`` under ``torchrun`` (it trains nothing).
    """
    check_names(cfg)
    run = cfg.run_dir
    command = (f"crossmodal train --config {run / 'config.yaml'} --set runs_dir={run.parent} "
               f"--set name={run.name}{' --resume' if resume else ''}")
    with distributed.session(resolve_device(cfg.train.device)) as dist:
        if dist.enabled and cfg.train.mode == "zeroshot":
            raise ValueError("train.mode zeroshot trains nothing: run it without torchrun")
        if not dist.is_main:  # rank 0 holds the lock and writes; the others train alongside
            return _train_run(cfg, resume, False, dist)
        with lock_run(run, command, create=True):
            return _train_run(cfg, resume, progress, dist)


def _train_run(cfg: Config, resume: bool, progress: bool, dist: distributed.Dist) -> Path:
    run_dir = cfg.run_dir
    if dist.is_main:
        _start_folder(run_dir, resume)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    started = time.perf_counter()
    with distributed.main_first(dist):  # a dataset built on first use is built once
        dataset = open_dataset(cfg.data.name, cfg.data.options)
    d = cfg.data
    splits = make_splits(dataset, n_query=d.n_query, n_train=d.n_train, seed=d.seed, n_val=d.n_val)
    if dist.is_main:
        splits.save(run_dir / "splits.json")
        cfg.dump(run_dir / "config.yaml")
    model = build_model(cfg, dataset.info)
    if cfg.train.mode == "zeroshot":
        return _zeroshot_run(cfg, model, dataset, splits, started, progress)
    loss = create_loss(cfg.loss.name, **cfg.loss.params)
    frozen = frozen_towers(model, cfg.train.mode in ("frozen", "partial"))
    if cfg.train.mode == "partial":  # its last blocks train (on cached maps): saved with the run
        frozen["image"] = False
    options = FitOptions.from_config(cfg.train, cfg.loss)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    data = _train_data(cfg, model, dataset, splits, frozen, options.device, progress, dist)
    timings["features"] = round(time.perf_counter() - t0, 3)
    checkpoints = Checkpoints(run_dir, cfg, model, loss, frozen)
    t0 = time.perf_counter()
    saved = checkpoints.load(options.device) if resume else None
    if resume and saved is None and dist.is_main:
        log.warning("--resume: %s has no checkpoint (one is written every %d epochs), so training "
                    "starts at epoch 1", run_dir, cfg.train.checkpoint_every)  # fmt: skip
    try:
        state = fit(model, loss, data, options, resume=saved,
                    on_epoch=checkpoints.on_epoch if dist.is_main else None, frozen=frozen,
                    progress=progress, reseed=False, dist=dist)  # fmt: skip
    except ResumeError as exc:
        hint = "remove that folder to train from scratch"
        raise RunError(f"cannot resume from {checkpoints.dir}: {exc}; {hint}") from None
    timings["epochs"] = round(time.perf_counter() - t0, 3)
    seconds = time.perf_counter() - started
    if not dist.is_main:
        return run_dir
    train_log = {"history": state.history, "best_epoch": state.best_epoch + 1,
                 "best_val_map": state.best_score, "seconds": seconds, "timings": timings}  # fmt: skip
    if dist.enabled:
        train_log["processes"] = dist.world_size
    save_run(cfg, model, dataset, frozen, train_log, cfg.loss.name)
    if not cfg.train.keep_checkpoint:  # the run is whole without it (a third of a run's size)
        shutil.rmtree(checkpoints.dir, ignore_errors=True)
    log.info("trained %s in %.1f s; best validation mAP %.4f", run_dir, seconds, state.best_score)
    return run_dir


def _start_folder(run_dir: Path, resume: bool) -> None:
    """Create the run folder, or drop what a new model makes stale (its indexes, evaluation)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    invalidate_products(run_dir, model=True)
    if not resume and (run_dir / CHECKPOINT).is_dir():  # another training's: never resumed by mistake
        shutil.rmtree(run_dir / CHECKPOINT)


def _train_data(cfg: Config, model: TwoTowerHasher, dataset: CrossModalDataset, splits: Any,
                frozen: dict[str, bool], device: str, progress: bool,
                dist: distributed.Dist) -> TrainData:  # fmt: skip
    """What ``fit`` trains on: the towers' inputs (frozen ones' features cached, by rank 0
    first under ``torchrun``), labels, validation items and the label names' texts."""
    # one seeded stream from here: a vocabulary tower creates its first layer when it is fitted
    torch.manual_seed(cfg.train.seed)
    with distributed.main_first(dist):  # frozen towers' features: extracted and cached once
        inputs = prepare_inputs(cfg, model, dataset, splits.train, frozen, device, progress)
    data = TrainData(inputs, splits.train, dataset.labels_matrix(), splits.val)
    if cfg.loss.label_names:
        names = label_name_inputs(dataset, model.text_tower, frozen["text"], torch.device(device))
        if names is None:
            log.warning("loss.label_names is set but %s has no named labels a text tower can read; "
                        "the term is off", dataset.name)  # fmt: skip
        else:
            data.names, data.name_columns = names
    return data


def save_run(cfg: Config, model: TwoTowerHasher, dataset: CrossModalDataset, frozen: dict[str, bool],
             train_log: dict[str, Any], method: str) -> None:  # fmt: skip
    """Write the trained model, ``train_log.json`` and the manifest into ``cfg.run_dir`` in one update."""
    seconds, best = train_log["seconds"], train_log["best_val_map"]
    with RunUpdate(cfg.run_dir) as update:
        save_model(update, model, model_spec(cfg, dataset.info), frozen)
        write_json_atomic(update.path("train_log.json"), train_log)
        update.adopt("config.yaml", "splits.json")
        update.commit(
            bits=model.bits, image_tower=cfg.model.image_tower, text_tower=cfg.model.text_tower,
            loss=method, train_seconds=round(seconds, 2), best_val_map=best, frozen=frozen,
            dataset={"name": dataset.name, "fingerprint": dataset.fingerprint(), "items": len(dataset)},
            dataset_info={k: v for k, v in dataset.info.__dict__.items() if k not in ("stats",)},
        )  # fmt: skip


ZEROSHOT_METHOD = "zeroshot-itq"


def _zeroshot_run(cfg: Config, model: TwoTowerHasher, dataset: CrossModalDataset, splits: Any,
                  started: float, progress: bool) -> Path:  # fmt: skip
    """``train.mode: zeroshot``: frozen towers of one dual encoder, heads set to ITQ; nothing trains."""
    check_shared_space(model)
    frozen = {m: True for m in MODALITIES}
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    inputs = prepare_inputs(cfg, model, dataset, splits.train, frozen, str(device), progress)
    feats = {m: inputs[m].item_features for m in MODALITIES}
    timings = {"features": round(time.perf_counter() - t0, 3)}
    t0 = time.perf_counter()
    db = np.asarray(splits.database)
    texts, source = zeroshot_texts(model, dataset, db, feats["text"], device)
    base = shared_itq(feats["image"][torch.as_tensor(db)].numpy(), texts, model.bits, seed=cfg.train.seed)
    set_linear_heads(model, base)
    timings["itq"] = round(time.perf_counter() - t0, 3)
    data = TrainData(inputs, splits.train, dataset.labels_matrix(), splits.val)
    captioned = bool(len(splits.val)) and all(len(c) for c in dataset.captions_of(splits.val))
    score = validate(model, _NoBitWeights(), data, device) if captioned else {}
    train_log = {"method": ZEROSHOT_METHOD, "history": [], "best_epoch": 0,
                 "best_val_map": score.get("val_map", -1.0), "validation": score,
                 "seconds": time.perf_counter() - started, "timings": timings,
                 "itq": {**base.info, "database_items": int(len(db)), "text_mean_from": source}}  # fmt: skip
    save_run(cfg, model.cpu(), dataset, frozen, train_log, ZEROSHOT_METHOD)
    log.info("zero-shot run %s: ITQ on %d database images, text mean from %s", cfg.run_dir, len(db), source)
    return cfg.run_dir


class _NoBitWeights:
    """What ``validate`` asks of a loss, for a model that had none: plain Hamming ranking."""

    def bit_weights(self) -> None:
        return None


def check_shared_space(model: TwoTowerHasher) -> None:
    """Refuse towers whose outputs are not one embedding space (``train.mode: zeroshot`` needs them).

    Raises:
        ValueError: a tower is not the half of a dual encoder, or their sizes differ.
    """
    towers = {"image": model.image_tower, "text": model.text_tower}
    odd = [m for m, t in towers.items() if not getattr(t, "zero_shot", False) or not t.pretrained]
    if odd or model.image_tower.feature_dim != model.text_tower.feature_dim:
        raise ValueError(
            "train.mode zeroshot needs the pretrained image and text towers of one dual encoder, whose "
            "embeddings share one space: model.image_tower and model.text_tower both clip:<model> with the "
            f"same model (got {', '.join(type(t).__name__ for t in towers.values())}, "
            f"{model.image_tower.feature_dim} and {model.text_tower.feature_dim} dims)"
        )
    if not isinstance(model.image_head, nn.Linear) or not isinstance(model.text_head, nn.Linear):
        raise ValueError("train.mode zeroshot sets linear hash heads (model.head: linear)")


@torch.no_grad()
def zeroshot_texts(model: TwoTowerHasher, dataset: CrossModalDataset, db: np.ndarray,
                   text_feats: torch.Tensor | None, device: torch.device) -> tuple[np.ndarray, str]:
    """Text embeddings whose mean centres text queries, and where they come from: the captions
    of the database items that have one, else ``NEUTRAL_TEXTS`` (a folder of images alone)."""
    has = np.array([bool(c) for c in dataset.captions_of(db)], dtype=bool)
    if text_feats is not None and has.any():
        return text_feats[torch.as_tensor(db[has])].numpy(), f"captions of {int(has.sum())} database items"
    tower = model.text_tower.eval().to(device)
    batch = {k: v.to(device) for k, v in tower.tokenize(list(NEUTRAL_TEXTS)).items()}
    return tower(**batch).float().cpu().numpy(), f"{len(NEUTRAL_TEXTS)} neutral texts (no captions)"


def set_linear_heads(model: TwoTowerHasher, base: Baseline) -> None:
    """Make the heads compute ``(x - mean) @ proj`` of ``base``, per modality."""
    for head, mean, proj in ((model.image_head, base.mean_image, base.proj_image),
                             (model.text_head, base.mean_text, base.proj_text)):  # fmt: skip
        w = torch.from_numpy(np.ascontiguousarray(proj))  # [f, bits]
        with torch.no_grad():
            head.weight.copy_(w.T.to(head.weight))
            head.bias.copy_((-torch.from_numpy(np.asarray(mean)) @ w).to(head.bias))
    model.activation = "identity"


def prepare_inputs(
    cfg: Config,
    model: TwoTowerHasher,
    dataset: CrossModalDataset,
    train_idx: Any,
    frozen: dict[str, bool],
    device: str,
    progress: bool = True,
) -> dict[str, ModalityInputs]:
    """Fit the text vocabulary (if any) and cache the frozen towers' features; inputs per modality."""
    texts = item_texts(dataset)
    if getattr(model.text_tower, "needs_fit", False) and not dataset.info.bow_dim:
        model.text_tower.fit([texts[i] for i in train_idx])
    towers = {"image": model.image_tower, "text": model.text_tower}
    requests = []
    for m, tower in towers.items():
        if m == "image" and cfg.train.mode == "partial":
            k = cfg.train.partial_blocks
            tower.set_trainable(k)
            desc = tower_description(cfg, m, training=True)
            requests.append(FeatureRequest(m, CachedTrunk(tower, k), desc))
        elif frozen[m]:
            tower.set_trainable(0)
            requests.append(FeatureRequest(m, tower, tower_description(cfg, m, training=True)))
        elif cfg.train.trainable_blocks is not None and getattr(tower, "pretrained", False):
            tower.set_trainable(cfg.train.trainable_blocks)
    cache, fbs = feature_cache_dir(cfg.train.cache_dir), cfg.train.feature_batch_size
    cached = extract_all(dataset, requests, cache, fbs, torch.device(device), True, progress)
    out = {}
    for m, tower in towers.items():
        feats, offsets = cached.get(m, (None, None))
        out[m] = ModalityInputs(m, dataset, tower, feats, texts if m == "text" else None, offsets)
    return out


class Checkpoints:
    """``<run>/checkpoint/``: the loop's state every ``train.checkpoint_every`` epochs and at the last.

    Two files: ``state.safetensors`` (current and best weights, the F, G and B buffers,
    the optimiser's tensors) and ``state.json`` (the recipe's settings, counters, history).
    The epoch is written into both, so a crash between the two writes is detected on resume.
    """

    def __init__(self, run_dir: Path, cfg: Config, model: TwoTowerHasher, loss: Any,
                 frozen: dict[str, bool]) -> None:  # fmt: skip
        self.dir, self.cfg = run_dir / CHECKPOINT, cfg
        self.model, self.loss, self.frozen = model, loss, frozen

    def on_epoch(self, p: Progress) -> None:
        if p.state.epoch % self.cfg.train.checkpoint_every == 0 or p.last:
            self.save(p)

    def save(self, p: Progress) -> None:
        state = p.state
        tensors = {f"cur.{k}": v for k, v in trainable_state(self.model, self.loss, self.frozen).items()}
        if state.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in state.best_state.items()})
        tensors.update({f"buf.{m}": p.buffers[m].cpu() for m in MODALITIES})
        tensors["buf.B"] = p.B.cpu()
        opt_state = p.optimizer.state_dict()
        for pid, st in opt_state["state"].items():
            for name, v in st.items():
                tensors[f"opt.{pid}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        with atomic_path(self.dir / "state.safetensors") as tmp:
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            save_file(tensors, str(tmp), metadata={"epoch": str(state.epoch)})
        meta = {"settings": training_settings(self.cfg), "epoch": state.epoch, "best_epoch": state.best_epoch,
                "best_score": state.best_score, "history": state.history,
                "param_groups": opt_state["param_groups"]}  # fmt: skip
        write_json_atomic(self.dir / "state.json", meta)

    def load(self, device: str) -> Progress | None:
        """The saved progress, or None when there is no checkpoint.

        Raises:
            RunError: the checkpoint is torn, unreadable or written by another recipe.
        """
        if not self.dir.exists():
            return None
        meta = checkpoint_state(self.dir.parent)
        hint = "remove that folder to train from scratch"
        if meta is None:
            raise RunError(f"cannot resume from {self.dir}: it is missing, unreadable or incomplete "
                           f"(its two files are from different epochs); {hint}")  # fmt: skip
        # a longer (or shorter) training of the same recipe may resume; anything else may not
        resumable = {"train.epochs", "train.patience"}
        differ = [k for k in checkpoint_differences(meta, self.cfg) if k not in resumable]
        if differ:
            raise RunError(f"cannot resume from {self.dir}: it was written by another recipe (differs in "
                           f"{', '.join(differ)}); {hint}")  # fmt: skip
        try:
            tensors = load_file(str(self.dir / "state.safetensors"), device=str(resolve_device(device)))
        except (OSError, SafetensorError) as exc:
            raise RunError(f"cannot resume from {self.dir}: {exc}; {hint}") from None
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        state = TrainState(
            meta["epoch"], meta["best_epoch"], meta["best_score"], meta["history"], best or None
        )
        opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = v
        buffers = {m: tensors[f"buf.{m}"] for m in MODALITIES}
        current = {k[4:]: v for k, v in tensors.items() if k.startswith("cur.")}
        return Progress(
            state, None, buffers, tensors["buf.B"], model_state=current, optimizer_state=opt_state
        )


def checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """The metadata of ``run_dir``'s checkpoint if it is whole (both files of one epoch), else None."""
    ck = Path(run_dir) / CHECKPOINT
    try:
        meta = json.loads((ck / "state.json").read_text(encoding="utf-8"))
        with safe_open(str(ck / "state.safetensors"), framework="pt") as fh:
            epoch = (fh.metadata() or {}).get("epoch")
    except (OSError, ValueError, SafetensorError):
        return None
    return meta if isinstance(meta, dict) and epoch == str(meta.get("epoch")) else None


def checkpoint_differences(meta: dict[str, Any], cfg: Config) -> list[str]:
    """Settings in which the recipe that wrote a checkpoint differs from ``cfg`` (all if unknown)."""
    saved = meta.get("settings")
    if not isinstance(saved, dict):
        return ["(a checkpoint without its recipe)"]
    return settings_differences(saved, training_settings(cfg))
