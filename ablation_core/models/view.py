"""The one view of a model the core works with: encode prompts, predict noise, list the weights a group trains.

Every backend implements it (``backends.diffusers`` for the CLI, tests and the toy world; ``backends.comfy`` for
the nodes); nothing in the core knows which program it runs in.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .families import Family
from .layers import Layer


@dataclass
class Conditioning:
    """Encoded prompts: the cross-attention context, plus SDXL's pooled text and size ids (``extra``)."""

    context: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.context.shape[0]

    def select(self, index: Tensor | list[int]) -> Conditioning:
        index = torch.as_tensor(index, device=self.context.device)
        return Conditioning(self.context[index], {k: v[index.to(v.device)] for k, v in self.extra.items()})

    def slice(self, start: int, stop: int) -> Conditioning:
        """Rows ``start:stop`` as views (no copy)."""
        return Conditioning(self.context[start:stop], {k: v[start:stop] for k, v in self.extra.items()})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        keys = parts[0].extra.keys()
        extra = {k: torch.cat([p.extra[k] for p in parts]) for k in keys}
        return Conditioning(torch.cat([p.context for p in parts]), extra)

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(self.context.to(device), {k: v.to(device) for k, v in self.extra.items()})


class ModelView(ABC):
    """A Stable Diffusion model as the ablation core sees it."""

    family: Family
    device: torch.device
    dtype: torch.dtype
    alphas_cumprod: Tensor
    latent_channels: int
    default_latent_size: int
    latent_multiple: int = 8  # latent sizes must be multiples of this: 2 ** (times the UNet halves them)

    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts with the model's text encoder(s). Gradients flow if the caller enables them."""

    @abstractmethod
    def eps(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The model's noise prediction at integer timesteps ``t`` (v-prediction models are converted)."""

    @abstractmethod
    def unet_layers(self, group: str) -> list[Layer]:
        """The UNet weights ``group`` trains, with their patch keys."""

    @abstractmethod
    def text_layers(self, group: str) -> list[Layer]:
        """The text-encoder weights ``group`` trains, with their patch keys."""

    @abstractmethod
    def token_ids(self, text: str) -> list[list[int]]:
        """Token ids of ``text`` (no start/end tokens) for each text encoder."""

    def layers(self, group: str) -> list[Layer]:
        return self.unet_layers(group) + self.text_layers(group)

    def all_layers(self) -> dict[str, Layer]:
        """Every weight a patch may touch, by patch key (used to resolve keys of loaded patches)."""
        found: dict[str, Layer] = {}
        for group in ("full", "attn", "embedding"):
            for layer in self.layers(group):
                found[layer.key] = layer
        return found

    def cancel_check_modules(self) -> list[nn.Module]:
        """Modules whose forward checks for cancel while a run is cancellable: every UNet linear and convolution."""
        return [layer.module for layer in self.unet_layers("full")]

    @contextlib.contextmanager
    def uncached_text(self) -> Iterator[None]:
        """Encode afresh inside the block (views that cache encodings must not while the text encoder is patched)."""
        yield

    def decode(self, latents: Tensor) -> Tensor:
        """Latents to RGB images in [0, 1], shape [B, 3, H, W]."""
        raise NotImplementedError("this model view cannot decode latents to images")
