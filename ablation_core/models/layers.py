"""Which weights each parameter group trains, and the patch key each weight is stored under.

Like peft's target-module selection, one mechanism picks modules by name pattern for every architecture. Module
names inside a transformer block (``attn2.to_k``) are the same in diffusers and LDM layouts, so the patterns work
for both; only the patch key naming (``ldm_keys``) needs to know the layout.

Flow transformers (Flux, in Black Forest Labs' names) have no cross-attention; the groups keep their meaning where it
carries: ``kv`` is the K and V rows of each double block's fused text-stream projection ``txt_attn.qkv`` (the text
side of the joint attention), ``attn`` all of the text stream's attention projections, ``embedding`` the two maps
that read the prompt embeddings (``txt_in``, ``vector_in.in_layer``), ``full`` every linear weight.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

GROUPS = ("kv", "attn", "embedding", "full")
Group = Literal["kv", "attn", "embedding", "full"]

GROUP_HELP = {
    "kv": "cross-attention K/V projections (paper default; robust to misspellings; smallest patch)",
    "attn": "all attention projections (self- and cross-attention Q/K/V/out)",
    "embedding": "text-encoder token embeddings of the target's words only (fast, but misspellings slip through)",
    "full": "every linear and convolution weight of the UNet (memorized images; largest patch)",
}

_UNET_PATTERNS: dict[str, re.Pattern[str]] = {
    "kv": re.compile(r"(^|\.)attn2\.to_[kv]$"),
    "attn": re.compile(r"(^|\.)attn[12]\.(to_[qkv]|to_out\.0)$"),
}
_TOKEN_EMBEDDING = re.compile(r"(^|\.)token_embedding$")
_FLUX_PATTERNS: dict[str, re.Pattern[str]] = {
    "kv": re.compile(r"^double_blocks\.\d+\.txt_attn\.qkv$"),
    "attn": re.compile(r"^double_blocks\.\d+\.txt_attn\.(qkv|proj)$"),
    "embedding": re.compile(r"^(txt_in|vector_in\.in_layer)$"),
}

FLUX_GROUP_HELP = {
    "kv": "K/V rows of each double block's text-stream projection txt_attn.qkv (smallest patch)",
    "attn": "the text stream's attention projections (txt_attn.qkv and txt_attn.proj) of every double block",
    "embedding": "txt_in and vector_in.in_layer, the maps that read the T5 and CLIP embeddings (UCE's Flux layers)",
    "full": "every linear weight of the transformer",
}

UNET_PREFIX = "lora_unet_"
TEXT_PREFIXES = {1: ("lora_te_",), 2: ("lora_te1_", "lora_te2_")}

LayerKind = Literal["linear", "conv", "embedding"]


@dataclass
class Layer:
    """One weight a patch can change: its patch key, the module holding it, and how the module uses it.

    ``rows``: the group trains only these output rows ``[start, stop)`` of the weight (the K and V of a fused QKV
    projection); the patch still stores the whole weight's change, zero elsewhere, so loaders map it as is."""

    key: str
    module: nn.Module
    kind: LayerKind
    rows: tuple[int, int] | None = None

    @property
    def weight(self):
        return self.module.weight


def layer_kind(module: nn.Module) -> LayerKind | None:
    if isinstance(module, nn.Linear) or _is_own_linear(module):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _is_own_linear(module: nn.Module) -> bool:
    """A host's own linear class that is not an ``nn.Linear`` (Forge's ``ForgeOperations.Linear`` is a plain
    ``nn.Module`` with ``in_features``, ``out_features`` and a 2-D ``weight``)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Linear" and isinstance(weight, Tensor) and weight.dim() == 2
            and weight.shape == (getattr(module, "out_features", None), getattr(module, "in_features", None)))


def select_unet_modules(named_modules: Iterable[tuple[str, nn.Module]], group: str) -> list[tuple[str, nn.Module]]:
    """The UNet modules a group trains. ``embedding`` trains no UNet module."""
    if group == "embedding":
        return []
    if group == "full":
        return [(n, m) for n, m in named_modules if layer_kind(m) in ("linear", "conv")]
    if group not in _UNET_PATTERNS:
        raise ValueError(f"unknown parameter group {group!r}; choose one of {', '.join(GROUPS)}")
    pattern = _UNET_PATTERNS[group]
    return [(n, m) for n, m in named_modules if pattern.search(n) and layer_kind(m) == "linear"]


def select_text_modules(named_modules: Iterable[tuple[str, nn.Module]], group: str) -> list[tuple[str, nn.Module]]:
    """The text-encoder modules a group trains: only the token embedding, and only for ``embedding``."""
    if group != "embedding":
        return []
    return [(n, m) for n, m in named_modules if _TOKEN_EMBEDDING.search(n) and isinstance(m, nn.Embedding)]


def select_flux_modules(named_modules: Iterable[tuple[str, nn.Module]], group: str
                        ) -> list[tuple[str, nn.Module, tuple[int, int] | None]]:
    """The modules of a Flux transformer (BFL names) a group trains, with the rows it trains (``kv``: K and V)."""
    if group == "full":
        return [(n, m, None) for n, m in named_modules if layer_kind(m) == "linear"]
    if group not in _FLUX_PATTERNS:
        raise ValueError(f"unknown parameter group {group!r}; choose one of {', '.join(GROUPS)}")
    chosen = []
    for name, module in named_modules:
        if _FLUX_PATTERNS[group].search(name) and layer_kind(module) == "linear":
            width = module.weight.shape[0] // 3
            chosen.append((name, module, (width, 3 * width) if group == "kv" else None))
    return chosen


def kohya_key(prefix: str, module_name: str) -> str:
    """``lora_unet_`` + ``input_blocks.1.1.transformer_blocks.0.attn2.to_k`` -> the underscore form loaders read."""
    return prefix + module_name.replace(".", "_")


def text_prefix(encoder_index: int, encoder_count: int) -> str:
    return TEXT_PREFIXES[2][encoder_index] if encoder_count == 2 else TEXT_PREFIXES[1][0]
