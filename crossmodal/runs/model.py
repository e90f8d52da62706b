"""A run's model on disk: ``model.json`` (what to build, by name), ``model.safetensors`` (weights)
and the text tower's own files (``vocab.json``).

Loading rebuilds the towers and heads from ``model.json`` alone, with the output
activation and the per-bit weights the model was trained with; no objective is built.
Frozen pretrained towers are not saved: they are rebuilt from their packages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from crossmodal.config import Config
from crossmodal.models.hasher import HasherSpec, TwoTowerHasher, build_hasher
from crossmodal.registry import UnknownNameError
from crossmodal.runs.folder import RunError, RunUpdate, check_run

if TYPE_CHECKING:
    from crossmodal.data import DatasetInfo

MODEL_SPEC = "model.json"
WEIGHTS = "model.safetensors"
MODALITIES = ("image", "text")


def model_spec(cfg: Config, info: DatasetInfo | None = None) -> HasherSpec:
    """The model a recipe names; a bag-of-words dataset fixes the ``bow_mlp`` input size, and
    ``train.mode: zeroshot`` linear heads (they hold the ITQ projection)."""
    m = cfg.model
    text_options = dict(m.text_options)
    if info is not None and info.bow_dim and m.text_tower == "bow_mlp":
        text_options.setdefault("vocab_size", info.bow_dim)
    return HasherSpec(
        bits=m.bits,
        image_tower={"name": m.image_tower, "pretrained": m.pretrained, "weights": m.image_weights,
                     "image_size": m.image_size},  # fmt: skip
        text_tower={"name": m.text_tower, "pretrained": m.pretrained, "options": text_options},
        head="linear" if cfg.train.mode == "zeroshot" else m.head,  # zeroshot: ITQ in linear heads
        head_hidden=m.head_hidden,
    )


def build_model(
    cfg: Config, info: DatasetInfo | None = None, pretrained: bool | None = None
) -> TwoTowerHasher:
    """The towers and heads a recipe names (weights of pretrained towers included)."""
    return build_hasher(model_spec(cfg, info), pretrained=pretrained)


def inference_spec(model: TwoTowerHasher, spec: HasherSpec) -> HasherSpec:
    """``spec`` completed with what training decided: activation, bit weights, tower files."""
    files = sorted(model.text_tower.extra_state_files())
    return HasherSpec(**{**spec.to_dict(), "activation": model.activation,
                         "bit_weights": model.bit_weights is not None, "tower_files": files})  # fmt: skip


def save_model(
    update: RunUpdate, model: TwoTowerHasher, spec: HasherSpec, frozen: dict[str, bool]
) -> list[str]:
    """Stage the model's files in ``update`` (weights without frozen towers, spec, tower files).

    Returns:
        The names staged.
    """
    spec = inference_spec(model, spec)
    skip = tuple(f"{m}_tower." for m in MODALITIES if frozen.get(m))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(skip)}
    save_file(state, str(update.path(WEIGHTS)), metadata={"bits": str(model.bits)})
    update.path(MODEL_SPEC).write_text(json.dumps(spec.to_dict(), indent=1), encoding="utf-8")
    for name, text in model.text_tower.extra_state_files().items():
        update.path(name).write_text(text, encoding="utf-8")
    return [WEIGHTS, MODEL_SPEC, *spec.tower_files]


def read_spec(run_dir: str | os.PathLike[str]) -> HasherSpec:
    """The ``model.json`` of a trained run.

    Raises:
        RunError: the run is untrained, or the file is missing or malformed.
    """
    run_dir = Path(run_dir)
    check_run(run_dir, need=(WEIGHTS, MODEL_SPEC))
    try:
        return HasherSpec.from_dict(json.loads((run_dir / MODEL_SPEC).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"{run_dir}/{MODEL_SPEC} is unreadable ({exc}); re-run crossmodal train") from None


def load_model(run_dir: str | os.PathLike[str]) -> TwoTowerHasher:
    """Rebuild the trained model of a run folder, in eval mode, ready to encode queries.

    Raises:
        RunError: a file is missing, unreadable or does not fit the model ``model.json`` names.
    """
    run_dir = Path(run_dir)
    spec = read_spec(run_dir)
    try:
        model = build_hasher(spec)
    except (UnknownNameError, ValueError, TypeError) as exc:
        raise RunError(f"{run_dir}/{MODEL_SPEC} names a model this crossmodal cannot build: {exc}") from None
    try:
        extra = {name: (run_dir / name).read_text(encoding="utf-8") for name in spec.tower_files}
        if extra:
            model.text_tower.load_extra_state(extra)
    except (OSError, ValueError, TypeError, KeyError) as exc:  # a missing, binary or malformed vocab.json
        raise RunError(f"{run_dir}: cannot read the text tower's files {spec.tower_files}: {exc}") from None
    try:  # safetensors holds tensors only: nothing in the file can run code
        state = load_file(str(run_dir / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise RunError(
            f"{run_dir}/{WEIGHTS} is not a valid safetensors file ({exc}); re-run crossmodal train"
        ) from None
    try:
        model.load_trained_state(state)
    except (ValueError, RuntimeError) as exc:
        raise RunError(f"{run_dir}/{WEIGHTS} does not fit the model in {MODEL_SPEC}: {exc}") from None
    model.eval()
    return model
