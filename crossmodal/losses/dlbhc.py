"""Deep Learning of Binary Hash Codes, DLBHC (Lin, Yang, Hsiao & Chen, CVPRW 2015), cross-modal.

A sigmoid latent layer of code length sits between the features and a label classifier;
training is plain classification and the codes threshold the latent layer at 0.5. Here
the hash head is that latent layer (``activation = "sigmoid"``: the hasher outputs
2 sigmoid - 1, so sign(code) = [latent > 0.5]) and the loss owns the classifier
``nn.Linear(bits, n_labels)``, shared by both towers so their latents must agree on
what they predict. For the image step (text is symmetric), with h = (u + 1) / 2 the
batch latents, y their multi-hot labels and H_other = (V + 1) / 2 the other modality's
latents of the same items:

    cls   = mean over entries of BCE(classifier(h), y)   (multi-label cross-entropy, each
            label's positives weighted by its negative/positive ratio, capped at 100)
    align = align / (b c) * sum_i ||h_i - H_other_i||^2   (the two views of an item agree)

With captions-only data (no labels) there is nothing to classify: the loss falls back to
DCMH's inter-modal pairwise likelihood on the codes, 1/(b n) sum log(1 + e^Theta) -
S Theta, Theta = 0.5 u V^T, S = "same item", and logs that it does. The B step is
sign(F + G).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as nnf

from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch, Similarity, pairwise_nll

log = logging.getLogger(__name__)


@register_loss("dlbhc")
class DLBHCLoss(HashLoss):
    activation = "sigmoid"

    def __init__(self, align: float = 1.0) -> None:
        super().__init__()
        self.align = align
        self.classifier: nn.Linear | None = None
        self.label_pos_weight: torch.Tensor | None = None

    def prepare(self, n: int, bits: int, sim: Similarity) -> None:
        """Create the classifier from the shapes (bits, label count) only; kept if it exists."""
        if sim.labels is None or sim.labels.shape[1] == 0:
            log.warning("dlbhc: no labels (captions-only data); training on the pairwise 'same item' term")
            self.classifier = None
            return
        labels = sim.labels
        # Rare labels (most of them, with hundreds of labels) would be learned as "never": weight
        # each label's positives by its negative/positive ratio, capped. Training-time state only.
        freq = labels.mean(0)
        self.label_pos_weight = ((1 - freq) / freq.clamp(min=1e-6)).clamp(1.0, 100.0)
        if self.classifier is not None and self.classifier.weight.shape == (labels.shape[1], bits):
            return
        self.classifier = nn.Linear(bits, labels.shape[1]).to(device=labels.device, dtype=labels.dtype)

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        u, idx = batch.codes, batch.index
        if self.classifier is None:
            s = batch.sim.binary(idx).to(u.dtype)
            return {"pair": pairwise_nll(u, batch.other, s) / (batch.n * u.shape[0])}
        h = (u + 1) / 2  # [b, c] latent in [0, 1]
        y = batch.sim.labels[idx].to(u.dtype)
        logits = self.classifier(h)
        weight = self.label_pos_weight
        terms = {"cls": nnf.binary_cross_entropy_with_logits(logits, y, pos_weight=weight)}
        if self.align:
            h_other = (batch.other[idx] + 1) / 2
            terms["align"] = self.align * ((h - h_other) ** 2).mean()
        return terms
