"""Training inputs taken from the anchor sampler's own path: no separate frozen pass, fewer UNet evaluations.

Each solver step of anchor sampling evaluates the frozen model at a noisy latent ``x_t`` for the anchor prompt (the
conditional half of the guided pass). The model-based loss (Eq. 5) pulls the target prompt's prediction at some
``x_t`` toward exactly that frozen anchor prediction, so the triples ``(x_t, t, eps_anchor)`` the sampler already
paid for are ready-made training examples: a training step then costs one UNet pass (with gradients) per example
instead of two, and the noisy latents are the model's own, on its sampling path. ``SamplerStates`` holds them;
``training_batch`` draws a step's batch from them, or, when they are not used, noises anchor images as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...models.schedules import Schedule


@dataclass
class SamplerStates:
    """Every state the anchor sampler visited: noisy latent, timestep, frozen anchor prediction, and image index."""

    x_t: Tensor
    t: Tensor
    frozen: Tensor
    image: Tensor

    @classmethod
    def gather(cls, recorded: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> SamplerStates:
        x_t, t, frozen, image = (torch.cat(parts) for parts in zip(*recorded))
        return cls(x_t, t.long(), frozen, image.long().cpu())

    def __len__(self) -> int:
        return len(self.t)


def uses_sampler_states(config) -> bool:
    """Reuse needs the frozen anchor prediction as the target (objective "model") on images of the anchor prompts
    as sampled (memorized-image runs drop some images after sampling, so they noise images as before)."""
    return bool(config.reuse_sampler_states) and config.objective == "model" and config.concept_type != "memorized"


def training_batch(states: SamplerStates | None, latents: Tensor, image_prompt: Tensor, variants: int, batch: int,
                   schedule: Schedule, generator: torch.Generator, device: torch.device, dtype: torch.dtype,
                   low_noise_rows: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """One step's batch: ``(x_t, t, noise target, anchor prompt index, variant, frozen anchor prediction or None)``.

    The noise target is what the network should predict for the noised anchor image (the noise, or a flow's
    velocity). From sampler states: states drawn uniformly (the noise target is then the frozen prediction, which
    only the "model" objective's target uses). Otherwise anchor images noised at uniform timesteps, with the frozen
    prediction left to the caller, as in the original recipe. ``low_noise_rows``: the first rows take their
    timesteps from the same share of the least noisy timesteps, the others from the rest (the whole batch still
    covers them uniformly)."""
    if states is not None:
        pick = torch.randint(len(states), (batch,), generator=generator)
        variant = torch.randint(variants, (batch,), generator=generator)
        on_device = pick.to(states.x_t.device)
        frozen = states.frozen[on_device].to(device, dtype)
        return (states.x_t[on_device].to(device, dtype), states.t[on_device].to(device), frozen,
                image_prompt[states.image[pick]], variant, frozen)
    image = torch.randint(len(latents), (batch,), generator=generator)
    variant = torch.randint(variants, (batch,), generator=generator)
    if 0 < low_noise_rows < batch:
        split = round(schedule.steps * low_noise_rows / batch)
        t = torch.cat([torch.randint(0, split, (low_noise_rows,), generator=generator),
                       torch.randint(split, schedule.steps, (batch - low_noise_rows,), generator=generator)]).to(device)
    else:  # every row (or none) is a low-noise row: the whole range
        t = torch.randint(0, schedule.steps, (batch,), generator=generator).to(device)
    noise = torch.randn(latents[image].shape, generator=generator).to(device, dtype)
    x0 = latents[image].to(device, dtype)
    return schedule.noisy(x0, noise, t), t, schedule.noise_target(x0, noise), image_prompt[image], variant, None
