"""A tiny synthetic dataset and a tiny frozen image tower for the fixtures of ``conftest.py``.

The dataset has 4 colour classes; each item is a small solid-colour picture with some
noise and a caption naming its colour and a shape. Labels are the colour plus the shape,
so relevance ("shares a label") is non-trivial. A "pretrained" tower that pools colour
stands in for a real CNN so that training takes seconds.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from crossmodal.data import DATASETS, CrossModalDataset, DatasetInfo, make_record, register_dataset
from crossmodal.models.image import IMAGE_TOWERS, ImageTower, register_image_tower

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ["square", "circle", "star"]


def colour_image(rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 32) -> bytes:
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_folder(root: Path, n: int, prefix: str = "new", labels: bool = False, seed: int = 1) -> Path:
    """``n`` images ``{prefix}{i:04d}.png`` of the tiny run's colours with captions, as an image
    folder (metadata.jsonl); with ``labels``, each is labelled with its colour, ``square`` and
    ``sparkly`` (a name the tiny run does not have)."""
    import json

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        arr = np.clip(np.array(COLOURS[name]) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{prefix}{i:04d}.png")
        row = {"file_name": f"{prefix}{i:04d}.png", "text": f"a {name} square"}
        if labels:
            row["labels"] = [name, "square", "sparkly"]
        lines.append(json.dumps(row))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


if "tiny_colours" not in DATASETS:

    @register_dataset("tiny_colours")
    def tiny_colours(n: int = 96, seed: int = 0, captions_only: bool = False) -> CrossModalDataset:
        rng = np.random.default_rng(seed)
        names = list(COLOURS) + SHAPES
        rows = []
        for i in range(n):
            colour = list(COLOURS)[i % 4]
            shape = SHAPES[(i // 4) % 3]
            labels = np.zeros(len(names), np.uint8)
            labels[names.index(colour)] = 1
            labels[names.index(shape)] = 1
            rows.append(make_record(f"item{i:03d}", [f"a {colour} {shape}", f"{colour}"],
                                    None if captions_only else labels,
                                    image_bytes=colour_image(COLOURS[colour], rng)))  # fmt: skip
        if captions_only:  # relevance "same image", one text index entry per caption
            info = DatasetInfo("tiny_colours", relevance="image", protocol={"n_query": 16, "n_train": 64})
        else:
            info = DatasetInfo("tiny_colours", label_names=names, protocol={"n_query": 16, "n_train": 64})
        return CrossModalDataset.from_records(rows, info)


if "tiny_pool" not in IMAGE_TOWERS:

    @register_image_tower("tiny_pool")
    class TinyPool(ImageTower):
        """Mean colour through a fixed random projection; 'pretrained' so frozen mode caches it."""

        def __init__(self, pretrained: bool = True, weights: str | None = None, image_size: int = 32) -> None:
            super().__init__()
            self.pretrained, self.image_size, self.feature_dim = pretrained, image_size, 16
            self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
            g = torch.Generator().manual_seed(0)
            self.proj = nn.Linear(3, 16)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(16, 3, generator=g))
                self.proj.bias.zero_()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.proj(x.mean(dim=(2, 3))))

        def blocks(self) -> list[nn.Module]:
            return [self.proj]


TINY_OVERRIDES = [
    "name=tiny",
    "data.name=tiny_colours",
    "data.options={}",
    "model.image_tower=tiny_pool",
    "model.image_size=32",
    "model.text_tower=bow_mlp",
    "model.text_options={hidden: 64}",
    "model.bits=16",
    "model.head=linear",
    "train.epochs=25",
    "train.batch_size=32",
    "train.lr=0.01",
    "train.patience=25",
]


def tiny_config(workdir: Path, *extra: str):
    from crossmodal.config import load_config

    return load_config(
        None,
        [*TINY_OVERRIDES, f"runs_dir={workdir / 'runs'}", f"train.cache_dir={workdir / 'cache'}", *extra],
    )
