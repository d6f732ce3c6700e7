"""The training objectives of Concept Ablation (Kumari et al., ICCV 2023) and the loss-maximization baseline.

All work on the same batch: anchor images noised to ``x_t``; predictions are in the network's own space (the noise
for SD, the velocity ``noise - x0`` for flow models), and "the true noise" below is the schedule's noise target in
that space. The target prompt's prediction is pulled toward
  - ``model``: the frozen model's own prediction for the anchor prompt (Eq. 5, stop-gradient; the default),
  - ``noise``: the true noise, as if the anchor image had been captioned with the target prompt (Eq. 6),
  - ``mixed``: the frozen prediction on the batch's low-noise rows and the true noise on the others (the default
    preset's): the noise target is noisiest where little noise was added, and needs no frozen pass elsewhere,
  - ``maximize``: away from the true noise on images of the target (a baseline the paper shows to be worse).
Regularization keeps the anchor prompt's own prediction where it was.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

OBJECTIVES = ("model", "noise", "mixed", "maximize")
# "mixed": this share of each batch's rows (rounded up) is drawn from the same share of the timesteps, the least
# noisy ones, and has the model-based target; the other rows, at the other timesteps, the noise-based one.
MIXED_MODEL_SHARE = 0.4
OBJECTIVE_HELP = {
    "model": "target prediction -> frozen anchor prediction (Eq. 5; default, best quality)",
    "noise": "target prediction -> true noise on anchor images (Eq. 6)",
    "mixed": "frozen anchor prediction at low noise levels, true noise above (default preset: fewer frozen passes)",
    "maximize": "loss-maximization baseline on target images (for comparison only)",
}


def model_rows(objective: str, batch: int, regularized: bool = False) -> int:
    """How many rows of a training batch need the frozen model's prediction (a UNet pass each). A regularized
    "mixed" run needs it on every row (it is what the anchor's own prediction is kept at), so every row uses it."""
    if objective == "model" or (objective == "mixed" and regularized):
        return batch
    return math.ceil(batch * MIXED_MODEL_SHARE) if objective == "mixed" else 0


def ablation_loss(objective: str, target_pred: Tensor, noise: Tensor, frozen_anchor_pred: Tensor | None) -> Tensor:
    """``frozen_anchor_pred``: the frozen prediction for the "model" objective; for "mixed", the target of every row
    (frozen predictions on the model rows, the noise on the others)."""
    if objective in ("model", "mixed"):
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
    reference = frozen_anchor_pred if objective in ("model", "mixed") and frozen_anchor_pred is not None else noise
    return F.mse_loss(anchor_pred.float(), reference.float())
