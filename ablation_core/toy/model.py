"""The toy text-to-image model: SD1's architecture at toy size, in pixel space.

It is a real diffusers ``UNet2DConditionModel`` with cross-attention and a real transformers ``CLIPTextModel`` on the
SD1 CLIP vocabulary, so every code path that edits SD1 (layer selection by name, K/V projections, patch files)
works on it unchanged. There is no VAE: images are 16x16 RGB and the "latent mapping" is the identity. The shipped
weights are a diffusers-style folder, so any diffusers/transformers loader reads them too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..models.quiet import quiet_loading
from ..models.sampling import sample_dpmpp_2m
from ..models.schedules import EpsSchedule, sd_alphas_cumprod
from ..models.tokenizer import MAX_LENGTH, VOCAB_SIZE, sd_clip_tokenizer
from ..resources import TOY_WEIGHTS_DIR
from .data import IMAGE_SIZE

log = logging.getLogger(__name__)

WEIGHTS_DIR = TOY_WEIGHTS_DIR
TEXT_HIDDEN = 64
TEXT_CONFIG: dict = {
    "vocab_size": VOCAB_SIZE, "hidden_size": TEXT_HIDDEN, "intermediate_size": 4 * TEXT_HIDDEN,
    "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": MAX_LENGTH,
    "projection_dim": TEXT_HIDDEN, "hidden_act": "quick_gelu", "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 49407,
}
UNET_CONFIG: dict = {
    "sample_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
    "block_out_channels": (32, 64, 64), "norm_num_groups": 8, "attention_head_dim": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_HIDDEN,
}
DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 20


def build_toy_model(seed: int = 0) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Freshly initialised UNet and text encoder (deterministic given ``seed``), for training."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    return unet, text_encoder


def load_toy_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   weights_dir: str | Path = WEIGHTS_DIR) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer]:
    """The shipped toy model (UNet, text encoder, SD1 tokenizer), in eval mode on ``device``."""
    weights_dir = Path(weights_dir)
    if not (weights_dir / "unet" / "config.json").exists():
        raise FileNotFoundError(f"no toy weights in {weights_dir}; run `python -m ablation_core.toy train` first")
    with quiet_loading():
        unet = UNet2DConditionModel.from_pretrained(weights_dir / "unet", torch_dtype=dtype, low_cpu_mem_usage=False)
        text_encoder = CLIPTextModel.from_pretrained(weights_dir / "text_encoder", torch_dtype=dtype)
    unet.to(device).eval()
    text_encoder.to(device).eval()
    return unet, text_encoder, sd_clip_tokenizer()


def toy_world_info(weights_dir: str | Path = WEIGHTS_DIR) -> dict:
    """The facts recorded when the shipped weights were trained (recipe, timings, measured accuracies)."""
    return json.loads((Path(weights_dir) / "toy_world.json").read_text())


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], device: str | torch.device = "cpu") -> Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_prompts(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> Tensor:
    """SD1-style conditioning: the last hidden state for the prompt padded to 77 tokens."""
    ids = tokenize(tokenizer, prompts, text_encoder.device)
    return text_encoder(ids).last_hidden_state


@torch.no_grad()
def sample_images(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                  prompts: list[str], seed: int = 0, steps: int = DEFAULT_STEPS,
                  guidance: float = DEFAULT_GUIDANCE, batch_size: int = 256) -> Tensor:
    """One image per prompt, [n, 3, 16, 16] in [-1, 1], with DPM-Solver++(2M) and classifier-free guidance.

    Noise for the i-th prompt depends only on ``seed`` and i, so before/after comparisons see the same noise.
    """
    device, dtype = unet.device, unet.dtype
    generator = torch.Generator().manual_seed(seed)
    noise_all = torch.randn(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    schedule = EpsSchedule(sd_alphas_cumprod())
    uncond = encode_prompts(text_encoder, tokenizer, [""])
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cond = encode_prompts(text_encoder, tokenizer, chunk).to(dtype)
        context = torch.cat([uncond.to(dtype).expand(len(chunk), -1, -1), cond])

        def eps(x: Tensor, t: Tensor, context: Tensor = context) -> Tensor:
            out = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=context).sample
            e_uncond, e_cond = out.chunk(2)
            return e_uncond + guidance * (e_cond - e_uncond)

        noise = noise_all[start:start + len(chunk)].to(device, dtype)
        images.append(sample_dpmpp_2m(eps, noise, schedule, steps).float().clamp(-1, 1).cpu())
    return torch.cat(images)


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
