"""A ComfyUI Flux ``MODEL`` and ``CLIP``, shaped like the real ones (``comfy.ldm.flux.model.Flux`` under
``BaseModel.diffusion_model``, ``ModelSamplingFlux``, DualCLIPLoader's flux CLIP), on the toy-flux architecture.

As in ComfyUI, the diffusion model's ``forward(x, timestep, context, y, guidance, transformer_options)`` takes the
flow time (sigma) and returns the velocity; its double and single stream blocks add their residuals **in place**
(``txt += ...``, ``x += ...``), which is what breaks autograd in the real ComfyUI; the CLIP tokenizes for both
encoders (``{"l": ..., "t5xxl": ...}``, T5 padded to its minimum length) and returns the T5 sequence with the
pooled CLIP vector.
"""

from __future__ import annotations

import dataclasses
import math
import types

import torch
from torch import Tensor, nn

from ablation_core.models.flux.transformer import FluxTransformer, timestep_embedding

try:  # pytest puts tests/ on the path; the harnesses run as ``python -m tests.<name>``
    import comfy_fakes as fakes
except ImportError:
    from tests import comfy_fakes as fakes
from ablation_core.toy import flux as toy_flux

T5_MIN_LENGTH = toy_flux.SEQUENCE_LENGTH


def _in_place(block: nn.Module, double: bool) -> None:
    """The block's own computation, with the stream it returns added to its input in place, as ComfyUI's are."""
    forward = block.forward

    def double_forward(img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
        new_img, new_txt = forward(img, txt, vec, pe)
        txt += new_txt - txt
        return new_img, txt

    def single_forward(x: Tensor, vec: Tensor, pe: Tensor, **kwargs) -> Tensor:
        new = forward(x, vec, pe)
        x += new - x
        return x

    block.forward = double_forward if double else single_forward


class ComfyFlux(nn.Module):
    """``comfy.ldm.flux.model.Flux`` as far as the backend uses it: BFL module names, ``params``, its forward."""

    def __init__(self, transformer: FluxTransformer):
        super().__init__()
        config = transformer.config
        self.params = types.SimpleNamespace(guidance_embed=config.guidance_embed, patch_size=config.patch_size,
                                            in_channels=config.in_channels, hidden_size=config.hidden_size)
        for name, child in transformer.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_transformer", transformer)
        for block in self.double_blocks:
            _in_place(block, double=True)
        for block in self.single_blocks:
            _in_place(block, double=False)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
                guidance: Tensor | None = None, transformer_options: dict | None = None, **kwargs) -> Tensor:
        """``FluxTransformer.forward``, calling the blocks as ComfyUI's ``forward_orig`` does (0.3.64): a double
        block with keywords only (``block(img=img, txt=txt, vec=vec, pe=pe, ...)``), a single block with the
        stream first (``block(img, vec=vec, pe=pe, ...)``)."""
        t = self._transformer
        height, width = x.shape[-2:]
        img = t.img_in(t.patchify(x))
        vec = t.time_in(timestep_embedding(timestep, 256).to(img.dtype))
        if t.config.guidance_embed:
            vec = vec + t.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + t.vector_in(y.to(img.dtype))
        txt = t.txt_in(context.to(img.dtype))
        pe = t.pe_embedder(t.position_ids(len(x), height, width, txt.shape[1], x.device))
        options = transformer_options or {}
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=None, transformer_options=options)
        joined = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            joined = block(joined, vec=vec, pe=pe, attn_mask=None, transformer_options=options)
        return t.unpatchify(t.final_layer(joined[:, txt.shape[1]:], vec), height, width)


class ModelSamplingFlux(nn.Module):
    def __init__(self, shift: float):
        super().__init__()
        self.shift = shift
        t = torch.arange(1, 10_001) / 10_000
        self.register_buffer("sigmas", math.exp(shift) / (math.exp(shift) + (1 / t - 1)))

    def timestep(self, sigma: Tensor) -> Tensor:
        return sigma


class FluxBaseModel(fakes.BaseModel):
    def __init__(self, diffusion_model: ComfyFlux, shift: float):
        super().__init__(diffusion_model, model_type=fakes.ModelType.FLOW,
                         latent_channels=diffusion_model.params.in_channels)
        self.model_sampling = ModelSamplingFlux(shift)


class FluxClipModel(nn.Module):
    """DualCLIPLoader's ``cond_stage_model`` for flux: ``clip_l`` and ``t5xxl``."""

    def __init__(self, encoders):
        super().__init__()
        self.clip_l, self.t5xxl = encoders.clip, encoders.t5


class FluxCLIP:
    """``comfy.sd.CLIP`` holding Flux's two text encoders (here the toy-flux ones, which share the SD vocabulary)."""

    def __init__(self, encoders):
        self.encoders = encoders
        self.cond_stage_model = FluxClipModel(encoders)
        self.patcher = fakes.ModelPatcher(self.cond_stage_model)
        # ComfyUI's FluxTokenizer: the T5 tokenizer's own minimum length, and the options T5TokenizerOptions sets
        self.tokenizer = types.SimpleNamespace(t5xxl=types.SimpleNamespace(min_length=T5_MIN_LENGTH, min_padding=None))
        self.tokenizer_options: dict = {}

    def set_tokenizer_option(self, name: str, value) -> None:
        self.tokenizer_options[name] = value

    def clone(self) -> FluxCLIP:
        return self

    def add_patches(self, patches: dict, strength_patch: float = 1.0, strength_model: float = 1.0) -> list:
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        """As ComfyUI's: T5 padded to ``t5xxl_min_length`` (the tokenizer's own unless an option says otherwise)."""
        options = {**self.tokenizer_options, **kwargs.get("tokenizer_options", {})}
        clip = self.encoders.clip_ids([text])[0].tolist()
        t5 = self.encoders.t5_ids([text])[0].tolist()
        t5 = t5[:t5.index(self.encoders.t5_eos) + 1]
        length = options.get("t5xxl_min_length", self.tokenizer.t5xxl.min_length) or 0
        t5 += [self.encoders.t5_pad] * ((options.get("t5xxl_min_padding") or 0) + max(0, length - len(t5)))
        return {"l": [[(int(i), 1.0) for i in clip]], "t5xxl": [[(int(i), 1.0) for i in t5]]}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        t5 = torch.tensor([[t for t, _ in tokens["t5xxl"][0]]])
        clip = torch.tensor([[t for t, _ in tokens["l"][0]]])
        context = self.encoders.t5(input_ids=t5).last_hidden_state
        pooled = self.encoders.clip(input_ids=clip).pooler_output
        return (context, pooled) if return_pooled else context


def make_flux(seed: int = 3, shift: float = 0.0) -> tuple[fakes.ModelPatcher, FluxCLIP, FluxTransformer]:
    """A ComfyUI MODEL and CLIP of the toy-flux architecture with random weights, and the transformer they wrap;
    16 latent channels as Flux.1's (the toy world's 3 would make the view read the toy's settings)."""
    _, encoders = toy_flux.build_toy_flux(seed=seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer(dataclasses.replace(toy_flux.TOY_FLUX_CONFIG, in_channels=16))
    transformer.eval().requires_grad_(False)
    encoders.eval().requires_grad_(False)
    model = fakes.ModelPatcher(FluxBaseModel(ComfyFlux(transformer), shift))
    return model, FluxCLIP(encoders), transformer


def make_toy_flux_model_and_clip() -> tuple[fakes.ModelPatcher, FluxCLIP]:
    """The shipped toy-flux world as ComfyUI would hold it (a Flux MODEL and a flux CLIP), for running the nodes."""
    transformer, encoders = toy_flux.load_toy_flux()
    transformer.eval().requires_grad_(False)
    encoders.eval().requires_grad_(False)
    model = fakes.ModelPatcher(FluxBaseModel(ComfyFlux(transformer), math.log(toy_flux.SHIFT)))
    return model, FluxCLIP(encoders)
