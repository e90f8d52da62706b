"""Deep Hashing Network, DHN (Zhu, Long, Wang & Cao, AAAI 2016), cross-modal.

A pairwise cross-entropy on code inner products plus a smooth quantisation loss. For
the image step (text is symmetric), with u the batch codes, V the other modality's
buffer, U this modality's buffer (batch rows replaced by u) and S the binary similarity:

    inter = 1/(b n) sum_{i in b, j} log(1 + e^Theta_ij) - S_ij Theta_ij,  Theta = scale * u V^T
    intra = the same form on scale * u U^T                           (weight ``intra``)
    quant = lam / (b c) * sum_{i, k} log cosh(|u_ik| - 1)

log cosh is computed as |x| + log(1 + e^{-2|x|}) - log 2, finite for any x. ``scale``
defaults to 0.5 (as DCMH's Theta) so the logits stay moderate for long codes. The B
step is sign(F + G). ``pos_weight`` weights the terms of similar pairs, as in DCMH and DPSH
(``"balanced"``: dissimilar / similar training pairs; 1, the paper's form, by default).
"""

from __future__ import annotations

import math

import torch

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, Similarity, WeightedPairs, softplus_stable


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)), stable for large |x|."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


def pairwise_cross_entropy(
    a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, scale: float, pos_weight: float = 1.0
) -> torch.Tensor:
    """Sum over pairs of w (log(1 + e^theta) - s theta); theta = scale a b^T, w = 1 + (pos_weight - 1) s."""
    theta = scale * a @ b.T
    terms = softplus_stable(theta) - s * theta
    return (terms * (1.0 + (pos_weight - 1.0) * s) if pos_weight != 1.0 else terms).sum()


@register_loss("dhn")
class DHNLoss(WeightedPairs, HashLoss):
    def __init__(
        self, lam: float = 0.1, scale: float = 0.5, inter: float = 1.0, intra: float = 0.5,
        pos_weight: float | str = 1.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.lam, self.scale, self.inter, self.intra = lam, scale, inter, intra
        self.set_pos_weight(pos_weight)

    def prepare(self, n: int, bits: int, sim: Similarity) -> None:
        self.prepare_pos_weight(sim)

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        pairs = batch.n * u.shape[0]
        s = batch.sim.target(idx).to(u.dtype)  # [b, n]
        w = self.pos_weight
        terms = {"inter": self.inter * pairwise_cross_entropy(u, batch.other, s, self.scale, w) / pairs}
        if self.intra:
            same = batch.same.index_copy(0, idx, u)
            terms["intra"] = self.intra * pairwise_cross_entropy(u, same, s, self.scale, w) / pairs
        terms["quant"] = self.lam * log_cosh(u.abs() - 1).mean()
        return terms
