"""Loading Flux models as ``FluxModelView``: the embedded toy-flux world, single-file transformers with their text
encoders from their own files, and diffusers Flux folders.

The flow schedule follows the diffusers pipeline and ComfyUI: dev (guidance-distilled) shifts the timesteps by the
image size (``mu`` from 0.5 at 256 image tokens to 1.15 at 4096, ``shift = e^mu``); schnell is not shifted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UnsupportedModelError
from ..models.families import FLUX, MMDIT_TEXT, TOY_FLUX
from ..models.flux.files import build_flux_transformer, flux_transformer_state, read_safetensors
from ..models.flux.text import FluxTextEncoders
from ..models.flux.text_files import load_clip_l, load_t5, load_t5_tokenizer
from ..models.flux.transformer import FluxTransformer
from ..models.fp8 import store_fp8
from ..models.schedules import FlowSchedule
from ..models.tokenizer import sd_clip_tokenizer
from .flux import FluxModelView

DEV_GUIDANCE = 3.5
DEFAULT_LATENT_SIZE = 64  # 512 px
SEQUENCE_LENGTH = {True: 512, False: 256}  # dev reads 512 T5 tokens, schnell 256
TEXT_HELP = ("a Flux transformer file needs its text encoders: --clip-l CLIP_L.safetensors --t5 T5XXL.safetensors "
             "--t5-tokenizer DIR (or a diffusers Flux folder, which holds all of them)")


@dataclass
class FluxTextSources:
    """Where Flux's text encoders and T5's tokenizer come from (files or transformers folders)."""

    clip_l: str | Path | None = None
    t5: str | Path | None = None
    t5_tokenizer: str | Path | None = None


def flux_schedule(transformer: FluxTransformer, latent_size: int = DEFAULT_LATENT_SIZE) -> FlowSchedule:
    """dev: the resolution-dependent shift of the diffusers pipeline; schnell: none."""
    if not transformer.config.guidance_embed:
        return FlowSchedule(shift=1.0)
    tokens = (latent_size // transformer.config.patch_size) ** 2
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    return FlowSchedule(shift=math.exp(mu))


FP8_BLOCKS = ("double_blocks.", "single_blocks.")  # fp8 storage: the blocks' Linear weights (all but 0.1 % of them)


def load_toy_flux_view(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       fp8: bool = False) -> FluxModelView:
    from ..toy import flux as toy_flux  # the toy world is imported only when asked for

    transformer, encoders = toy_flux.load_toy_flux(device, dtype)
    if fp8:
        store_fp8(transformer, FP8_BLOCKS)
    return FluxModelView(transformer, encoders, TOY_FLUX, toy_flux.schedule(), device, dtype, source="toy-flux",
                         default_latent_size=16, guidance=toy_flux.DEFAULT_GUIDANCE)


def load_flux_view(spec: str | Path, text: FluxTextSources | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> FluxModelView:
    """A Flux transformer file (or a diffusers Flux folder) with its text encoders, as a ``FluxModelView``."""
    path = Path(spec)
    text = text or FluxTextSources()
    if path.is_dir():
        transformer = _diffusers_transformer(path / "transformer", dtype)
        text = FluxTextSources(text.clip_l or path / "text_encoder", text.t5 or path / "text_encoder_2",
                               text.t5_tokenizer or path / "tokenizer_2")
    else:
        state, metadata = read_safetensors(path)
        transformer = build_flux_transformer(flux_transformer_state(state), metadata, dtype)
    if text.clip_l is None or text.t5 is None:
        raise UnsupportedModelError(TEXT_HELP)
    if fp8:  # before the text encoders load, so the peak is the fp8 transformer's plus theirs
        store_fp8(transformer, FP8_BLOCKS)
    encoders = FluxTextEncoders(load_t5(text.t5, dtype), load_t5_tokenizer(text.t5_tokenizer),
                                load_clip_l(text.clip_l, dtype), sd_clip_tokenizer(),
                                SEQUENCE_LENGTH[transformer.config.guidance_embed])
    return FluxModelView(transformer, encoders, FLUX, flux_schedule(transformer), device, dtype, source=str(path),
                         default_latent_size=DEFAULT_LATENT_SIZE, guidance=DEV_GUIDANCE)


def _diffusers_transformer(folder: Path, dtype: torch.dtype) -> FluxTransformer:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{folder} holds no .safetensors weights of a Flux transformer (a diffusers "
                                    f"folder with a transformer/ is read as Flux; {MMDIT_TEXT})")
    state: dict = {}
    for file in files:  # sharded checkpoints: diffusion_pytorch_model-0000N-of-0000M.safetensors
        state.update(read_safetensors(file)[0])
    return build_flux_transformer(flux_transformer_state(state), None, dtype)
