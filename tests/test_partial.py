"""Partial fine-tuning: the image tower's last blocks train on cached feature maps of the
blocks before them, so the frozen part runs once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from tinyrun import tiny_config

from crossmodal.models.image import CachedTrunk, EfficientNetLite0


@pytest.mark.parametrize("k", [0, 1, 2, 5, 17])
def test_trunk_then_top_is_the_whole_tower(k):
    torch.manual_seed(0)
    tower = EfficientNetLite0(image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tower.top(tower.trunk(x, k), k), tower(x), atol=1e-5, rtol=1e-4)


def test_cached_trunk_gives_flat_maps_the_tower_reads_back():
    torch.manual_seed(0)
    tower = EfficientNetLite0(image_size=64).eval()
    trunk = CachedTrunk(tower, 2)
    assert tower.cached_split == 2 and trunk.feature_dim == int(np.prod(tower.map_shape))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        flat = trunk.for_inference()(x)  # batch norms folded, as the feature cache runs it
        torch.testing.assert_close(tower.from_cached(flat), tower(x), atol=1e-4, rtol=1e-3)
    tower.set_trainable(2)
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("_blocks") else "")
               for n, p in tower.named_parameters() if p.requires_grad}  # fmt: skip
    assert trained == {"_blocks.15", "_conv_head", "_bn1"}


def test_a_tower_that_cannot_be_split_is_refused_clearly():
    from tinyrun import TinyPool  # noqa: F401 - registers tiny_pool

    from crossmodal.models.image import create_image_tower

    tower = create_image_tower("tiny_pool")
    with pytest.raises(ValueError, match="train.mode 'partial' needs an image tower that can be split"):
        CachedTrunk(tower, 2)
    assert tower.cached_split == 0


@pytest.mark.slow
def test_a_partial_run_trains_the_last_blocks_and_encodes_the_same_from_maps_or_pixels(workdir):
    from crossmodal.jobs.train import train_run
    from crossmodal.runs.encode import continuous_codes, frozen_features, open_run_data
    from crossmodal.runs.model import load_model

    cfg = tiny_config(workdir, "name=partial", "model.image_tower=efficientnet_lite0",
                      "model.pretrained=false", "train.mode=partial", "train.trainable_blocks=2",
                      "train.epochs=2", "loss.label_names=1.0")  # fmt: skip
    run = train_run(cfg, progress=False)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["frozen"]["image"] is False  # its trained blocks are part of the run
    log = json.loads((run / "train_log.json").read_text())
    assert "image/label_names" in log["history"][-1] and "text/label_names" in log["history"][-1]
    assert any("trunk" in p.name or p.suffix == ".npy" for p in (workdir / "cache").iterdir())
    model = load_model(run)
    with safe_open(str(run / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
    assert "image_tower._blocks.15._project_conv.weight" in keys
    data = open_run_data(run)
    idx = data.splits["database"][:8]
    cached = continuous_codes(model, data.dataset, idx, frozen_features(data, model))["image"]
    model.image_tower.cached_split = 0
    pixels = continuous_codes(model, data.dataset, idx, {"image": None, "text": None})["image"]
    np.testing.assert_allclose(cached, pixels, atol=1e-3, rtol=1e-3)
