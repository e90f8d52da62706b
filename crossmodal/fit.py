"""DCMH's alternating optimisation for any registered objective, as a library function.

``fit(model, loss, data, options)`` runs, each epoch, image-tower steps with the text
codes G and the binary codes B fixed, then text-tower steps with F and B fixed, then the
closed-form B step of the loss (Jiang & Li, "Deep Cross-Modal Hashing", CVPR 2017,
Algorithm 1). The buffers F and G of the whole training set live here and are passed to
the loss explicitly. With validation items, the model is selected on their mAP (never
on the query set), with early stopping. ``fit`` knows no run folder: the training job
adds checkpoints, resuming and saving around it through ``on_epoch`` and ``resume``.

When it returns, the model owns its inference: its output activation is the loss's and
its per-bit weights (for methods that learn them) are set.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from crossmodal import distributed
from crossmodal.codes import sign
from crossmodal.distributed import Dist
from crossmodal.evaluate import evaluate_directions, relevance_args
from crossmodal.features import duration
from crossmodal.losses import HashLoss, LossBatch, Similarity, pairwise_nll
from crossmodal.models.hasher import TwoTowerHasher

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")


class Inputs(Protocol):
    """What one modality feeds its tower, by item position.

    ``batch(positions, device, rng)`` gives the tower's (or, when ``from_features``, the
    head's) input; ``item_features`` is ``[n_items, f]`` cached features, or None.
    """

    from_features: bool
    item_features: torch.Tensor | None

    def batch(self, indices: np.ndarray, device: torch.device, rng: np.random.Generator | None = None) -> Any:
        ...


class TensorInputs:
    """Inputs held in one tensor (tower features ``[n, f]``, or raw images): rows by position."""

    def __init__(self, x: torch.Tensor, from_features: bool = True) -> None:
        self.x, self.from_features = x, from_features
        self.item_features = x if from_features else None

    def batch(self, indices: np.ndarray, device: torch.device, rng: np.random.Generator | None = None) -> Any:
        return self.x[torch.as_tensor(np.asarray(indices), dtype=torch.long)].to(device)


@dataclass
class TrainData:
    """What ``fit`` trains on.

    Attributes:
        inputs: ``{"image": Inputs, "text": Inputs}``, addressed by item position.
        train: ``[n]`` positions of the training items.
        labels: ``[n_items, L]`` multi-hot labels of every position (``L = 0``: relevance is
            "same item", as for captions-only data).
        val: positions of the validation items (none: no selection, the last epoch is kept).
        names: the text inputs of the label names, ``[len(name_columns)]`` rows (for the
            ``label_names`` term; None: off).
        name_columns: ``[k]`` the label columns whose names ``names`` holds, in its row order.
    """

    inputs: dict[str, Inputs]
    train: np.ndarray
    labels: np.ndarray
    val: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    names: Inputs | None = None
    name_columns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


@dataclass
class FitOptions:
    """The schedule: epochs, steps, optimiser, selection. See ``TrainConfig`` for meanings."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    patience: int = 8
    eval_every: int = 1
    seed: int = 0
    text_variants: bool = True
    device: str = "cpu"
    similarity: str = "binary"  # Similarity.mode: binary | cosine | jaccard
    contrastive: float = 0.0  # weight of the instance-level InfoNCE term (0: off)
    temperature: float = 0.1
    label_names: float = 0.0  # weight of the images <-> label-name texts likelihood term (0: off)
    decorrelation: float = 0.0  # weight of the bit decorrelation term (0: off)
    spread: float = 0.0  # weight of the term that keeps items' codes apart (0: off)
    spread_bits: float = 4.0  # the Hamming distance under which two items' codes are pushed apart

    @classmethod
    def from_config(cls, train: Any, loss: Any = None) -> FitOptions:
        """The options of a ``TrainConfig`` and ``LossConfig`` (``device: auto`` resolved)."""
        from_loss = ("similarity", "contrastive", "temperature", "label_names", "decorrelation", "spread",
                     "spread_bits")
        names = [f for f in cls.__dataclass_fields__ if f != "device" and f not in from_loss]
        extra = {f: getattr(loss, f) for f in from_loss} if loss is not None else {}
        return cls(**{f: getattr(train, f) for f in names}, **extra, device=str(resolve_device(train.device)))


@dataclass
class TrainState:
    """What a checkpoint restores: epoch counters, the history and the best model so far."""

    epoch: int = 0
    best_epoch: int = -1
    best_score: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_state: dict[str, torch.Tensor] | None = None


@dataclass
class Progress:
    """The state of the loop at the end of an epoch, as ``on_epoch`` sees it (and ``resume`` takes)."""

    state: TrainState
    optimizer: torch.optim.Optimizer | None
    buffers: dict[str, torch.Tensor]  # "image" -> F [n, bits], "text" -> G [n, bits]
    B: torch.Tensor  # [n, bits] in {-1, +1}
    last: bool = False
    model_state: dict[str, torch.Tensor] | None = None  # for resume: the current model and loss
    optimizer_state: dict[str, Any] | None = None  # for resume


class ResumeError(ValueError):
    """Saved progress that does not fit the model, loss or optimiser it is resumed into."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def trainable_state(
    model: TwoTowerHasher, loss: HashLoss, frozen: dict[str, bool]
) -> dict[str, torch.Tensor]:
    """Parameters and buffers that training changes (``model.*``, ``loss.*``), less frozen towers."""
    state = {}
    skip = tuple(f"{m}_tower." for m in MODALITIES if frozen.get(m))
    for key, value in model.state_dict().items():
        if not key.startswith(skip):
            state[f"model.{key}"] = value.detach().clone().contiguous()
    for key, value in loss.state_dict().items():
        state[f"loss.{key}"] = value.detach().clone().contiguous()
    return state


def load_trainable_state(model: TwoTowerHasher, loss: HashLoss, state: dict[str, torch.Tensor]) -> None:
    """Restore ``trainable_state``. Raises ``ValueError`` when it does not fit the model."""
    model.load_trained_state({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    loss.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("loss.")}, strict=True)


def frozen_towers(model: TwoTowerHasher, frozen_mode: bool) -> dict[str, bool]:
    """Which towers stay fixed (and have cached features): the pretrained ones, in frozen mode."""
    return {m: frozen_mode and bool(getattr(getattr(model, f"{m}_tower"), "pretrained", False))
            for m in MODALITIES}  # fmt: skip


def encode(model: TwoTowerHasher, inputs: Inputs, indices: np.ndarray, m: str, device: torch.device,
           rng: np.random.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Continuous codes ``[len(indices), bits]`` of modality ``m``."""
    x = inputs.batch(indices, device, rng)
    enc = model.encode_image if m == "image" else model.encode_text
    return enc(x, from_features=inputs.from_features)


@torch.no_grad()
def encode_all(model: TwoTowerHasher, inputs: Inputs, indices: np.ndarray, m: str, device: torch.device,
               batch: int = 256) -> torch.Tensor:  # fmt: skip
    """``encode`` in eval mode, in batches."""
    model.eval()
    out = [encode(model, inputs, indices[s : s + batch], m, device) for s in range(0, len(indices), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.bits, device=device)


def make_optimizer(model: TwoTowerHasher, loss: HashLoss, options: FitOptions) -> torch.optim.Optimizer:
    params = [p for p in list(model.parameters()) + list(loss.parameters()) if p.requires_grad]
    if options.optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.lr, momentum=0.9, weight_decay=options.weight_decay)
    return torch.optim.Adam(params, lr=options.lr, weight_decay=options.weight_decay)


def fit(
    model: TwoTowerHasher,
    loss: HashLoss,
    data: TrainData,
    options: FitOptions | None = None,
    *,
    resume: Progress | None = None,
    on_epoch: Callable[[Progress], None] | None = None,
    frozen: dict[str, bool] | None = None,
    progress: bool = False,
    reseed: bool = True,
    dist: Dist | None = None,
) -> TrainState:
    """Train ``model`` with ``loss`` on ``data``; return the state (history, best epoch and score).

    Args:
        resume: a ``Progress`` saved by ``on_epoch`` (with ``model_state`` and
            ``optimizer_state``): training continues after its epoch. ``ResumeError`` when
            it does not fit.
        on_epoch: called after every epoch (``last`` set on the final one), e.g. to checkpoint.
        frozen: towers whose weights ``trainable_state`` leaves out (frozen pretrained towers).
        progress: show a progress bar over epochs (rank 0 only).
        reseed: seed torch's generator with ``options.seed`` first; a caller that seeded it
            itself before building what ``data`` needs (a vocabulary, a new layer) passes False.
        dist: the ``torchrun`` process group (default: the current one, if any). Each rank
            trains on its share of every global batch of ``options.batch_size`` items in
            DistributedDataParallel; the F and G rows each step writes are shared with every
            rank, so all hold the whole buffers at each phase switch and at the B step;
            validation runs on rank 0 and its result is broadcast. ``on_epoch`` is called on
            every rank (the caller writes on rank 0 only).

    Returns:
        The final ``TrainState``; the model holds the best validated weights (the last
        epoch's without validation items) and the loss's activation and bit weights.
    """
    opts = options or FitOptions()
    dist = dist or distributed.current()
    device = torch.device(opts.device)
    frozen = frozen or {m: False for m in MODALITIES}
    if reseed:
        torch.manual_seed(opts.seed)
    model.activation = loss.activation
    model.to(device)
    loss.to(device)
    train = np.asarray(data.train)
    sim = _similarity(data.labels, train, device, opts.similarity)
    loss.prepare(len(train), model.bits, sim)  # may create the loss's own parameters
    loss.to(device=device, dtype=_dtype(model))
    opt = make_optimizer(model, loss, opts)
    feats = {m: None if src.item_features is None else src.item_features[torch.as_tensor(train)]
             for m, src in data.inputs.items()}  # fmt: skip
    if loss.init_heads(model, feats):  # training-free: the heads are final; validated once
        return _training_free(model, loss, data, device, frozen, dist)
    names = _NamePairs(data, sim, opts.label_names) if opts.label_names and data.names is not None else None
    step = _Step(model, loss, data.inputs, train, sim, opts, device, dist, names)
    nets = _phase_nets(step, dist)
    buffers = _initial_buffers(model, data, train, device, dist)
    B = loss.update_codes(buffers["image"], buffers["text"])
    state = TrainState()
    if resume is not None:
        state, buffers, B = _restore(model, loss, opt, resume, device)
        log.info("resumed from epoch %d", state.epoch)
    _Loop(model, loss, data, opts, device, frozen, dist, progress).run(nets, opt, state, buffers, B, on_epoch)
    if state.best_state is not None:
        load_trainable_state(model, loss, state.best_state)
    model.set_bit_weights(None if loss.bit_weights() is None else loss.bit_weights().detach().cpu())
    return state


class _Loop:
    """The epochs: both towers' phases, the B step, validation and early stopping."""

    def __init__(self, model, loss, data, opts, device, frozen, dist, progress) -> None:  # noqa: ANN001
        self.model, self.loss, self.data, self.opts, self.device = model, loss, data, opts, device
        self.frozen, self.dist, self.progress = frozen, dist, progress and dist.is_main

    def run(self, nets: dict[str, torch.nn.Module], opt: torch.optim.Optimizer, state: TrainState,
            buffers: dict[str, torch.Tensor], B: torch.Tensor,
            on_epoch: Callable[[Progress], None] | None) -> None:  # fmt: skip
        """Train from ``state.epoch`` to ``opts.epochs`` (or an early stop), updating ``state``."""
        opts, n = self.opts, len(self.data.train)
        first = state.epoch  # an estimate of the time left is printed after it
        bar = tqdm(range(state.epoch, opts.epochs), desc="train", unit="epoch", disable=not self.progress)
        for epoch in bar:
            started = time.perf_counter()
            terms: dict[str, float] = {}
            for m in MODALITIES:
                self.model.train()
                phase = _phase(nets[m], opt, m, epoch, buffers, B, opts, self.dist, n)
                terms.update({f"{m}/{name}": value for name, value in phase.items()})
            B = self.loss.update_codes(buffers["image"], buffers["text"])
            record = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - started, 3), **terms}
            if (epoch + 1) % opts.eval_every == 0 or epoch + 1 == opts.epochs:
                record.update(_validate_once(self.model, self.loss, self.data, self.device, self.dist))
                if record.get("val_map", -1.0) > state.best_score:
                    state.best_score, state.best_epoch = record["val_map"], epoch  # 0-based
                    state.best_state = trainable_state(self.model, self.loss, self.frozen)
            state.history.append(record)
            state.epoch = epoch + 1
            val = record.get("val_map", float("nan"))
            bar.set_postfix(loss=f"{sum(terms.values()):.4f}", val_map=f"{val:.3f}")
            log.info("epoch %s", json.dumps(record))
            if self.progress and epoch == first and epoch + 1 < opts.epochs:
                self._estimate(bar, time.perf_counter() - started, opts.epochs - epoch - 1)
            stop = epoch - state.best_epoch >= opts.patience and state.best_epoch >= 0
            if on_epoch is not None:
                on_epoch(Progress(state, opt, buffers, B, last=stop or epoch + 1 == opts.epochs))
            if stop:
                log.info("early stop at epoch %d (best %d)", epoch + 1, state.best_epoch + 1)
                break

    @staticmethod
    def _estimate(bar: Any, took: float, left: int) -> None:
        """Print the first epoch's time (validation included) and an estimate of the rest."""
        bar.write(f"train: {took:.1f} s an epoch; about {duration(took * left)} left for "
                  f"{left} more (early stopping may end sooner)")  # fmt: skip


def _training_free(model: TwoTowerHasher, loss: HashLoss, data: TrainData, device: torch.device,
                   frozen: dict[str, bool], dist: Dist) -> TrainState:  # fmt: skip
    """The state of a method whose ``init_heads`` set final heads: validated once, no epochs."""
    model.set_bit_weights(loss.bit_weights())
    state = TrainState()
    record = {"epoch": 0, **_validate_once(model, loss, data, device, dist)}
    state.history.append(record)
    state.best_score, state.best_epoch = record.get("val_map", -1.0), 0
    state.best_state = trainable_state(model, loss, frozen)
    return state


def _validate_once(model: TwoTowerHasher, loss: HashLoss, data: TrainData, device: torch.device,
                   dist: Dist) -> dict[str, float]:  # fmt: skip
    """``validate`` on rank 0, its result on every rank (so that all select and stop alike)."""
    return dist.broadcast(validate(model, loss, data, device) if dist.is_main else None)


def _initial_buffers(model: TwoTowerHasher, data: TrainData, train: np.ndarray, device: torch.device,
                     dist: Dist) -> dict[str, torch.Tensor]:  # fmt: skip
    """F and G of every training item, ``[n, bits]`` each; under ``torchrun`` each rank encodes
    a share and the rows are shared."""
    if not dist.enabled:
        return {m: encode_all(model, data.inputs[m], train, m, device) for m in MODALITIES}
    parts = dist.split(np.arange(len(train)))
    out = {}
    for m in MODALITIES:
        mine = encode_all(model, data.inputs[m], train[parts[dist.rank]], m, device)
        out[m] = mine.new_zeros(len(train), mine.shape[1])
        distributed.share_rows(out[m], parts, mine, dist)
    return out


def _phase_nets(step: _Step, dist: Dist) -> dict[str, torch.nn.Module]:
    """What runs each tower's steps: ``step`` itself, or under ``torchrun`` one
    DistributedDataParallel per tower over that tower, its head and the loss, so that a
    phase all-reduces the gradients of what it trains and nothing of the other tower.

    Raises:
        ValueError: the model has trained parameters outside its towers and heads, which
            neither would synchronise.
    """
    if not dist.enabled:
        return {m: step for m in MODALITIES}
    phases = {m: _Phase(step, m) for m in MODALITIES}
    covered = {id(p) for phase in phases.values() for p in phase.parameters()}
    stray = [k for k, p in step.model.named_parameters() if p.requires_grad and id(p) not in covered]
    if stray:
        raise ValueError(f"cannot train under torchrun: trained parameters outside the towers and heads "
                         f"({', '.join(stray[:3])})")  # fmt: skip
    _draw_per_rank(step.loss, dist)
    return {m: distributed.wrap(phase, dist) for m, phase in phases.items()}


class _Phase(torch.nn.Module):
    """One tower's trained parts (tower, head) and the loss, as one module for
    DistributedDataParallel; its forward is the shared ``_Step``."""

    def __init__(self, step: _Step, m: str) -> None:
        super().__init__()
        self.tower, self.head = getattr(step.model, f"{m}_tower"), getattr(step.model, f"{m}_head")
        self.loss = step.loss
        self.steps = [step]  # in a list: the step, and with it the other tower, is no submodule

    def forward(self, *args: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return self.steps[0](*args)


def _draw_per_rank(loss: HashLoss, dist: Dist) -> None:
    """Offset the seeded generators of sampling losses (triplets, ranked pairs) by the rank, so
    that the ranks draw independently; rank 0 draws as a single process would."""
    for module in loss.modules():
        g = getattr(module, "generator", None)
        if isinstance(g, torch.Generator):
            g.manual_seed(g.initial_seed() + dist.rank)


# Terms that are not a mean over the batch's items (their gradient per item does not shrink
# with the batch): under DistributedDataParallel each rank's is weighted by the number of
# processes, since DDP averages the ranks' gradients.
SUM_TERMS = ("decorrelation",)


def _phase(net: torch.nn.Module, opt: torch.optim.Optimizer, m: str, epoch: int,
           buffers: dict[str, torch.Tensor], B: torch.Tensor, opts: FitOptions, dist: Dist,
           n: int) -> dict[str, float]:  # fmt: skip
    """One pass of steps on tower ``m``, with the other modality's codes and B fixed.

    The epoch's item order is drawn alike on every rank; each global batch of
    ``opts.batch_size`` is split among the ranks. Returns the mean loss terms (over all ranks).
    """
    rng = np.random.default_rng([opts.seed, epoch, MODALITIES.index(m)])
    order = rng.permutation(n)
    draws = rng if not dist.enabled else np.random.default_rng([opts.seed, epoch, MODALITIES.index(m),
                                                                1 + dist.rank])  # fmt: skip
    variant_rng = draws if opts.text_variants or m == "image" else None  # a text or image view
    sums: dict[str, float] = {}
    for s in range(0, n, opts.batch_size):
        parts = dist.split(order[s : s + opts.batch_size])
        if min(len(p) for p in parts) == 0:  # a last batch with fewer items than processes
            continue
        terms, fresh = net(m, parts, dist.rank, buffers, B, variant_rng)
        b = len(parts[dist.rank])
        total = _objective(terms, b / len(fresh), dist)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        buffers[m][torch.as_tensor(np.concatenate(parts), device=fresh.device)] = fresh
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * b / n
    return dist.sum_terms(sums)


def _objective(terms: dict[str, torch.Tensor], share: float, dist: Dist) -> torch.Tensor:
    """What one rank back-propagates: the sum of the terms; under DDP, the batch-mean terms
    weighted by this rank's ``share`` of the global batch and the others (``SUM_TERMS``) whole,
    times the number of processes, so that DDP's average of the ranks' gradients is the
    gradient of the global batch."""
    if not dist.enabled:
        return sum(terms.values())
    means = sum(v for k, v in terms.items() if k not in SUM_TERMS)
    whole = sum(v for k, v in terms.items() if k in SUM_TERMS)
    return dist.world_size * (share * means + whole)


class _Step(torch.nn.Module):
    """The loss terms of one step on one tower (the forward that DistributedDataParallel wraps).

    ``forward(m, parts, rank, buffers, B, rng)``: ``parts`` the training positions of the global
    batch, one array per rank (one without a process group), of which ``parts[rank]`` are this
    rank's ``b`` items. Returns the named terms and the global batch's new codes ``[sum of
    len(parts), bits]`` (no gradient), for the buffer of modality ``m``. Under ``torchrun`` the
    loss sees the other ranks' rows of this batch at their new values (not differentiated
    through), as a single process would (their own terms move those rows).
    """

    def __init__(self, model, loss, inputs, train, sim, opts, device, dist, names=None) -> None:  # noqa: ANN001
        super().__init__()
        self.model, self.loss = model, loss
        self.inputs, self.train, self.sim, self.opts, self.device, self.dist, self.names = (
            inputs, train, sim, opts, device, dist, names)  # fmt: skip

    def forward(self, m: str, parts: list[np.ndarray], rank: int, buffers: dict[str, torch.Tensor],
                B: torch.Tensor, rng: np.random.Generator | None,
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
        opts = self.opts
        other = buffers["text" if m == "image" else "image"]
        pos = torch.as_tensor(parts[rank], device=self.device)
        items = self.train[pos.cpu().numpy()]
        codes = encode(self.model, self.inputs[m], items, m, self.device, rng)
        fresh = distributed.gather_rows(parts, codes.detach(), self.dist)  # [B, bits]
        batch = torch.as_tensor(np.concatenate(parts), device=pos.device)
        same = buffers[m].index_copy(0, batch, fresh) if self.dist.enabled else buffers[m]
        terms = self.loss(LossBatch(m, codes, pos, same, other, B, self.sim))
        if opts.contrastive:  # this tower's codes against the other side of the global batch's items
            nce = info_nce(codes, other[batch], opts.temperature, first=sum(len(p) for p in parts[:rank]))
            terms["contrastive"] = opts.contrastive * nce
        if self.names is not None:
            pairs = self.names.term(self.model, m, codes, buffers, pos)
            terms["label_names"] = opts.label_names * pairs
        if opts.spread:
            terms["spread"] = opts.spread * spread(codes, buffers[m], pos, opts.spread_bits)
        if opts.decorrelation:
            terms["decorrelation"] = opts.decorrelation * decorrelation(same, codes, pos)
        return terms, fresh


@torch.no_grad()
def validate(
    model: TwoTowerHasher, loss: HashLoss, data: TrainData, device: torch.device
) -> dict[str, float]:
    """mAP (stable ranking) of the validation items as queries against the training items.

    For "same item" relevance the validation items are their own database. Returns
    ``{"val_map_i2t", "val_map_t2i", "val_map"}`` (their mean), or ``{}`` without validation items.
    """
    val, train = np.asarray(data.val), np.asarray(data.train)
    if len(val) == 0:
        return {}
    db = val if data.labels.shape[1] == 0 else train
    codes = {
        f"{w}_{m}": sign(encode_all(model, data.inputs[m], idx, m, device).cpu().numpy())
        for w, idx in (("query", val), ("db", db))
        for m in MODALITIES
    }
    weights = loss.bit_weights()
    res = evaluate_directions(
        codes, **relevance_args(data.labels, val, db), directions=("i2t", "t2i"), ks=(),
        tie_aware=False,  # selection needs one number per epoch: the stable mAP
        pr_radius=False, bit_weights=None if weights is None else weights.detach().cpu().numpy(),
    )  # fmt: skip
    out = {f"val_map_{d}": float(v["map"]) for d, v in res.items()}
    out["val_map"] = float(np.mean(list(out.values())))
    return out


def _similarity(labels: np.ndarray, train: np.ndarray, device: torch.device, mode: str) -> Similarity:
    lab = torch.from_numpy(np.asarray(labels)[train].astype(np.float32)) if labels.shape[1] else None
    return Similarity(lab.to(device) if lab is not None else None, len(train), mode=mode)


class _NamePairs:
    """Images against the texts of label names: the pairwise likelihood of DCMH (its eq. 2)
    between image codes and the codes of every label's name as a text, with s = 1 where the
    image carries the label. Where ``text_variants`` trains a label name as one more text of
    each item that carries it, and so as similar to everything those items share a label
    with ("cat" to a tiger, through "mammal"), this term asks the name's code to be near
    exactly the images of its label: what a one-word query needs. Similar pairs are weighted
    by the dissimilar/similar ratio (labels are sparse). The image step moves image codes
    against fixed name codes; the text step moves the name codes against the image buffer.
    """

    def __init__(self, data: TrainData, sim: Similarity, weight: float) -> None:
        assert sim.labels is not None and data.names is not None
        self.inputs = data.names
        self.rows = np.arange(len(data.name_columns))
        self.y = sim.labels[:, torch.as_tensor(data.name_columns, device=sim.labels.device)]  # [n, k]
        p = float(self.y.mean())
        self.pos_weight = (1.0 - p) / p if 0.0 < p < 1.0 else 1.0

    def term(self, model: TwoTowerHasher, m: str, codes: torch.Tensor, buffers: dict[str, torch.Tensor],
             pos: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The mean pair term of one batch: ``codes [b, c]`` of modality ``m`` at ``pos``."""
        device = codes.device
        if m == "image":
            with torch.no_grad():
                names = encode(model, self.inputs, self.rows, "text", device)
            images = codes
        else:
            names = encode(model, self.inputs, self.rows, "text", device)
            images = buffers["image"][pos]
        y = self.y[pos]
        return pairwise_nll(images, names, y, self.pos_weight) / y.numel()


def spread(codes: torch.Tensor, buffer: torch.Tensor, pos: torch.Tensor, bits: float) -> torch.Tensor:
    """Mean squared hinge on near-duplicate codes: every pair of a batch item ``codes [b, c]``
    and another training item (``buffer [n, c]`` of the same modality, ``pos`` its batch
    rows) whose sign codes are fewer than ``bits`` bits apart is pushed apart, by
    ``(1 - 2 h / c) - (1 - 2 bits / c)`` for Hamming distance h. Items that the label terms pull together stay
    near, but not on one code, so that their own image or text can find them."""
    c = codes.shape[1]
    # the codes' signs forward, the identity backward (straight-through, Bengio et al. 2013):
    # cos is then exactly 1 - 2 h / c for Hamming distance h, and a pair's gradient moves every
    # bit of the batch item away from the other code, the weakest bits flipping first
    a = (codes + (torch.where(codes >= 0, 1.0, -1.0) - codes).detach()) / c**0.5
    b = torch.where(buffer >= 0, 1.0, -1.0) / c**0.5
    cos = a @ b.T  # [b, n]
    cos = cos.scatter(1, pos[:, None], -1.0)  # not the item itself
    return torch.relu(cos - (1.0 - 2.0 * bits / c)).pow(2).sum() / (len(codes) * max(1, len(buffer) - 1))


def decorrelation(buffer: torch.Tensor, codes: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal correlation of the code bits over the training set, the
    batch rows ``pos`` replaced by ``codes [b, c]``: bits that carry the same information
    waste the code (the decorrelation constraint of spectral hashing, Weiss et al. 2008,
    as a penalty; in deep hashing, e.g. DPSH's successors and DSDH)."""
    z = buffer.index_copy(0, pos, codes)
    z = z - z.mean(0, keepdim=True)
    z = z / z.norm(dim=0, keepdim=True).clamp(min=1e-6)
    corr = z.T @ z  # [c, c], unit diagonal
    c = corr.shape[0]
    return (corr.pow(2).sum() - corr.diagonal().pow(2).sum()) / (c * (c - 1))


def info_nce(anchors: torch.Tensor, partners: torch.Tensor, temperature: float,
             first: int = 0) -> torch.Tensor:  # fmt: skip
    """Mean InfoNCE of ``anchors [b, c]`` against their own partners, rows ``first .. first + b``
    of ``partners [p, c]`` (p >= b), the other rows being negatives, on cosine similarity /
    ``temperature`` (van den Oord et al., 2018; the image-text form of CLIP, Radford et al.,
    2021, one direction). Under ``torchrun`` the partners are the whole global batch's."""
    a = torch.nn.functional.normalize(anchors, dim=1)
    p = torch.nn.functional.normalize(partners, dim=1)
    logits = a @ p.T / temperature  # [b, p]
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(a), device=a.device) + first)


def _dtype(model: TwoTowerHasher) -> torch.dtype:
    return next((p.dtype for p in model.image_head.parameters() if p.is_floating_point()), torch.float32)


def _restore(model: TwoTowerHasher, loss: HashLoss, opt: torch.optim.Optimizer, saved: Progress,
             device: torch.device) -> tuple[TrainState, dict[str, torch.Tensor], torch.Tensor]:  # fmt: skip
    try:
        if saved.model_state is not None:
            load_trainable_state(model, loss, saved.model_state)
        if saved.optimizer_state is not None:
            opt.load_state_dict(saved.optimizer_state)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ResumeError(f"the saved progress does not fit: {exc}") from None
    buffers = {m: b.to(device) for m, b in saved.buffers.items()}
    return saved.state, buffers, saved.B.to(device)
