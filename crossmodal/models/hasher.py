"""TwoTowerHasher: an image tower and a text tower, each followed by a hash head.

``encode_image`` / ``encode_text`` return continuous codes ``[B, bits]``; with
``binarize=True`` they return {-1, +1} codes (sign with +1 at zero). Both accept either
raw inputs for the tower or, with ``from_features=True``, tower features computed
earlier (frozen mode caches them).
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.losses.base import sign_pm1

ACTIVATIONS = ("identity", "tanh", "sigmoid", "piecewise")
PIECEWISE_EPS = 0.1


def piecewise_threshold(
    s: torch.Tensor, eps: float = PIECEWISE_EPS, straight_through: bool = True
) -> torch.Tensor:
    """DNNH's threshold on sigmoid outputs ``s`` in [0, 1] (Lai et al., CVPR 2015).

    Values within ``eps`` of 0.5 pass unchanged; the others snap to 0 or 1. The snapped
    values are constants, so taken literally they pass no gradient and an output that
    leaves the band early never moves again; with ``straight_through`` (the default) the
    backward pass uses the identity there (the value is still the snapped one).
    """
    snapped = (s > 0.5).to(s.dtype)
    if straight_through:
        snapped = s + (snapped - s).detach()
    return torch.where((s - 0.5).abs() < eps, s, snapped)


class DivideAndEncode(nn.Module):
    """Divide-and-encode head (Lai et al., CVPR 2015).

    The feature vector is cut into ``groups`` equal slices; each slice alone produces
    ``bits / groups`` outputs, with no connection across slices.
    """

    def __init__(self, in_dim: int, bits: int, groups: int | None = None) -> None:
        super().__init__()
        groups = groups or bits
        if bits % groups:
            raise ValueError(f"divide-and-encode: bits ({bits}) must be a multiple of groups ({groups})")
        self.groups, self.slice = groups, in_dim // groups
        if self.slice == 0:
            raise ValueError(f"divide-and-encode: feature size {in_dim} is smaller than {groups} groups")
        self.weight = nn.Parameter(torch.randn(groups, self.slice, bits // groups) / self.slice**0.5)
        self.bias = nn.Parameter(torch.zeros(groups, bits // groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, : self.groups * self.slice].reshape(x.shape[0], self.groups, self.slice)
        out = torch.einsum("bgs,gso->bgo", x, self.weight) + self.bias  # [B, groups, bits/groups]
        return out.reshape(x.shape[0], -1)


def make_head(kind: str, in_dim: int, bits: int, hidden: int = 1024) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, bits)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, bits))
    if kind == "dne":
        return DivideAndEncode(in_dim, bits)
    raise ValueError(f"unknown head {kind!r}; known heads: dne, linear, mlp")


class TwoTowerHasher(nn.Module):
    """Towers plus hash heads mapping both modalities into one Hamming space."""

    def __init__(
        self,
        image_tower: nn.Module,
        text_tower: nn.Module,
        bits: int,
        head: str = "linear",
        head_hidden: int = 1024,
        activation: str = "identity",
    ) -> None:
        super().__init__()
        if bits <= 0 or bits % 8:
            raise ValueError(f"code length must be a positive multiple of 8, got {bits}")
        self.bits = bits
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_head = make_head(head, image_tower.feature_dim, bits, head_hidden)
        self.text_head = make_head(head, text_tower.feature_dim, bits, head_hidden)
        self.activation = activation

    def _finish(self, codes: torch.Tensor, binarize: bool) -> torch.Tensor:
        if self.activation == "tanh":
            codes = torch.tanh(codes)
        elif self.activation == "sigmoid":
            codes = torch.sigmoid(codes) * 2 - 1
        elif self.activation == "piecewise":
            codes = piecewise_threshold(torch.sigmoid(codes)) * 2 - 1
        elif self.activation != "identity":
            raise ValueError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        return sign_pm1(codes) if binarize else codes

    def encode_image(
        self, x: torch.Tensor, binarize: bool = False, from_features: bool = False
    ) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` (or features ``[B, f]``) -> codes ``[B, bits]``."""
        feats = x if from_features else self.image_tower(x)
        return self._finish(self.image_head(feats), binarize)

    def encode_text(
        self,
        batch: dict[str, torch.Tensor] | torch.Tensor,
        binarize: bool = False,
        from_features: bool = False,
    ) -> torch.Tensor:
        """Tokenized text (a dict for the tower, or features ``[B, f]``) -> codes ``[B, bits]``."""
        feats = batch if from_features else self.text_tower(**batch)
        return self._finish(self.text_head(feats), binarize)

    def forward(
        self, images: torch.Tensor | None = None, texts: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["image"] = self.encode_image(images)
        if texts is not None:
            out["text"] = self.encode_text(texts)
        return out
