"""Sampling from any model view: DPM-Solver++ 2M on the view's schedule, and batched guided sampling of latents.

Anchor images for ablation are drawn from the frozen model itself with ``sample_latents``; evaluation and the
before/after grids use it too. The solver needs only a prediction function and a ``Schedule``, so it serves
diffusers, ComfyUI, A1111, toy and flow models alike; latents come out of it directly, so no dataset and no VAE are
needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import Schedule, sd_alphas_cumprod  # noqa: F401  (re-exported for older imports)
from .view import Conditioning, ModelView

PredictFn = Callable[[Tensor, Tensor], Tensor]


@torch.no_grad()
def sample_dpmpp_2m(predict: PredictFn, noise: Tensor, schedule: Schedule, steps: int,
                    on_step: Callable[[int], None] | None = None) -> Tensor:
    """Denoise ``noise`` into x0 with DPM-Solver++(2M) in ``steps`` model evaluations.

    ``predict(x_t, t)`` gets the batch at integer timestep ``t`` (a long tensor of shape [batch]) and returns the
    network's prediction in the schedule's space (noise or velocity), guidance already folded in. The solver works
    on ``x0`` and ``lambda = log(alpha / sigma)``, so it serves every schedule; a flow's first step starts from pure
    noise (``alpha = 0``), where the update is the first-order one. Runs in float32.
    """
    timesteps = schedule.sampling_timesteps(steps)
    x = noise.float()
    previous_x0: Tensor | None = None
    previous_h: float | None = None
    for i, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = schedule.x0_from(x, t_batch, predict(x.to(noise.dtype), t_batch)).float()
        if i + 1 == len(timesteps):
            x = x0
            if on_step is not None:
                on_step(i)
            break
        alpha_t, sigma_t = (float(v) for v in schedule.coefficients(torch.tensor([t])))
        alpha_n, sigma_n = (float(v) for v in schedule.coefficients(torch.tensor([timesteps[i + 1]])))
        h = _log_snr(alpha_n, sigma_n) - _log_snr(alpha_t, sigma_t)
        if previous_x0 is None or previous_h is None or math.isinf(previous_h):
            d = x0
        else:
            r = previous_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        x = (sigma_n / sigma_t) * x - alpha_n * math.expm1(-h) * d
        previous_x0, previous_h = x0, h
        if on_step is not None:
            on_step(i)
    return x.to(noise.dtype)


def _log_snr(alpha: float, sigma: float) -> float:
    return math.log(alpha / sigma) if alpha > 0 else -math.inf


RecordFn = Callable[[Tensor, Tensor, Tensor], None]


def unguided(guidance: float) -> bool:
    """Guidance 1 is the prompt's own prediction: sampling needs no unconditional pass."""
    return float(guidance) == 1.0


def guided_prediction(view: ModelView, cond: Conditioning, uncond: Conditioning, guidance: float,
                      record: RecordFn | None = None) -> PredictFn:
    """A prediction function with guidance: classifier-free guidance as one batched pass over [uncond, cond], or,
    for guidance-distilled models (Flux dev: ``view.guidance_input``), the guidance scale given to the network.

    ``record(x_t, t, prediction)`` receives every state the solver visits with the prompt's own prediction (unguided,
    or the distilled model's at this guidance): the frozen model's answer at that noisy latent, which training can
    reuse instead of computing it again. Guidance 1 is the prompt's own prediction: one pass."""
    if view.guidance_input:
        cond = cond.with_guidance(guidance)
    both = Conditioning.cat([uncond, cond]) if not (view.guidance_input or unguided(guidance)) else cond

    def predict(x_t: Tensor, t: Tensor) -> Tensor:
        if view.guidance_input or unguided(guidance):
            own = view.predict(x_t, t, cond)
            if record is not None:
                record(x_t, t, own)
            return own
        out = view.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        unconditional, own = out.chunk(2)
        if record is not None:
            record(x_t, t, own)
        return unconditional + guidance * (own - unconditional)

    return predict


@torch.no_grad()
def sample_latents(view: ModelView, prompts: list[str], prompt_index: Tensor, steps: int, guidance: float,
                   batch_size: int, seed: int, latent_size: int | None = None,
                   on_progress: Callable[[float, int], None] | None = None,
                   encoded: Conditioning | None = None, negative_prompt: str = "",
                   states: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None) -> Tensor:
    """Sample one latent per entry of ``prompt_index`` (indices into ``prompts``); returns them on the CPU.

    ``on_progress(images_done, images_total)`` is called after every sampler step, with a fractional count of images
    (a batch half-way through its solver steps counts half), so progress bars and cancel checks stay live.
    ``encoded`` may hold ``prompts`` already encoded, to skip encoding them again. ``negative_prompt`` replaces the
    empty prompt of classifier-free guidance (sampling then steers away from it). A ``states`` list receives, for
    every solver step of every batch, ``(x_t, t, prediction_of_the_prompt, image_index)`` (see
    ``guided_prediction``).
    """
    size = latent_size or view.default_latent_size
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompt_index), view.latent_channels, size, size, generator=generator)
    cond_all = encoded if encoded is not None else view.encode(prompts)
    uncond = view.encode([negative_prompt])
    latents = []
    for start in range(0, len(prompt_index), batch_size):
        index = prompt_index[start:start + batch_size]
        cond = cond_all.select(index)
        uncond_batch = uncond.select([0] * len(index))
        record = None
        if states is not None:
            def record(x_t: Tensor, t: Tensor, own: Tensor,
                       images: Tensor = torch.arange(start, start + len(index))) -> None:
                states.append((x_t.detach().to(view.dtype), t.detach(), own.detach(), images))
        predict = guided_prediction(view, cond, uncond_batch, guidance, record)

        def on_step(i: int, start: int = start, count: int = len(index)) -> None:
            if on_progress is not None:
                on_progress(start + count * (i + 1) / steps, len(prompt_index))

        x0 = sample_dpmpp_2m(predict, noise[start:start + len(index)].to(view.device, view.dtype),
                             view.schedule, steps, on_step)
        latents.append(x0.float().cpu())
    return torch.cat(latents)
