"""Sampling from any model view: the SD noise schedule, DPM-Solver++ 2M, and batched guided sampling of latents.

Anchor images for ablation are drawn from the frozen model itself with ``sample_latents``; evaluation and the
before/after grids use it too. The solver needs only an eps function and ``alphas_cumprod``, so it serves
diffusers, ComfyUI and toy models alike; latents come out of it directly, so no dataset and no VAE are needed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .view import Conditioning, ModelView

EpsFn = Callable[[Tensor, Tensor], Tensor]


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """The "scaled linear" schedule that SD1.x, SD2.x and SDXL were trained with."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def sampling_timesteps(num_train_steps: int, steps: int) -> list[int]:
    """Evenly spaced integer timesteps from the noisiest (``num_train_steps - 1``) to the cleanest (0)."""
    if steps == 1:
        return [num_train_steps - 1]
    return [int(t) for t in torch.linspace(num_train_steps - 1, 0, steps).round().long()]


@torch.no_grad()
def sample_dpmpp_2m(eps: EpsFn, noise: Tensor, alphas_cumprod: Tensor, steps: int,
                    on_step: Callable[[int], None] | None = None) -> Tensor:
    """Denoise ``noise`` into x0 with DPM-Solver++(2M) in ``steps`` model evaluations.

    ``eps(x_t, t)`` gets the batch at integer timestep ``t`` (a long tensor of shape [batch]) and returns the
    predicted noise, classifier-free guidance already folded in. Runs in float32 on the schedule.
    """
    if steps < 1:
        raise ValueError("steps must be at least 1")
    acp = alphas_cumprod.to(torch.float64)
    timesteps = sampling_timesteps(len(acp), steps)
    x = noise.float()
    lam_of = lambda s: -torch.log(torch.tensor(s, dtype=torch.float64))
    previous_x0: Tensor | None = None
    previous_h: float | None = None
    for i, t in enumerate(timesteps):
        alpha_t, sigma_t = float(acp[t].sqrt()), float((1 - acp[t]).sqrt())
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps_pred = eps(x.to(noise.dtype), t_batch).float()
        x0 = (x - sigma_t * eps_pred) / alpha_t
        if i + 1 == len(timesteps):
            x = x0
            if on_step is not None:
                on_step(i)
            break
        t_next = timesteps[i + 1]
        alpha_n, sigma_n = float(acp[t_next].sqrt()), float((1 - acp[t_next]).sqrt())
        h = float(lam_of(sigma_n / alpha_n) - lam_of(sigma_t / alpha_t))
        if previous_x0 is None or previous_h is None:
            d = x0
        else:
            r = previous_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        x = (sigma_n / sigma_t) * x - alpha_n * torch.expm1(torch.tensor(-h)).item() * d
        previous_x0, previous_h = x0, h
        if on_step is not None:
            on_step(i)
    return x.to(noise.dtype)

RecordFn = Callable[[Tensor, Tensor, Tensor], None]


def unguided(guidance: float) -> bool:
    """Guidance 1 is the prompt's own prediction: sampling needs no unconditional pass."""
    return float(guidance) == 1.0


def guided_eps(view: ModelView, cond: Conditioning, uncond: Conditioning, guidance: float,
               record: RecordFn | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """An eps function with classifier-free guidance: one batched pass over [uncond, cond].

    ``record(x_t, t, cond_eps)`` receives every state the solver visits with the prompt's own (unguided) prediction:
    the frozen model's answer at that noisy latent, which training can reuse instead of computing it again.
    Guidance 1 is the prompt's own prediction: one pass, the unconditional half is never computed."""
    both = Conditioning.cat([uncond, cond])

    def eps(x_t: Tensor, t: Tensor) -> Tensor:
        if unguided(guidance):
            cond_eps = view.eps(x_t, t, cond)
            if record is not None:
                record(x_t, t, cond_eps)
            return cond_eps
        out = view.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        uncond_eps, cond_eps = out.chunk(2)
        if record is not None:
            record(x_t, t, cond_eps)
        return uncond_eps + guidance * (cond_eps - uncond_eps)

    return eps


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
    every solver step of every batch, ``(x_t, t, eps_of_the_prompt, image_index)`` (see ``guided_eps``).
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
            def record(x_t: Tensor, t: Tensor, cond_eps: Tensor,
                       images: Tensor = torch.arange(start, start + len(index))) -> None:
                states.append((x_t.detach().to(view.dtype), t.detach(), cond_eps.detach(), images))
        eps = guided_eps(view, cond, uncond_batch, guidance, record)

        def on_step(i: int, start: int = start, count: int = len(index)) -> None:
            if on_progress is not None:
                on_progress(start + count * (i + 1) / steps, len(prompt_index))

        x0 = sample_dpmpp_2m(eps, noise[start:start + len(index)].to(view.device, view.dtype),
                             view.alphas_cumprod, steps, on_step)
        latents.append(x0.float().cpu())
    return torch.cat(latents)
