"""Deep Hashing Network, DHN (Zhu, Long, Wang & Cao, AAAI 2016), cross-modal.

A pairwise cross-entropy on code inner products plus a smooth quantisation loss. For
the image step (text is symmetric), with u the batch codes, V the other modality's
buffer, U this modality's buffer (batch rows replaced by u) and S the binary similarity:

    inter = 1/(b n) sum_{i in b, j} log(1 + e^Theta_ij) - S_ij Theta_ij,  Theta = scale * u V^T
    intra = the same form on scale * u U^T                           (weight ``intra``)
    quant = lam / (b c) * sum_{i, k} log cosh(|u_ik| - 1)

log cosh is computed as |x| + log(1 + e^{-2|x|}) - log 2, finite for any x. ``scale``
defaults to 0.5 (as DCMH's Theta) so the logits stay moderate for long codes. The B
step is sign(F + G).
"""

from __future__ import annotations

import math

import torch

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, softplus_stable


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)), stable for large |x|."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - math.log(2.0)


def pairwise_cross_entropy(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, scale: float) -> torch.Tensor:
    """Sum over pairs of log(1 + e^theta) - s * theta with theta = scale * a b^T."""
    theta = scale * a @ b.T
    return (softplus_stable(theta) - s * theta).sum()


@register_loss("dhn")
class DHNLoss(HashLoss):
    def __init__(self, lam: float = 0.1, scale: float = 0.5, inter: float = 1.0, intra: float = 0.5) -> None:
        super().__init__()
        self.lam, self.scale, self.inter, self.intra = lam, scale, inter, intra

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        pairs = batch.n * u.shape[0]
        s = batch.sim.target(idx).to(u.dtype)  # [b, n]
        terms = {"inter": self.inter * pairwise_cross_entropy(u, batch.other, s, self.scale) / pairs}
        if self.intra:
            same = batch.same.index_copy(0, idx, u)
            terms["intra"] = self.intra * pairwise_cross_entropy(u, same, s, self.scale) / pairs
        terms["quant"] = self.lam * log_cosh(u.abs() - 1).mean()
        return terms
