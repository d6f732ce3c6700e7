"""Names of UNet and text-encoder weights in the two layouts people meet: diffusers and original LDM.

ComfyUI, A1111 and single-file checkpoints use LDM names (``input_blocks.1.1.transformer_blocks.0.attn2.to_k``);
diffusers folders use diffusers names (``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``). Patch keys
and single-file export need one to map to the other; this module is the only place that knows how.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the name mapping needs to know about a UNet's shape."""

    layers_per_block: int
    up_block_has_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: dict) -> UNetLayout:
        layers = config["layers_per_block"]
        if not isinstance(layers, int):
            if len(set(layers)) != 1:
                raise ValueError("UNets with a different layers_per_block per level are not supported")
            layers = layers[0]
        return cls(layers, tuple("CrossAttn" in t for t in config["up_block_types"]))


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET_PARTS.get(head, head)}.{tail}" if tail else _RESNET_PARTS.get(head, head)


def unet_name_to_ldm(name: str, layout: UNetLayout) -> str:
    """Map a diffusers UNet module or parameter name to its LDM name (without the ``diffusion_model.`` prefix)."""
    for diffusers_prefix, ldm_prefix in _TOP_LEVEL.items():
        if name == diffusers_prefix or name.startswith(diffusers_prefix + "."):
            return ldm_prefix + name[len(diffusers_prefix):]
    per_down, per_up = layout.layers_per_block + 1, layout.layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * per_down + j
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m[1]) + 1) * per_down}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"middle_block.{int(m[1]) * 2}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * per_up + j
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        block = int(m[1])
        slot = 2 if layout.up_block_has_attention[block] else 1
        return f"output_blocks.{block * per_up + layout.layers_per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name known for UNet weight {name!r}")


def unet_module_to_ldm(module_name: str, layout: UNetLayout) -> str:
    """Like ``unet_name_to_ldm`` for a module (a weight's owner) rather than a parameter."""
    return unet_name_to_ldm(module_name + ".weight", layout)[: -len(".weight")]


# Text encoders -------------------------------------------------------------------------------------------------

_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def clip_state_dict_to_openclip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert a transformers CLIP text model state dict to OpenCLIP names (SD2 and SDXL's second encoder)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, value in state.items():
        if name in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[name]] = value
        elif name == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            layer, part, kind = int(m[1]), m[2], m[3]
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[part[-6]] = value
            else:
                out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[part]}.{kind}"] = value
    for (layer, kind), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def canonical_clip_name(name: str) -> str:
    """transformers 5 dropped the ``text_model.`` level from ``CLIPTextModel``; checkpoints and LoRA keys keep it."""
    if name.startswith(("text_model.", "text_projection")) or not name:
        return name
    return "text_model." + name


def canonical_clip_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {canonical_clip_name(k): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_state_for_model(model: torch.nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adapt canonical (``text_model.``) names to whatever this transformers version's model expects."""
    state = canonical_clip_state(state)
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return state
    return {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
