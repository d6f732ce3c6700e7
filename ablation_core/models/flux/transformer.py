"""Flux's transformer in plain PyTorch, with Black Forest Labs' module names (the single-file layout).

The names are the ones ComfyUI's UNETLoader, Forge and the official checkpoints use (``double_blocks.0.txt_attn.qkv``,
``single_blocks.0.linear1``, ``txt_in``, ``vector_in.in_layer`` ...), so a real Flux.1 file loads into it as it is,
patches are keyed as every loader expects, and the embedded toy-flux model is the same code at a smaller width.

The parts that matter for erasure:
- ``txt_in`` maps the T5 sequence embedding into the model, ``vector_in`` the pooled CLIP vector: the only maps that
  see the prompt embeddings unchanged (UCE's Flux edit solves for these two in closed form);
- each double block's ``txt_attn.qkv`` is one fused Linear whose rows are Q, K and V of the text stream (the part of
  the joint attention through which the prompt reaches the image; Q and K pass a per-head RMSNorm after it);
- the text stream's input to it is modulated by the timestep and guidance (``txt_mod``), and from the second block on
  it has attended to the image, so unlike SD's cross-attention K/V it is not a fixed function of the prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class FluxConfig:
    """Shapes of a Flux transformer. Flux.1 dev/schnell: the defaults (``guidance_embed`` False for schnell)."""

    in_channels: int = 16
    patch_size: int = 2
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    context_in_dim: int = 4096
    vec_in_dim: int = 768
    mlp_ratio: float = 4.0
    axes_dim: tuple[int, ...] = field(default=(16, 56, 56))
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10_000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (scaled by ``time_factor``, as Flux does)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(positions: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices [B, L, dim/2, 2, 2] for one axis of positions [B, L]."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim
    angles = positions.double()[..., None] / (theta**scale)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).view(*angles.shape, 2, 2).float()


def apply_rope(x: Tensor, frequencies: Tensor) -> Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    rotated = frequencies[..., 0] * pairs[..., 0] + frequencies[..., 1] * pairs[..., 1]
    return rotated.reshape(*x.shape).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Joint attention with rotary positions; [B, H, L, D] in, [B, L, H*D] out."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class EmbedND(nn.Module):
    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta, self.axes_dim = theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        parts = [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(parts, dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rrms = torch.rsqrt(x.float().square().mean(dim=-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, 3*H*D] -> q, k, v of [B, H, L, D], Q and K normalised per head."""
        b, length, _ = qkv.shape
        q, k, v = qkv.view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


@dataclass
class ModulationOut:
    shift: Tensor
    scale: Tensor
    gate: Tensor

    def apply(self, x: Tensor) -> Tensor:
        return (1 + self.scale) * x + self.shift


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.multiplier == 6 else None


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden, bias=True), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, dim, bias=True))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly over [text, image]."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(dim, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(dim, heads, config.qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", _mlp(dim, config.mlp_hidden))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        img_q, img_k, img_v = self.img_attn.split_heads(self.img_attn.qkv(img_mod1.apply(self.img_norm1(img))))
        txt_q, txt_k, txt_v = self.txt_attn.split_heads(self.txt_attn.qkv(txt_mod1.apply(self.txt_norm1(txt))))
        joint = attention(torch.cat([txt_q, img_q], dim=2), torch.cat([txt_k, img_k], dim=2),
                          torch.cat([txt_v, img_v], dim=2), pe)
        txt_attn, img_attn = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]
        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.apply(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over the joined sequence; ``linear1`` fuses Q, K, V and the MLP's input."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.mlp_hidden = config.num_heads, config.mlp_hidden
        self.linear1 = nn.Linear(dim, dim * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(config.head_dim)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor) -> Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(mod.apply(self.pre_norm(x))), [3 * x.shape[-1], self.mlp_hidden], -1)
        b, length, _ = qkv.shape
        q, k, v = qkv.view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat([attention(q, k, v, pe), self.mlp_act(mlp)], dim=-1))
        return x + mod.gate * out


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class FluxTransformer(nn.Module):
    """Flux.1's transformer. ``forward`` takes latents [B, C, H, W], the flow time in [0, 1], the T5 sequence
    embedding, the pooled CLIP vector and (dev) the guidance scale, and returns the velocity [B, C, H, W]."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        if sum(config.axes_dim) != config.head_dim:
            raise ValueError(f"axes_dim {config.axes_dim} must add up to the head size {config.head_dim}")
        self.config = config
        dim, patch_channels = config.hidden_size, config.in_channels * config.patch_size**2
        self.pe_embedder = EmbedND(config.theta, config.axes_dim)
        self.img_in = nn.Linear(patch_channels, dim, bias=True)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(config.context_in_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config) for _ in range(config.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(config) for _ in range(config.depth_single_blocks))
        self.final_layer = LastLayer(dim, patch_channels)

    def patchify(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.config.patch_size
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: Tensor, height: int, width: int) -> Tensor:
        b, p = tokens.shape[0], self.config.patch_size
        c = tokens.shape[-1] // (p * p)
        x = tokens.view(b, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, height, width)

    def position_ids(self, batch: int, height: int, width: int, text_length: int, device: torch.device) -> Tensor:
        """Flux's 3-axis positions: text tokens all at 0, image patches at (0, row, column)."""
        p = self.config.patch_size
        rows, cols = torch.meshgrid(torch.arange(height // p, device=device), torch.arange(width // p, device=device),
                                    indexing="ij")
        image = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).view(1, -1, 3).float()
        text = torch.zeros(1, text_length, 3, device=device)
        return torch.cat([text, image], dim=1).expand(batch, -1, -1)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor,
                guidance: Tensor | None = None) -> Tensor:
        height, width = x.shape[-2:]
        img = self.img_in(self.patchify(x))
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this Flux model is guidance-distilled (dev): give it a guidance scale")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y.to(img.dtype))
        txt = self.txt_in(context.to(img.dtype))
        pe = self.pe_embedder(self.position_ids(len(x), height, width, txt.shape[1], x.device))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        joined = torch.cat([txt, img], dim=1)
        for block in self.single_blocks:
            joined = block(joined, vec, pe)
        img = joined[:, txt.shape[1]:]
        return self.unpatchify(self.final_layer(img, vec), height, width)
