"""Concept ablation: fine-tune a parameter group so the target prompt behaves like its anchor.

Reads top to bottom like a pipeline: 1. check inputs and resolve layers, 2. build and encode prompts, 3. sample
anchor images from the frozen model, 4. train adapters, 5. build the patch. The model is never modified: adapters
hook its modules and are removed at the end, whether the run finishes, fails or is cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import prompts as prompt_lib
from .adapters import AdapterSet
from .anchors import sample_latents
from .backends.base import Conditioning, ModelView
from .errors import AblationCancelled, AblationError, OutOfMemoryError, PromptError, TrainingDivergedError
from .layers import GROUPS, Layer
from .objectives import OBJECTIVES, ablation_loss, regularization_loss
from .patch import AblationPatch, build_metadata
from .settings import AblationConfig

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a progress bar shows: phase ("prompts", "anchors" or "train"), step of total, the loss and time left."""

    phase: str
    step: int
    total: int
    loss: float | None = None
    eta_seconds: float | None = None


@dataclass
class AblationResult:
    patch: AblationPatch
    losses: list[float]
    seconds_anchors: float
    seconds_training: float


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def _check(config: AblationConfig) -> None:
    prompt_lib.check_pair(config.target, config.anchor)
    if config.group not in GROUPS:
        raise AblationError(f"unknown parameter group {config.group!r}; choose one of {', '.join(GROUPS)}")
    if config.objective not in OBJECTIVES:
        raise AblationError(f"unknown objective {config.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if config.kind not in prompt_lib.KINDS:
        raise AblationError(f"unknown concept kind {config.kind!r}; choose one of {', '.join(prompt_lib.KINDS)}")
    if config.steps < 1 or config.batch_size < 1 or config.anchor_images < 1:
        raise AblationError("steps, batch size and anchor images must all be at least 1")


def _embedding_row_masks(view: ModelView, layers: list[Layer], config: AblationConfig) -> dict[str, Tensor]:
    """The embedding group changes only the rows of the target's own words (not the anchor's or the template's)."""
    target_ids, anchor_ids = view.token_ids(config.target), view.token_ids(config.anchor)
    masks = {}
    for layer, target_tokens, anchor_tokens in zip(layers, target_ids, anchor_ids):
        rows = sorted(set(target_tokens) - set(anchor_tokens))
        if not rows:
            raise PromptError(f"the target '{config.target}' has no words of its own beside the anchor "
                              f"'{config.anchor}', so the embedding group has nothing to change; use group kv")
        mask = torch.zeros(layer.weight.shape[0])
        mask[rows] = 1.0
        masks[layer.key] = mask
    return masks


ENCODE_CHUNK = 32


def _encode_with_progress(view: ModelView, prompts: list[str], report: ProgressFn, cancelled: CancelFn) -> Conditioning:
    """Encode in chunks, reporting ("prompts", done, total) and checking cancel between chunks."""
    parts = []
    for start in range(0, len(prompts), ENCODE_CHUNK):
        if cancelled():
            raise AblationCancelled("cancelled while encoding prompts; nothing was written")
        parts.append(view.encode(prompts[start:start + ENCODE_CHUNK]))
        report(Progress("prompts", min(start + ENCODE_CHUNK, len(prompts)), len(prompts)))
    return Conditioning.cat(parts)


def _prompt_pairs(config: AblationConfig) -> tuple[list[str], list[str]]:
    user = list(config.anchor_prompts) if config.anchor_prompts else None
    anchors = prompt_lib.choose_anchor_prompts(config.anchor, config.kind, config.anchor_prompt_count, config.seed,
                                               user)
    targets = prompt_lib.target_prompts(anchors, config.anchor, config.target, config.kind)
    for typo in prompt_lib.misspellings(config.target, config.misspelled_targets, config.seed):
        targets += prompt_lib.target_prompts(anchors, config.anchor, typo, config.kind)
    return anchors, targets


def ablate(view: ModelView, config: AblationConfig, on_progress: ProgressFn | None = None,
           should_cancel: CancelFn | None = None) -> AblationResult:
    """Run one ablation and return its patch; raises ``AblationCancelled`` if ``should_cancel()`` turns true."""
    report = on_progress or (lambda progress: None)
    cancelled = should_cancel or (lambda: False)

    # 1. Check inputs and resolve the layers the group trains.
    _check(config)
    layers = view.layers(config.group)
    if not layers:
        raise AblationError(f"the model has no layers in group {config.group!r}")
    row_masks = _embedding_row_masks(view, layers, config) if config.group == "embedding" else None

    # 2. Prompts: each target prompt has an anchor twin; typos of the target add more target prompts.
    anchor_prompts, target_prompts = _prompt_pairs(config)
    variants = len(target_prompts) // len(anchor_prompts)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        to_encode = anchor_prompts + (target_prompts if config.group != "embedding" else [])
        encoded = _encode_with_progress(view, to_encode, report, cancelled)
        anchor_cond = encoded.slice(0, len(anchor_prompts))
        target_cond = encoded.slice(len(anchor_prompts), len(to_encode)) if config.group != "embedding" else None

    # 3. Anchor images (target images for the loss-maximization baseline) from the frozen model.
    started = time.perf_counter()
    if config.objective == "maximize":
        sampled_prompts = target_prompts[: len(anchor_prompts)]
        sampled_cond = target_cond.slice(0, len(anchor_prompts)) if target_cond is not None else None
    else:
        sampled_prompts, sampled_cond = anchor_prompts, anchor_cond
    image_prompt = torch.arange(config.anchor_images) % len(anchor_prompts)
    image_prompt = image_prompt[torch.randperm(len(image_prompt), generator=generator)]

    reported = -1

    def on_sampler_step(done: float, total: int) -> None:
        nonlocal reported
        if cancelled():
            raise AblationCancelled("cancelled while sampling anchor images; nothing was written")
        if int(done) != reported:  # at most one report per finished image's worth of solver steps
            reported = int(done)
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (total - done) if done else None  # this phase only
            report(Progress("anchors", int(done), total, None, eta))

    with _oom_guard():
        latents = sample_latents(view, sampled_prompts, image_prompt, config.sampler_steps, config.guidance,
                                 config.sample_batch_size, config.seed, config.latent_size, on_sampler_step,
                                 sampled_cond)
    seconds_anchors = time.perf_counter() - started

    # 4. Train adapters on the frozen model.
    adapters = AdapterSet(layers, config.lora_rank, row_masks)
    optimizer = torch.optim.AdamW(adapters.parameters(), lr=config.learning_rate, weight_decay=0.0)
    acp = view.alphas_cumprod.to(view.device)
    losses: list[float] = []
    started = time.perf_counter()
    with adapters.attached(), torch.enable_grad():
        for step in range(config.steps):
            if cancelled():
                raise AblationCancelled(f"cancelled at step {step} of {config.steps}; nothing was written")
            image = torch.randint(len(latents), (config.batch_size,), generator=generator)
            variant = torch.randint(variants, (config.batch_size,), generator=generator)
            prompt = image_prompt[image]
            t = torch.randint(0, len(acp), (config.batch_size,), generator=generator).to(view.device)
            noise = torch.randn(latents[image].shape, generator=generator).to(view.device, view.dtype)
            x0 = latents[image].to(view.device, view.dtype)
            a = acp[t].view(-1, 1, 1, 1)
            x_t = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(view.dtype)
            with _oom_guard():
                loss = _step_loss(view, adapters, config, x_t, t, noise, prompt,
                                  prompt + variant * len(anchor_prompts), anchor_cond, target_cond, target_prompts)
                if not math.isfinite(loss.item()):
                    raise TrainingDivergedError(
                        f"the loss became {loss.item()} at step {step}; nothing was written. Lower the learning "
                        f"rate (now {config.learning_rate:g}) or use float32/bfloat16 instead of float16.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            elapsed = time.perf_counter() - started
            eta = elapsed / (step + 1) * (config.steps - step - 1)
            report(Progress("train", step + 1, config.steps, losses[-1], eta))
    seconds_training = time.perf_counter() - started

    # 5. The patch: the trained weight deltas plus everything needed to trust and reproduce them.
    deltas = adapters.weight_deltas()
    metadata = build_metadata(view, config, losses, seconds_anchors, seconds_training)
    patch = AblationPatch.from_deltas(deltas, metadata, original_weights={layer.key: layer.weight for layer in layers})
    log.info("ablated %r -> %r: loss %.4g -> %.4g in %.1fs", config.target, config.anchor, losses[0], losses[-1],
             seconds_anchors + seconds_training)
    return AblationResult(patch, losses, seconds_anchors, seconds_training)


def _step_loss(view: ModelView, adapters: AdapterSet, config: AblationConfig, x_t: Tensor, t: Tensor, noise: Tensor,
               anchor_index: Tensor, target_index: Tensor, anchor_cond: Conditioning,
               target_cond: Conditioning | None, target_prompts: list[str]) -> Tensor:
    anchor_batch = anchor_cond.select(anchor_index)
    frozen = None
    if config.objective == "model":
        with torch.no_grad(), adapters.disabled():
            frozen = view.eps(x_t, t, anchor_batch)
    if target_cond is None:  # embedding group: the text encoder is what trains
        target_batch = view.encode([target_prompts[i] for i in target_index.tolist()])
    else:
        target_batch = target_cond.select(target_index)
    loss = ablation_loss(config.objective, view.eps(x_t, t, target_batch), noise, frozen)
    if config.regularization:
        loss = loss + regularization_loss(config.objective, view.eps(x_t, t, anchor_batch), noise, frozen)
    return loss


@contextlib.contextmanager
def _oom_guard() -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise OutOfMemoryError(
            "the GPU ran out of memory; try a smaller batch (--batch-size), fewer anchor images per sampling "
            "batch (--sample-batch-size), a smaller latent size, or the kv group") from err
