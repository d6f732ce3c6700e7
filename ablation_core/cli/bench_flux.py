"""``bench --arch flux``: what a trained ablation of Flux.1 costs, counted on the meta device, and a memory plan.

Flux.1 is 12B parameters: no CPU here runs it, and its weights are never downloaded. A copy on PyTorch's ``meta``
device has every shape and no data, so ``models.meta.call_cost`` counts the FLOPs of a full-size forward (and of a
training pass through the default group's weights) and the bytes autograd saves for it, in milliseconds. With the
default preset's UNet-evaluation counts (``methods.ablation.budget``, one pass per step on a guidance-distilled
model), that gives the FLOPs of a whole run at 512 and 1024 px; T5-XXL's and CLIP-L's prompt encodings are counted the
same way. The memory plan adds up what a 24 GB card must hold while training (the ``models.memory`` estimate with
Flux's own activation count) for the plain bf16 run and for the one that fits: fp8 base weights (cast to bf16 one
layer at a time), gradient checkpointing of the double and single stream blocks, the text encoders set aside on the
CPU once the prompts are encoded, and low-rank deltas where the group's full-rank deltas would not fit.
"""

from __future__ import annotations

import torch

from ..methods.ablation.budget import gradient_passes_per_step, unet_evaluations
from ..methods.ablation.preserve import preserved_prompts
from ..methods.ablation.settings import make_config, resolve_config
from ..models.flux.transformer import FluxConfig, FluxTransformer
from ..models.layers import select_flux_modules
from ..models.memory import FRAMEWORK_BYTES, GIB
from ..models.meta import call_cost

SIZES_PX = (512, 1024)
LATENT_PER_PX = 8  # Flux's VAE: 16 latent channels at 1/8 of the image side
TEXT_TOKENS = 512  # dev; schnell reads 256
CARD_BYTES = 24 * 10**9  # a "24 GB" card (RTX 3090 / 4090)
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, projection_dim=768)
DEFAULT_TARGET = ("Grumpy Cat", "cat")


def _meta_flux(config: FluxConfig = FluxConfig()) -> FluxTransformer:
    with torch.device("meta"):
        return FluxTransformer(config).to(torch.bfloat16).eval().requires_grad_(False)


def kv_parameter_names(model: FluxTransformer) -> list[str]:
    """The weights a ``kv`` run differentiates: each double block's fused ``txt_attn.qkv`` (its K and V rows)."""
    return group_parameters(model, "kv")[0]


def group_parameters(model: FluxTransformer, group: str) -> tuple[list[str], int]:
    """The weights a run of ``group`` differentiates, and how many numbers it trains (``kv``: the K and V rows of
    each fused ``txt_attn.qkv``; ``embedding``: all of ``txt_in`` and ``vector_in.in_layer``)."""
    chosen = select_flux_modules(model.named_modules(), group)
    trained = sum(module.weight.numel() * ((rows[1] - rows[0]) / module.weight.shape[0] if rows else 1)
                  for _, module, rows in chosen)
    return [f"{name}.weight" for name, _, _ in chosen], int(trained)


def _call(model: FluxTransformer, px: int, trained: list[str], grad: bool) -> dict[str, int]:
    config, side = model.config, px // LATENT_PER_PX
    meta = dict(device="meta", dtype=torch.bfloat16)
    args = (torch.empty(1, config.in_channels, side, side, **meta), torch.empty(1, **meta),
            torch.empty(1, TEXT_TOKENS, config.context_in_dim, **meta), torch.empty(1, config.vec_in_dim, **meta),
            torch.empty(1, **meta))
    return call_cost(model, args, {}, trained, grad)


def _text_encoder_flops() -> dict[str, int]:
    """FLOPs of encoding one prompt with T5-XXL (512 tokens) and CLIP-L (77), counted on meta copies."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    except ImportError:  # transformers is what reads real text encoders; without it only the transformer is counted
        return {}
    counts = {}
    for name, build, tokens in (("t5_xxl", lambda: T5EncoderModel(T5Config(**T5_XXL)), TEXT_TOKENS),
                                ("clip_l", lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)), 77)):
        with torch.device("meta"):
            model = build().eval()
        ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
        counts[name] = call_cost(model, (ids,), {})["flops"]
    return counts


def memory_plan(model: FluxTransformer, training: dict[str, int], rows: int, group: str, lora_rank: int,
                text_encoder_bytes: int) -> dict[str, object]:
    """Bytes on the card while training ``rows`` rows at once, for the plain bf16 run and the one that fits 24 GB.
    Full-rank deltas take 16 bytes a number (delta, gradient and AdamW's two moments, in float32); the fitting plan
    trains LoRA adapters where the full-rank group would not fit (``kv``: 5.3 GiB), the group itself where it is
    small (``embedding``: ``txt_in`` and ``vector_in``, 0.2 GiB)."""
    weights = sum(p.numel() for p in model.parameters())
    trained = group_parameters(model, group)[1]
    low_rank = trained * 16 > GIB
    small = f"LoRA rank {lora_rank}" if low_rank else f"full-rank {group}"
    plans = {
        f"bf16 weights, full-rank {group}, text encoders on the card": dict(
            weights=weights * 2, activations=training["saved_bytes"] * rows, trained=trained * 16,
            text_encoders=text_encoder_bytes),
        f"fp8 weights, {small}, gradient checkpointing, text encoders set aside": dict(
            weights=weights * 1, activations=training["saved_bytes_checkpointed"] * rows,
            trained=(_lora_params(model, lora_rank) if low_rank else trained) * 16, text_encoders=0),
    }
    out: dict[str, object] = {}
    for name, parts in plans.items():
        total = sum(parts.values()) + FRAMEWORK_BYTES
        sizes = {k: f"{v / GIB:.2f} GiB" for k, v in {**parts, "framework": FRAMEWORK_BYTES}.items()}
        out[name] = {**sizes, "total": f"{total / GIB:.1f} GiB", "fits_24gb": total <= CARD_BYTES}
    return out


def _lora_params(model: FluxTransformer, rank: int) -> int:
    hidden = model.config.hidden_size
    return len(model.double_blocks) * rank * (3 * hidden + hidden)


def run_flux_bench(sizes: tuple[int, ...] = SIZES_PX, lora_rank: int = 16) -> dict[str, object]:
    """FLOPs and UNet evaluations of the default preset on Flux.1 dev at each size, and the memory plan."""
    model = _meta_flux()
    target, anchor = DEFAULT_TARGET
    config = resolve_config(make_config(target, anchor, guidance=3.5), "flux")
    trained = group_parameters(model, str(config.group))[0]
    evaluations = unet_evaluations(config, guidance_input=True)
    grad_rows = int(config.steps) * gradient_passes_per_step(config)
    frozen_rows = sum(evaluations.values()) - grad_rows
    text = _text_encoder_flops()
    prompts = int(config.anchor_prompt_count) * 2 + 1 + (len(preserved_prompts(config, "flux"))
                                                        if config.preserved_rows else 0)
    text_flops = prompts * sum(text.values())
    sd_config = resolve_config(make_config(target, anchor), "sd1")
    report: dict[str, object] = {
        "arch": "flux", "model": "Flux.1 dev shape (meta device: shapes only, no weights)",
        "transformer_parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
        "default_preset_unet_evaluations": sum(evaluations.values()),
        "default_preset_unet_evaluations_by_phase": evaluations,
        "sd_default_preset_unet_evaluations": sum(unet_evaluations(sd_config).values()),
        "text_encoder_flops_per_prompt": text, "text_encoder_prompts": prompts,
    }
    for px in sizes:
        frozen, training = _call(model, px, trained, False), _call(model, px, trained, True)
        report[f"{px}px"] = {
            "image_tokens": (px // LATENT_PER_PX // model.config.patch_size) ** 2, "text_tokens": TEXT_TOKENS,
            "tflops_per_frozen_evaluation": round(frozen["flops"] / 1e12, 2),
            "tflops_per_training_evaluation": round(training["flops"] / 1e12, 2),
            "default_preset_pflops": round((frozen_rows * frozen["flops"] + grad_rows * training["flops"]
                                            + text_flops) / 1e15, 1),
            "activation_gib_per_training_row": round(training["saved_bytes"] / GIB, 2),
            "activation_gib_per_training_row_checkpointed": round(training["saved_bytes_checkpointed"] / GIB, 2),
        }
        if px == 512:
            t5_bytes = sum(_text_param_count().values()) * 2
            rows = gradient_passes_per_step(config)  # the batch and the preserved rows, trained in one pass
            report[f"memory_plan_512px_{rows}_rows"] = memory_plan(model, training, rows, str(config.group),
                                                                   lora_rank, t5_bytes)
    return report


def _text_param_count() -> dict[str, int]:
    """T5-XXL encoder (4.76B) and CLIP-L text (123M) parameters, from their shapes."""
    d, f, layers = T5_XXL["d_model"], T5_XXL["d_ff"], T5_XXL["num_layers"]
    t5 = T5_XXL["vocab_size"] * d + layers * (4 * d * d + 3 * d * f)
    h, i, n = CLIP_L["hidden_size"], CLIP_L["intermediate_size"], CLIP_L["num_hidden_layers"]
    return {"t5_xxl": t5, "clip_l": 49408 * h + 77 * h + n * (4 * h * h + 2 * h * i)}
