"""Deep Supervised Hashing, DSH (Liu, Wang, Shan & Chen, CVPR 2016), cross-modal.

A contrastive loss on the squared Euclidean distance of codes (4x the Hamming distance
for {-1,+1} codes) with margin m, plus a regulariser that pulls every output to +-1 with
a gradient of constant size. For the image step (text is symmetric), with u the batch
codes, V the other modality's buffer, U this modality's buffer (batch rows replaced by
u), S the binary similarity and D_ij = ||u_i - v_j||^2:

    inter = 1/(b n) sum_{i in b, j} 0.5 S_ij D_ij + 0.5 (1 - S_ij) max(m - D_ij, 0)
    intra = the same form against U                                  (weight ``intra``)
    reg   = alpha / b * sum_i || |u_i| - 1 ||_1

m defaults to 2 * bits (the paper's choice: dissimilar pairs further apart than half the
code length in Hamming distance cost nothing). The B step is sign(F + G).
"""

from __future__ import annotations

import torch

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch


def contrastive(u: torch.Tensor, v: torch.Tensor, s: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over pairs of 0.5 s D + 0.5 (1 - s) max(margin - D, 0), D the squared distances."""
    d = (u.pow(2).sum(1, keepdim=True) + v.pow(2).sum(1) - 2 * u @ v.T).clamp(min=0)  # [b, n]
    return (0.5 * s * d + 0.5 * (1 - s) * (margin - d).clamp(min=0)).sum()


@register_loss("dsh")
class DSHLoss(HashLoss):
    def __init__(
        self, margin: float | None = None, alpha: float = 0.01, inter: float = 1.0, intra: float = 0.5
    ) -> None:
        super().__init__()
        self.margin, self.alpha, self.inter, self.intra = margin, alpha, inter, intra

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        m = 2.0 * u.shape[1] if self.margin is None else self.margin
        pairs = batch.n * u.shape[0]
        s = batch.sim.binary(idx).to(u.dtype)  # [b, n]
        terms = {"inter": self.inter * contrastive(u, batch.other, s, m) / pairs}
        if self.intra:
            same = batch.same.index_copy(0, idx, u)
            terms["intra"] = self.intra * contrastive(u, same, s, m) / pairs
        terms["reg"] = self.alpha * (u.abs() - 1).abs().sum() / u.shape[0]
        return terms
