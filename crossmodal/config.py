"""Configuration: one dataclass per section, YAML presets, ``--set`` overrides.

A recipe is a YAML file in ``configs/`` with the sections below. Unknown keys and values
of the wrong type are refused with a message naming them; the resolved config is written
into the run folder as ``config.yaml``. Shipped recipes state every training setting, so
a default below changes none of them.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crossmodal.io import write_text_atomic


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


# The defaults are those of the default recipe, configs/openmoji.yaml, so that ``Config()``
# is not a second, different "openmoji" recipe. Two settings belong to the dataset or loss a
# config names, not to the recipe, and default to what that builder or loss takes when given
# nothing: ``data.options`` (the OpenMoji builder's defaults are the recipe's) and
# ``loss.params`` (DCMH's own defaults are the paper's, eta = 1, which the recipe replaces).
# Holding OpenMoji's or DCMH's values there would hand them to any other dataset or loss that
# an override names. The terms a recipe adds on top of its method (loss.contrastive,
# train.label_texts, loss.decorrelation, loss.spread...) are off, so that a bare config is
# the method as its paper states it.
# Runtime knobs keep machine-neutral defaults. tests/test_config.py checks
# all of this against the recipe file.

# Split sizes are DataConfig keys, never builder options: a builder only declares its default protocol.
SPLIT_SIZE_KEYS = ("n_query", "n_train", "n_val")
SIMILARITIES = ("binary", "cosine", "jaccard")
TRAIN_MODES = ("frozen", "partial", "finetune", "zeroshot")


@dataclass
class DataConfig:
    name: str = "openmoji"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the dataset builder
    n_query: int | None = None  # None: the dataset's default protocol
    n_train: int | None = None
    n_val: int | None = None
    seed: int = 0


@dataclass
class ModelConfig:
    image_tower: str = "efficientnet_lite0"
    text_tower: str = "minilm"
    bits: int = 64
    head: str = "mlp"  # linear | mlp | dne (divide-and-encode) | mlp_dne (mlp hidden layer, then dne)
    head_hidden: int = 1024  # hidden width of the mlp head
    pretrained: bool = True
    image_size: int = 96
    image_weights: str | None = None  # a weights file for torchvision towers
    text_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "dcmh"
    params: dict[str, Any] = field(default_factory=dict)
    # what "similar" means to the pairwise-likelihood losses (dcmh, dpsh, dhn):
    # binary (shares a label), or graded in [0, 1]: cosine or jaccard of the label vectors
    similarity: str = "binary"
    # weight of an instance-level term added to any loss: each image against its own text,
    # with the other items of the batch as negatives (InfoNCE), both directions; 0: off
    contrastive: float = 0.0
    temperature: float = 0.1  # of the contrastive term, on cosine similarities of the codes
    # weight of a term added to any loss: image codes against the codes of their labels' names
    # as texts (pairwise likelihood, s = 1 where the image carries the label); 0: off
    label_names: float = 0.0
    # weight of a term added to any loss: squared correlation between code bits; 0: off
    decorrelation: float = 0.0
    # weight of a term added to any loss that pushes apart items whose codes are closer than
    # spread_bits bits (near-duplicates that would otherwise share one code); 0: off
    spread: float = 0.0
    spread_bits: float = 4.0


@dataclass
class TrainConfig:
    # frozen: cache pretrained tower features, train the rest; partial: as frozen, but the image
    # tower's last trainable_blocks blocks train too, on cached feature maps of the blocks
    # before them (the frozen part runs once); finetune: end to end; zeroshot: nothing trains:
    # the towers of one dual encoder (clip:<model> both) share a space and the linear heads are
    # ITQ on the database images' embeddings (no labels or captions needed; loss is unused)
    mode: str = "frozen"
    # finetune: train only the last n blocks of pretrained towers; partial: n (null: 2)
    trainable_blocks: int | None = None
    epochs: int = 15
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    weight_decay: float = 0.0
    patience: int = 8  # early stopping on validation mAP, in epochs
    eval_every: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    num_threads: int = 0  # 0: torch's default
    feature_batch_size: int = 64
    # frozen towers' features; null: "features" in the user cache folder (crossmodal.io.cache_home)
    cache_dir: str | None = None
    checkpoint_every: int = 5  # epochs; the last epoch is always checkpointed
    # keep <run>/checkpoint/ once training has finished (to --resume it for more epochs later);
    # by default it is removed with the run complete
    keep_checkpoint: bool = False
    text_variants: bool = True  # frozen text: each step sees the joined captions or one caption at random
    # frozen text: the names of an item's labels ("word:cat" -> "cat") are training texts too
    label_texts: bool = False
    # frozen image tower: augmented views per image (colour, greyscale, stroke width, blur,
    # rotation, scale) cached beside the clean features; each step sees one of them at random
    image_views: int = 0

    @property
    def partial_blocks(self) -> int:
        """The image tower's trained blocks in ``partial`` mode (``trainable_blocks``, default 2)."""
        return self.trainable_blocks if self.trainable_blocks is not None else 2


@dataclass
class IndexConfig:
    kind: str = "flat"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    name: str = "openmoji"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dump(self, path: str | os.PathLike[str]) -> None:
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    def validate(self) -> Config:
        bits = self.model.bits
        if bits <= 0 or bits % 8:
            raise ConfigError(f"model.bits must be a positive multiple of 8 (got {bits})")
        if self.train.mode not in TRAIN_MODES:
            raise ConfigError(f"train.mode must be one of {', '.join(TRAIN_MODES)} (got {self.train.mode!r})")
        if self.train.mode == "partial" and self.train.trainable_blocks is not None \
                and self.train.trainable_blocks <= 0:  # fmt: skip
            raise ConfigError("train.mode 'partial' trains the image tower's last trainable_blocks blocks: "
                              f"give a count >= 1 (got {self.train.trainable_blocks})")  # fmt: skip
        if self.train.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"train.optimizer must be 'adam' or 'sgd' (got {self.train.optimizer!r})")
        if self.model.head not in ("linear", "mlp", "dne", "mlp_dne"):
            raise ConfigError(f"model.head must be linear, mlp, dne or mlp_dne (got {self.model.head!r})")
        for key in ("epochs", "batch_size"):
            if getattr(self.train, key) <= 0:
                raise ConfigError(f"train.{key} must be positive (got {getattr(self.train, key)})")
        if self.loss.similarity not in SIMILARITIES:
            raise ConfigError(f"loss.similarity must be one of {', '.join(SIMILARITIES)} "
                              f"(got {self.loss.similarity!r})")  # fmt: skip
        if self.train.image_views < 0:
            raise ConfigError(f"train.image_views must be >= 0 (got {self.train.image_views})")
        for name in ("label_names", "decorrelation", "spread", "spread_bits"):
            if getattr(self.loss, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0 (got {getattr(self.loss, name)})")
        if self.loss.contrastive < 0 or self.loss.temperature <= 0:
            raise ConfigError("loss.contrastive must be >= 0 and loss.temperature > 0 "
                              f"(got {self.loss.contrastive}, {self.loss.temperature})")  # fmt: skip
        for key in SPLIT_SIZE_KEYS:
            if key in self.data.options:
                raise ConfigError(f"data.options.{key}: set split sizes with data.{key}")
        return self


# Settings that change how a run is computed, not what it learns.
RUNTIME_SETTINGS = ("device", "num_threads", "feature_batch_size", "cache_dir", "checkpoint_every",
                    "keep_checkpoint")


def training_settings(cfg: Config) -> dict[str, dict[str, Any]]:
    """What a trained model depends on: data, model, loss and train, less the runtime knobs.

    The run's name and folder, and its index settings, are left out too: the same model
    can live anywhere and be indexed any way.
    """
    d = cfg.to_dict()
    out = {k: d[k] for k in ("data", "model", "loss", "train")}
    out["train"] = {k: v for k, v in out["train"].items() if k not in RUNTIME_SETTINGS}
    return out


def settings_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``section.key`` names whose values differ between two ``training_settings`` dicts."""
    out = []
    for section in sorted(set(a) | set(b)):
        x, y = a.get(section), b.get(section)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{section}.{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            out.append(section)
    return out


def from_dict(raw: dict[str, Any], cls: type = Config, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {where or 'config'}: {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value or {}, hint, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path} must be {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        value = yaml.safe_load(text) if text.strip() else ""
        node = raw
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return raw


def recipe_names() -> list[str]:
    """The recipes shipped with the package (``configs/*.yaml``), by name."""
    folder = importlib.resources.files("crossmodal") / "configs"
    try:
        return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def find_recipe(path: str | os.PathLike[str]) -> Path:
    """A recipe file: ``path`` itself when it exists, else the shipped recipe of that name
    (``imagefolder``, ``imagefolder.yaml`` or ``configs/imagefolder.yaml`` from any folder).

    Raises:
        ConfigError: neither exists; the message lists the shipped recipes.
    """
    p = Path(path)
    if p.exists():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if name in recipe_names():
        return Path(str(importlib.resources.files("crossmodal") / "configs" / f"{name}.yaml"))
    known = ", ".join(recipe_names()) or "none installed"
    raise ConfigError(f"config file not found: {p} (shipped recipes, loadable by name: {known})")


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when ``path`` is None), apply overrides, validate.

    ``path`` is a file, or the name of a shipped recipe (``find_recipe``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = find_recipe(path)
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw).validate()
