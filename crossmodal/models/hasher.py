"""TwoTowerHasher: an image tower and a text tower, each followed by a hash head.

``encode_image`` / ``encode_text`` return continuous codes ``[B, bits]``; with
``binarize=True`` they return {-1, +1} codes (sign with +1 at zero). Both accept either
raw inputs for the tower or, with ``from_features=True``, tower features computed
earlier (frozen mode caches them).

The model owns inference: its output activation and (for methods that learn them) its
per-bit ranking weights are part of it, and ``HasherSpec`` names everything needed to
rebuild it (towers by name with their options, head, activation), so that a saved model
is loaded without the objective it was trained with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from crossmodal.codes import sign
from crossmodal.models.image import create_image_tower
from crossmodal.models.text import create_text_tower

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


HEADS = ("linear", "mlp", "dne", "mlp_dne")


def make_head(kind: str, in_dim: int, bits: int, hidden: int = 1024) -> nn.Module:
    """A hash head ``[B, in_dim] -> [B, bits]``: ``linear``; ``mlp`` (one hidden layer of
    ``hidden`` units, ReLU); ``dne`` (divide-and-encode on the features themselves); ``mlp_dne``
    (the mlp's hidden layer, then divide-and-encode on it: DNNH slices learned features, and
    this gives it the mlp head's capacity).

    Raises:
        ValueError: an unknown ``kind``, or ``dne`` with more slices than features.
    """
    if kind == "linear":
        return nn.Linear(in_dim, bits)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, bits))
    if kind == "dne":
        return DivideAndEncode(in_dim, bits)
    if kind == "mlp_dne":  # the mlp head's hidden layer, then divide-and-encode slices of it
        hidden_layer = [nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.1)]
        return nn.Sequential(*hidden_layer, DivideAndEncode(hidden, bits))
    raise ValueError(f"unknown head {kind!r}; known heads: {', '.join(HEADS)}")


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
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.head_kind, self.head_hidden = head, head_hidden
        # [bits] per-bit ranking weights (weighted Hamming), for methods that learn them
        self.register_buffer("bit_weights", None)

    def set_bit_weights(self, weights: torch.Tensor | None) -> None:
        """Rank by weighted Hamming with ``weights [bits]`` (None: plain Hamming).

        Raises:
            ValueError: ``weights`` has another length than the code.
        """
        if weights is not None and tuple(weights.shape) != (self.bits,):
            raise ValueError(f"bit weights must have shape ({self.bits},), got {tuple(weights.shape)}")
        self.bit_weights = None if weights is None else weights.detach().clone().float()

    def _finish(self, codes: torch.Tensor, binarize: bool) -> torch.Tensor:
        if self.activation == "tanh":
            codes = torch.tanh(codes)
        elif self.activation == "sigmoid":
            codes = torch.sigmoid(codes) * 2 - 1
        elif self.activation == "piecewise":
            codes = piecewise_threshold(torch.sigmoid(codes)) * 2 - 1
        elif self.activation != "identity":
            raise ValueError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        return sign(codes) if binarize else codes

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load saved weights; only tower weights may be absent (frozen towers are not saved).

        Raises:
            ValueError: other keys are missing or unexpected.
            RuntimeError: a tensor of the wrong shape.
        """
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith(("image_tower.", "text_tower."))]
        if bad_missing or unexpected:
            raise ValueError(
                f"model weights do not match the model: missing {bad_missing}, unexpected {unexpected}"
            )

    def encode_image(
        self, x: torch.Tensor, binarize: bool = False, from_features: bool = False
    ) -> torch.Tensor:
        """Images ``[B, 3, S, S]`` (or cached features ``[B, f]``) -> codes ``[B, bits]``.

        Cached features are the pooled features of a frozen tower, or, when the tower is
        partially fine-tuned (``cached_split``), the flattened maps its last blocks read."""
        if from_features:
            feats = self.image_tower.from_cached(x) if hasattr(self.image_tower, "from_cached") else x
        else:
            feats = self.image_tower(x)
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


@dataclass
class HasherSpec:
    """Everything that rebuilds a ``TwoTowerHasher`` by name (saved as a run's ``model.json``).

    Attributes:
        bits: code length.
        image_tower: ``{"name", "pretrained", "weights", "image_size"}`` for ``create_image_tower``.
        text_tower: ``{"name", "pretrained", "options"}`` for ``create_text_tower``.
        head, head_hidden: the hash heads (``make_head``).
        activation: the output activation (one of ``ACTIVATIONS``).
        bit_weights: whether the model holds learned per-bit weights.
        tower_files: text-tower state files saved beside the weights (e.g. ``vocab.json``).
    """

    bits: int
    image_tower: dict[str, Any]
    text_tower: dict[str, Any]
    head: str = "linear"
    head_hidden: int = 1024
    activation: str = "identity"
    bit_weights: bool = False
    tower_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> HasherSpec:
        """Raises ``ValueError`` naming the keys that are missing, unknown or of the wrong type."""
        if not isinstance(raw, dict):
            raise ValueError(f"model spec must be a JSON object, got {type(raw).__name__}")
        names = {f.name for f in cls.__dataclass_fields__.values()}
        unknown, missing = set(raw) - names, {"bits", "image_tower", "text_tower"} - set(raw)
        if unknown or missing:
            raise ValueError(f"model spec: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        spec = cls(**raw)
        types = {"bits": int, "image_tower": dict, "text_tower": dict, "head": str, "head_hidden": int,
                 "activation": str, "bit_weights": bool, "tower_files": list}  # fmt: skip
        wrong = [k for k, t in types.items() if not isinstance(getattr(spec, k), t) or
                 (t is int and isinstance(getattr(spec, k), bool))]  # fmt: skip
        if wrong or spec.head_hidden <= 0 or not isinstance(spec.image_tower.get("name"), str) \
                or not isinstance(spec.text_tower.get("name"), str):  # fmt: skip
            raise ValueError(f"model spec: bad values for {wrong or ['head_hidden or a tower name']}")
        if not all(isinstance(f, str) and f and "/" not in f and "\\" not in f and not f.startswith(".")
                   for f in spec.tower_files):  # fmt: skip
            raise ValueError(f"model spec: tower_files must be plain file names, got {spec.tower_files}")
        return spec


def build_hasher(spec: HasherSpec, pretrained: bool | None = None) -> TwoTowerHasher:
    """The towers and heads ``spec`` names, with pretrained tower weights unless ``pretrained=False``.

    Raises:
        UnknownNameError: a tower name is not registered.
        ValueError: a bad code length, head or activation.
    """
    im, tx = spec.image_tower, spec.text_tower
    pre_image = im.get("pretrained", True) if pretrained is None else pretrained
    pre_text = tx.get("pretrained", True) if pretrained is None else pretrained
    image = create_image_tower(
        im["name"], pretrained=pre_image, weights=im.get("weights"), image_size=im.get("image_size")
    )
    text = create_text_tower(tx["name"], pretrained=pre_text, **dict(tx.get("options") or {}))
    model = TwoTowerHasher(image, text, spec.bits, spec.head, spec.head_hidden, spec.activation)
    if spec.bit_weights:
        model.set_bit_weights(torch.ones(spec.bits))
    return model
