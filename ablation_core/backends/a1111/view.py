"""The model A1111 (or reForge, which keeps its objects) has loaded, seen as the core's ``ModelView``.

A1111 holds the original LDM objects: ``sd_model.model.diffusion_model`` is the ``UNetModel`` (module names
``input_blocks.1.1.transformer_blocks.0.attn2.to_k``, so patch keys are these names as they are), and
``sd_model.get_learned_conditioning(prompts)`` encodes with A1111's own prompt handling (a tensor for SD1/SD2, a dict
with ``crossattn`` and ``vector`` for SDXL). Nothing here imports A1111: the flows hand in what they take from it.

The loaded model is never changed. Training hooks its modules (``methods.ablation.adapters``) and every hook is gone
when a run ends, however it ends. One thing A1111 itself does to the weights: its built-in Lora extension adds the
LoRAs of the last generation into them and keeps the originals in ``network_weights_backup``. Layers here report those
originals (so fingerprints and the closed form see the checkpoint as loaded), and ``loras_unmerged`` lets A1111 put
the originals back before a run trains on them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UnsupportedModelError
from ...models.checkpointing import transformer_blocks
from ...models.families import FAMILIES, MMDIT_TEXT, Family, family_by_context_dim
from ...models.layers import Layer, kohya_key, layer_kind, select_unet_modules
from ...models.schedules import EpsSchedule, sd_alphas_cumprod
from ...models.view import Conditioning, ModelView, PromptCache

log = logging.getLogger(__name__)

DEFAULT_LATENT_SIZE = {"sd1": 64, "sd2": 64, "sdxl": 128}
UNET_PREFIX = "lora_unet_"
VOCABULARY = 49408  # CLIP's BPE vocabulary, every SD text encoder's


class SizedPrompts(list):
    """Prompts as A1111's ``SdConditioning`` passes them: a list that also carries the image size (SDXL's size
    conditioning reads ``width`` and ``height`` from it)."""

    def __init__(self, prompts: list[str], width: int, height: int):
        super().__init__(prompts)
        self.width, self.height = width, height
        self.is_negative_prompt = False


class LoadedWeightLayer(Layer):
    """A layer whose ``weight`` is the checkpoint's own weight, also while A1111's Lora extension has a LoRA of the
    last generation added into the module (the original then waits in ``network_weights_backup``)."""

    @property
    def weight(self) -> Tensor:
        backup = getattr(self.module, "network_weights_backup", None)
        if isinstance(backup, Tensor) and getattr(self.module, "network_current_names", ()):
            return backup
        return self.module.weight


def a1111_family(sd_model: Any) -> Family:
    """SD1/SD2/SDXL from A1111's own flags, or from the UNet's shapes; SD3 and inpainting models get a clear error."""
    if getattr(sd_model, "is_sd3", False):
        raise UnsupportedModelError(f"the loaded model is SD3. {MMDIT_TEXT}")
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    keys = [m for n, m in unet.named_modules() if n.endswith("attn2.to_k")] if unet is not None else []
    if not keys or not hasattr(unet, "input_blocks"):
        raise UnsupportedModelError(f"the loaded model has no UNet cross-attention. {MMDIT_TEXT}")
    in_channels = getattr(unet, "in_channels", 4)
    if in_channels != 4:
        raise UnsupportedModelError(f"the loaded model's UNet reads {in_channels} channels (an inpainting or "
                                    "instruct model); load the base text-to-image checkpoint to ablate a concept")
    for flag, name in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(sd_model, flag, False) is True:
            return FAMILIES[name]
    return family_by_context_dim(keys[0].in_features, hasattr(unet, "label_emb"))


def _text_encoders(sd_model: Any, family: Family) -> list[Any]:
    """A1111's wrapped text encoders, each with ``tokenize(texts)`` -> token ids without start/end tokens."""
    if family.name == "sdxl":
        return [e for e in sd_model.conditioner.embedders if callable(getattr(e, "tokenize", None))]
    return [sd_model.cond_stage_model]


def compute_modules(root: nn.Module | None) -> list[nn.Module]:
    """The linear and convolution modules under ``root``: where a forward spends its time, so where cancel checks go."""
    return [m for m in root.modules() if layer_kind(m) in ("linear", "conv")] if root is not None else []


# what a memory hint names (``models.memory.check_fits``): the tab's own controls and the web UI's start flags
TAB_SETTING_NAMES: dict[str, str | None] = {
    "lora": None, "checkpointing": "the tab's Advanced > Gradient checkpointing box",
    "batch": "Advanced > Batch size, now {batch}",
    "latents": "a lower Advanced > Training resolution (now {pixels} px)",
    "device": "a GPU with more free memory",
}


class A1111ModelView(ModelView):
    """``shared.sd_model`` of A1111 as a ``ModelView``.

    ``autocast`` is A1111's ``devices.autocast`` (the mixed precision its own sampling runs under); the UNet and text
    encoder are called inside it. ``networks`` is the built-in Lora extension's module (``prepared`` sets its LoRAs
    aside).
    """

    program = "A1111"
    setting_names = {**TAB_SETTING_NAMES, "dtype": "half-precision weights (start the web UI without --no-half)"}

    def __init__(self, sd_model: Any, latent_size: int | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 networks: Any = None):
        self.sd_model, self.networks = sd_model, networks
        self.family = a1111_family(sd_model)
        self.diffusion_model: nn.Module = sd_model.model.diffusion_model
        self.autocast = autocast
        self.v_prediction = getattr(sd_model, "parameterization", "eps") == "v"
        first = next(self.diffusion_model.parameters())
        self.device, self.dtype = first.device, first.dtype
        acp = getattr(sd_model, "alphas_cumprod", None)
        self.alphas_cumprod = (acp.detach().to("cpu", torch.float64) if isinstance(acp, Tensor)
                               else sd_alphas_cumprod())
        self.schedule = EpsSchedule(self.alphas_cumprod)
        self.latent_channels = int(getattr(self.diffusion_model, "in_channels", 4))
        self.default_latent_size = latent_size or DEFAULT_LATENT_SIZE[self.family.name]
        self.latent_multiple = 2 ** (len(getattr(self.diffusion_model, "channel_mult", (1, 2, 4, 4))) - 1)
        self._encoders = _text_encoders(sd_model, self.family)
        self._prompt_cache = PromptCache(self._encode_batch)

    def prepared(self) -> contextlib.AbstractContextManager:
        """The model ready for a run: no LoRA of the last generation in the weights (see ``loras_unmerged``)."""
        return loras_unmerged(self.networks)

    # Text ------------------------------------------------------------------------------------------------------
    def _encode_batch(self, prompts: list[str]) -> Conditioning:
        size = self.default_latent_size * 8
        with self.autocast():
            encoded = self.sd_model.get_learned_conditioning(SizedPrompts(prompts, size, size))
        if isinstance(encoded, dict):  # SDXL: the context and the pooled text with size ids (the UNet's ``y``)
            context = encoded["crossattn"]
            extra = {"y": encoded["vector"].to(self.device, self.dtype)} if "vector" in encoded else {}
        else:
            context, extra = encoded, {}
        return Conditioning(context.to(self.device, self.dtype), extra)

    def encode(self, prompts: list[str]) -> Conditioning:
        return self._prompt_cache.encode(prompts)

    def uncached_text(self) -> contextlib.AbstractContextManager:
        return self._prompt_cache.disabled()

    def token_ids(self, text: str) -> list[list[int]]:
        return [[int(t) for t in encoder.tokenize([text])[0]] for encoder in self._encoders]

    # UNet ------------------------------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        extra = {k: v.to(self.device, self.dtype) for k, v in cond.extra.items()}
        with self.autocast():
            out = self.diffusion_model(x_t.to(self.device, self.dtype), t.to(self.device),
                                       context=cond.context.to(self.device, self.dtype), **extra)
        if self.v_prediction:
            out = self.schedule.noise_from_v(x_t, t, out)
        return out.to(self.dtype)

    def transformer_blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.diffusion_model)

    def unet_layers(self, group: str) -> list[Layer]:
        return [LoadedWeightLayer(kohya_key(UNET_PREFIX, name), module, layer_kind(module))  # type: ignore[arg-type]
                for name, module in select_unet_modules(self.diffusion_model.named_modules(), group)]

    def text_layers(self, group: str) -> list[Layer]:
        """None: A1111's Lora extension applies no token-embedding change, so the embedding group is not offered."""
        return []

    def token_embedding_modules(self) -> list[nn.Module]:
        """The vocabulary embedding of each text encoder (A1111 wraps it in ``EmbeddingsWithFixes`` for textual
        inversion; the plain ``nn.Embedding`` inside is what reads the token ids). The robust rounds hook it; it is
        never trained here."""
        found = []
        for encoder in self._encoders:
            tables = [m for m in encoder.modules() if isinstance(m, nn.Embedding) and m.num_embeddings >= VOCABULARY]
            if tables:
                found.append(tables[0])
        return found if len(found) == len(self._encoders) else []

    def cancel_check_modules(self) -> list[nn.Module]:
        """UNet and text-encoder layers: encoding hundreds of prompts takes minutes on a CPU, so Interrupt is
        checked inside the text encoder too."""
        text_root = getattr(self.sd_model, "conditioner", None) or getattr(self.sd_model, "cond_stage_model", None)
        text = compute_modules(text_root) if isinstance(text_root, nn.Module) else []
        return super().cancel_check_modules() + text

    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> RGB in [0, 1] through the checkpoint's VAE (``decode_first_stage`` scales them itself)."""
        vae = getattr(self.sd_model, "first_stage_model", None)
        dtype = next(vae.parameters()).dtype if isinstance(vae, nn.Module) else self.dtype
        with torch.no_grad(), self.autocast():
            images = self.sd_model.decode_first_stage(latents.to(self.device, dtype))
        return ((images.float() + 1) / 2).clamp(0, 1)


@contextlib.contextmanager
def loras_unmerged(networks: Any) -> Iterator[None]:
    """No LoRA of A1111's built-in extension active while the block runs, and the same ones afterwards.

    With its list of active networks empty, the extension restores each module's original weights the next time the
    module runs (and re-applies the list at the next generation, which names its own LoRAs anyway).
    """
    active = getattr(networks, "loaded_networks", None)
    if not isinstance(active, list) or not active:
        yield
        return
    saved = list(active)
    active.clear()
    log.info("concept ablation: %d LoRA(s) of the last generation are set aside while it runs", len(saved))
    try:
        yield
    finally:
        if not active:
            active.extend(saved)
