"""Anchor images drawn from the frozen model itself, so no dataset and no VAE are needed.

Latents come straight out of the sampler and are what the training loop noises; they are sampled in batches with
classifier-free guidance, deterministically from a seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .backends.base import Conditioning, ModelView
from .sampling import sample_dpmpp_2m


def guided_eps(view: ModelView, cond: Conditioning, uncond: Conditioning,
               guidance: float) -> Callable[[Tensor, Tensor], Tensor]:
    """An eps function with classifier-free guidance: one batched pass over [uncond, cond]."""
    both = Conditioning.cat([uncond, cond])

    def eps(x_t: Tensor, t: Tensor) -> Tensor:
        out = view.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
        uncond_eps, cond_eps = out.chunk(2)
        return uncond_eps + guidance * (cond_eps - uncond_eps)

    return eps


@torch.no_grad()
def sample_latents(view: ModelView, prompts: list[str], prompt_index: Tensor, steps: int, guidance: float,
                   batch_size: int, seed: int, latent_size: int | None = None,
                   on_progress: Callable[[float, int], None] | None = None,
                   encoded: Conditioning | None = None) -> Tensor:
    """Sample one latent per entry of ``prompt_index`` (indices into ``prompts``); returns them on the CPU.

    ``on_progress(images_done, images_total)`` is called after every sampler step, with a fractional count of images
    (a batch half-way through its solver steps counts half), so progress bars and cancel checks stay live.
    ``encoded`` may hold ``prompts`` already encoded, to skip encoding them again.
    """
    size = latent_size or view.default_latent_size
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompt_index), view.latent_channels, size, size, generator=generator)
    cond_all = encoded if encoded is not None else view.encode(prompts)
    uncond = view.encode([""])
    latents = []
    for start in range(0, len(prompt_index), batch_size):
        index = prompt_index[start:start + batch_size]
        cond = cond_all.select(index)
        uncond_batch = uncond.select([0] * len(index))
        eps = guided_eps(view, cond, uncond_batch, guidance)

        def on_step(i: int, start: int = start, count: int = len(index)) -> None:
            if on_progress is not None:
                on_progress(start + count * (i + 1) / steps, len(prompt_index))

        x0 = sample_dpmpp_2m(eps, noise[start:start + len(index)].to(view.device, view.dtype),
                             view.alphas_cumprod, steps, on_step)
        latents.append(x0.float().cpu())
    return torch.cat(latents)
