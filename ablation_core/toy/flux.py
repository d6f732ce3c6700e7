"""The toy-flux model: Flux.1's architecture at toy size, in pixel space, beside the SD toy world.

It is the same ``FluxTransformer`` a real Flux.1 file loads into (double and single stream blocks, RoPE, modulation,
a guidance input, fused ``txt_attn.qkv``), with a small T5 encoder for the sequence and a small CLIP for the pooled
vector, both on the SD vocabulary. It draws the SD toy world's 16x16 images (3 channels, patches of 2x2), is read by
the same classifier and measured by the same evaluation. The shipped transformer is one safetensors file in the
single-file (BFL) layout, its config in the header; the text encoders are transformers folders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ..files import save_safetensors_atomic
from ..models.flux.text import FluxText, FluxTextEncoders
from ..models.flux.transformer import FluxConfig, FluxTransformer
from ..models.quiet import quiet_loading
from ..models.sampling import sample_dpmpp_2m
from ..models.schedules import FlowSchedule
from ..models.tokenizer import VOCAB_SIZE, sd_clip_tokenizer
from ..resources import TOY_FLUX_WEIGHTS_DIR
from .data import IMAGE_SIZE

TRANSFORMER_FILE = "transformer.safetensors"
SEQUENCE_LENGTH = 32
SHIFT = 1.0
DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 20
CONTEXT_DIM = 64
POOLED_DIM = 64

TOY_FLUX_CONFIG = FluxConfig(in_channels=3, patch_size=2, hidden_size=128, num_heads=4, depth=2,
                             depth_single_blocks=3, context_in_dim=CONTEXT_DIM, vec_in_dim=POOLED_DIM,
                             axes_dim=(8, 12, 12), guidance_embed=True)
T5_CONFIG: dict = {
    "vocab_size": VOCAB_SIZE, "d_model": CONTEXT_DIM, "d_kv": 16, "d_ff": 4 * CONTEXT_DIM, "num_layers": 2,
    "num_heads": 4, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 64,
    "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 49407,
    "decoder_start_token_id": 0, "is_encoder_decoder": False, "use_cache": False,
}
CLIP_CONFIG: dict = {
    "vocab_size": VOCAB_SIZE, "hidden_size": POOLED_DIM, "intermediate_size": 4 * POOLED_DIM, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "projection_dim": POOLED_DIM, "hidden_act": "quick_gelu",
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}


def schedule() -> FlowSchedule:
    return FlowSchedule(shift=SHIFT)


def text_encoders(t5: T5EncoderModel, clip: CLIPTextModel) -> FluxTextEncoders:
    """The toy's encoders with their tokenizers: the SD vocabulary for both, T5-style (no start token, padded with
    id 0) for the sequence."""
    return FluxTextEncoders(t5, sd_clip_tokenizer("!"), clip, sd_clip_tokenizer(), SEQUENCE_LENGTH)


def build_toy_flux(seed: int = 0) -> tuple[FluxTransformer, FluxTextEncoders]:
    """Freshly initialised transformer and text encoders (deterministic given ``seed``), for training."""
    torch.manual_seed(seed)
    transformer = FluxTransformer(TOY_FLUX_CONFIG)
    t5 = T5EncoderModel(T5Config(**T5_CONFIG))
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    return transformer, text_encoders(t5, clip)


def save_toy_flux(transformer: FluxTransformer, encoders: FluxTextEncoders, out: Path) -> None:
    """The transformer as one fp16 single-file checkpoint (config in the header), the encoders as folders."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in transformer.state_dict().items()}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(transformer.config).items()}
    save_safetensors_atomic(tensors, out / TRANSFORMER_FILE, {"flux_config": json.dumps(config)})
    for name, module in (("text_encoder", encoders.clip), ("text_encoder_2", encoders.t5)):
        dtype = next(module.parameters()).dtype
        module.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
        module.to(dtype)


def load_transformer_file(path: Path, dtype: torch.dtype = torch.float32) -> FluxTransformer:
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["flux_config"])
    transformer = FluxTransformer(FluxConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                for k, v in config.items()}))
    transformer.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path)).items()})
    return transformer.to(dtype)


def load_toy_flux(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  weights_dir: str | Path = TOY_FLUX_WEIGHTS_DIR) -> tuple[FluxTransformer, FluxTextEncoders]:
    """The shipped toy-flux transformer and text encoders, in eval mode on ``device``."""
    weights_dir = Path(weights_dir)
    if not (weights_dir / TRANSFORMER_FILE).exists():
        raise FileNotFoundError(f"no toy-flux weights in {weights_dir}; run `python -m ablation_core.toy train "
                                "--arch flux` first")
    transformer = load_transformer_file(weights_dir / TRANSFORMER_FILE, dtype)
    with quiet_loading():
        clip = CLIPTextModel.from_pretrained(weights_dir / "text_encoder", torch_dtype=dtype)
        t5 = T5EncoderModel.from_pretrained(weights_dir / "text_encoder_2", torch_dtype=dtype)
    encoders = text_encoders(t5, clip).to(device).eval()
    return transformer.to(device).eval(), encoders


def guided_velocity(transformer: FluxTransformer, flow: FlowSchedule, text: FluxText, empty: FluxText,
                    guidance: float, distilled: bool | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """The velocity at integer timesteps with guidance: given to the network when it is guidance-distilled (and
    ``distilled`` is not False), classifier-free guidance over [empty, prompt] otherwise."""
    distilled = transformer.config.guidance_embed if distilled is None else distilled
    count = len(text.context)

    def predict(x: Tensor, t: Tensor) -> Tensor:
        sigma = flow.sigmas(t).to(x.device, x.dtype)
        if distilled:
            return transformer(x, sigma, text.context, text.pooled, torch.full((len(x),), float(guidance),
                                                                               device=x.device))
        context = torch.cat([empty.context.expand(count, -1, -1), text.context])
        pooled = torch.cat([empty.pooled.expand(count, -1), text.pooled])
        scale = torch.ones(2 * count, device=x.device) if transformer.config.guidance_embed else None
        unconditional, own = transformer(torch.cat([x, x]), torch.cat([sigma, sigma]), context, pooled,
                                         scale).chunk(2)
        return unconditional + guidance * (own - unconditional)

    return predict


@torch.no_grad()
def sample_toy_flux(transformer: FluxTransformer, encoders: FluxTextEncoders, prompts: list[str], seed: int = 0,
                    steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, batch_size: int = 256,
                    distilled: bool | None = None) -> Tensor:
    """One image per prompt, [n, 3, 16, 16] in [-1, 1]: DPM-Solver++(2M) on the flow, guidance given to the network
    when it is guidance-distilled, classifier-free guidance otherwise. Noise for prompt i depends on seed and i."""
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    noise_all = torch.randn(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    flow = schedule()
    empty = encoders([""])
    images = []
    for start in range(0, len(prompts), batch_size):
        text = encoders(prompts[start:start + batch_size])
        predict = guided_velocity(transformer, flow, text, empty, guidance, distilled)
        noise = noise_all[start:start + len(text.context)].to(device, dtype)
        images.append(sample_dpmpp_2m(predict, noise, flow, steps).float().clamp(-1, 1).cpu())
    return torch.cat(images)
