"""Deep Neural Network Hashing, DNNH / NINH (Lai, Pan, Liu & Yan, CVPR 2015), cross-modal.

A triplet ranking loss: an anchor must be closer to a similar item than to a
dissimilar one by a margin. Use it with a divide-and-encode head and the piecewise
threshold activation (sigmoid, outputs within 0.1 of 0.5 pass, the
others snap to 0/1; the hasher maps them to {-1,+1}), both as in the paper.

For the image step (text is symmetric), each batch item i is an anchor with codes u_i;
up to ``k`` (positive p, negative q) pairs per anchor are drawn (seeded) from the other
modality's buffer V (inter) and from this modality's buffer U, batch rows replaced by u
(intra). With T the valid triplets:

    inter = 1/|T| sum_{(i,p,q) in T} max(0, margin - ||u_i - v_q||^2 + ||u_i - v_p||^2)
    intra = the same form with U                                   (weight ``intra``)

Distances are in {-1,+1} space, 4x those of the paper's {0,1} codes: the paper's margin
of 1 is 4 here; the default ``margin`` is bits / 2 (a gap of bits/8 Hamming bits). The B
step is sign(F + G).

The paper slices learned convolutional features; on frozen pretrained features, slicing
the raw features (``model.head: dne``) leaves DNNH near chance (validation mAP .103 in an
8-epoch OpenMoji run at 64 bits), so ``compare`` slices a learned hidden layer of the mlp
head's width (``mlp_dne``: .490), the capacity every other method's head has.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, sample_triplets
from crossmodal.models.hasher import DivideAndEncode

log = logging.getLogger(__name__)


def triplet_hinge(
    u: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor, margin: float
) -> torch.Tensor:
    """Mean over valid slots of max(0, margin - ||u_i - v_neg||^2 + ||u_i - v_pos||^2)."""
    d_pos = (u[:, None, :] - v[pos]).pow(2).sum(-1)  # [b, k]
    d_neg = (u[:, None, :] - v[neg]).pow(2).sum(-1)
    hinge = (margin - d_neg + d_pos).clamp(min=0) * valid
    return hinge.sum() / valid.sum().clamp(min=1)


@register_loss("dnnh")
class DNNHLoss(HashLoss):
    activation = "piecewise"
    #: what `crossmodal compare` sets on top of a recipe for this method
    config_overrides = {"model.head": "mlp_dne"}

    def __init__(self, margin: float | None = None, k: int = 16, intra: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.margin, self.k, self.intra = margin, k, intra
        self.generator = torch.Generator().manual_seed(seed)

    def init_heads(self, model: nn.Module, features: dict[str, torch.Tensor | None]) -> bool:
        head = getattr(model, "image_head", None)
        layers = list(head) if isinstance(head, nn.Sequential) else [head]
        if not isinstance(layers[-1], DivideAndEncode):
            log.warning("dnnh is meant for a divide-and-encode head (model.head: mlp_dne or dne)")
        return False

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        margin = u.shape[1] / 2 if self.margin is None else self.margin
        s = batch.sim.binary(idx)  # [b, n]
        pos, neg, valid = sample_triplets(s, self.k, self.generator)
        terms = {"inter": triplet_hinge(u, batch.other, pos, neg, valid, margin)}
        if self.intra:
            same = batch.same.index_copy(0, idx, u)
            pos, neg, valid = sample_triplets(s, self.k, self.generator)
            terms["intra"] = self.intra * triplet_hinge(u, same, pos, neg, valid, margin)
        return terms
