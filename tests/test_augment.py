"""Augmented image views and their place in the frozen-feature cache."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from crossmodal.augment import augment_view, view_rng


def drawing() -> Image.Image:
    img = Image.new("RGB", (64, 64), "white")
    img.paste((200, 30, 30), (16, 16, 48, 48))
    return img


def test_a_view_is_a_pure_function_of_seed_item_and_view():
    a = augment_view(drawing(), view_rng(0, 3, 1))
    b = augment_view(drawing(), view_rng(0, 3, 1))
    c = augment_view(drawing(), view_rng(0, 3, 2))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    assert a.size == (64, 64) and a.mode == "RGB"


def test_views_change_the_drawing_but_keep_it_recognisable():
    clean = np.asarray(drawing(), dtype=np.float32)
    for v in range(1, 9):
        view = np.asarray(augment_view(drawing(), view_rng(0, 0, v)), dtype=np.float32)
        assert np.abs(view - clean).mean() > 1.0  # something changed
        # the square stays darker than the ground, near the centre
        assert view[28:36, 28:36].mean() < view[:4, :4].mean() - 40


class MeanColour(torch.nn.Module):
    """A stand-in image tower: the mean of each channel (3 features)."""

    pretrained = True
    feature_dim = 3
    image_size = 32

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB").resize((32, 32)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_views_are_cached_beside_the_clean_features(workdir, tmp_path):
    from crossmodal.data import CrossModalDataset, open_dataset
    from crossmodal.features import ModalityInputs, extract_features

    full = open_dataset("tiny_colours")
    ds = CrossModalDataset(full.table.select(range(5)), full.info)
    clean = extract_features(ds, "image", MeanColour(), {"name": "mean"}, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    feats, offsets = extract_features(ds, "image", MeanColour(), {"name": "mean", "views": 2}, tmp_path,
                                      variants=True)  # fmt: skip
    assert len(list(tmp_path.glob("*.npy"))) == 2  # the clean file is reused, the views get their own
    assert offsets.tolist() == [0, 3, 6, 9, 12, 15] and feats.shape == (15, 3)
    assert torch.equal(feats[torch.from_numpy(offsets[:-1])], clean)  # row 0 of an item: its clean image
    assert not torch.equal(feats[1], feats[0]) and not torch.equal(feats[1], feats[2])
    desc = {"name": "mean", "views": 2}
    again, _ = extract_features(ds, "image", MeanColour(), desc, tmp_path, variants=True)
    assert torch.equal(again, feats)  # read back from the cache
    source = ModalityInputs("image", ds, MeanColour(), feats, None, offsets)
    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    drawn = {int(r) for _ in range(30)
             for r in (source.batch(np.array([1]), cpu, rng) == feats).all(1).nonzero()[:, 0]}  # fmt: skip
    assert drawn == {3, 4, 5}  # item 1's clean row and both its views get drawn
    assert torch.equal(source.batch(np.array([1]), torch.device("cpu")), clean[1:2])  # no rng: the clean row


def test_only_training_asks_for_the_views(workdir):
    from tinyrun import tiny_config

    from crossmodal.features import tower_description

    cfg = tiny_config(workdir, "train.image_views=2")
    assert tower_description(cfg, "image", training=True)["views"] == 2
    assert "views" not in tower_description(cfg, "image")  # eval and index read the clean features
