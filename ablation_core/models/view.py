"""The one view of a model the core works with: encode prompts, predict noise, list the weights a group trains.

Every backend implements it (``backends.diffusers`` for the CLI, tests and the toy world; ``backends.comfy`` for
the nodes); nothing in the core knows which program it runs in.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import AblationError
from .families import Family
from .layers import Layer
from .schedules import Schedule

NON_FINITE_TEXT = (
    "the text encoder returned NaN or infinite values for {count} of {total} prompt(s) (e.g. '{example}'); nothing "
    "was changed. The checkpoint's text encoder may be damaged or in a precision it overflows in (try float32), or "
    "the program's prompt processing divided by zero (in A1111: Settings -> Stable Diffusion -> Emphasis mode "
    "'No norm' skips its mean rescaling)")


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

    def with_guidance(self, guidance: float) -> Conditioning:
        """The same prompts with a guidance scale for guidance-distilled networks (Flux dev reads it as an input)."""
        scale = torch.full((len(self),), float(guidance), device=self.context.device)
        return Conditioning(self.context, {**self.extra, "guidance": scale})


def require_finite(encoded: Conditioning, prompts: list[str]) -> Conditioning:
    """``encoded`` as it is, or a clear error naming a prompt whose encoding is not finite (a NaN here would
    otherwise surface much later as a NaN loss or a failed solve)."""
    bad = ~torch.isfinite(encoded.context.reshape(len(encoded), -1)).all(dim=1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0])
        raise AblationError(NON_FINITE_TEXT.format(count=int(bad.sum()), total=len(prompts), example=prompts[first]))
    return encoded


class PromptCache:
    """Encodings kept per prompt, so anchor sampling and training never encode a prompt twice (views of programs
    whose text encoders are slow to run or to load use it); ``disabled()`` encodes afresh inside a block."""

    def __init__(self, encode_many: Callable[[list[str]], Conditioning]):
        self.encode_many = encode_many
        self.encoded: dict[str, Conditioning] = {}
        self.enabled = True

    def encode(self, prompts: list[str]) -> Conditioning:
        if not self.enabled or torch.is_grad_enabled():
            return self.encode_many(prompts)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.encoded]
        if missing:
            encoded = require_finite(self.encode_many(missing), missing)
            for index, prompt in enumerate(missing):
                self.encoded[prompt] = encoded.select([index])
        return Conditioning.cat([self.encoded[p] for p in prompts])

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


class ModelView(ABC):
    """A text-to-image model as the ablation core sees it: a UNet (SD) or a flow transformer (Flux) with its text
    encoders. ``schedule`` says how images are noised and what ``predict`` returns (noise or velocity)."""

    family: Family
    device: torch.device
    dtype: torch.dtype
    schedule: Schedule
    latent_channels: int
    default_latent_size: int
    latent_multiple: int = 8  # latent sizes must be multiples of this: 2 ** (times the UNet halves them)
    guidance_input: bool = False  # the network reads the guidance scale (Flux dev) instead of running CFG
    context_start_tokens: int = 1  # CLIP starts every sequence with a start token; T5 has none
    context_causal: bool = True  # CLIP's positions see only what comes before them; T5's see the whole prompt
    encode_step: int = 8  # prompts encoded between two progress reports (about a second of a CPU's SD1 CLIP)
    closed_form_group: str = "kv"  # the parameter group the closed form edits (its patches' metadata)
    activation_scale: float = 1.0  # training activations over those of the family's measured model (models.memory)

    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts with the model's text encoder(s). Gradients flow if the caller enables them."""

    @abstractmethod
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The network's prediction at integer timesteps ``t`` in the schedule's space: the noise for SD (v-prediction
        models are converted), the velocity for flow models."""

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

    def closed_form_layers(self) -> dict[str, list[Layer]]:
        """The layers the closed form edits, by the input they read: ``"context"`` (the encoded token sequence) or a
        key of ``Conditioning.extra`` (a pooled vector). SD: the cross-attention K/V, which all read the context."""
        return {"context": self.unet_layers(self.closed_form_group)}

    def token_embedding_modules(self) -> list[nn.Module]:
        """Each text encoder's token-embedding module (one for SD1/SD2, two for SDXL), read by the attacks and the
        robust rounds; by default the modules the ``embedding`` group trains."""
        return [layer.module for layer in self.text_layers("embedding")]

    def encoder_ids(self, ids: Tensor) -> list[Tensor]:
        """Token id sequences in CLIP's layout ([batch, 77]: start, tokens, end, end-token padding) as each text
        encoder reads them (the attacks write ids directly). SD: every encoder reads that layout."""
        return [ids] * len(self.token_embedding_modules())

    def encoder_positions(self, positions: list[int]) -> list[list[int | None]]:
        """Positions in CLIP's layout as each text encoder numbers them (None: a position it does not read)."""
        return [list(positions)] * len(self.token_embedding_modules())

    def transformer_blocks(self) -> list[nn.Module]:
        """The UNet's transformer blocks, which gradient checkpointing recomputes (``models.checkpointing``)."""
        return []

    def text_encoders_to_set_aside(self) -> list[nn.Module]:
        """Text encoders this view may move to the CPU while the UNet trains; none where the host program manages
        its own memory (ComfyUI and A1111 load and unload their models themselves)."""
        return []

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
