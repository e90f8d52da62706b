"""The one contract every hashing objective shares.

A loss sees one mini-batch of continuous codes from one tower (``modality``), the
trainer's buffers of the whole training set's codes for both modalities and the binary
codes ``B``, and a way to ask for pairwise similarities. It returns a dict of named
terms; the trainer sums them and logs each. Nothing about the training set is kept
inside the loss: what it needs is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from crossmodal.codes import sign


@dataclass
class Similarity:
    """Pairwise relevance of training items, from multi-hot labels or from item keys.

    With labels, items are similar when they share at least one label and the graded
    similarity is the number of shared labels. Without labels (captions-only data),
    an item is similar only to itself.
    """

    labels: torch.Tensor | None  # [n, L] float multi-hot, or None
    n: int
    #: up to this many items, ``binary`` rows come from an [n, n] bool matrix computed once
    #: (12,288 items: 151 MB) instead of a product with all labels per call
    dense_limit: int = 12_288
    #: what ``target`` gives: "binary", or the graded "cosine" / "jaccard" of the label sets
    mode: str = "binary"
    _dense: torch.Tensor | None = field(default=None, init=False, repr=False)

    def graded(self, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Number of shared labels between items ``rows`` and ``cols`` (all items if None)."""
        if self.labels is None:
            cols_t = torch.arange(self.n, device=rows.device) if cols is None else cols
            return (rows[:, None] == cols_t[None, :]).float()
        a = self.labels[rows]
        b = self.labels if cols is None else self.labels[cols]
        return a @ b.T  # [len(rows), len(cols)]

    def target(self, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The similarity the pairwise likelihood fits, ``[len(rows), len(cols)]`` in [0, 1].

        ``binary``: 1 when items share a label. ``cosine``: shared / sqrt(|a| |b|).
        ``jaccard``: shared / |a or b|. Graded similarity keeps apart what "shares one label"
        merges (a cat and a tiger share only "mammal"); multi-level similarity as in DSRH
        (Zhao et al., CVPR 2015). Without labels every mode is "same item".
        """
        if self.mode == "binary" or self.labels is None:
            return self.binary(rows, cols)
        shared = self.graded(rows, cols)
        size_a = self.labels[rows].sum(1, keepdim=True)  # [b, 1]
        size_b = (self.labels if cols is None else self.labels[cols]).sum(1)[None, :]  # [1, n]
        if self.mode == "cosine":
            return shared / (size_a * size_b).sqrt().clamp(min=1e-12)
        if self.mode == "jaccard":
            return shared / (size_a + size_b - shared).clamp(min=1e-12)
        raise ValueError(f"unknown similarity {self.mode!r}; known: binary, cosine, jaccard")

    def binary(self, rows: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """1 where items share at least one label (or are the same item), else 0."""
        if cols is None and self.labels is not None and self.n <= self.dense_limit:
            if self._dense is None:  # in row blocks: no float [n, n] product at any time
                dense = torch.empty(self.n, self.n, dtype=torch.bool, device=self.labels.device)
                for s in range(0, self.n, 1024):
                    dense[s : s + 1024] = (self.labels[s : s + 1024] @ self.labels.T) > 0
                self._dense = dense
            return self._dense[rows].float()
        return (self.graded(rows, cols) > 0).float()


@dataclass
class LossBatch:
    """What a loss sees for one step.

    Attributes:
        modality: "image" or "text": the tower being updated.
        codes: ``[b, c]`` continuous codes of this batch, with gradients.
        index: ``[b]`` positions of the batch items in the training set.
        same: ``[n, c]`` buffer of this modality's codes for the whole training set (no grad).
        other: ``[n, c]`` buffer of the other modality's codes (no grad).
        B: ``[n, c]`` current binary codes in {-1, +1}.
        sim: pairwise similarity of training items.
        features: ``[b, f]`` the tower features the codes came from (for losses with their own heads).
    """

    modality: str
    codes: torch.Tensor
    index: torch.Tensor
    same: torch.Tensor
    other: torch.Tensor
    B: torch.Tensor
    sim: Similarity
    features: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.same.shape[0]


class HashLoss(nn.Module):
    """Base class of hashing objectives. Subclasses implement ``forward(batch) -> dict``.

    A loss may own parameters (a classifier, bit weights); the trainer optimises them
    with the towers and saves them in the run.
    """

    #: continuous codes pass through this before the loss and at encoding time
    activation: str = "identity"

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def update_codes(self, F: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """The closed-form B step; by default B = sign(F + G), with sign(0) = +1."""
        return sign(F + G)

    def prepare(self, n: int, bits: int, sim: Similarity) -> None:  # noqa: B027 - optional hook
        """Called once before training with the training-set size, code length and similarity."""

    def init_heads(self, model: nn.Module, features: dict[str, torch.Tensor | None]) -> bool:
        """Set the hash heads before training, from the training items' tower features.

        ``features`` maps "image" / "text" to ``[n, f]`` cached features (None when a
        tower is not frozen). Return True when the heads are final and no gradient
        training is needed (training-free methods such as LSH); by default do nothing.
        """
        return False

    def bit_weights(self) -> torch.Tensor | None:
        """Per-bit ranking weights, for losses that learn them; None means plain Hamming."""
        return None


class WeightedPairs:
    """The pair-weighting switch the pairwise-likelihood losses share (DCMH, DPSH, DHN).

    ``pos_weight`` multiplies the likelihood terms of similar pairs; ``"balanced"`` sets it,
    in ``prepare``, to the ratio of dissimilar to similar training pairs (weighted maximum
    likelihood, as in HashNet, Cao et al. 2017), which data with rare similar pairs need.
    The papers' own form is ``pos_weight = 1``.
    """

    pos_weight: float = 1.0
    pos_weight_option: float | str = 1.0

    def set_pos_weight(self, pos_weight: float | str) -> None:
        """Raises ``ValueError`` for anything but a number or ``"balanced"``."""
        number = isinstance(pos_weight, int | float) and not isinstance(pos_weight, bool)
        if not (pos_weight == "balanced" or number):
            raise ValueError(f"pos_weight must be a number or 'balanced', got {pos_weight!r}")
        self.pos_weight_option = pos_weight
        self.pos_weight = float(pos_weight) if pos_weight != "balanced" else 1.0

    def prepare_pos_weight(self, sim: Similarity) -> None:
        if self.pos_weight_option == "balanced":
            p = similar_fraction(sim)
            self.pos_weight = (1.0 - p) / p if 0.0 < p < 1.0 else 1.0


def softplus_stable(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) = max(x, 0) + log(1 + e^-|x|): finite for any |x|."""
    return torch.clamp(x, min=0) + torch.log1p(torch.exp(-torch.abs(x)))


class _PairwiseNLL(torch.autograd.Function):
    """sum w * (softplus(theta) - s * theta), theta = 0.5 a b^T, w = 1 + (pos_weight - 1) s.

    One pass over the ``[b, n]`` pair matrix forward, and the closed-form gradient
    ``d/dtheta = w * (sigmoid(theta) - s)`` backward (DCMH's eq. 6), instead of autograd
    through a dozen element-wise ops: a step's loss takes about half the time.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, pos_weight: float) -> torch.Tensor:
        theta = (0.5 * a) @ b.T
        # softplus is log(1 + e^x), computed stably (x itself beyond 20)
        nll = torch.nn.functional.softplus(theta) - s * theta
        w = 1.0 + (pos_weight - 1.0) * s if pos_weight != 1.0 else None
        if w is not None:
            nll = nll * w
        if any(ctx.needs_input_grad[:2]):
            grad = torch.sigmoid(theta) - s
            ctx.save_for_backward(a, b, grad if w is None else grad * w)
        return nll.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        a, b, grad = ctx.saved_tensors
        grad = grad * (0.5 * grad_out)
        grad_a = grad @ b if ctx.needs_input_grad[0] else None
        grad_b = grad.T @ a if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None, None


def pairwise_nll(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Sum over pairs of log(1 + e^theta) - s * theta with theta = 0.5 * a b^T.

    ``pos_weight`` multiplies the terms of similar pairs (s = 1), to balance data where
    similar pairs are rare (weighted maximum likelihood, as in HashNet, Cao et al. 2017).
    """
    return _PairwiseNLL.apply(a, b, s.to(a.dtype), float(pos_weight))


def similar_fraction(sim: Similarity, sample: int = 2000, seed: int = 0) -> float:
    """Fraction of similar pairs among the training items (estimated on a sample of rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(sim.n, generator=g)[:sample]
    if sim.labels is not None:
        rows = rows.to(sim.labels.device)
    return float(sim.binary(rows).mean())


def sample_columns(
    mask: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``k`` columns per row among those where ``mask`` is true, uniformly without replacement.

    Bounded sampling for losses over triplets or ranked pairs: each row gets
    ``min(k, n)`` slots; a slot is valid when its row had that many candidates.

    Args:
        mask: ``[b, n]`` candidates (bool or 0/1).
        k: slots per row.
        generator: a CPU generator, for reproducible draws.

    Returns:
        ``cols [b, min(k, n)]`` column indices and ``valid [b, min(k, n)]`` (bool).
    """
    scores = torch.rand(mask.shape, generator=generator).to(mask.device)  # [b, n]
    scores = scores.masked_fill(~mask.bool(), -1.0)
    top, cols = scores.topk(min(k, mask.shape[1]), dim=1)
    return cols, top >= 0


def sample_triplets(
    s: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` (positive, negative) column pairs per row of a binary similarity ``s [b, n]``.

    Returns ``pos``, ``neg`` and ``valid``, each ``[b, min(k, n)]``: slot t of row i is
    the triplet (i, pos[i, t], neg[i, t]), valid when both were found.
    """
    pos, has_pos = sample_columns(s > 0, k, generator)
    neg, has_neg = sample_columns(s <= 0, k, generator)
    return pos, neg, has_pos & has_neg
