"""Bit-scalable deep hashing, DRSCH (Zhang, Lin, Zuo & Zhang, TIP 2015), cross-modal.

A triplet ranking loss on a weighted Hamming distance with learned, non-negative
per-bit weights, plus a regulariser on similar pairs (the paper's Laplacian term).
The weights are w = c * softplus(a) / sum softplus(a) (mean 1, so the margin keeps its
meaning); the loss owns ``a``. For {-1,+1} codes the weighted Hamming distance is
D_w(u, v) = sum_k w_k (u_k - v_k)^2 / 4, which is also the surrogate for the continuous
(tanh) outputs. For the image step (text is symmetric), each batch item i is an anchor;
up to ``k`` (positive p, negative q) pairs per anchor are drawn (seeded) from the other
modality's buffer V (inter) and from this modality's buffer U, batch rows replaced by u
(intra). With T the valid triplets and S the binary similarity:

    inter = 1/|T| sum_{(i,p,q) in T} max(0, margin + D_w(u_i, v_p) - D_w(u_i, v_q))
    intra = the same form with U                                      (weight ``intra``)
    reg   = lam / (4 c |S|) sum_{i in b, j} S_ij ||u_i - v_j||^2  (similar pairs pulled together)

``margin`` defaults to bits / 4 weighted Hamming bits. Evaluation and the engine rank by
weighted Hamming with ``bit_weights()``. Bit-scalable codes: ``top_bits(weights, k)``
gives the k highest-weight bits, and ``truncate_codes`` keeps them, so one trained model
serves several code lengths. The B step is sign(F + G).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as nnf

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, Similarity, sample_triplets

_UNIT = math.log(math.e - 1)  # softplus(_UNIT) == 1


def top_bits(weights: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest-weight bits, by decreasing weight (ties: lower index first)."""
    w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
    if not 1 <= k <= w.shape[0]:
        raise ValueError(f"k must be between 1 and the code length {w.shape[0]}, got {k}")
    return np.argsort(-w, kind="stable")[:k]


def truncate_codes(
    codes: np.ndarray, weights: torch.Tensor | np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` highest-weight bits: ``(codes[:, bits], weights[bits])``."""
    keep = top_bits(weights, k)
    w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights)
    return np.asarray(codes)[:, keep], w[keep]


def weighted_triplets(
    u: torch.Tensor, v: torch.Tensor, w: torch.Tensor, trip: tuple[torch.Tensor, ...], margin: float
) -> torch.Tensor:
    """Mean over valid slots of max(0, margin + D_w(u_i, v_pos) - D_w(u_i, v_neg))."""
    pos, neg, valid = trip
    d_pos = ((u[:, None, :] - v[pos]).pow(2) * w).sum(-1) / 4  # [b, k]
    d_neg = ((u[:, None, :] - v[neg]).pow(2) * w).sum(-1) / 4
    hinge = (margin + d_pos - d_neg).clamp(min=0) * valid
    return hinge.sum() / valid.sum().clamp(min=1)


@register_loss("drsch")
class DRSCHLoss(HashLoss):
    activation = "tanh"

    def __init__(
        self, margin: float | None = None, lam: float = 0.1, k: int = 16, intra: float = 0.5, seed: int = 0
    ) -> None:
        super().__init__()
        self.margin, self.lam, self.k, self.intra = margin, lam, k, intra
        self.generator = torch.Generator().manual_seed(seed)
        self.raw_weights: nn.Parameter | None = None

    def prepare(self, n: int, bits: int, sim: Similarity) -> None:
        """Create the per-bit weights (all 1 at the start) for ``bits``-bit codes (kept if they exist)."""
        if self.raw_weights is not None and self.raw_weights.shape == (bits,):
            return
        device = sim.labels.device if sim.labels is not None else None
        self.raw_weights = nn.Parameter(torch.full((bits,), _UNIT, device=device))

    def bit_weights(self) -> torch.Tensor | None:
        if self.raw_weights is None:
            return None
        w = nnf.softplus(self.raw_weights)
        return w * (w.shape[0] / w.sum())

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        if self.raw_weights is None:
            raise RuntimeError("drsch: call prepare(n, bits, sim) first; it creates the bit weights")
        w = self.bit_weights().to(device=u.device, dtype=u.dtype)
        margin = u.shape[1] / 4 if self.margin is None else self.margin
        s = batch.sim.binary(idx).to(u.dtype)  # [b, n]
        trip = sample_triplets(s, self.k, self.generator)
        terms = {"inter": weighted_triplets(u, batch.other, w, trip, margin)}
        if self.intra:
            same = batch.same.index_copy(0, idx, u)
            trip = sample_triplets(s, self.k, self.generator)
            terms["intra"] = self.intra * weighted_triplets(u, same, w, trip, margin)
        if self.lam:
            v = batch.other
            d = (u.pow(2).sum(1, keepdim=True) + v.pow(2).sum(1) - 2 * u @ v.T).clamp(min=0)  # [b, n]
            terms["reg"] = self.lam * (s * d).sum() / (4 * u.shape[1] * s.sum().clamp(min=1))
        return terms
