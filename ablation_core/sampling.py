"""A fast deterministic sampler (DPM-Solver++ 2M on the discrete DDPM schedule) over any eps predictor.

Anchor images for ablation are drawn from the frozen model itself; this is the sampler that draws them, and the
toy world's evaluation uses it too. It needs only an eps function and ``alphas_cumprod``, so it serves diffusers,
ComfyUI and toy models alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

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
