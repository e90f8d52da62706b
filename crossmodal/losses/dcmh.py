"""Deep Cross-Modal Hashing (Jiang & Li, CVPR 2017), with intra-modal terms.

For the image step (text is symmetric), with F the image codes, G the text codes and B
the binary codes of the n training items, and a batch b of images:

    inter   = sum_{i in b, j} log(1 + e^Theta_ij) - S_ij Theta_ij,  Theta = 0.5 F_b G^T
    intra   = the same form on 0.5 F_b F^T                          (weight ``intra``)
    quant   = gamma * ||B_b - F_b||^2
    balance = eta * ||F 1||^2   with F = the buffer, the batch rows replaced by F_b

All terms are divided by (n * batch), as in the paper's code, so the learning rate does
not depend on the training-set size. With ``pos_weight`` the likelihood terms of similar
pairs are weighted (``"balanced"``: by the ratio of dissimilar to similar training pairs),
which data with rare similar pairs need (OpenMoji: 6 % of pairs are similar).
The B step is B = sign(gamma (F + G)) = sign(F + G).
"""

from __future__ import annotations

import torch

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, Similarity, WeightedPairs, pairwise_nll


@register_loss("dcmh")
class DCMHLoss(WeightedPairs, HashLoss):
    def __init__(
        self,
        gamma: float = 1.0,
        eta: float = 1.0,
        inter: float = 1.0,
        intra: float = 0.5,
        pos_weight: float | str = 1.0,
    ) -> None:
        super().__init__()
        self.gamma, self.eta, self.inter, self.intra = gamma, eta, inter, intra
        self.set_pos_weight(pos_weight)

    def prepare(self, n: int, bits: int, sim: Similarity) -> None:
        self.prepare_pos_weight(sim)

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        f, idx = batch.codes, batch.index
        norm = batch.n * f.shape[0]
        s = batch.sim.target(idx)  # [b, n]
        terms = {"inter": self.inter * pairwise_nll(f, batch.other, s, self.pos_weight) / norm}
        if self.intra:
            same = batch.same.index_copy(0, idx, f)
            terms["intra"] = self.intra * pairwise_nll(f, same, s, self.pos_weight) / norm
        terms["quant"] = self.gamma * ((batch.B[idx] - f) ** 2).sum() / norm
        column_sum = batch.same.sum(0) - batch.same[idx].sum(0) + f.sum(0)
        terms["balance"] = self.eta * (column_sum**2).sum() / norm
        return terms

    def update_codes(self, F: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        return super().update_codes(self.gamma * F, self.gamma * G)
