"""Single-file ``.safetensors`` checkpoints of SD1.x, SD2.x and SDXL in the original (LDM/ComfyUI) layout.

Loading reads every size off the checkpoint's shapes and starts from the shipped family configs, so it never needs
a hub and also loads the tiny checkpoints tests build. Saving writes the same layout (tests and local ComfyUI checks
use it to make small checkpoints that real programs load).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import UnsupportedModelError
from ..files import save_safetensors_atomic
from . import configs as model_configs
from .families import MMDIT_TEXT, SUPPORTED_TEXT
from .ldm_keys import (
    UNetLayout,
    canonical_clip_state,
    clip_state_dict_to_openclip,
    clip_state_for_model,
    unet_name_to_ldm,
)
from .quiet import quiet_loading

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd1": ["cond_stage_model.transformer."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}
_MMDIT_MARKERS = ("joint_blocks.", "double_blocks.", "single_blocks.", "transformer_blocks.0.attn.add_q_proj")


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion model, as diffusers/transformers modules."""

    family: str
    unet: UNet2DConditionModel
    text_encoders: list[CLIPTextModel]
    vae: AutoencoderKL | None = None
    prediction_type: str = "epsilon"


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"{path} does not exist")
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise UnsupportedModelError(
            f"{path.name} is a pickle checkpoint; only .safetensors files are loaded (pickles can run code). "
            "Convert it to .safetensors first (for example with ComfyUI's CheckpointSave or a diffusers conversion).")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UnsupportedModelError(f"{path.name} is not a readable .safetensors file ({err}).") from err


def detect_family(state: dict[str, Tensor]) -> str:
    """SD1/SD2/SDXL from the keys of a single-file checkpoint; clear errors for MM-DiT and non-SD files."""
    if any(marker in key for key in state for marker in _MMDIT_MARKERS):
        raise UnsupportedModelError(f"this checkpoint is an MM-DiT model. {MMDIT_TEXT}")
    if UNET_PREFIX + "input_blocks.0.0.weight" not in state:
        raise UnsupportedModelError(
            f"this file is not a Stable Diffusion checkpoint in the single-file layout (no '{UNET_PREFIX}' UNet). "
            f"Supported: {SUPPORTED_TEXT}, as a full single-file .safetensors or a diffusers folder.")
    if UNET_PREFIX + "label_emb.0.0.weight" in state and TEXT_PREFIXES["sdxl"][1] + "ln_final.weight" in state:
        return "sdxl"
    if TEXT_PREFIXES["sd2"][0] + "ln_final.weight" in state:
        return "sd2"
    if TEXT_PREFIXES["sd1"][0] + "text_model.final_layer_norm.weight" in state:
        return "sd1"
    raise UnsupportedModelError(
        "the checkpoint has a UNet but no text encoder this tool recognises (SD1 CLIP-L, SD2 OpenCLIP-H, SDXL "
        "CLIP-L + OpenCLIP-bigG). Use a full checkpoint that includes its text encoder(s).")


# Shapes -> configs ---------------------------------------------------------------------------------------------

def _count(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m[1]) for key in state if (m := re.match(pattern, key))}
    return max(found) + 1 if found else 0


def infer_unet_config(state: dict[str, Tensor], family: str) -> dict:
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    config = model_configs.unet_config(family)
    first = unet["input_blocks.0.0.weight"]
    config["in_channels"] = first.shape[1]
    config["out_channels"] = unet["out.2.weight"].shape[0]
    downsample_blocks = sorted(int(m[1]) for k in unet if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight", k)))
    layers = downsample_blocks[0] - 1 if downsample_blocks else _count(unet, r"input_blocks\.(\d+)\.") - 1
    levels = len(downsample_blocks) + 1
    channels, attention, depth = [], [], []
    for level in range(levels):
        index = 1 + level * (layers + 1)
        channels.append(unet[f"input_blocks.{index}.0.out_layers.3.weight"].shape[0])
        has_attention = f"input_blocks.{index}.1.proj_in.weight" in unet
        attention.append(has_attention)
        depth.append(_count(unet, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\.") if has_attention else 1)
    config.update(layers_per_block=layers, block_out_channels=channels)
    config["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    config["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    context_key = next(k for k in unet if k.endswith("attn2.to_k.weight"))
    config["cross_attention_dim"] = unet[context_key].shape[1]
    config["use_linear_projection"] = next(v for k, v in unet.items() if k.endswith("proj_in.weight")).ndim == 2
    if family == "sd1":
        config["attention_head_dim"] = 8
    else:
        config["attention_head_dim"] = [max(1, c // 64) for c in channels]
    if family == "sdxl":
        config["transformer_layers_per_block"] = depth
        pooled_dim = state[TEXT_PREFIXES["sdxl"][1] + "text_projection"].shape[1]
        projection_in = unet["label_emb.0.0.weight"].shape[1]
        config["projection_class_embeddings_input_dim"] = projection_in
        config["addition_time_embed_dim"] = (projection_in - pooled_dim) // 6
    elif any(d != 1 for d in depth):
        config["transformer_layers_per_block"] = depth
    return config


def _infer_text_config(text_state: dict[str, Tensor], openclip: bool, base: str) -> CLIPTextConfig:
    config = model_configs.text_config(base)
    if openclip:
        embed, layers = text_state["token_embedding.weight"], _count(text_state, r"transformer\.resblocks\.(\d+)\.")
        config["intermediate_size"] = text_state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        config["max_position_embeddings"] = text_state["positional_embedding"].shape[0]
        if "text_projection" in text_state:
            config["projection_dim"] = text_state["text_projection"].shape[1]
    else:
        embed = text_state["text_model.embeddings.token_embedding.weight"]
        layers = _count(text_state, r"text_model\.encoder\.layers\.(\d+)\.")
        config["intermediate_size"] = text_state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
        config["max_position_embeddings"] = text_state["text_model.embeddings.position_embedding.weight"].shape[0]
    config.update(vocab_size=embed.shape[0], hidden_size=embed.shape[1], num_hidden_layers=layers,
                  num_attention_heads=max(1, embed.shape[1] // 64))
    return CLIPTextConfig(**config)


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _load_text_encoders(state: dict[str, Tensor], family: str) -> list[CLIPTextModel]:
    encoders: list[CLIPTextModel] = []
    for index, prefix in enumerate(TEXT_PREFIXES[family]):
        part = _strip(state, prefix)
        openclip = prefix.endswith(".model.")
        base = model_configs.FAMILY_TEXT_ENCODERS[family][index]
        config = _infer_text_config(part, openclip, base)
        with_projection = family == "sdxl" and openclip
        if family == "sd2":
            config.num_hidden_layers -= 1  # SD2 reads the penultimate layer: the last one is dropped
        model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
        if openclip:
            part = convert_open_clip_checkpoint(model, state, prefix=prefix)
            part = {k: v for k, v in part.items() if not (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))
                    or int(m[1]) < config.num_hidden_layers}
            if not with_projection:
                part.pop("text_projection.weight", None)
        missing, unexpected = model.load_state_dict(clip_state_for_model(model, part), strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise UnsupportedModelError(
                f"the text encoder under '{prefix}' does not match its architecture (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); the checkpoint may be damaged.")
        encoders.append(model)
    return encoders


def _infer_vae_config(vae_state: dict[str, Tensor], family: str) -> dict:
    config = dict(model_configs.VAE_CONFIG)
    levels = _count(vae_state, r"encoder\.down\.(\d+)\.")
    config["block_out_channels"] = [vae_state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    config["down_block_types"] = ["DownEncoderBlock2D"] * levels
    config["up_block_types"] = ["UpDecoderBlock2D"] * levels
    config["layers_per_block"] = _count(vae_state, r"encoder\.down\.0\.block\.(\d+)\.")
    config["latent_channels"] = vae_state["decoder.conv_in.weight"].shape[1]
    config["scaling_factor"] = model_configs.VAE_SCALING[family]
    return config


def load_single_file(path: str | Path, prediction_type: str | None = None) -> SDComponents:
    state = read_checkpoint(path)
    family = detect_family(state)
    try:
        with quiet_loading():
            unet_config = infer_unet_config(state, family)
            unet = UNet2DConditionModel(**unet_config)
            unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config))
            text_encoders = _load_text_encoders(state, family)
            vae = None
            vae_state = _strip(state, VAE_PREFIX)
            if vae_state:
                vae_config = _infer_vae_config(vae_state, family)
                vae = AutoencoderKL(**vae_config)
                vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config))
    except (KeyError, IndexError, RuntimeError, ValueError) as err:
        raise UnsupportedModelError(f"{Path(path).name} looks like a {family} checkpoint but is incomplete or damaged "
                                    f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from err
    if prediction_type is None:
        prediction_type = "v_prediction" if "v_pred" in state else "epsilon"
    log.info("loaded %s single-file checkpoint %s", family, path)
    return SDComponents(family, unet, text_encoders, vae, prediction_type)


# Saving --------------------------------------------------------------------------------------------------------

def vae_name_to_ldm(name: str, levels: int) -> str:
    """Map a diffusers AutoencoderKL weight name to its LDM name."""
    resnet = {"conv_shortcut": "nin_shortcut"}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)\.(weight|bias)", name):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
        return f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", name):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", name):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{resnet.get(m[3], m[3])}.{m[4]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", name):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return name.replace("conv_norm_out", "norm_out")


def components_to_ldm_state(components: SDComponents) -> dict[str, Tensor]:
    """The single-file (LDM) state dict of a model.

    SD2 checkpoints carry one more text layer than SD2 reads (it uses the penultimate layer); a copy of the last
    used layer stands in for it, so the file has the real layout and loads back to the same model.
    """
    layout = UNetLayout.from_config(dict(components.unet.config))
    state = {UNET_PREFIX + unet_name_to_ldm(k, layout): v for k, v in components.unet.state_dict().items()}
    for prefix, encoder in zip(TEXT_PREFIXES[components.family], components.text_encoders):
        text_state = canonical_clip_state(encoder.state_dict())
        if prefix.endswith(".model."):
            text_state = clip_state_dict_to_openclip(text_state)
            if components.family == "sd2":
                last = _count(text_state, r"transformer\.resblocks\.(\d+)\.") - 1
                text_state.update({k.replace(f"resblocks.{last}.", f"resblocks.{last + 1}.", 1): v.clone()
                                   for k, v in text_state.items() if k.startswith(f"transformer.resblocks.{last}.")})
        state.update({prefix + k: v for k, v in text_state.items()})
    if components.vae is not None:
        levels = len(components.vae.config.block_out_channels)
        for k, v in components.vae.state_dict().items():
            if ".mid_block.attentions." in k and v.ndim == 2:
                v = v[:, :, None, None]
            state[VAE_PREFIX + vae_name_to_ldm(k, levels)] = v
    if components.prediction_type == "v_prediction":
        state["v_pred"] = torch.tensor([])
    return state


def save_single_file(components: SDComponents, path: str | Path) -> None:
    state = {k: v.detach().contiguous() for k, v in components_to_ldm_state(components).items()}
    save_safetensors_atomic(state, path, {"format": "pt"})
