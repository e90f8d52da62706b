"""The trainer: DCMH's alternating updates for any registered objective.

Each epoch runs image-tower steps with the text codes G and binary codes B fixed, then
text-tower steps with F and B fixed, then the closed-form B step of the loss. The
buffers F and G of the whole training set live here and are passed to the loss
explicitly. The model is selected on a validation split carved out of the training set
(never the query set), with early stopping; checkpoints allow resuming.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from crossmodal.config import Config, settings_differences, training_settings
from crossmodal.data import CrossModalDataset
from crossmodal.features import FeatureRequest, ModalityInputs, extract_all, item_texts
from crossmodal.io import atomic_path, write_json_atomic
from crossmodal.losses import HashLoss, LossBatch, Similarity, create_loss
from crossmodal.models.hasher import TwoTowerHasher
from crossmodal.run import RunError

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")


@dataclass
class TrainState:
    """What a checkpoint restores: buffers, epoch counters and the best model so far."""

    epoch: int = 0
    best_epoch: int = -1
    best_score: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def frozen_towers(model: TwoTowerHasher, cfg: Config) -> dict[str, bool]:
    """Which towers are frozen and cached: pretrained towers in frozen mode."""
    frozen = cfg.train.mode == "frozen"
    return {
        "image": frozen and bool(getattr(model.image_tower, "pretrained", False)),
        "text": frozen and bool(getattr(model.text_tower, "pretrained", False)),
    }


def trainable_state(
    model: TwoTowerHasher, loss: HashLoss, frozen: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """Parameters and buffers to save: everything except frozen pretrained towers."""
    state = {}
    skip = tuple(f"{m}_tower." for m in MODALITIES if frozen[m])
    for key, value in model.state_dict().items():
        if not key.startswith(skip):
            state[f"model.{key}"] = value.detach().clone().contiguous()
    for key, value in loss.state_dict().items():
        state[f"loss.{key}"] = value.detach().clone().contiguous()
    return state


def load_trainable_state(
    model: TwoTowerHasher, loss: HashLoss | None, state: dict[str, torch.Tensor]
) -> None:
    model_state = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    bad_missing = [k for k in missing if not k.startswith(("image_tower.", "text_tower."))]
    if bad_missing or unexpected:
        raise ValueError(
            f"model weights do not match the model: missing {bad_missing}, unexpected {unexpected}"
        )
    if loss is not None:
        loss_state = {k[5:]: v for k, v in state.items() if k.startswith("loss.")}
        loss.load_state_dict(loss_state, strict=True)


class Trainer:
    """Trains a ``TwoTowerHasher`` with a registered loss on a dataset's train split."""

    def __init__(
        self,
        cfg: Config,
        model: TwoTowerHasher,
        dataset: CrossModalDataset,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        run_dir: Path | None = None,
    ) -> None:
        self.cfg, self.model, self.dataset = cfg, model, dataset
        self.train_idx, self.val_idx = np.asarray(train_idx), np.asarray(val_idx)
        self.run_dir = run_dir
        self.device = resolve_device(cfg.train.device)
        self.loss = create_loss(cfg.loss.name, **cfg.loss.params)
        self.model.activation = self.loss.activation
        self.frozen = frozen_towers(model, cfg)
        labels = dataset.labels_matrix()
        lab = torch.from_numpy(labels[self.train_idx].astype(np.float32)) if labels.shape[1] else None
        self.sim = Similarity(lab.to(self.device) if lab is not None else None, len(self.train_idx))
        self.inputs: dict[str, ModalityInputs] = {}
        self.state = TrainState()
        self.timings: dict[str, float] = {}  # seconds per phase: features (both towers), epochs

    # -- set-up -------------------------------------------------------------------------
    def prepare_inputs(self, progress: bool = True) -> None:
        cfg, model = self.cfg, self.model
        texts = item_texts(self.dataset)
        if getattr(model.text_tower, "needs_fit", False) and not self.dataset.info.bow_dim:
            model.text_tower.fit([texts[i] for i in self.train_idx])
        towers = {"image": model.image_tower, "text": model.text_tower}
        started = time.perf_counter()
        requests = []
        for m, tower in towers.items():
            if self.frozen[m]:
                tower.set_trainable(0)
                requests.append(FeatureRequest(m, tower, tower_description(cfg, m)))
            elif cfg.train.trainable_blocks is not None and getattr(tower, "pretrained", False):
                tower.set_trainable(cfg.train.trainable_blocks)
        cache, fbs = cfg.train.cache_dir, cfg.train.feature_batch_size
        cached = extract_all(self.dataset, requests, cache, fbs, self.device, True, progress)
        for m, tower in towers.items():
            feats, offsets = cached.get(m, (None, None))
            self.inputs[m] = ModalityInputs(
                m, self.dataset, tower, feats, texts if m == "text" else None, offsets
            )
        self.timings["features"] = round(time.perf_counter() - started, 3)

    def encode(self, m: str, indices: np.ndarray, rng: np.random.Generator | None = None) -> torch.Tensor:
        x = self.inputs[m].batch(indices, self.device, rng)
        enc = self.model.encode_image if m == "image" else self.model.encode_text
        return enc(x, from_features=self.inputs[m].from_features)

    @torch.no_grad()
    def encode_all(self, m: str, indices: np.ndarray, batch: int = 256) -> torch.Tensor:
        self.model.eval()
        out = [self.encode(m, indices[s : s + batch]) for s in range(0, len(indices), batch)]
        return torch.cat(out) if out else torch.zeros(0, self.model.bits, device=self.device)

    def make_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in list(self.model.parameters()) + list(self.loss.parameters()) if p.requires_grad]
        t = self.cfg.train
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=0.9, weight_decay=t.weight_decay)
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)

    # -- the loop -------------------------------------------------------------------------
    def fit(self, resume: bool = False, progress: bool = True) -> TrainState:
        t = self.cfg.train
        torch.manual_seed(t.seed)
        self.model.to(self.device)
        self.loss.to(self.device)
        self.prepare_inputs(progress)
        n = len(self.train_idx)
        self.loss.prepare(n, self.model.bits, self.sim)  # may create the loss's own parameters
        self.loss.to(self.device)
        opt = self.make_optimizer()
        feats = {
            m: None if src.features is None else src.features[self.train_idx]
            for m, src in self.inputs.items()
        }
        if self.loss.init_heads(self.model, feats):
            self.state.best_state = trainable_state(self.model, self.loss, self.frozen)
            return self.state
        buffers = {m: self.encode_all(m, self.train_idx) for m in MODALITIES}
        B = self.loss.update_codes(buffers["image"], buffers["text"])
        if resume and self.run_dir is not None and (self.run_dir / "checkpoint").exists():
            buffers, B = self.load_checkpoint(opt)
            log.info("resumed from epoch %d", self.state.epoch)
        loop_started = time.perf_counter()
        bar = tqdm(range(self.state.epoch, t.epochs), desc="train", unit="epoch", disable=not progress)
        for epoch in bar:
            started = time.perf_counter()
            terms: dict[str, float] = {}
            for m in MODALITIES:
                other = "text" if m == "image" else "image"
                for name, value in self.run_modality(m, epoch, opt, buffers, buffers[other], B).items():
                    terms[f"{m}/{name}"] = value
            B = self.loss.update_codes(buffers["image"], buffers["text"])
            record = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - started, 3), **terms}
            if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs:
                record.update(self.validate())
                self.maybe_keep_best(record)
            self.state.history.append(record)
            self.state.epoch = epoch + 1
            bar.set_postfix(
                loss=f"{sum(terms.values()):.4f}", val_map=f"{record.get('val_map', float('nan')):.3f}"
            )
            log.info("epoch %s", json.dumps(record))
            stop = epoch - self.state.best_epoch >= t.patience and self.state.best_epoch >= 0
            last = stop or epoch + 1 == t.epochs
            if self.run_dir is not None and ((epoch + 1) % t.checkpoint_every == 0 or last):
                self.save_checkpoint(opt, buffers, B)
            if stop:
                log.info("early stop at epoch %d (best %d)", epoch + 1, self.state.best_epoch + 1)
                break
        self.timings["epochs"] = round(time.perf_counter() - loop_started, 3)
        if self.state.best_state is not None:
            load_trainable_state(self.model, self.loss, self.state.best_state)
        return self.state

    def run_modality(
        self,
        m: str,
        epoch: int,
        opt: torch.optim.Optimizer,
        buffers: dict[str, torch.Tensor],
        other: torch.Tensor,
        B: torch.Tensor,
    ) -> dict[str, float]:
        """One pass of steps on tower ``m`` with the other modality's codes and B fixed."""
        self.model.train()
        rng = np.random.default_rng([self.cfg.train.seed, epoch, MODALITIES.index(m)])
        order = rng.permutation(len(self.train_idx))
        sums: dict[str, float] = {}
        bs = self.cfg.train.batch_size
        for s in range(0, len(order), bs):
            pos = torch.as_tensor(order[s : s + bs], device=self.device)
            codes = self.encode(
                m, self.train_idx[pos.cpu().numpy()], rng if self.cfg.train.text_variants else None
            )
            batch = LossBatch(m, codes, pos, buffers[m], other, B, self.sim)
            terms = self.loss(batch)
            total = sum(terms.values())
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            buffers[m][pos] = codes.detach()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(pos) / len(order)
        return sums

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """mAP of the validation items (queries) against the rest of the training set."""
        from crossmodal.evaluate import evaluate_directions

        if len(self.val_idx) == 0:
            return {}
        # captions-only data: relevance is "same item", so the validation items are their own database
        db = self.val_idx if self.sim.labels is None else self.train_idx
        codes = {
            f"{w}_{m}": self.encode_all(m, idx).cpu().numpy()
            for w, idx in (("query", self.val_idx), ("db", db))
            for m in MODALITIES
        }
        codes = {k: np.where(v >= 0, 1, -1).astype(np.int8) for k, v in codes.items()}
        weights = self.loss.bit_weights()
        res = evaluate_directions(
            **codes_for_eval(codes, self.dataset, self.val_idx, db),
            directions=("i2t", "t2i"),
            ks=(),
            tie_aware=False,  # selection needs one number per epoch: the stable mAP
            pr_radius=False,
            bit_weights=None if weights is None else weights.detach().cpu().numpy(),
        )
        out = {f"val_map_{d}": float(v["map"]) for d, v in res.items()}
        out["val_map"] = float(np.mean(list(out.values())))
        return out

    def maybe_keep_best(self, record: dict[str, Any]) -> None:
        score = record.get("val_map", -1.0)
        if score > self.state.best_score:
            self.state.best_score, self.state.best_epoch = score, self.state.epoch
            self.state.best_state = trainable_state(self.model, self.loss, self.frozen)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(
        self, opt: torch.optim.Optimizer, buffers: dict[str, torch.Tensor], B: torch.Tensor
    ) -> None:
        ck = self.run_dir / "checkpoint"
        tensors = {f"cur.{k}": v for k, v in trainable_state(self.model, self.loss, self.frozen).items()}
        if self.state.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in self.state.best_state.items()})
        tensors.update(
            {"buf.image": buffers["image"].cpu(), "buf.text": buffers["text"].cpu(), "buf.B": B.cpu()}
        )
        opt_state = opt.state_dict()
        for pid, st in opt_state["state"].items():
            for name, v in st.items():
                tensors[f"opt.{pid}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        # the epoch goes into both files: a crash between the two writes is detected on resume
        with atomic_path(ck / "state.safetensors") as tmp:
            tensors = {k: v.contiguous() for k, v in tensors.items()}
            save_file(tensors, str(tmp), metadata={"epoch": str(self.state.epoch)})
        meta = {
            "settings": training_settings(self.cfg),
            "epoch": self.state.epoch,
            "best_epoch": self.state.best_epoch,
            "best_score": self.state.best_score,
            "history": self.state.history,
            "param_groups": opt_state["param_groups"],
        }
        write_json_atomic(ck / "state.json", meta)

    def load_checkpoint(self, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        ck = self.run_dir / "checkpoint"
        meta = checkpoint_state(self.run_dir)
        if meta is None:
            raise RunError(
                f"cannot resume from {ck}: it is missing, unreadable or incomplete (its two files are "
                "from different epochs); remove that folder to train from scratch"
            )
        # a longer (or shorter) training of the same recipe may resume; anything else may not
        ignored = {"train.epochs", "train.patience"}
        differ = [k for k in checkpoint_differences(meta, self.cfg) if k not in ignored]
        if differ:
            raise RunError(
                f"cannot resume from {ck}: it was written by another recipe (differs in "
                f"{', '.join(differ)}); remove that folder to train from scratch"
            )
        try:
            tensors = load_file(str(ck / "state.safetensors"), device=str(self.device))
            load_trainable_state(
                self.model, self.loss, {k[4:]: v for k, v in tensors.items() if k.startswith("cur.")}
            )
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            hint = "remove that folder to train from scratch"
            raise RunError(f"cannot resume from {ck}: {exc}; {hint}") from None
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        self.state = TrainState(
            meta["epoch"], meta["best_epoch"], meta["best_score"], meta["history"], best or None
        )
        opt_state: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = v
        opt.load_state_dict(opt_state)
        return {"image": tensors["buf.image"], "text": tensors["buf.text"]}, tensors["buf.B"]


def checkpoint_state(run_dir: Path) -> dict[str, Any] | None:
    """The metadata of ``run_dir``'s checkpoint if it is whole (both files of one epoch), else None."""
    from safetensors import safe_open

    ck = Path(run_dir) / "checkpoint"
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


def codes_for_eval(
    codes: dict[str, np.ndarray], dataset: CrossModalDataset, q_idx: np.ndarray, db_idx: np.ndarray
) -> dict[str, Any]:
    """Arguments for ``evaluate_directions``: codes plus labels (or item keys when no labels)."""
    labels = dataset.labels_matrix()
    out: dict[str, Any] = dict(codes)
    if labels.shape[1]:
        out.update(query_labels=labels[q_idx], db_labels=labels[db_idx])
    else:
        out.update(query_keys=np.asarray(q_idx), db_keys=np.asarray(db_idx))
    return out


def tower_description(cfg: Config, modality: str) -> dict[str, Any]:
    m = cfg.model
    if modality == "image":
        return {
            "name": m.image_tower,
            "size": m.image_size,
            "weights": m.image_weights,
            "pretrained": m.pretrained,
        }
    return {"name": m.text_tower, "options": m.text_options, "pretrained": m.pretrained}


def save_model(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
