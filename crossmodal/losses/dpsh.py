"""Deep Pairwise-Supervised Hashing, DPSH (Li, Wang & Kang, IJCAI 2016), cross-modal.

DPSH is single-modal: a pairwise likelihood on Theta_ij = 0.5 u_i . u_j plus a
quantisation term pulling each output to its own sign. Cross-modally, for the image
step (text is symmetric), with u the batch codes, V the other modality's buffer and U
this modality's buffer (batch rows replaced by u), S the binary similarity:

    inter = 1/(b n) sum_{i in b, j} log(1 + e^Theta_ij) - S_ij Theta_ij,  Theta = 0.5 u V^T
    intra = the same form on 0.5 u U^T                              (weight ``intra``)
    quant = eta / (b c) * sum_i ||u_i - sign(u_i)||^2

With ``pos_weight`` the likelihood terms of similar pairs are weighted (``"balanced"``:
by the ratio of dissimilar to similar training pairs; 1, the paper's form, by default).
The likelihood is a mean over pairs (as DCMH divides by n * batch) and the quantisation
a mean over entries, so Adam at lr 1e-3 works whatever n is. The B step is sign(F + G);
the loss itself never reads B (its quantisation target is each output's own sign).
"""

from __future__ import annotations

import torch

from crossmodal.codes import sign
from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, Similarity, WeightedPairs, pairwise_nll


@register_loss("dpsh")
class DPSHLoss(WeightedPairs, HashLoss):
    def __init__(
        self, eta: float = 0.1, inter: float = 1.0, intra: float = 0.5, pos_weight: float | str = 1.0
    ) -> None:
        super().__init__()
        self.eta, self.inter, self.intra = eta, inter, intra
        self.set_pos_weight(pos_weight)

    def prepare(self, n: int, bits: int, sim: Similarity) -> None:
        self.prepare_pos_weight(sim)

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        pairs = batch.n * u.shape[0]
        s = batch.sim.target(idx).to(u.dtype)  # [b, n]
        w = self.pos_weight
        terms = {"inter": self.inter * pairwise_nll(u, batch.other, s, w) / pairs}
        if self.intra:
            same = batch.same.index_copy(0, idx, u)
            terms["intra"] = self.intra * pairwise_nll(u, same, s, w) / pairs
        terms["quant"] = self.eta * ((u - sign(u.detach())) ** 2).mean()
        return terms
