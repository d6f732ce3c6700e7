"""Before a trained ablation starts: will it fit the device's memory? (``models.memory`` has the estimate.)

The model is already loaded when ``ablate`` runs, so what is checked is what the run adds: training activations,
the trained deltas with their optimizer state, and the stored sampler states. ``ABLATION_SKIP_MEMORY_CHECK=1``
skips the check for someone who knows better (a device whose free memory is reported low but can be reclaimed).
"""

from __future__ import annotations

import os

from ...models.layers import Layer
from ...models.memory import MemoryEstimate, check_fits, estimate
from ...models.view import ModelView
from .budget import gradient_passes_per_step
from .reuse import uses_sampler_states
from .settings import AblationConfig

SKIP_VARIABLE = "ABLATION_SKIP_MEMORY_CHECK"


def run_estimate(view: ModelView, config: AblationConfig, layers: list[Layer],
                 weight_parameters: int = 0) -> MemoryEstimate:
    latent = config.latent_size or view.default_latent_size
    rows = gradient_passes_per_step(config)
    rank = int(config.lora_rank or 0)
    trained = sum(rank * sum(layer.module.weight.shape[:2]) if rank else layer.module.weight.numel()
                  for layer in layers)
    needed = estimate(view.family.name, latent, rows, view.dtype, trained, weight_parameters,
                      bool(config.gradient_checkpointing), view.activation_scale)
    if uses_sampler_states(config):  # x_t and the frozen prediction of every solver step, in the model's dtype
        value_bytes = 2 if view.dtype.itemsize <= 2 else 4
        needed.framework += (2 * int(config.anchor_images) * int(config.sampler_steps) * view.latent_channels
                             * latent * latent * value_bytes)
    return needed


def check_run_fits(view: ModelView, config: AblationConfig, layers: list[Layer]) -> None:
    """Raise ``OutOfMemoryError`` (with what to change) when the run would not fit; nothing has started yet."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        return
    check_fits(run_estimate(view, config, layers), view.device, int(config.batch_size),
               config.latent_size or view.default_latent_size, view.dtype, bool(config.gradient_checkpointing),
               getattr(view, "setting_names", None))
