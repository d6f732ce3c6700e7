"""The model Stable Diffusion WebUI Forge has loaded, seen as the core's ``ModelView``.

Forge keeps A1111's ``shared.sd_model`` name but not its objects (DESIGN section 8): the model is a
``ForgeDiffusionEngine`` whose UNet is ``forge_objects.unet.model.diffusion_model`` (LDM module names, so patch keys
are the A1111 ones), prompts go through ``get_learned_conditioning`` (under inference mode), and the schedule lives in
``forge_objects.unet.model.predictor``. Forge is imported only inside functions (``backend.memory_management``), so
this module imports without it and the tests drive it with fakes.

The loaded model is never changed. Forge's Lora extension adds the LoRAs of the last generation into the weights
(originals in ``model.lora_loader.backup``): layers report those originals, and ``prepared`` loads the LoRA-free
patcher (``forge_objects_original.unet``), which puts them back; the next generation merges its own LoRAs again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from ...models.checkpointing import transformer_blocks
from ...models.families import FAMILIES, MMDIT_TEXT, Family, family_by_context_dim
from ...models.layers import Layer, kohya_key, layer_kind, select_unet_modules
from ...models.schedules import EpsSchedule
from ...models.view import Conditioning, ModelView, PromptCache
from ..a1111.view import DEFAULT_LATENT_SIZE, TAB_SETTING_NAMES, UNET_PREFIX, SizedPrompts, compute_modules
from .autograd import copied_inference_weights, out_of_place_residuals

log = logging.getLogger(__name__)

UNET_STATE_PREFIX = "diffusion_model."
QUANTIZED_STORAGE = ("nf4", "fp4", "gguf")
PREDICTIONS = {"epsilon": False, "eps": False, "v_prediction": True}  # Forge's prediction_type -> is v-prediction
TEXT_ENGINES = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


def is_forge_model(sd_model: Any) -> bool:
    """Forge's own model objects (``ForgeDiffusionEngine``), as opposed to A1111's (reForge keeps those)."""
    return getattr(sd_model, "forge_objects", None) is not None and getattr(sd_model, "model", None) is None


class ForgeLayer(Layer):
    """A layer whose ``weight`` is the checkpoint's own, also while Forge has a LoRA of the last generation merged
    into the module (the original then waits in the ``KModel``'s ``lora_loader.backup``)."""

    def __init__(self, key: str, module: nn.Module, kind: str, state_key: str, backup: dict):
        super().__init__(key, module, kind)  # type: ignore[arg-type]
        self.state_key, self.backup = state_key, backup

    @property
    def weight(self) -> Tensor:
        original = self.backup.get(self.state_key)
        return original if isinstance(original, Tensor) else self.module.weight


def forge_family(sd_model: Any) -> Family:
    """SD1/SD2/SDXL from Forge's flags or the UNet's shapes; SD3, Flux, inpainting and quantized UNets get a clear
    error."""
    if getattr(sd_model, "is_sd3", False):
        raise UnsupportedModelError(f"the loaded model is SD3. {MMDIT_TEXT}")
    kmodel = sd_model.forge_objects.unet.model
    unet = getattr(kmodel, "diffusion_model", None)
    if unet is not None and hasattr(unet, "double_blocks"):
        raise UnsupportedModelError(
            "the loaded model is Flux: this tab makes patches for SD1, SD2 and SDXL in Forge. Make Flux patches with "
            "the command line (python -m ablation_core ablate --model FLUX_FILE --clip-l ... --t5 ...) or ComfyUI's "
            "nodes; they load here like any LoRA (<lora:NAME:1>)")
    keys = [m for n, m in unet.named_modules() if n.endswith("attn2.to_k")] if unet is not None else []
    if not keys or not hasattr(unet, "input_blocks"):
        raise UnsupportedModelError(f"the loaded model has no UNet cross-attention. {MMDIT_TEXT}")
    storage = str(getattr(kmodel, "storage_dtype", ""))
    quantized = storage in QUANTIZED_STORAGE or any(
        getattr(p, "gguf_cls", None) is not None or getattr(p, "bnb_quantized", None) is not None
        for p in unet.parameters())
    if quantized:
        raise UnsupportedModelError(f"the loaded UNet is stored quantized ({storage or 'nf4/gguf'}), which cannot be "
                                    "trained or solved through; load an fp16, bf16 or fp8 checkpoint of the model")
    in_channels = getattr(unet, "in_channels", 4)
    if in_channels != 4 or getattr(sd_model, "is_inpaint", False):
        raise UnsupportedModelError(f"the loaded model's UNet reads {in_channels} channels (an inpainting or "
                                    "instruct model); load the base text-to-image checkpoint to ablate a concept")
    for flag, name in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(sd_model, flag, False) is True:
            return FAMILIES[name]
    return family_by_context_dim(keys[0].in_features, getattr(unet, "num_classes", None) is not None)


def _memory_management() -> Any:
    from backend import memory_management

    return memory_management


class ForgeModelView(ModelView):
    """``shared.sd_model`` of Forge (a ``ForgeDiffusionEngine``) as a ``ModelView``."""

    program = "Forge"
    setting_names = {**TAB_SETTING_NAMES, "dtype": "16-bit or fp8 UNet weights (start Forge with --unet-in-fp16, "
                                                    "--unet-in-bf16 or --unet-in-fp8-e4m3fn)"}

    def __init__(self, sd_model: Any, latent_size: int | None = None):
        self.sd_model = sd_model
        self.family = forge_family(sd_model)
        original = getattr(sd_model, "forge_objects_original", None)
        self.patcher = getattr(original, "unet", None) or sd_model.forge_objects.unet
        self.kmodel = self.patcher.model
        self.diffusion_model: nn.Module = self.kmodel.diffusion_model
        predictor = self.kmodel.predictor
        prediction = getattr(predictor, "prediction_type", "epsilon")
        if prediction not in PREDICTIONS or not isinstance(getattr(predictor, "alphas_cumprod", None), Tensor):
            raise UnsupportedModelError(f"models with {prediction} prediction are not supported; this tool edits "
                                        "epsilon- and v-prediction SD1.x, SD2.x and SDXL models")
        self.v_prediction = PREDICTIONS[prediction]
        self.alphas_cumprod = predictor.alphas_cumprod.detach().to("cpu", torch.float64)
        self.schedule = EpsSchedule(self.alphas_cumprod)
        self.dtype = getattr(self.kmodel, "computation_dtype", None) or next(self.diffusion_model.parameters()).dtype
        self.device = torch.device(getattr(self.patcher, "load_device", None) or
                                   next(self.diffusion_model.parameters()).device)
        self.latent_channels = int(getattr(self.diffusion_model, "in_channels", 4))
        self.default_latent_size = latent_size or DEFAULT_LATENT_SIZE[self.family.name]
        self.latent_multiple = 2 ** (len(getattr(self.diffusion_model, "channel_mult", (1, 2, 4, 4))) - 1)
        self._engines = [getattr(sd_model, name) for name in TEXT_ENGINES if getattr(sd_model, name, None)]
        self._prompt_cache = PromptCache(self._encode_batch)

    # The run -----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """The model ready for a run: the LoRA-free UNet loaded, and autograd able to pass through Forge's weights
        (inference tensors, copied on use while gradients flow) and its in-place residual adds (run on a copy)."""
        self._ensure_loaded()
        with copied_inference_weights(self.diffusion_model), out_of_place_residuals(self.transformer_blocks()):
            yield

    def _ensure_loaded(self) -> None:
        """Load the UNet patcher onto its device the way Forge does (inside inference mode); encoding prompts may
        have made Forge move it away to load the text encoder."""
        memory = _memory_management()
        if any(getattr(m, "model", None) is self.patcher for m in getattr(memory, "current_loaded_models", [])):
            return
        with torch.inference_mode():
            memory.load_models_gpu([self.patcher])

    # Text --------------------------------------------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str]) -> Conditioning:
        """Forge encodes under inference mode: the result is cloned (outside it) before autograd can see it."""
        size = self.default_latent_size * 8
        encoded = self.sd_model.get_learned_conditioning(SizedPrompts(prompts, size, size))
        if isinstance(encoded, dict):  # SDXL: the context and the pooled text with size ids (the UNet's ``y``)
            context = encoded["crossattn"]
            extra = {"y": encoded["vector"].to(self.device, self.dtype).clone()} if "vector" in encoded else {}
        else:
            context, extra = encoded, {}
        return Conditioning(context.to(self.device, self.dtype).clone(), extra)

    def encode(self, prompts: list[str]) -> Conditioning:
        return self._prompt_cache.encode(prompts)

    def uncached_text(self) -> contextlib.AbstractContextManager:
        return self._prompt_cache.disabled()

    def token_ids(self, text: str) -> list[list[int]]:
        return [[int(t) for t in engine.tokenize([text])[0]] for engine in self._engines]

    def token_embedding_modules(self) -> list[nn.Module]:
        """None: Forge encodes prompts under inference mode, so no gradient reaches an injected embedding (the
        robust rounds and the attacks need one)."""
        return []

    # UNet --------------------------------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        self._ensure_loaded()
        extra = {k: v.to(self.device, self.dtype) for k, v in cond.extra.items()}
        out = self.diffusion_model(x_t.to(self.device, self.dtype), t.to(self.device).float(),
                                   context=cond.context.to(self.device, self.dtype), transformer_options={}, **extra)
        if self.v_prediction:
            out = self.schedule.noise_from_v(x_t, t, out)
        return out.to(self.dtype)

    def transformer_blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.diffusion_model)

    def unet_layers(self, group: str) -> list[Layer]:
        backup = getattr(getattr(self.kmodel, "lora_loader", None), "backup", None) or {}
        return [ForgeLayer(kohya_key(UNET_PREFIX, name), module, layer_kind(module),  # type: ignore[arg-type]
                           f"{UNET_STATE_PREFIX}{name}.weight", backup)
                for name, module in select_unet_modules(self.diffusion_model.named_modules(), group)]

    def text_layers(self, group: str) -> list[Layer]:
        """None: the tab trains UNet weights only (as in A1111)."""
        return []

    def cancel_check_modules(self) -> list[nn.Module]:
        """UNet and text-encoder layers: encoding hundreds of prompts takes minutes on a CPU."""
        clip = getattr(self.sd_model.forge_objects, "clip", None)
        text = compute_modules(getattr(clip, "cond_stage_model", None))
        return super().cancel_check_modules() + text

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> RGB in [0, 1] through Forge's VAE (``decode_first_stage`` scales them itself)."""
        with torch.no_grad():
            images = self.sd_model.decode_first_stage(latents.to(self.device, self.dtype)).clone()
        return ((images.float() + 1) / 2).clamp(0, 1)
