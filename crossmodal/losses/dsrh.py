"""Deep Semantic Ranking based Hashing, DSRH (Zhao, Huang, Wang & Tan, CVPR 2015), cross-modal.

A ranking surrogate weighted by multi-level similarity: r_x = the number of labels a
training item shares with the anchor (``sim.graded``). For an anchor with codes u and
two items i, j with r_i > r_j, item i must be closer, by a margin rho, in the Hamming
surrogate d(u, v) = (c - u . v) / 2 (the Hamming distance for {-1,+1} codes); the pair
weighs as its NDCG gain difference:

    rank = sum_{(q,i,j)} w_qij max(0, rho + d(u_q, v_i) - d(u_q, v_j)) / sum w_qij,
    w_qij = 2^{r_qi} - 2^{r_qj}

For the image step (text is symmetric), anchors are the batch items; for each anchor
``k`` items i are drawn among those sharing a label and ``k`` items j among all (seeded),
and every pair with r_i > r_j counts. ``inter`` takes i, j from the other modality's
buffer, ``intra`` (weight ``intra``) from this modality's buffer, batch rows replaced by
u. Outputs pass through tanh (the paper's sigmoid-shaped relaxation of sign). ``rho``
defaults to bits / 8 Hamming bits. The B step is sign(F + G).
"""

from __future__ import annotations

import torch

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, sample_columns


def ranking_pairs(
    r: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled pairs (i, j) per anchor with their weights 2^r_i - 2^r_j (0 where r_i <= r_j).

    Args:
        r: ``[b, n]`` graded similarity (shared-label counts) of anchors to items.
        k: items drawn per anchor on each side (relevant i, any j).

    Returns:
        ``i [b, k, 1]``, ``j [b, 1, k]`` column indices and weights ``[b, k, k]``.
    """
    i, has_i = sample_columns(r > 0, k, generator)
    j, has_j = sample_columns(torch.ones_like(r, dtype=torch.bool), k, generator)
    ri, rj = r.gather(1, i)[:, :, None], r.gather(1, j)[:, None, :]
    valid = has_i[:, :, None] & has_j[:, None, :] & (ri > rj)
    w = torch.where(valid, torch.exp2(ri) - torch.exp2(rj), torch.zeros_like(ri - rj))
    return i[:, :, None], j[:, None, :], w


def weighted_rank_hinge(
    u: torch.Tensor, v: torch.Tensor, i: torch.Tensor, j: torch.Tensor, w: torch.Tensor, rho: float
) -> torch.Tensor:
    """sum w * max(0, rho + d(u, v_i) - d(u, v_j)) / sum w with d = (c - u . v) / 2."""
    ip = torch.einsum("bc,bnc->bn", u, v[i[:, :, 0]])[:, :, None]  # [b, k, 1]
    jp = torch.einsum("bc,bnc->bn", u, v[j[:, 0, :]])[:, None, :]  # [b, 1, k]
    hinge = (rho + 0.5 * (jp - ip)).clamp(min=0)  # d_i - d_j = (u.v_j - u.v_i) / 2
    return (w * hinge).sum() / w.sum().clamp(min=1e-12)


@register_loss("dsrh")
class DSRHLoss(HashLoss):
    activation = "tanh"

    def __init__(self, rho: float | None = None, k: int = 8, intra: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.rho, self.k, self.intra = rho, k, intra
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        rho = u.shape[1] / 8 if self.rho is None else self.rho
        r = batch.sim.graded(idx).to(u.dtype)  # [b, n]
        i, j, w = ranking_pairs(r, self.k, self.generator)
        terms = {"inter": weighted_rank_hinge(u, batch.other, i, j, w, rho)}
        if self.intra:
            same = batch.same.index_copy(0, idx, u)
            i, j, w = ranking_pairs(r, self.k, self.generator)
            terms["intra"] = self.intra * weighted_rank_hinge(u, same, i, j, w, rho)
        return terms
