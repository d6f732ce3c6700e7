"""The model families this tool supports, and how to tell them apart. One place for these facts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """A model family as data. ``flow``: a rectified-flow transformer (Flux) rather than an eps/v UNet; ``toy``: an
    embedded toy world (its own words, its own settings)."""

    name: str
    title: str
    context_dim: int
    text_encoders: tuple[str, ...]
    pad_tokens: tuple[str, ...]
    uses_pooled_text: bool = False
    flow: bool = False
    toy: bool = False

    @property
    def settings_profile(self) -> str:
        """Which table of default settings the family reads: "real", "flux", "toy" or "toy-flux"."""
        if self.toy:
            return "toy-flux" if self.flow else "toy"
        return "flux" if self.flow else "real"


SD1 = Family("sd1", "Stable Diffusion 1.x", 768, ("text_encoder",), ("<|endoftext|>",))
SD2 = Family("sd2", "Stable Diffusion 2.x", 1024, ("text_encoder",), ("!",))
SDXL = Family("sdxl", "Stable Diffusion XL", 2048, ("text_encoder", "text_encoder_2"), ("<|endoftext|>", "!"), True)
TOY = Family("toy", "embedded toy world (SD architecture)", 0, ("text_encoder",), ("<|endoftext|>",), toy=True)
FLUX = Family("flux", "Flux.1", 4096, ("t5", "clip_l"), ("<pad>", "<|endoftext|>"), True, flow=True)
TOY_FLUX = Family("toy-flux", "embedded toy world (Flux architecture)", 64, ("t5", "clip"), ("!", "<|endoftext|>"),
                  True, flow=True, toy=True)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, TOY, FLUX, TOY_FLUX)}
SUPPORTED_TEXT = "SD1.x, SD2.x, SDXL (UNet models with cross-attention) and Flux.1 (dev, schnell and fine-tunes)"
MMDIT_TEXT = (
    "SD3/SD3.5 and other MM-DiT families are not supported yet: their joint blocks (joint_blocks.N.context_block) "
    f"and embedders need their own layer map, schedule and text encoders; this tool supports {SUPPORTED_TEXT}."
)


TOY_SHAPE = {"latent_channels": 3, "context_dim": 64}


def is_toy_shape(latent_channels: int, context_dim: int) -> bool:
    """The embedded toy model draws RGB pixels (3 channels) from a 64-wide text context; no real SD model does."""
    return latent_channels == TOY_SHAPE["latent_channels"] and context_dim == TOY_SHAPE["context_dim"]


def family_by_context_dim(context_dim: int, has_pooled_embedding: bool, latent_channels: int = 4) -> Family:
    """Tell SD1/SD2/SDXL (and the toy model) apart by the text context the UNet's cross-attention reads."""
    if is_toy_shape(latent_channels, context_dim):
        return TOY
    if has_pooled_embedding:
        return SDXL
    return SD2 if context_dim == SD2.context_dim else SD1
