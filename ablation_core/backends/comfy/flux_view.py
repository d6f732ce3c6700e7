"""A ComfyUI Flux ``MODEL`` (``comfy.ldm.flux.model.Flux``) with its ``CLIP`` (DualCLIPLoader, type flux) as a
``ModelView``, and ``comfy_view``, which picks the view for whatever model the node was given.

What differs from the SD view (``view.ComfyModelView``, whose patching, loading and cancel machinery this reuses):

- prompts: ComfyUI's CLIP object tokenizes for both encoders (``{"l": ..., "t5xxl": ...}``, T5 padded to 256 tokens)
  and returns the T5 sequence with CLIP-L's pooled vector; the distilled model's guidance rides in the conditioning;
- predictions: ``diffusion_model(x, sigma, context, y=pooled, guidance=g)`` returns the velocity; the schedule is
  ComfyUI's own ``ModelSamplingFlux`` curve (its ``shift`` is Flux's ``mu``), read from the model;
- layers: the same BFL names as our own Flux view (``models.layers.select_flux_modules``), so patches are the same;
- ComfyUI's double and single stream blocks add residuals in place (``txt += ...``, ``x += ...``), which autograd
  refuses once the text stream's K/V train: while gradients flow, the tensors those blocks modify are copied when
  autograd saves them (``saved_tensors_hooks``), and nothing else is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ...errors import AblationError
from ...models.families import FLUX, TOY_FLUX, is_toy_shape
from ...models.layers import Layer, kohya_key, select_flux_modules
from ...models.schedules import FlowSchedule
from ...models.view import Conditioning, PromptCache
from ...toy.flux import DEFAULT_GUIDANCE as TOY_GUIDANCE
from ..flux import flux_activation_scale
from .view import CLIP_END_TOKEN, UNET_STATE_PREFIX, ComfyModelView, _original_weight, cancel_requested, ensure_loaded

NO_TOKEN_ATTACKS = ("robust rounds and attacks write token ids and embeddings into both text encoders, and Flux's "
                    "T5 and CLIP share no vocabulary: in ComfyUI they are not available for Flux yet (the CLI runs "
                    "them on toy-flux, whose encoders share one)")
DEFAULT_GUIDANCE = 3.5  # ComfyUI's FluxGuidance default
DEFAULT_LATENT_SIZE = 64  # 512 px
TOY_LATENT_SIZE = 16  # the toy-flux world draws 16 x 16 RGB pixels
FLUX_BLOCKS = ("DoubleStreamBlock", "SingleStreamBlock")


def is_comfy_flux(model) -> bool:
    """A ComfyUI ``BaseModel`` whose diffusion model has Flux's double blocks and text input."""
    unet = getattr(model, "diffusion_model", None)
    return unet is not None and hasattr(unet, "double_blocks") and hasattr(unet, "txt_in")


def comfy_view(patcher, clip=None, latent_size: int | None = None, original_weights: bool = False):
    """The view for a ComfyUI model: Flux or SD (which refuses other families with a message that names them)."""
    if is_comfy_flux(patcher.model):
        return ComfyFluxView(patcher, clip, latent_size, original_weights)
    return ComfyModelView(patcher, clip, latent_size, original_weights)


class _RowsLayer(Layer):
    """A layer whose ``weight`` is the unpatched one ComfyUI keeps in ``backup`` while the model is patched."""

    def __init__(self, key: str, module: nn.Module, rows, original):
        super().__init__(key, module, "linear", rows)
        self._original = original

    @property
    def weight(self):
        return self._original()


def _stream(block: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """The stream tensor a block adds to in place, however it was passed: ComfyUI 0.3.64 calls a double block with
    keywords only (``block(img=img, txt=txt, ...)``) and a single block with the stream first (``block(img, vec=...)``,
    whose parameter is named ``x``)."""
    if type(block).__name__ == "DoubleStreamBlock":
        return args[1] if len(args) > 1 else kwargs["txt"]
    return args[0] if args else kwargs.get("x", kwargs.get("img"))


@contextlib.contextmanager
def _residuals_copied_when_saved(blocks: list[nn.Module]) -> Iterator[None]:
    """While a block runs with gradients, autograd keeps copies of the stream tensor the block adds to in place
    (the second argument of a double block, the first of a single block) instead of the tensor itself."""
    watched: list[int] = []

    def pack(tensor: Tensor) -> Tensor:
        if watched and tensor.untyped_storage().data_ptr() in watched:
            return tensor.clone()
        return tensor

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled():
            watched.append(_stream(module, args, kwargs).untyped_storage().data_ptr())

    def leave(module: nn.Module, args: tuple, out) -> None:
        if torch.is_grad_enabled() and watched:
            watched.pop()

    handles = []
    for block in blocks:
        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for handle in handles:
            handle.remove()


class ComfyFluxView(ComfyModelView):
    """ComfyUI's Flux with its CLIP (T5-XXL + CLIP-L). See the module docstring."""

    context_start_tokens = 0
    context_causal = False
    closed_form_group = "embedding"
    # one T5-XXL prompt takes 20 to 50 s on a CPU in ComfyUI (it computes T5 in float32 whatever the file's dtype,
    # casting every weight per call): the bar moves after each prompt (the prompts are encoded one by one anyway)
    encode_step = 1

    def __init__(self, patcher, clip=None, latent_size: int | None = None, original_weights: bool = False):
        self.patcher, self.clip = patcher, clip
        self.model = patcher.model
        self.diffusion_model = self.model.diffusion_model
        params = getattr(self.diffusion_model, "params", None)
        self.dtype = getattr(self.model, "manual_cast_dtype", None) or self.model.get_dtype()
        self.device = next(self.diffusion_model.parameters()).device
        mu = float(getattr(self.model.model_sampling, "shift", 1.15))
        self.schedule = FlowSchedule(shift=math.exp(mu))
        self.guidance_input = bool(getattr(params, "guidance_embed", True))
        self.latent_channels = self.model.latent_format.latent_channels
        # the toy-flux world held as a ComfyUI MODEL (RGB pixels from a 64-wide context) reads the toy's settings
        context_dim = int(self.diffusion_model.txt_in.in_features)
        self.family = TOY_FLUX if is_toy_shape(self.latent_channels, context_dim) else FLUX
        self.default_latent_size = latent_size or (TOY_LATENT_SIZE if self.family.toy else DEFAULT_LATENT_SIZE)
        self.default_guidance = TOY_GUIDANCE if self.family.toy else DEFAULT_GUIDANCE  # what each draws at
        self.latent_multiple = int(getattr(params, "patch_size", 2))
        self.activation_scale = flux_activation_scale(int(getattr(params, "hidden_size", 3072)),
                                                      len(self.transformer_blocks()))
        self._original_weights = original_weights
        self._state_keys: dict[str, tuple[str, str]] = {}
        self._prompt_cache = PromptCache(self._encode_many)

    # Text ------------------------------------------------------------------------------------------------------
    def _tokenize(self, text: str) -> dict:
        """ComfyUI's tokens, with T5 padded to its tokenizer's own minimum length (256 for Flux) whatever
        T5TokenizerOptions set: with a shorter one every prompt had its own length, which the encodings of a run
        cannot have (they are stacked; the trained node failed with "Sizes of tensors must match")."""
        clip = self._require_clip()
        t5 = getattr(getattr(clip, "tokenizer", None), "t5xxl", None)
        if getattr(t5, "min_length", None) is None:
            return clip.tokenize(text)
        return clip.tokenize(text, tokenizer_options={"t5xxl_min_length": t5.min_length,
                                                      "t5xxl_min_padding": getattr(t5, "min_padding", None)})

    def _encode_one(self, prompt: str) -> Conditioning:
        clip = self._require_clip()
        tokens = self._tokenize(prompt)
        if "t5xxl" not in tokens:
            raise AblationError("this CLIP is not Flux's: load T5-XXL and CLIP-L with DualCLIPLoader (type: flux)")
        context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        return Conditioning(context.to(self.device, self.dtype).clone(),
                            {"pooled": pooled.to(self.device, self.dtype).clone()})

    def _encode_many(self, prompts: list[str]) -> Conditioning:
        """One prompt at a time (each needs its pooled vector); ComfyUI pads T5 to 256 tokens, so prompts of up to
        255 tokens batch together; longer ones are cut to the shortest length in the batch."""
        parts = []
        for prompt in prompts:
            cancel_requested()
            parts.append(self._encode_one(prompt))
        length = min(p.context.shape[1] for p in parts)
        return Conditioning.cat([Conditioning(p.context[:, :length], p.extra) for p in parts])

    def encode(self, prompts: list[str]) -> Conditioning:
        """Encoded once per prompt and kept: no group trains Flux's text encoders (the prompt-reading maps are in
        the transformer), so no gradient ever flows into them."""
        with torch.no_grad():
            return self._prompt_cache.encode(prompts)

    def uncached_text(self) -> contextlib.AbstractContextManager:
        """The cache stays on: nothing a run trains or switches off (the held-out check's before and after) reaches
        Flux's text encoders. Encoding afresh cost the check five T5 prompts per sample, 20 s each on a CPU."""
        return contextlib.nullcontext()

    def token_ids(self, text: str) -> list[list[int]]:
        """The prompt's tokens for T5 (before its end token and padding) and for CLIP-L (between start and end)."""
        tokens = self._tokenize(text)
        end = int(self._tokenize("")["t5xxl"][0][0][0])  # an empty prompt is T5's end token, then padding
        t5 = [int(t[0]) for t in tokens["t5xxl"][0]]
        clip = [int(t[0]) for t in tokens["l"][0]][1:]
        return [t5[:t5.index(end)] if end in t5 else t5,
                clip[:clip.index(CLIP_END_TOKEN)] if CLIP_END_TOKEN in clip else clip]

    def token_embedding_modules(self) -> list[nn.Module]:
        raise AblationError(NO_TOKEN_ATTACKS)

    def encoder_ids(self, ids: Tensor) -> list[Tensor]:
        raise AblationError(NO_TOKEN_ATTACKS)

    # Transformer -----------------------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        ensure_loaded(self.patcher)
        sigma = self.schedule.sigmas(t.cpu()).to(self.device, torch.float32)
        guidance = cond.extra.get("guidance")
        if self.guidance_input and guidance is None:
            guidance = torch.full((len(x_t),), self.default_guidance, device=self.device)
        options = self.patcher.model_options.get("transformer_options", {})
        with _residuals_copied_when_saved(self.transformer_blocks()) if torch.is_grad_enabled() \
                else contextlib.nullcontext():
            return self.diffusion_model(x_t.to(self.device, self.dtype), sigma,
                                        cond.context.to(self.device, self.dtype),
                                        y=cond.extra["pooled"].to(self.device, self.dtype),
                                        guidance=guidance.to(self.device) if guidance is not None else None,
                                        transformer_options=options)

    def unet_layers(self, group: str) -> list[Layer]:
        layers = []
        for name, module, rows in select_flux_modules(self.diffusion_model.named_modules(), group):
            key, state_key = kohya_key("lora_unet_", name), f"{UNET_STATE_PREFIX}{name}.weight"
            self._state_keys[key] = ("model", state_key)
            if self._original_weights:
                layers.append(_RowsLayer(key, module, rows,
                                         lambda s=state_key, m=module: _original_weight(self.patcher, s, m)))
            else:
                layers.append(Layer(key, module, "linear", rows))
        return layers

    def closed_form_layers(self) -> dict[str, list[Layer]]:
        """UCE's Flux edit, as on our own Flux view: ``txt_in`` (T5 sequence), ``vector_in.in_layer`` (pooled)."""
        layers = self.unet_layers("embedding")
        return {"context": [layer for layer in layers if layer.key.endswith("txt_in")],
                "pooled": [layer for layer in layers if layer.key.endswith("vector_in_in_layer")]}

    def text_layers(self, group: str) -> list[Layer]:
        return []

    def transformer_blocks(self) -> list[nn.Module]:
        return [m for m in self.diffusion_model.modules() if type(m).__name__ in FLUX_BLOCKS]
