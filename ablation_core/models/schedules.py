"""How a model family noises images and what its network predicts, as ComfyUI's ``model_sampling`` does.

Every family shares one convention: ``x_t = alpha_t * x0 + sigma_t * noise`` at integer timesteps ``t`` from 0 (least
noisy) to ``steps - 1`` (most noisy). What differs is held here, and nothing else branches on it:

- ``EpsSchedule``: Stable Diffusion's variance-preserving schedule (``alpha^2 + sigma^2 = 1`` from
  ``alphas_cumprod``); the network's prediction, as a view returns it, is the noise (v-prediction models are
  converted by their views).
- ``FlowSchedule``: rectified flow (Flux, SD3): ``x_t = (1 - s) x0 + s noise`` with ``s`` the timestep shifted
  toward the noisy end, and the network predicts the velocity ``noise - x0``.

The losses compare predictions in the network's own space (noise or velocity), the sampler and the attacks ask the
schedule for ``x0`` and the noised images.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """The "scaled linear" schedule that SD1.x, SD2.x and SDXL were trained with."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device, torch.float32).view(-1, *([1] * (like.dim() - 1)))


class Schedule(ABC):
    """A family's noise schedule over ``steps`` integer timesteps, and what its network predicts."""

    prediction: str
    steps: int

    @abstractmethod
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` (float64) at integer timesteps ``t``."""

    @abstractmethod
    def noise_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """What the network should predict for ``x0`` noised with ``noise`` (the noise-based loss's target)."""

    @abstractmethod
    def x0_from(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """The clean image the prediction at ``(x_t, t)`` implies."""

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x0`` noised to timesteps ``t`` (one per sample), in ``x0``'s dtype."""
        alpha, sigma = self.coefficients(t.cpu())
        return (_per_sample(alpha, x0) * x0.float() + _per_sample(sigma, x0) * noise.float()).to(x0.dtype)

    def to_noise_prediction(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        """The noise the prediction implies (for metrics that read every family in the same units)."""
        alpha, sigma = self.coefficients(t.cpu())
        x0 = self.x0_from(x_t, t, prediction).float()
        return ((x_t.float() - _per_sample(alpha, x_t) * x0) / _per_sample(sigma, x_t).clamp_min(1e-6))

    def sampling_timesteps(self, count: int) -> list[int]:
        """Evenly spaced integer timesteps from the noisiest to the cleanest (0)."""
        if count < 1:
            raise ValueError("steps must be at least 1")
        if count == 1:
            return [self.steps - 1]
        return [int(t) for t in torch.linspace(self.steps - 1, 0, count).round().long()]


class EpsSchedule(Schedule):
    """Stable Diffusion's discrete schedule; predictions are noise."""

    prediction = "epsilon"

    def __init__(self, alphas_cumprod: Tensor):
        self.alphas_cumprod = alphas_cumprod.to(torch.float64)
        self.steps = len(self.alphas_cumprod)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        acp = self.alphas_cumprod[t.long().cpu()]
        return acp.sqrt(), (1 - acp).sqrt()

    def noise_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise

    def noise_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """A v-prediction model's output as the noise it implies, ``sqrt(acp) v + sqrt(1 - acp) x_t`` (float32, on
        ``v``'s device): how the SD2 768-v views give ``predict`` its noise."""
        acp = self.alphas_cumprod.to(v.device, torch.float32)[t.to(v.device)].view(-1, 1, 1, 1)
        return acp.sqrt() * v.float() + (1 - acp).sqrt() * x_t.to(v.device).float()

    def x0_from(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        alpha, sigma = self.coefficients(t.cpu())
        return (x_t.float() - _per_sample(sigma, x_t) * prediction.float()) / _per_sample(alpha, x_t)


class FlowSchedule(Schedule):
    """Rectified flow with a timestep shift: ``sigma = shift * s / (1 + (shift - 1) * s)``, ``s = (t + 1) / steps``.

    Flux's resolution-dependent ``mu`` is the same curve with ``shift = exp(mu)``; SD3 uses ``shift = 3``."""

    prediction = "velocity"

    def __init__(self, shift: float = 1.0, steps: int = 1000):
        self.shift, self.steps = float(shift), int(steps)

    def sigmas(self, t: Tensor) -> Tensor:
        s = (t.to(torch.float64) + 1) / self.steps
        return self.shift * s / (1 + (self.shift - 1) * s)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        sigma = self.sigmas(t.cpu())
        return 1 - sigma, sigma

    def noise_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    def x0_from(self, x_t: Tensor, t: Tensor, prediction: Tensor) -> Tensor:
        return x_t.float() - _per_sample(self.sigmas(t.cpu()), x_t) * prediction.float()

    def timestep_of_sigma(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep index of a noise level: the inverse of ``sigmas``."""
        s = sigma.double() / (self.shift - (self.shift - 1) * sigma.double())
        return s * self.steps - 1
