"""Flux.1 files as people have them: the transformer in the single-file layout (what ComfyUI's UNETLoader and Forge
read: ``flux1-dev.safetensors``, fp8 copies, or a whole checkpoint with ``model.diffusion_model.`` keys), diffusers
folders (``transformer/`` in diffusers' names, converted here), and the text encoders from their own files
(``clip_l.safetensors``, ``t5xxl_fp16.safetensors``: transformers' key layout) or folders.

The network's shape is read from the weights (width, depth, heads from the QK-norm scale, guidance input or not);
only the rotary axes are not in them (Flux.1's are used for its head size of 128, or the file's own config).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from ...errors import UnsupportedModelError
from .transformer import FluxConfig, FluxTransformer

FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
DIFFUSERS_MARKER = "transformer_blocks.0.attn.add_q_proj.weight"
FLUX_AXES = {128: (16, 56, 56)}  # Flux.1's rotary axes for its head size


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise UnsupportedModelError(f"{path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise UnsupportedModelError(f"{path.name} is not a .safetensors file; only safetensors are loaded (pickles "
                                    "can run code)")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise UnsupportedModelError(f"{path.name} is not a readable .safetensors file ({err}).") from err


def is_flux_state(keys) -> bool:
    return any(k.endswith(FLUX_MARKER) or k.endswith(DIFFUSERS_MARKER) for k in keys)


def flux_transformer_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The transformer's weights under BFL names: prefixes dropped, diffusers names converted, text encoders and
    VAE of an all-in-one checkpoint left out."""
    for prefix in FLUX_PREFIXES:
        if any(k.startswith(prefix) and (k.endswith(FLUX_MARKER) or k.endswith(DIFFUSERS_MARKER)) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    if DIFFUSERS_MARKER in state:
        state = diffusers_to_bfl(state)
    if FLUX_MARKER not in state:
        raise UnsupportedModelError("this file holds no Flux transformer (no double_blocks.0.img_attn.norm)")
    return state


def flux_config_from_state(state: dict[str, Tensor], metadata: dict[str, str] | None = None) -> FluxConfig:
    """The transformer's shape from its weights (and the rotary axes from the file's config where it has one)."""
    if metadata and "flux_config" in metadata:
        config = json.loads(metadata["flux_config"])
        return FluxConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    hidden, patch_channels = state["img_in.weight"].shape
    head_dim = state[FLUX_MARKER].shape[0]
    if head_dim not in FLUX_AXES:
        raise UnsupportedModelError(f"a Flux transformer with heads of {head_dim} (Flux.1 has 128): its rotary axes "
                                    "are not known; this tool reads Flux.1 and fine-tunes of it")
    mlp_hidden = state["double_blocks.0.img_mlp.0.weight"].shape[0]
    return FluxConfig(
        in_channels=patch_channels // 4, patch_size=2, hidden_size=hidden, num_heads=hidden // head_dim,
        depth=_count(state, "double_blocks"), depth_single_blocks=_count(state, "single_blocks"),
        context_in_dim=state["txt_in.weight"].shape[1], vec_in_dim=state["vector_in.in_layer.weight"].shape[1],
        mlp_ratio=mlp_hidden / hidden, axes_dim=FLUX_AXES[head_dim],
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in state,
        guidance_embed="guidance_in.in_layer.weight" in state)


def _count(state: dict[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def build_flux_transformer(state: dict[str, Tensor], metadata: dict[str, str] | None = None,
                           dtype: torch.dtype = torch.bfloat16) -> FluxTransformer:
    """A ``FluxTransformer`` holding ``state`` (BFL names) in ``dtype`` (fp8 files are cast: training reads them
    in the compute precision)."""
    config = flux_config_from_state(state, metadata)
    with torch.device("meta"):
        transformer = FluxTransformer(config)
    expected = set(transformer.state_dict())
    missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise UnsupportedModelError(f"the Flux file lacks {len(missing)} weight(s) (e.g. '{missing[0]}'); it is "
                                    "incomplete or of another variant (Flux fill/depth/Kontext inputs are not read)")
    if unknown:
        raise UnsupportedModelError(f"the Flux file has {len(unknown)} weight(s) this tool does not know (e.g. "
                                    f"'{unknown[0]}'): a variant of Flux it does not read yet")
    transformer.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return transformer.to(dtype)


def _qkv(state: dict[str, Tensor], prefix: str, names: tuple[str, ...], end: str) -> Tensor:
    return torch.cat([state.pop(f"{prefix}{name}.{end}") for name in names])


def diffusers_to_bfl(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers' ``FluxTransformer2DModel`` names to Black Forest Labs' (the reverse of ComfyUI's
    ``flux_to_diffusers``): separate Q/K/V fused into ``qkv``, ``linear1`` from Q/K/V and the MLP input."""
    state = dict(state)
    out: dict[str, Tensor] = {}
    for index in range(_count(state, "transformer_blocks")):
        src, dst = f"transformer_blocks.{index}.", f"double_blocks.{index}."
        for end in ("weight", "bias"):
            out[f"{dst}img_attn.qkv.{end}"] = _qkv(state, src + "attn.", ("to_q", "to_k", "to_v"), end)
            out[f"{dst}txt_attn.qkv.{end}"] = _qkv(state, src + "attn.", ("add_q_proj", "add_k_proj", "add_v_proj"),
                                                   end)
        for a, b in _DOUBLE_BLOCK.items():
            out[dst + b] = state.pop(src + a)
    for index in range(_count(state, "single_transformer_blocks")):
        src, dst = f"single_transformer_blocks.{index}.", f"single_blocks.{index}."
        for end in ("weight", "bias"):
            out[f"{dst}linear1.{end}"] = torch.cat([_qkv(state, src + "attn.", ("to_q", "to_k", "to_v"), end),
                                                    state.pop(f"{src}proj_mlp.{end}")])
        for a, b in _SINGLE_BLOCK.items():
            out[dst + b] = state.pop(src + a)
    for a, b in _TOP_LEVEL.items():
        if a in state:
            out[b] = state.pop(a)
    for end in ("weight", "bias"):  # diffusers keeps (scale, shift) where BFL keeps (shift, scale)
        scale, shift = state.pop(f"norm_out.linear.{end}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{end}"] = torch.cat([shift, scale])
    if state:
        raise UnsupportedModelError(f"the diffusers Flux transformer has {len(state)} weight(s) this tool does not "
                                    f"know (e.g. '{next(iter(state))}')")
    return out


_DOUBLE_BLOCK = {
    **{f"attn.to_out.0.{e}": f"img_attn.proj.{e}" for e in ("weight", "bias")},
    **{f"attn.to_add_out.{e}": f"txt_attn.proj.{e}" for e in ("weight", "bias")},
    **{f"norm1.linear.{e}": f"img_mod.lin.{e}" for e in ("weight", "bias")},
    **{f"norm1_context.linear.{e}": f"txt_mod.lin.{e}" for e in ("weight", "bias")},
    **{f"ff.net.0.proj.{e}": f"img_mlp.0.{e}" for e in ("weight", "bias")},
    **{f"ff.net.2.{e}": f"img_mlp.2.{e}" for e in ("weight", "bias")},
    **{f"ff_context.net.0.proj.{e}": f"txt_mlp.0.{e}" for e in ("weight", "bias")},
    **{f"ff_context.net.2.{e}": f"txt_mlp.2.{e}" for e in ("weight", "bias")},
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
_SINGLE_BLOCK = {
    **{f"norm.linear.{e}": f"modulation.lin.{e}" for e in ("weight", "bias")},
    **{f"proj_out.{e}": f"linear2.{e}" for e in ("weight", "bias")},
    "attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale",
}
_TOP_LEVEL = {
    **{f"x_embedder.{e}": f"img_in.{e}" for e in ("weight", "bias")},
    **{f"context_embedder.{e}": f"txt_in.{e}" for e in ("weight", "bias")},
    **{f"proj_out.{e}": f"final_layer.linear.{e}" for e in ("weight", "bias")},
    **{f"time_text_embed.timestep_embedder.linear_{i}.{e}": f"time_in.{n}.{e}"
       for i, n in ((1, "in_layer"), (2, "out_layer")) for e in ("weight", "bias")},
    **{f"time_text_embed.text_embedder.linear_{i}.{e}": f"vector_in.{n}.{e}"
       for i, n in ((1, "in_layer"), (2, "out_layer")) for e in ("weight", "bias")},
    **{f"time_text_embed.guidance_embedder.linear_{i}.{e}": f"guidance_in.{n}.{e}"
       for i, n in ((1, "in_layer"), (2, "out_layer")) for e in ("weight", "bias")},
}
