"""Cross-modal LSH: random hyperplanes in a CCA space shared by both modalities (no training).

Single-modal LSH draws random hyperplanes through the data and keeps one bit per side.
Image and text features live in different spaces, so both are first projected onto
their canonical directions (CCA between the training items' image and text features,
``dim`` directions, default the code length), where paired items are maximally
correlated; each direction is scaled by its canonical correlation to the power
``power`` (as in CCA-ITQ, Gong et al., PAMI 2013) so weakly correlated directions count
less. One set of seeded Gaussian hyperplanes R [dim, c] then cuts that shared space.
``init_heads`` sets each modality's linear hash head to the composition

    code(x) = sign((x - mean) P D R),  head.weight = (P D R)^T,  head.bias = -mean P D R,
    D = diag(corr^power)

and returns True: the heads are final and the trainer skips gradient training. CCA and
the hyperplanes come from ``crossmodal.baselines`` (``fit_cca``, ``random_hyperplanes``),
so this equals the ``lsh`` baseline with the same ``reg``, power and seed, but lives in
the model's heads. It needs the towers frozen and cached (``train.mode: frozen`` with
pretrained towers) and linear heads (``model.head: linear``). ``forward`` is never used.

``reg`` is the CCA ridge, relative to the mean variance. With fewer training items than
feature dimensions plain CCA finds spurious correlations near 1; a large ridge moves it
towards PLS (the SVD of the cross-covariance), which does not overfit: on a toy problem
with 120 items and 64 + 96 dimensions, i2t mAP was 0.44 at reg 1e-3, 0.77 at 0.1, 0.99
at 0.5, hence the default 0.5.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from crossmodal.baselines import fit_cca, random_hyperplanes
from crossmodal.losses import register_loss
from crossmodal.losses.base import HashLoss, LossBatch

log = logging.getLogger(__name__)


def _set_head(head: nn.Linear, mean: np.ndarray, proj: np.ndarray) -> None:
    """head(x) = (x - mean) @ proj."""
    w = torch.from_numpy(np.ascontiguousarray(proj))  # [f, bits]
    with torch.no_grad():
        head.weight.copy_(w.T.to(head.weight))
        head.bias.copy_((-torch.from_numpy(mean) @ w).to(head.bias))


@register_loss("lsh")
class LSHLoss(HashLoss):
    #: what `crossmodal compare` sets on top of a recipe: a linear head to hold the hyperplanes
    config_overrides = {"model.head": "linear"}

    def __init__(self, dim: int | None = None, reg: float = 0.5, power: float = 4.0, seed: int = 0) -> None:
        super().__init__()
        self.dim, self.reg, self.power, self.seed = dim, reg, power, seed

    def init_heads(self, model: nn.Module, features: dict[str, torch.Tensor | None]) -> bool:
        """Set both linear heads to CCA projection + seeded random hyperplanes; returns True."""

        missing = [m for m in ("image", "text") if features.get(m) is None]
        if missing:
            raise ValueError(
                f"lsh needs frozen pretrained towers with cached features (train.mode: frozen, "
                f"model.pretrained: true); not frozen: {', '.join(missing)}"
            )
        heads = {"image": model.image_head, "text": model.text_head}
        for m, head in heads.items():
            if not isinstance(head, nn.Linear):
                raise ValueError(
                    f"lsh sets linear hash heads; the {m} head is {type(head).__name__}: "
                    "use model.head: linear"
                )
        x, y = (features[m].detach().cpu().double().numpy() for m in ("image", "text"))
        cca = fit_cca(x, y, dims=self.dim or model.bits, reg=self.reg)
        planes = random_hyperplanes(cca.wx.shape[1], model.bits, self.seed)  # [dim, bits]
        planes = (cca.corr**self.power)[:, None] * planes
        _set_head(heads["image"], cca.mean_x, cca.wx @ planes)
        _set_head(heads["text"], cca.mean_y, cca.wy @ planes)
        log.info(
            "lsh: %d CCA directions (top correlations %s), %d hyperplanes",
            cca.wx.shape[1],
            np.round(cca.corr[:4], 3).tolist(),
            model.bits,
        )
        return True

    def forward(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        raise RuntimeError("lsh has no training objective: init_heads sets its heads and training is skipped")
