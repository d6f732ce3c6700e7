"""The Flux backend: a ``FluxTransformer`` with its T5 and CLIP encoders, seen as the core's ``ModelView``.

Serves the embedded toy-flux world, Flux.1 single-file transformers (the layout ComfyUI's UNETLoader and Forge read)
with their text encoders, and diffusers Flux folders (converted to the same names on load), for the CLI, the Python
API and the tests. The view speaks the flow schedule: ``predict`` returns the velocity, and guidance-distilled
models (dev) read the guidance scale as an input instead of running classifier-free guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AblationError
from ..models.families import Family
from ..models.flux.text import FluxTextEncoders
from ..models.flux.transformer import FluxTransformer
from ..models.fp8 import cast_keeping_fp8
from ..models.layers import Layer, kohya_key, layer_kind, select_flux_modules
from ..models.memory import FLUX_WIDTH_X_BLOCKS
from ..models.schedules import FlowSchedule
from ..models.view import Conditioning, ModelView

CLIP_END = 49407
UNET_PREFIX = "lora_unet_"  # kohya's prefix for the diffusion network, which ComfyUI and Forge map for Flux too


def flux_activation_scale(hidden_size: int, blocks: int) -> float:
    """A Flux model's training activations relative to Flux.1's (``models.memory``): width x blocks."""
    return hidden_size * blocks / FLUX_WIDTH_X_BLOCKS


class FluxModelView(ModelView):
    """Flux as the core sees it. ``encode`` gives the T5 sequence as ``context`` and CLIP's pooled vector as
    ``extra["pooled"]``; ``guidance`` is the scale a distilled model reads when a conditioning carries none."""

    context_start_tokens = 0
    context_causal = False
    closed_form_group = "embedding"

    def __init__(self, transformer: FluxTransformer, encoders: FluxTextEncoders, family: Family,
                 schedule: FlowSchedule, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 source: str = "", default_latent_size: int = 64, guidance: float = 3.5, vae: nn.Module | None = None):
        self.family, self.transformer, self.encoders, self.vae = family, transformer, encoders, vae
        self.schedule, self.source = schedule, source
        self.device, self.dtype = torch.device(device), dtype
        self.guidance_input = bool(transformer.config.guidance_embed)
        self.default_guidance = float(guidance)
        self.latent_channels = transformer.config.in_channels
        self.activation_scale = flux_activation_scale(transformer.config.hidden_size, len(transformer.double_blocks)
                                                      + len(transformer.single_blocks))
        self.default_latent_size = default_latent_size
        self.latent_multiple = transformer.config.patch_size
        self._shared_vocabulary: bool | None = None
        for module in (transformer, encoders):
            module.to(self.device).eval().requires_grad_(False)
        cast_keeping_fp8(transformer, dtype)

    # Text ------------------------------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Conditioning:
        text = self.encoders(prompts)
        return Conditioning(text.context.to(self.dtype), {"pooled": text.pooled.to(self.dtype)})

    def token_ids(self, text: str) -> list[list[int]]:
        return list(self.encoders.words(text))

    def token_embedding_modules(self) -> list[nn.Module]:
        return [t5_token_embedding(self.encoders.t5), self.encoders.clip.get_input_embeddings()]

    def encoder_ids(self, ids: Tensor) -> list[Tensor]:
        """CLIP's layout for CLIP; for T5 the same tokens without the start token, its end token and its padding
        (the toy's two encoders share the SD vocabulary; Flux.1's do not, so ids cannot be written into both)."""
        self._check_shared_vocabulary()
        t5 = []
        for row in ids.tolist():
            body = row[1:]
            tokens = body[:body.index(CLIP_END)] if CLIP_END in body else body
            tokens = tokens[: self.encoders.sequence_length - 1] + [self.encoders.t5_eos]
            t5.append(tokens + [self.encoders.t5_pad] * (self.encoders.sequence_length - len(tokens)))
        return [torch.tensor(t5, device=ids.device), ids]

    def encoder_positions(self, positions: list[int]) -> list[list[int | None]]:
        self._check_shared_vocabulary()
        t5 = [p - 1 if 0 < p < self.encoders.sequence_length else None for p in positions]
        return [t5, list(positions)]

    def _check_shared_vocabulary(self) -> None:
        if self._shared_vocabulary is None:
            self._shared_vocabulary = self.encoders.t5_tokenizer.get_vocab() == self.encoders.clip_tokenizer.get_vocab()
        if not self._shared_vocabulary:
            raise AblationError("token ids can be written into both text encoders only when they share a vocabulary "
                                "(the toy-flux world); Flux.1's T5 and CLIP do not, so the token search is not "
                                "available for it")

    # Transformer -----------------------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        sigma = self.schedule.sigmas(t.cpu()).to(self.device, torch.float32)
        guidance = None
        if self.guidance_input:
            guidance = cond.extra.get("guidance")
            if guidance is None:
                guidance = torch.full((len(x_t),), self.default_guidance, device=self.device)
        return self.transformer(x_t.to(self.dtype), sigma, cond.context, cond.extra["pooled"], guidance)

    def unet_layers(self, group: str) -> list[Layer]:
        """The transformer's weights ``group`` trains (``models.layers`` says which), keyed as kohya names them."""
        return [Layer(kohya_key(UNET_PREFIX, name), module, "linear", rows)
                for name, module, rows in select_flux_modules(self.transformer.named_modules(), group)]

    def closed_form_layers(self) -> dict[str, list[Layer]]:
        """UCE's Flux edit: ``txt_in`` reads the T5 sequence, ``vector_in.in_layer`` the pooled CLIP vector."""
        layers = self.unet_layers("embedding")
        return {"context": [layer for layer in layers if layer.key.endswith("txt_in")],
                "pooled": [layer for layer in layers if layer.key.endswith("vector_in_in_layer")]}

    def text_layers(self, group: str) -> list[Layer]:
        return []  # no group trains Flux's text encoders: the prompt-reading maps are in the transformer

    def transformer_blocks(self) -> list[nn.Module]:
        return [*self.transformer.double_blocks, *self.transformer.single_blocks]

    def text_encoders_to_set_aside(self) -> list[nn.Module]:
        return [self.encoders]

    def cancel_check_modules(self) -> list[nn.Module]:
        return [m for m in self.transformer.modules() if layer_kind(m) == "linear"]

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            if self.latent_channels == 3:
                return ((latents.float() + 1) / 2).clamp(0, 1)
            raise NotImplementedError("no VAE was loaded with this Flux model, so latents cannot become images")
        with torch.no_grad():
            return ((self.vae(latents.to(self.dtype)).float() + 1) / 2).clamp(0, 1)


def t5_token_embedding(t5: nn.Module) -> nn.Module:
    """The embedding module T5's encoder calls. transformers 5 ties ``shared`` and ``encoder.embed_tokens`` by their
    weight, not as one module, so a hook on ``get_input_embeddings()`` (``shared``) would never run."""
    encoder = t5.get_encoder() if hasattr(t5, "get_encoder") else None
    return getattr(encoder, "embed_tokens", None) or t5.get_input_embeddings()
