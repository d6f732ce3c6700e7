"""The diffusers/transformers backend: diffusers folders, single-file checkpoints and the embedded toy model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..errors import UnsupportedModelError
from ..models.checkpointing import transformer_blocks
from ..models.families import FAMILIES, MMDIT_TEXT, SUPPORTED_TEXT, Family, is_toy_shape
from ..models.layers import Layer, kohya_key, layer_kind, select_text_modules, select_unet_modules, text_prefix
from ..models.ldm_keys import UNetLayout, canonical_clip_name, unet_module_to_ldm
from ..models.quiet import quiet_loading
from ..models.schedules import EpsSchedule, sd_alphas_cumprod
from ..models.single_file import SDComponents, load_single_file
from ..models.tokenizer import sd_clip_tokenizer
from ..models.view import Conditioning, ModelView

log = logging.getLogger(__name__)

TOY_MODEL = "toy"


class DiffusersModelView(ModelView):
    """A diffusers UNet with its transformers CLIP text encoder(s), seen as the core's ``ModelView``."""

    def __init__(self, components: SDComponents, tokenizers: list[CLIPTokenizer] | None = None,
                 alphas_cumprod: Tensor | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, source: str = ""):
        self.family: Family = FAMILIES[components.family]
        self.components = components
        self.unet = components.unet
        self.text_encoders = components.text_encoders
        self.vae = components.vae
        self.prediction_type = components.prediction_type
        self.tokenizers = tokenizers or [sd_clip_tokenizer(pad) for pad in self.family.pad_tokens]
        self.device, self.dtype = torch.device(device), dtype
        self.alphas_cumprod = (alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()).float()
        self.schedule = EpsSchedule(self.alphas_cumprod)
        self.source = source
        self.latent_channels = self.unet.config.in_channels
        self.default_latent_size = self.unet.config.sample_size
        self.latent_multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        self._layout = UNetLayout.from_config(dict(self.unet.config))
        for module in self.modules():
            module.to(self.device).eval().requires_grad_(False)
            if next(module.parameters()).dtype != dtype:
                module.to(dtype)

    def modules(self) -> list[nn.Module]:
        return [m for m in [self.unet, *self.text_encoders, self.vae] if m is not None]

    # Text ------------------------------------------------------------------------------------------------------
    def _token_batch(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        return ids.to(self.device)

    def encode(self, prompts: list[str]) -> Conditioning:
        if self.family.name != "sdxl":
            ids = self._token_batch(self.tokenizers[0], prompts)
            return Conditioning(self.text_encoders[0](ids).last_hidden_state.to(self.dtype))
        contexts, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(self._token_batch(tokenizer, prompts), output_hidden_states=True)
            contexts.append(out.hidden_states[-2])
            if isinstance(encoder, CLIPTextModelWithProjection):
                pooled = out.text_embeds
        size = self.default_latent_size * 8
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=self.dtype)
        return Conditioning(torch.cat(contexts, dim=-1).to(self.dtype),
                            {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.repeat(len(prompts), 1)})

    def token_ids(self, text: str) -> list[list[int]]:
        return [tokenizer(text, add_special_tokens=False).input_ids for tokenizer in self.tokenizers]

    # UNet ------------------------------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        added = cond.extra or None
        out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond.context, added_cond_kwargs=added).sample
        if self.prediction_type == "v_prediction":
            acp = self.alphas_cumprod.to(out.device)[t].view(-1, 1, 1, 1)
            out = acp.sqrt() * out + (1 - acp).sqrt() * x_t
        return out

    def unet_layers(self, group: str) -> list[Layer]:
        chosen = select_unet_modules(self.unet.named_modules(), group)
        return [Layer(kohya_key("lora_unet_", unet_module_to_ldm(name, self._layout)), module, layer_kind(module))
                for name, module in chosen]

    def text_layers(self, group: str) -> list[Layer]:
        layers = []
        for index, encoder in enumerate(self.text_encoders):
            prefix = text_prefix(index, len(self.text_encoders))
            for name, module in select_text_modules(encoder.named_modules(), group):
                layers.append(Layer(kohya_key(prefix, canonical_clip_name(name)), module, "embedding"))
        return layers

    def transformer_blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.unet)

    def text_encoders_to_set_aside(self) -> list[nn.Module]:
        return list(self.text_encoders)

    def all_layers(self) -> dict[str, Layer]:
        """Patch keys in LDM naming, plus the diffusers-style kohya names other tools write (SD1 LoRAs)."""
        found = super().all_layers()
        for name, module in self.unet.named_modules():
            canonical = kohya_key("lora_unet_", unet_module_to_ldm(name, self._layout)) if layer_kind(module) else ""
            if canonical in found:
                found.setdefault(kohya_key("lora_unet_", name), found[canonical])
        return found

    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            if self.latent_channels == 3:
                return ((latents.float() + 1) / 2).clamp(0, 1)
            raise UnsupportedModelError("this checkpoint has no VAE, so latents cannot be turned into images")
        scale = self.vae.config.scaling_factor
        with torch.no_grad():
            images = self.vae.decode(latents.to(self.dtype) / scale).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


def _schedule_from_folder(folder: Path) -> tuple[Tensor, str]:
    config_path = folder / "scheduler" / "scheduler_config.json"
    if not config_path.exists():
        return sd_alphas_cumprod(), "epsilon"
    config = json.loads(config_path.read_text())
    if config.get("beta_schedule", "scaled_linear") == "scaled_linear":
        acp = sd_alphas_cumprod(config.get("num_train_timesteps", 1000), config.get("beta_start", 0.00085),
                                config.get("beta_end", 0.012))
    else:
        betas = torch.linspace(config["beta_start"], config["beta_end"], config.get("num_train_timesteps", 1000),
                               dtype=torch.float64)
        acp = torch.cumprod(1 - betas, 0)
    return acp, config.get("prediction_type", "epsilon")


def _family_of_folder(unet: UNet2DConditionModel, text_encoders: list[nn.Module]) -> str:
    if is_toy_shape(unet.config.in_channels, unet.config.cross_attention_dim):
        return "toy"
    if len(text_encoders) == 2 or unet.config.addition_embed_type == "text_time":
        return "sdxl"
    if unet.config.cross_attention_dim == 1024 or text_encoders[0].config.hidden_act == "gelu":
        return "sd2"
    return "sd1"


def load_diffusers_folder(folder: str | Path, prediction_type: str | None = None,
                          family: str | None = None) -> tuple[SDComponents, list[CLIPTokenizer] | None, Tensor]:
    folder = Path(folder)
    if (folder / "transformer").is_dir():
        raise UnsupportedModelError(f"{folder} holds a transformer (MM-DiT) model. {MMDIT_TEXT}")
    if not (folder / "unet").is_dir() or not (folder / "text_encoder").is_dir():
        raise UnsupportedModelError(
            f"{folder} is not a diffusers Stable Diffusion folder (it needs unet/ and text_encoder/). "
            f"Supported: {SUPPORTED_TEXT}.")
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
            text_encoders: list[nn.Module] = [CLIPTextModel.from_pretrained(folder / "text_encoder")]
            if (folder / "text_encoder_2").is_dir():
                text_encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"))
            vae = (AutoencoderKL.from_pretrained(folder / "vae", low_cpu_mem_usage=False)
                   if (folder / "vae").is_dir() else None)
            tokenizer_dirs = [folder / "tokenizer", folder / "tokenizer_2"][: len(text_encoders)]
            tokenizers = ([CLIPTokenizer.from_pretrained(d) for d in tokenizer_dirs]
                          if all(d.is_dir() for d in tokenizer_dirs) else None)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UnsupportedModelError(f"{folder} could not be loaded as a diffusers model (damaged or incomplete "
                                    f"folder?): {str(err).splitlines()[0][:200]}") from err
    acp, folder_prediction = _schedule_from_folder(folder)
    family = family or _family_of_folder(unet, text_encoders)
    return SDComponents(family, unet, text_encoders, vae, prediction_type or folder_prediction), tokenizers, acp


def load_sd_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  prediction_type: str | None = None) -> DiffusersModelView:
    """Load ``toy``, a diffusers SD folder or a single-file SD ``.safetensors`` checkpoint as a ``ModelView``."""
    if str(spec) == TOY_MODEL:
        from ..toy.model import WEIGHTS_DIR  # the toy world is imported only when asked for

        components, tokenizers, acp = load_diffusers_folder(WEIGHTS_DIR, family="toy")
        return DiffusersModelView(components, tokenizers, acp, device, dtype, source=TOY_MODEL)
    path = Path(spec)
    if path.is_dir():
        components, tokenizers, acp = load_diffusers_folder(path, prediction_type)
        return DiffusersModelView(components, tokenizers, acp, device, dtype, source=str(path))
    if not path.exists():
        raise UnsupportedModelError(
            f"model {spec!r} not found: give a .safetensors checkpoint, a diffusers folder, or 'toy' for the "
            "embedded toy model")
    components = load_single_file(path, prediction_type)
    return DiffusersModelView(components, None, None, device, dtype, source=str(path))
