"""The training objectives of Concept Ablation (Kumari et al., ICCV 2023) and the loss-maximization baseline.

All work on the same batch: anchor images noised to ``x_t``; the target prompt's prediction is pulled toward
  - ``model``: the frozen model's own prediction for the anchor prompt (Eq. 5, stop-gradient; the default),
  - ``noise``: the true noise, as if the anchor image had been captioned with the target prompt (Eq. 6),
  - ``maximize``: away from the true noise on images of the target (a baseline the paper shows to be worse).
Regularization keeps the anchor prompt's own prediction where it was.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("model", "noise", "maximize")
OBJECTIVE_HELP = {
    "model": "target prediction -> frozen anchor prediction (Eq. 5; default, best quality)",
    "noise": "target prediction -> true noise on anchor images (Eq. 6)",
    "maximize": "loss-maximization baseline on target images (for comparison only)",
}


def ablation_loss(objective: str, target_pred: Tensor, noise: Tensor, frozen_anchor_pred: Tensor | None) -> Tensor:
    if objective == "model":
        assert frozen_anchor_pred is not None
        return F.mse_loss(target_pred.float(), frozen_anchor_pred.float())
    if objective == "noise":
        return F.mse_loss(target_pred.float(), noise.float())
    if objective == "maximize":
        return -F.mse_loss(target_pred.float(), noise.float())
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def regularization_loss(objective: str, anchor_pred: Tensor, noise: Tensor,
                        frozen_anchor_pred: Tensor | None) -> Tensor:
    """Keep anchor prompts on anchor images as they were: the frozen prediction (model) or the noise (noise)."""
    reference = frozen_anchor_pred if objective == "model" and frozen_anchor_pred is not None else noise
    return F.mse_loss(anchor_pred.float(), reference.float())
