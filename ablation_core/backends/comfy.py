"""The ComfyUI backend: a ``ModelPatcher`` and ``CLIP`` seen as the core's ``ModelView``, and the node-side flows.

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
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..ablate import Progress, ablate
from ..cache import PatchCache
from ..errors import AblationError, UnsupportedModelError
from ..families import MMDIT_TEXT, SD1, SD2, SDXL, Family
from ..images import grid, save_image, to_pil
from ..layers import Layer, kohya_key, layer_kind, select_text_modules, select_unet_modules, text_prefix
from ..ldm_keys import canonical_clip_name
from ..merge import merge_weighted
from ..patch import META, AblationPatch, check_fingerprint, resolve
from ..settings import AblationConfig
from .base import Conditioning, ModelView

log = logging.getLogger(__name__)

UNET_STATE_PREFIX = "diffusion_model."
CLIP_END_TOKEN = 49407
DEFAULT_LATENT_SIZE = {"sd1": 64, "sd2": 64, "sdxl": 128}
PROGRESS_EVENT = "concept_ablation.progress"
ENCODE_BATCH = 32


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
    config = getattr(model, "model_config", None)
    unet_config = getattr(config, "unet_config", {}) or {}
    context_dim = unet_config.get("context_dim", SD1.context_dim)
    has_pooled = bool(unet_config.get("adm_in_channels")) and context_dim != SD2.context_dim
    if has_pooled:
        return SDXL
    return SD2 if context_dim == SD2.context_dim else SD1


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
        self._sigmas = sigmas.float()
        self.latent_channels = self.model.latent_format.latent_channels
        self.default_latent_size = latent_size or DEFAULT_LATENT_SIZE[self.family.name]
        self._original_weights = original_weights
        self._state_keys: dict[str, tuple[str, str]] = {}
        self._encoded: dict[str, Conditioning] = {}

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
            _cancel_requested()
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
        missing = [p for p in dict.fromkeys(prompts) if p not in self._encoded]
        if missing:
            encoded = self._encode_many(missing)
            for index, prompt in enumerate(missing):
                self._encoded[prompt] = encoded.select([index])
        return Conditioning.cat([self._encoded[p] for p in prompts])

    def token_ids(self, text: str) -> list[list[int]]:
        tokenized = self._require_clip().tokenize(text)
        ids = []
        for _, key in _clip_encoders(self.clip):
            row = [t[0] for t in tokenized[key][0]]
            words = row[1:row.index(CLIP_END_TOKEN, 1)] if CLIP_END_TOKEN in row[1:] else row[1:]
            ids.append([int(t) for t in words if isinstance(t, int)])
        return ids

    # UNet ------------------------------------------------------------------------------------------------------
    def eps(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        _ensure_loaded(self.patcher)
        sigma = self._sigmas.to(t.device)[t]
        timestep = self.model.model_sampling.timestep(sigma).float()
        extra = {k: v.to(self.device, self.dtype) for k, v in cond.extra.items()}
        options = self.patcher.model_options.get("transformer_options", {})
        out = self.diffusion_model(x_t.to(self.device, self.dtype), timestep.to(self.device),
                                   context=cond.context.to(self.device, self.dtype), transformer_options=options,
                                   **extra)
        if self.v_prediction:
            acp = self.alphas_cumprod.to(out.device, torch.float32)[t].view(-1, 1, 1, 1)
            out = acp.sqrt() * out.float() + (1 - acp).sqrt() * x_t.float()
        return out

    def _layer(self, key: str, module: nn.Module, state_key: tuple[str, str]) -> Layer:
        self._state_keys[key] = state_key
        kind = layer_kind(module)
        if not self._original_weights:
            return Layer(key, module, kind)
        owner = self.patcher if state_key[0] == "model" else self.clip.patcher
        return _OriginalWeightLayer(key, module, kind, lambda: _original_weight(owner, state_key[1], module))

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

    def state_key(self, patch_key: str) -> tuple[str, str]:
        """Which patcher ("model" or "clip") holds a patch key's weight, and its state-dict name there."""
        if patch_key not in self._state_keys:
            self.all_layers()
        return self._state_keys[patch_key]

    def decode_with(self, vae, latents: Tensor) -> Tensor:
        """Latents from the core's sampler -> images [B, 3, H, W] in [0, 1] through ComfyUI's VAE."""
        images = vae.decode(self.model.latent_format.process_out(latents.float()))
        return images.reshape(-1, *images.shape[-3:]).movedim(-1, 1).float().clamp(0, 1)


def _original_weight(owner, state_key: str, module: nn.Module) -> Tensor:
    backup = getattr(owner, "backup", {}).get(state_key)
    return backup.weight if backup is not None else module.weight


def _ensure_loaded(patcher) -> None:
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)


def _copy_weight(weight: Tensor) -> Tensor:
    return weight


def _make_trainable(patcher) -> None:
    """Load for training; if the weights are inference tensors, make ComfyUI hand modules copies of them.

    A weight/bias wrapper (even this identity) makes ComfyUI's ops cast with ``copy=True``, so autograd saves
    ordinary tensors (layer norms save their bias too). That is the CPU case; on a GPU the load itself makes
    ordinary copies and nothing is wrapped.
    """
    _ensure_loaded(patcher)
    params = {f"{UNET_STATE_PREFIX}{name}.{kind}": getattr(module, kind)
              for name, module in patcher.model.diffusion_model.named_modules() if hasattr(module, "weight_function")
              for kind in ("weight", "bias") if getattr(module, kind, None) is not None}
    if not any(value.is_inference() for value in params.values()):
        return
    for key in params:
        patcher.add_weight_wrapper(key, _copy_weight)
    _ensure_loaded(patcher)


# Progress, cancel --------------------------------------------------------------------------------------------

class NodeProgress:
    """ComfyUI's progress bar plus a websocket message per step (the web extension draws the loss curve).

    The bar runs over anchor images first, then training steps.
    """

    def __init__(self, node_id: str | None, anchor_images: int, train_steps: int):
        import comfy.utils

        self.node_id, self.anchor_images = node_id, anchor_images
        self.total = anchor_images + train_steps
        self.bar = comfy.utils.ProgressBar(self.total)

    def __call__(self, progress: Progress) -> None:
        if progress.phase != "prompts":  # the bar covers anchor images, then training steps
            value = progress.step if progress.phase == "anchors" else self.anchor_images + progress.step
            self.bar.update_absolute(value, self.total)
        self._send({"node": self.node_id, "phase": progress.phase, "step": progress.step, "total": progress.total,
                    "loss": progress.loss, "eta": progress.eta_seconds})

    def finish(self, losses: list[float], cached: bool) -> None:
        self.bar.update_absolute(self.total, self.total)
        self._send({"node": self.node_id, "phase": "done", "cached": cached, "losses": losses})

    @staticmethod
    def _send(data: dict) -> None:
        try:
            from server import PromptServer
        except ImportError:
            return
        if getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_sync(PROGRESS_EVENT, data)


def _cancel_requested() -> bool:
    """Raises ComfyUI's own interrupt exception, so Cancel stops the run at once and the UI shows it cancelled."""
    import comfy.model_management

    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


# Flows the nodes call ----------------------------------------------------------------------------------------

@dataclass
class PatchStack:
    """Patches kept separate, each with its strength (what Stack Ablation Patches outputs)."""

    entries: list[tuple[AblationPatch, float]] = field(default_factory=list)


def stack_entries(value: AblationPatch | PatchStack | None, strength: float = 1.0) -> list[tuple[AblationPatch, float]]:
    if value is None:
        return []
    if isinstance(value, PatchStack):
        return [(patch, s * strength) for patch, s in value.entries]
    return [(value, strength)]


def as_single_patch(value: AblationPatch | PatchStack) -> AblationPatch:
    """One patch: a stack becomes the weighted sum of its entries."""
    if isinstance(value, AblationPatch):
        return value
    entries = stack_entries(value)
    if len(entries) == 1 and entries[0][1] == 1.0:
        return entries[0][0]
    return merge_weighted([p for p, _ in entries], [s for _, s in entries])


def ablate_concept(model, clip, config: AblationConfig, node_id: str | None = None,
                   cache_dir: str | Path | None = None) -> tuple[object, object, AblationPatch]:
    """Train in ComfyUI and return (patched MODEL clone, CLIP (a patched clone for the embedding group), patch)."""
    with torch.inference_mode(False), torch.enable_grad():
        trainer = model.clone()
        _make_trainable(trainer)
        view = ComfyModelView(trainer, clip, latent_size=config.latent_size)
        cache = PatchCache(cache_dir) if cache_dir else None
        key = cache.key(view, config) if cache else None
        patch = cache.get(key) if cache else None
        progress = NodeProgress(node_id, config.anchor_images, config.steps)
        if patch is None:
            started = time.perf_counter()
            result = ablate(view, config, on_progress=progress, should_cancel=_cancel_requested)
            patch = result.patch
            log.info("concept ablation finished in %.1fs", time.perf_counter() - started)
            if cache:
                cache.put(key, patch)
            progress.finish(result.losses, cached=False)
        else:
            log.info("concept ablation: reusing the cached patch for these settings (%s)", key)
            progress.finish(_metric_losses(patch), cached=True)
    model_out, clip_out = apply_patches(model, clip, [(patch, 1.0)])
    return model_out, clip_out, patch


def _metric_losses(patch: AblationPatch) -> list[float]:
    metrics = json.loads(patch.metadata.get(META + "metrics", "{}"))
    return [metrics[k] for k in ("loss_first", "loss_last") if k in metrics]


def apply_patches(model, clip, entries: list[tuple[AblationPatch, float]]) -> tuple[object, object]:
    """Clones of MODEL and CLIP with the patches added as ComfyUI weight patches (``(delta,)`` = "diff")."""
    view = ComfyModelView(model, clip, original_weights=True)
    outputs = {"model": model.clone(), "clip": clip}
    for patch, strength in entries:
        resolved = resolve(patch, view)
        check_fingerprint(patch, view)
        by_owner: dict[str, dict[str, tuple[Tensor]]] = {"model": {}, "clip": {}}
        for key, (_, dense) in resolved.items():
            owner, state_key = view.state_key(key)
            by_owner[owner][state_key] = (dense,)
        if by_owner["clip"]:
            if clip is None:
                raise AblationError("this patch changes the text encoder: connect the CLIP too")
            if outputs["clip"] is clip:
                outputs["clip"] = clip.clone()
        for owner, patches in by_owner.items():
            if patches:
                outputs[owner].add_patches(patches, strength)
    return outputs["model"], outputs["clip"]


def fingerprint_matches(model, clip, patch: AblationPatch) -> bool:
    return check_fingerprint(patch, ComfyModelView(model, clip, original_weights=True))


def render_report(model, clip, vae, value: AblationPatch | PatchStack, strength: float, prompts: list[str],
                  seed: int, steps: int, guidance: float, samples: int, image_size: int) -> Tensor:
    """Before/after images for each prompt, sampled from the same noise; a grid as an IMAGE tensor [1, H, W, 3]."""
    from ..anchors import sample_latents

    patched, patched_clip = apply_patches(model, clip, stack_entries(value, strength))
    latent_size = max(image_size // 8, 1)
    prompt_index = torch.arange(len(prompts)).repeat_interleave(samples)
    images = {}
    with torch.inference_mode(False), torch.no_grad():
        for name, (patcher, text) in {"before": (model, clip), "after": (patched, patched_clip)}.items():
            _ensure_loaded(patcher)
            view = ComfyModelView(patcher, text, latent_size=latent_size)
            latents = sample_latents(view, prompts, prompt_index, steps, guidance, len(prompt_index), seed,
                                     latent_size, on_progress=lambda done, total: _cancel_requested())
            images[name] = view.decode_with(vae, latents).cpu()
    rows = []
    for p in range(len(prompts)):
        cells = slice(p * samples, (p + 1) * samples)
        rows.append([*images["before"][cells], *images["after"][cells]])
    columns = [f"before #{i + 1}" for i in range(samples)] + [f"after #{i + 1}" for i in range(samples)]
    picture = grid(rows, prompts, columns, cell=max(64, min(image_size, 256)))
    return torch.from_numpy(np.array(picture)).float().div(255).unsqueeze(0)


def report_prompts(value: AblationPatch | PatchStack, extra: str) -> list[str]:
    """Target and anchor prompts from the patch metadata, then the user's surrounding prompts (one per line)."""
    prompts: list[str] = []
    for patch, _ in stack_entries(value):
        for name in ("targets", "anchors"):
            prompts += json.loads(patch.metadata.get(META + name, "[]"))
    prompts += [line.strip() for line in extra.splitlines() if line.strip()]
    return list(dict.fromkeys(prompts)) or ["a photo"]


def describe_text(value: AblationPatch | PatchStack) -> str:
    """The metadata of a patch (or each patch of a stack) as readable lines."""
    blocks = []
    for patch, strength in stack_entries(value):
        lines = [f"strength {strength:g}, {len(patch.deltas)} layers, "
                 f"{'low rank ' + str(patch.max_rank) if patch.is_low_rank else 'full rank'}"]
        for key in sorted(patch.metadata):
            if key.startswith(META) or key in ("modelspec.title", "ss_base_model_version"):
                lines.append(f"{key.removeprefix(META)}: {patch.metadata[key]}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def save_preview(images: Tensor, path: str | Path) -> Path:
    """The first image of a ComfyUI IMAGE batch ([B, H, W, 3] in [0, 1]) as a PNG."""
    return save_image(to_pil(images[0].movedim(-1, 0)), path)
