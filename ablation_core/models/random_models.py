"""Random-weight models of the real architectures: full size for the benchmark, tiny for tests.

Tiny models keep every structural feature of their family (LDM key layout, SD2's OpenCLIP encoder, SDXL's two
encoders, pooled text and size ids) at a few MB. Random UNets barely listen to the prompt (DESIGN section 5), so
``prompt_sensitive`` scales the cross-attention value/output projections to make prompts matter.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from . import configs as model_configs
from .single_file import SDComponents

TINY_TEXT = {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 1, "max_position_embeddings": 77, "projection_dim": 32}
TINY_UNETS: dict[str, dict] = {
    "sd1": {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": 8, "cross_attention_dim": 64,
            "sample_size": 8},
    "sd2": {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": [1, 1],
            "cross_attention_dim": 64, "sample_size": 8},
    "sdxl": {"block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [1, 1],
             "transformer_layers_per_block": [1, 2], "cross_attention_dim": 128, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 32 + 6 * 8, "sample_size": 8},
}
TINY_VAE = {"block_out_channels": [32, 32], "layers_per_block": 1, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2}


def _text_encoder(family: str, index: int, tiny: bool) -> CLIPTextModel:
    kind = model_configs.FAMILY_TEXT_ENCODERS[family][index]
    config = model_configs.text_config(kind)
    if tiny:
        config.update(TINY_TEXT)
    model_class = CLIPTextModelWithProjection if (family == "sdxl" and index == 1) else CLIPTextModel
    return model_class(CLIPTextConfig(**config))


def build_components(family: str, tiny: bool = True, seed: int = 0, with_vae: bool = False,
                     prompt_sensitive: bool = True, dtype: torch.dtype = torch.float32) -> SDComponents:
    """A randomly initialised SD1/SD2/SDXL model (deterministic given ``seed``), built directly in ``dtype`` (a
    full-size SDXL in float32 alone is 14 GB: built in bfloat16 it never needs more than half of that)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return _build(family, tiny, seed, with_vae, prompt_sensitive)
    finally:
        torch.set_default_dtype(previous)


def _build(family: str, tiny: bool, seed: int, with_vae: bool, prompt_sensitive: bool) -> SDComponents:
    torch.manual_seed(seed)
    unet_config = model_configs.unet_config(family)
    if tiny:
        unet_config.update(TINY_UNETS[family])
    unet = UNet2DConditionModel(**unet_config)
    encoders = [_text_encoder(family, i, tiny) for i in range(len(model_configs.FAMILY_TEXT_ENCODERS[family]))]
    vae = None
    if with_vae:
        vae_config = dict(model_configs.VAE_CONFIG, scaling_factor=model_configs.VAE_SCALING[family])
        if tiny:
            vae_config.update(TINY_VAE)
        vae = AutoencoderKL(**vae_config)
    if prompt_sensitive:
        with torch.no_grad():
            for name, param in unet.named_parameters():
                if "attn2.to_v" in name or "attn2.to_out.0.weight" in name:
                    param.mul_(8.0)
    return SDComponents(family, unet, encoders, vae)
