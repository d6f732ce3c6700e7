"""A ComfyUI ``ModelPatcher`` and ``CLIP`` seen as the core's ``ModelView``.

ComfyUI is imported only inside functions, so this module (and the nodes) import without it. The pitfalls this
module exists to handle (DESIGN section 7):

- nodes run under ``torch.inference_mode()``, and weights loaded there are inference tensors that autograd cannot
  save; training runs under ``inference_mode(False)`` on a clone whose weights are copied on use when needed;
- ``BaseModel.apply_model`` returns x0, so ``eps`` calls ``diffusion_model`` directly (SDXL with ``y``);
- the user's model is never changed: training hooks a clone, and results are ``add_patches`` on clones;
- ComfyUI's ``CLIPLayer`` adds residuals in place, so the embedding group runs it out of place while it trains.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ...errors import AblationError, UnsupportedModelError
from ...models.checkpointing import transformer_blocks
from ...models.families import MMDIT_TEXT, SD1, Family, family_by_context_dim
from ...models.layers import Layer, kohya_key, layer_kind, select_text_modules, select_unet_modules, text_prefix
from ...models.ldm_keys import canonical_clip_name
from ...models.schedules import EpsSchedule
from ...models.view import Conditioning, ModelView, PromptCache

log = logging.getLogger(__name__)

UNET_STATE_PREFIX = "diffusion_model."
CLIP_END_TOKEN = 49407
DEFAULT_LATENT_SIZE = {"sd1": 64, "sd2": 64, "sdxl": 128, "toy": 16}
PROGRESS_EVENT = "concept_ablation.progress"
ENCODE_BATCH = 32
CPU_CHUNK_POSITIONS = 4096


class _OriginalWeightLayer(Layer):
    """A layer whose ``weight`` is the model's unpatched weight (ComfyUI keeps it in ``backup`` while patched)."""

    def __init__(self, key: str, module: nn.Module, kind: str, original: Callable[[], Tensor]):
        super().__init__(key, module, kind)  # type: ignore[arg-type]
        self._original = original

    @property
    def weight(self):
        return self._original()


def model_family(model) -> Family:
    """Tell SD1/SD2/SDXL apart from a ComfyUI ``BaseModel``; MM-DiT and other models get a clear error."""
    unet = getattr(model, "diffusion_model", None)
    names = [n for n, _ in unet.named_modules()] if unet is not None else []
    if unet is None or not any(n.endswith("attn2.to_k") for n in names) or not any("input_blocks" in n for n in names):
        kind = type(model).__name__
        raise UnsupportedModelError(f"this {kind} model has no UNet cross-attention. {MMDIT_TEXT}")
    unet_config = getattr(getattr(model, "model_config", None), "unet_config", {}) or {}
    context_dim = unet_config.get("context_dim", SD1.context_dim)
    latent_channels = getattr(getattr(model, "latent_format", None), "latent_channels", 4)
    return family_by_context_dim(context_dim, bool(unet_config.get("adm_in_channels")), latent_channels)


def cancel_requested() -> bool:
    """Raises ComfyUI's own interrupt exception, so Cancel stops the run at once and the UI shows it cancelled."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


def _clip_encoders(clip) -> list[tuple[str, str]]:
    """(module name prefix, tokenizer key) of each text encoder, in order: ``clip_l`` -> ``l``, ``clip_g`` -> ``g``."""
    if clip is None:
        return []
    found = select_text_modules(clip.cond_stage_model.named_modules(), "embedding")
    heads = [name.split(".", 1)[0] for name, _ in found]
    return [(head, head.removeprefix("clip_")) for head in heads]


@contextlib.contextmanager
def _out_of_place_residuals(text_model: nn.Module) -> Iterator[None]:
    """ComfyUI's ``CLIPLayer`` adds its residuals in place (``x += attn(norm(x))``), which autograd refuses once the
    token embedding trains ("modified by an inplace operation"). While gradients flow, such layers run the same
    computation out of place; their own ``forward`` is back afterwards."""
    parts = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
    layers = [m for m in text_model.modules()
              if type(m).__name__ == "CLIPLayer" and all(hasattr(m, p) for p in parts) and "forward" not in vars(m)]

    def out_of_place(layer: nn.Module) -> Callable[..., Tensor]:
        def forward(x: Tensor, mask: Tensor | None = None, optimized_attention=None) -> Tensor:
            x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
            return x + layer.mlp(layer.layer_norm2(x))
        return forward

    for layer in layers:
        layer.forward = out_of_place(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class ComfyModelView(ModelView):
    """A ComfyUI model (``ModelPatcher``) with its ``CLIP``, seen as the core's ``ModelView``.

    ``original_weights`` makes layers report the unpatched weights (for fingerprint checks without loading the
    model); training views report the weights as loaded on the device.
    """

    # what a memory hint names (``models.memory.check_fits``): the node's own widgets and the model loader's
    setting_names = {
        "lora": None, "batch": None, "checkpointing": "the node's gradient_checkpointing switch",
        "latents": "smaller anchor images (the node's image_size, now {pixels} px)",
        "dtype": "fp8 or bf16 weights (UNETLoader's weight_dtype, or ComfyUI's --bf16-unet)",
        "device": "a GPU with more free memory",
    }

    def __init__(self, patcher, clip=None, latent_size: int | None = None, original_weights: bool = False):
        self.patcher, self.clip = patcher, clip
        self.model = patcher.model
        self.diffusion_model = self.model.diffusion_model
        self.family = model_family(self.model)
        model_type = getattr(getattr(self.model, "model_type", None), "name", "EPS")
        if model_type not in ("EPS", "V_PREDICTION"):
            raise UnsupportedModelError(f"models with {model_type} prediction are not supported; this tool edits "
                                        "epsilon- and v-prediction SD1.x, SD2.x and SDXL models")
        self.v_prediction = model_type == "V_PREDICTION"
        self.dtype = getattr(self.model, "manual_cast_dtype", None) or self.model.get_dtype()
        self.device = next(self.diffusion_model.parameters()).device
        sigmas = self.model.model_sampling.sigmas.detach().to(torch.float64).cpu()
        self.alphas_cumprod = 1.0 / (1.0 + sigmas**2)
        self.schedule = EpsSchedule(self.alphas_cumprod)
        self._sigmas = sigmas.float()
        self.latent_channels = self.model.latent_format.latent_channels
        self.default_latent_size = latent_size or DEFAULT_LATENT_SIZE[self.family.name]
        unet_config = getattr(getattr(self.model, "model_config", None), "unet_config", {}) or {}
        self.latent_multiple = 2 ** (len(unet_config.get("channel_mult") or (1, 2, 4, 4)) - 1)
        self._original_weights = original_weights
        self._state_keys: dict[str, tuple[str, str]] = {}
        self._prompt_cache = PromptCache(self._encode_many)

    # Text ------------------------------------------------------------------------------------------------------
    def _require_clip(self):
        if self.clip is None:
            raise AblationError("this step needs the CLIP (text encoder): connect the checkpoint's CLIP output")
        return self.clip

    def _encode_one(self, prompt: str) -> Conditioning:
        clip = self._require_clip()
        tokens = {k: chunks[:1] for k, chunks in clip.tokenize(prompt).items()}  # one 77-token chunk per prompt
        context, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        size = self.default_latent_size * 8
        y = self.model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0,
                                  target_width=size, target_height=size)
        return Conditioning(context.to(self.device, self.dtype).clone(), {"y": y.to(self.device, self.dtype).clone()})

    def _encode_many(self, prompts: list[str]) -> Conditioning:
        """SD1/SD2: many prompts in one call, as the 77-token chunks ComfyUI encodes as a batch and concatenates.

        SDXL needs each prompt's pooled output, which ComfyUI returns for the first chunk only, so it goes one by one.
        """
        clip = self._require_clip()
        parts = []
        step = 1 if self.family.uses_pooled_text else ENCODE_BATCH
        for start in range(0, len(prompts), step):
            cancel_requested()
            batch = prompts[start:start + step]
            if self.family.uses_pooled_text:
                parts.append(self._encode_one(batch[0]))
                continue
            tokens: dict[str, list] = {}
            for prompt in batch:
                for key, chunks in clip.tokenize(prompt).items():
                    tokens.setdefault(key, []).append(chunks[0])
            context = clip.encode_from_tokens(tokens)
            context = context.reshape(len(batch), -1, context.shape[-1])
            parts.append(Conditioning(context.to(self.device, self.dtype).clone()))
        return Conditioning.cat(parts)

    def encode(self, prompts: list[str]) -> Conditioning:
        """Encoded once per prompt and kept (no-grad only), so training never reloads the text encoder."""
        if torch.is_grad_enabled():  # the embedding group trains through the text encoder
            with _out_of_place_residuals(self._require_clip().cond_stage_model):
                return self._encode_many(prompts)
        return self._prompt_cache.encode(prompts)

    def uncached_text(self) -> contextlib.AbstractContextManager:
        return self._prompt_cache.disabled()

    def token_ids(self, text: str) -> list[list[int]]:
        tokenized = self._require_clip().tokenize(text)
        ids = []
        for _, key in _clip_encoders(self.clip):
            row = [t[0] for t in tokenized[key][0]]
            words = row[1:row.index(CLIP_END_TOKEN, 1)] if CLIP_END_TOKEN in row[1:] else row[1:]
            ids.append([int(t) for t in words if isinstance(t, int)])
        return ids

    # UNet ------------------------------------------------------------------------------------------------------
    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """On a CPU the batch goes through the UNet in sub-batches of at most ``CPU_CHUNK_POSITIONS`` latent pixels:
        one attention or convolution over a whole 512-pixel batch takes several seconds there, longer than Cancel
        may wait (the checks sit between layers), and a CPU is no faster per image on larger batches."""
        ensure_loaded(self.patcher)
        chunk = max(1, CPU_CHUNK_POSITIONS // (x_t.shape[-2] * x_t.shape[-1])) if self.device.type == "cpu" else 0
        if chunk and len(x_t) > chunk:
            return torch.cat([self._eps(x_t[i:i + chunk], t[i:i + chunk], cond.slice(i, i + chunk))
                              for i in range(0, len(x_t), chunk)])
        return self._eps(x_t, t, cond)

    def _eps(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        sigma = self._sigmas.to(t.device)[t]
        timestep = self.model.model_sampling.timestep(sigma).float()
        extra = {k: v.to(self.device, self.dtype) for k, v in cond.extra.items()}
        options = self.patcher.model_options.get("transformer_options", {})
        out = self.diffusion_model(x_t.to(self.device, self.dtype), timestep.to(self.device),
                                   context=cond.context.to(self.device, self.dtype), transformer_options=options,
                                   **extra)
        if self.v_prediction:
            out = self.schedule.noise_from_v(x_t, t, out)
        return out

    def _layer(self, key: str, module: nn.Module, state_key: tuple[str, str]) -> Layer:
        self._state_keys[key] = state_key
        kind = layer_kind(module)
        if not self._original_weights:
            return Layer(key, module, kind)
        owner = self.patcher if state_key[0] == "model" else self.clip.patcher
        return _OriginalWeightLayer(key, module, kind, lambda: _original_weight(owner, state_key[1], module))

    def transformer_blocks(self) -> list[nn.Module]:
        return transformer_blocks(self.diffusion_model)

    def unet_layers(self, group: str) -> list[Layer]:
        return [self._layer(kohya_key("lora_unet_", name), module, ("model", f"{UNET_STATE_PREFIX}{name}.weight"))
                for name, module in select_unet_modules(self.diffusion_model.named_modules(), group)]

    def text_layers(self, group: str) -> list[Layer]:
        if group != "embedding" or self.clip is None:
            return []
        encoders = _clip_encoders(self.clip)
        layers = []
        for index, (name, module) in enumerate(select_text_modules(self.clip.cond_stage_model.named_modules(), group)):
            canonical = canonical_clip_name(name.split("transformer.", 1)[-1])
            key = kohya_key(text_prefix(index, len(encoders)), canonical)
            layers.append(self._layer(key, module, ("clip", f"{name}.weight")))
        return layers

    def cancel_check_modules(self) -> list[nn.Module]:
        """Every UNet and text-encoder linear and convolution: encoding hundreds of prompts with CLIP takes minutes
        on a CPU, so Cancel is checked inside the text encoder too, not only between chunks of prompts."""
        text = compute_modules(self.clip.cond_stage_model) if self.clip is not None else []
        return super().cancel_check_modules() + text

    def state_key(self, patch_key: str) -> tuple[str, str]:
        """Which patcher ("model" or "clip") holds a patch key's weight, and its state-dict name there."""
        if patch_key not in self._state_keys:
            self.all_layers()
        return self._state_keys[patch_key]

    def decode_with(self, vae, latents: Tensor) -> Tensor:
        """Latents from the core's sampler -> images [B, 3, H, W] in [0, 1] through ComfyUI's VAE."""
        images = vae.decode(self.model.latent_format.process_out(latents.float()))
        return images.reshape(-1, *images.shape[-3:]).movedim(-1, 1).float().clamp(0, 1)


def compute_modules(root: nn.Module | None) -> list[nn.Module]:
    """The linear and convolution modules under ``root``: where a forward spends its time, so where cancel checks go."""
    return [m for m in root.modules() if layer_kind(m) in ("linear", "conv")] if root is not None else []


def _original_weight(owner, state_key: str, module: nn.Module) -> Tensor:
    backup = getattr(owner, "backup", {}).get(state_key)
    return backup.weight if backup is not None else module.weight


def ensure_loaded(patcher) -> None:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)


def _copy_weight(weight: Tensor) -> Tensor:
    return weight


def make_trainable(patcher) -> None:
    """Load for training; if the weights are inference tensors, make ComfyUI hand modules copies of them.

    A weight/bias wrapper (even this identity) makes ComfyUI's ops cast with ``copy=True``, so autograd saves
    ordinary tensors (layer norms save their bias too). That is the CPU case; on a GPU the load itself makes
    ordinary copies and nothing is wrapped.
    """
    ensure_loaded(patcher)
    params = {f"{UNET_STATE_PREFIX}{name}.{kind}": getattr(module, kind)
              for name, module in patcher.model.diffusion_model.named_modules() if hasattr(module, "weight_function")
              for kind in ("weight", "bias") if getattr(module, kind, None) is not None}
    if any(value.is_inference() for value in params.values()):
        for key in params:
            patcher.add_weight_wrapper(key, _copy_weight)
        ensure_loaded(patcher)
    _copy_plain_inference_parameters(patcher.model.diffusion_model)


def _copy_plain_inference_parameters(model: nn.Module) -> None:
    """Parameters outside ComfyUI's ops (Flux's QK norm ``scale``, which ``rms_norm`` uses as it is on a CPU) that
    are inference tensors are replaced by ordinary copies with the same values: no wrapper reaches them, and autograd
    cannot save an inference tensor."""
    for module in model.modules():
        if hasattr(module, "weight_function"):
            continue
        for name, value in list(module._parameters.items()):
            if value is not None and value.is_inference():
                module._parameters[name] = nn.Parameter(value.clone(), requires_grad=value.requires_grad)
