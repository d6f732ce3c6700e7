"""Concept ablation: fine-tune a parameter group so the target prompt behaves like its anchor.

Reads top to bottom like a pipeline: 1. settings for this model, inputs and layers, 2. build and encode prompts,
3. sample anchor images from the frozen model, 4. train adapters, 5. check the effect on held-out prompts, 6. build
the patch. The model is never modified: adapters hook its modules and are removed at the end, whether the run
finishes, fails or is cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import AblationError, OutOfMemoryError, PromptError, TrainingDivergedError
from ...models.checkpointing import checkpointed, set_aside
from ...models.layers import Layer
from ...models.sampling import sample_latents
from ...models.view import Conditioning, ModelView
from ...patches.patch import AblationPatch
from .. import prompts as prompt_lib
from ..progress import CancelFn, Canceller, Progress, ProgressFn, cancel_checks, encode_with_progress, paced
from .adapters import AdapterSet
from .check import check_evaluations, check_pair, combine, held_out_pairs, pair_latents, weak_effect_warning
from .fits import check_run_fits
from .metadata import build_metadata
from .objectives import ablation_loss, model_rows, regularization_loss
from .preserve import encode_preserved, kept_rows, kept_weight
from .recipes import drop_near_copies
from .reuse import SamplerStates, training_batch, uses_sampler_states
from .settings import AblationConfig, check_config, resolve_for_view

log = logging.getLogger(__name__)

MAX_PROMPT_TOKENS = 75


@dataclass
class AblationResult:
    patch: AblationPatch
    losses: list[float]
    seconds_anchors: float
    seconds_training: float
    config: AblationConfig
    check: dict[str, float]
    warning: str | None = None


def _check_prompts(view: ModelView, config: AblationConfig) -> None:
    room = MAX_PROMPT_TOKENS if config.kind == "memorization" else MAX_PROMPT_TOKENS // 2
    for target, anchor in config.pairs():
        prompt_lib.check_pair(target, anchor)
        longest = max(len(ids) for ids in view.token_ids(target))
        if longest > room:
            raise PromptError(f"the target '{target[:40]}' is {longest} tokens long; the text encoder reads "
                              f"{MAX_PROMPT_TOKENS} tokens per prompt, so keep a target under {room} tokens (a name "
                              "or a short phrase)")
    if config.latent_size is not None and config.latent_size % view.latent_multiple:
        raise AblationError(f"the latent size must be a multiple of {view.latent_multiple} for this model "
                            f"(got {config.latent_size})")


def _embedding_row_masks(view: ModelView, layers: list[Layer], config: AblationConfig) -> dict[str, Tensor]:
    """The embedding group changes only the rows of the targets' own words (not the anchors' or the template's) of
    each token-embedding table; other layers of the group (Flux's ``txt_in`` and ``vector_in``) change whole."""
    masks = {}
    for index, layer in enumerate(layer for layer in layers if layer.kind == "embedding"):
        rows: set[int] = set()
        for target, anchor in config.pairs():
            own = set(view.token_ids(target)[index]) - set(view.token_ids(anchor)[index])
            if not own:
                raise PromptError(f"the target '{target}' has no words of its own beside the anchor '{anchor}', so "
                                  "the embedding group has nothing to change; use group kv")
            rows |= own
        rows = sorted(rows)
        mask = torch.zeros(layer.weight.shape[0])
        mask[rows] = 1.0
        masks[layer.key] = mask
    return masks


def _anchors_by_pair(config: AblationConfig) -> list[list[str]]:
    """Each pair's anchor prompts, in the order of ``config.pairs()``."""
    listed = config.anchor_prompts
    anchors_by_pair = []
    kinds = config.kinds()
    others = [a for _, a in config.pairs()]
    for index, (_, anchor) in enumerate(config.pairs()):
        user = prompt_lib.prompts_for(anchor, listed, kinds[index], others) if listed else None
        chosen = prompt_lib.choose_anchor_prompts(anchor, kinds[index], config.anchor_prompt_count,
                                                  config.seed + index, user)
        anchors_by_pair.append(prompt_lib.without_targets(chosen, [t for t, _ in config.pairs()])
                               if config.extra_pairs else chosen)
    return anchors_by_pair


def _prompt_pairs(config: AblationConfig) -> tuple[list[str], list[str]]:
    """Anchor prompts of every pair, and their target twins: ``variants`` blocks of the same length (the targets,
    then each misspelling), so target prompt ``i + v * len(anchors)`` is the twin of anchor prompt ``i``."""
    anchors_by_pair = _anchors_by_pair(config)
    kinds = config.kinds()
    typos = [prompt_lib.misspellings(t, config.misspelled_targets, config.seed) for t, _ in config.pairs()]
    anchors = [p for prompts in anchors_by_pair for p in prompts]
    targets: list[str] = []
    for variant in range(1 + config.misspelled_targets):
        for (target, anchor), kind, prompts, found in zip(config.pairs(), kinds, anchors_by_pair, typos):
            spelled = target if variant == 0 else found[(variant - 1) % len(found)] if found else target
            targets += prompt_lib.target_prompts(prompts, anchor, spelled, kind)
    return anchors, targets


def ablate(view: ModelView, config: AblationConfig, on_progress: ProgressFn | None = None,
           should_cancel: CancelFn | None = None, base_patch: AblationPatch | None = None,
           extra_targets: Conditioning | None = None, preserved: Conditioning | None = None,
           kept_at_original: bool = False) -> AblationResult:
    """Run one ablation and return its patch; raises ``AblationCancelled`` if ``should_cancel()`` turns true.

    Settings the config leaves open are chosen for this model (``resolve_config``); the result carries them. With
    ``base_patch`` the run trains on the model with that earlier patch applied (through hooks; the weights are not
    touched) and the result holds both changes, with the fingerprint of the original model. ``extra_targets`` are
    more target conditionings (adversarial embeddings, say) trained toward the anchors like the target prompts:
    blocks of one row per anchor prompt, row ``i`` of each block the twin of anchor prompt ``i`` (``_prompt_pairs``).
    ``preserved`` are conditionings the run keeps as they were: each step one of them, on the same noisy images, is
    held to the frozen model's prediction: the model with ``base_patch`` applied, or without it where
    ``kept_at_original`` (a robust round's base is its own earlier round, whose harm the kept rows should undo).
    """
    report, canceller = paced(on_progress, should_cancel)

    # 1. Settings for this model, inputs, and the layers the group trains.
    config = resolve_for_view(config, view)
    check_config(config)
    _check_prompts(view, config)
    layers = view.layers(config.group)
    if not layers:
        raise AblationError(f"the model has no layers in group {config.group!r}")
    row_masks = _embedding_row_masks(view, layers, config) if config.group == "embedding" else None
    if config.offload_text_encoder and view.text_layers(str(config.group)):
        raise AblationError("the embedding group trains the text encoder, so it cannot be set aside while training; "
                            "leave out --offload-text-encoder or use another group")
    check_run_fits(view, config, layers)
    base = AdapterSet.of_patch(view, base_patch) if base_patch is not None else None

    with cancel_checks(view.cancel_check_modules(), canceller), base.attached() if base else contextlib.nullcontext():
        # 2. Prompts: each target prompt has an anchor twin; typos of the target add more target prompts.
        canceller.phase = "encoding prompts"
        anchor_prompts, target_prompts = _prompt_pairs(config)
        generator = torch.Generator().manual_seed(config.seed)
        # a group that trains the text encoder (SD's token embeddings) encodes the target prompts at each step;
        # otherwise (Flux's embedding group is txt_in and vector_in, in the transformer) they are encoded once here
        text_trains = bool(view.text_layers(str(config.group)))
        with torch.no_grad():
            to_encode = anchor_prompts + ([] if text_trains else target_prompts)
            encoded = encode_with_progress(view, to_encode, report, canceller)
            anchor_cond = encoded.slice(0, len(anchor_prompts))
            target_cond = None if text_trains else encoded.slice(len(anchor_prompts), len(to_encode))
            target_cond = _with_extra_targets(target_cond, extra_targets, len(anchor_prompts), view)
            if view.guidance_input:  # a distilled model reads the scale: train at the guidance it draws with
                anchor_cond = anchor_cond.with_guidance(float(config.guidance))
                target_cond = target_cond.with_guidance(float(config.guidance)) if target_cond is not None else None
        if preserved is None and config.preserved_rows:
            canceller.phase = "encoding the concepts to keep"
            preserved = encode_preserved(view, config, report, canceller)
        if preserved is not None:
            preserved = preserved.to(view.device)
            preserved = preserved.with_guidance(float(config.guidance)) if view.guidance_input else preserved
        variants = (len(target_cond) if target_cond is not None else len(target_prompts)) // len(anchor_prompts)

        # 3. Anchor images (target images for the loss-maximization baseline) from the frozen model.
        canceller.phase = "sampling anchor images"
        started = time.perf_counter()
        recorded: list | None = [] if uses_sampler_states(config) else None
        latents, image_prompt = _anchor_latents(view, config, anchor_prompts, target_prompts, anchor_cond,
                                                target_cond, generator, report, canceller, recorded)
        states = SamplerStates.gather(recorded) if recorded else None
        seconds_anchors = time.perf_counter() - started

        # 4. Train adapters on the frozen model.
        canceller.phase = "training"
        adapters = AdapterSet(layers, config.lora_rank, row_masks)
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=config.learning_rate, weight_decay=0.0)
        low_noise_rows = model_rows("mixed", int(config.batch_size)) if config.objective == "mixed" else 0
        kept_scale = kept_weight(len(config.pairs()))
        losses: list[float] = []
        started = time.perf_counter()
        report(Progress("train", 0, config.steps))  # a CPU's first step of SD1 takes seconds: say it began
        with adapters.attached():
            with torch.enable_grad(), _memory_options(view, config):
                for step in range(config.steps):
                    canceller.check()
                    x_t, t, noise, prompt, variant, frozen = training_batch(
                        states, latents, image_prompt, variants, config.batch_size, view.schedule, generator,
                        view.device, view.dtype, low_noise_rows)
                    with _oom_guard():
                        loss = _step_loss(view, adapters, config, x_t, t, noise, prompt,
                                          prompt + variant * len(anchor_prompts), anchor_cond, target_cond,
                                          target_prompts, frozen)
                        if preserved is not None:
                            images, kept = kept_rows(len(x_t), int(config.preserved_rows or len(x_t)),
                                                     len(preserved), generator)
                            kept_loss = _kept_loss(view, adapters, x_t[images], t[images], preserved.select(kept),
                                                   base if kept_at_original else None)
                            loss = loss + kept_loss * kept_scale
                        if not math.isfinite(loss.item()):
                            raise TrainingDivergedError(
                                f"the loss became {loss.item()} at step {step}; nothing was written. Lower the "
                                f"learning rate (now {config.learning_rate:g}) or use float32/bfloat16 instead of "
                                "float16.")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                    losses.append(loss.item())
                    elapsed = time.perf_counter() - started
                    eta = elapsed / (step + 1) * (config.steps - step - 1)
                    report(Progress("train", step + 1, config.steps, losses[-1], eta))
            seconds_training = time.perf_counter() - started

            # 5. The effect, on prompts the run did not train on.
            canceller.phase = "checking the result"
            checks = {}
            prompt_pair = [pair for pair, prompts in enumerate(_anchors_by_pair(config)) for _ in prompts]
            held_out = held_out_pairs(config, anchor_prompts)
            sizes = [check_evaluations(view, config, len(prompts)) for _, prompts, _ in held_out]
            report(Progress("check", 0, sum(sizes)))
            with _oom_guard(), view.uncached_text():
                for pair, (target, check_anchors, check_targets) in enumerate(held_out):
                    own = pair_latents(latents, image_prompt, prompt_pair, pair)

                    def within(done: int, offset: int = sum(sizes[:pair])) -> None:
                        report(Progress("check", offset + done, sum(sizes)))
                    checks[target] = check_pair(view, adapters, config, own, check_anchors, check_targets, base,
                                                within)
            check = combine(checks)
        warning = weak_effect_warning(check, config)
        if warning:
            log.warning(warning)

    # 6. The patch: the trained weight deltas plus everything needed to trust and reproduce them.
    canceller.phase = "building the patch"
    deltas = adapters.weight_deltas()
    originals = {layer.key: layer.weight for layer in layers}
    if base is not None:
        for key, delta in base.weight_deltas().items():
            deltas[key] = deltas[key] + delta if key in deltas else delta
            originals[key] = view.all_layers()[key].weight
    metadata = build_metadata(view, config, losses, seconds_anchors, seconds_training, check, base_patch)
    patch = AblationPatch.from_deltas(deltas, metadata, original_weights=originals)
    log.info("ablated %s: loss %.4g -> %.4g in %.1fs; erased %.0f%% on held-out prompts",
             ", ".join(f"{t!r} -> {a!r}" for t, a in config.pairs()), losses[0], losses[-1],
             seconds_anchors + seconds_training, 100 * check["erased_fraction"])
    return AblationResult(patch, losses, seconds_anchors, seconds_training, config, check, warning)


def _with_extra_targets(target_cond: Conditioning | None, extra: Conditioning | None, anchors: int,
                        view: ModelView) -> Conditioning | None:
    if extra is None:
        return target_cond
    if target_cond is None:
        raise AblationError("extra target conditionings act on the UNet; the embedding group trains the text encoder")
    if len(extra) == 0 or len(extra) % anchors:
        raise AblationError(f"extra target conditionings come in blocks of one per anchor prompt ({anchors}); got "
                            f"{len(extra)}")
    return Conditioning.cat([target_cond, extra.to(view.device)])


def _anchor_latents(view: ModelView, config: AblationConfig, anchor_prompts: list[str], target_prompts: list[str],
                    anchor_cond: Conditioning, target_cond: Conditioning | None, generator: torch.Generator,
                    report: ProgressFn, canceller: Canceller, states: list | None = None) -> tuple[Tensor, Tensor]:
    """Anchor images from the frozen model (target images for the maximization baseline), and each one's prompt.
    A ``states`` list receives the sampler's states for training (``reuse.SamplerStates``)."""
    if config.objective == "maximize":
        sampled_prompts = target_prompts[: len(anchor_prompts)]
        sampled_cond = target_cond.slice(0, len(anchor_prompts)) if target_cond is not None else None
    else:
        sampled_prompts, sampled_cond = anchor_prompts, anchor_cond
    image_prompt = torch.arange(config.anchor_images) % len(anchor_prompts)
    image_prompt = image_prompt[torch.randperm(len(image_prompt), generator=generator)]
    started = time.perf_counter()
    reported = 0
    report(Progress("anchors", 0, len(image_prompt)))  # a CPU's first solver step of SD1.5 can take a minute

    def on_sampler_step(done: float, total: int) -> None:
        nonlocal reported
        canceller.check()
        if int(done) != reported:  # at most one report per finished image's worth of solver steps
            reported = int(done)
            elapsed = time.perf_counter() - started
            eta = elapsed / done * (total - done) if done else None
            report(Progress("anchors", int(done), total, None, eta))

    with _oom_guard():
        latents = sample_latents(view, sampled_prompts, image_prompt, config.sampler_steps, config.guidance,
                                 config.sample_batch_size, config.seed, config.latent_size, on_sampler_step,
                                 sampled_cond, config.negative_prompt or "", states)
        if config.concept_type == "memorized":
            latents, image_prompt = _without_near_copies(view, config, latents, image_prompt, on_sampler_step)
    return latents, image_prompt


def _without_near_copies(view: ModelView, config: AblationConfig, latents: Tensor, image_prompt: Tensor,
                         on_sampler_step) -> tuple[Tensor, Tensor]:
    """Drop anchor images that still look like the memorized image (the model's own samples of the target)."""
    count = min(8, config.anchor_images)
    targets = sample_latents(view, [config.target], torch.zeros(count, dtype=torch.long), config.sampler_steps,
                             config.guidance, config.sample_batch_size, config.seed + 1, config.latent_size,
                             lambda done, total: on_sampler_step(0, 1))
    kept = drop_near_copies(latents, targets)
    if len(kept) == 0:
        raise AblationError("every anchor image looks like the memorized image; give anchor prompts that describe "
                            "other pictures (--anchor-prompts)")
    log.info("memorized image: kept %d of %d anchor images (dropped near-copies of the target's samples)",
             len(kept), len(latents))
    return latents[kept], image_prompt[kept]


def _step_loss(view: ModelView, adapters: AdapterSet, config: AblationConfig, x_t: Tensor, t: Tensor, noise: Tensor,
               anchor_index: Tensor, target_index: Tensor, anchor_cond: Conditioning,
               target_cond: Conditioning | None, target_prompts: list[str], frozen: Tensor | None = None) -> Tensor:
    """The step's loss; ``frozen`` is the frozen anchor prediction when the caller has it (sampler states)."""
    anchor_batch = anchor_cond.select(anchor_index)
    rows = model_rows(str(config.objective), len(x_t), bool(config.regularization))
    if frozen is None and rows:  # the frozen prediction on the first rows ("mixed": the low-noise ones), noise after
        with torch.no_grad(), adapters.disabled():
            low = view.predict(x_t[:rows], t[:rows], anchor_cond.select(anchor_index[:rows]))
        frozen = low if rows == len(x_t) else torch.cat([low.to(noise.dtype), noise[rows:]])
    if target_cond is None:  # embedding group: the text encoder is what trains
        target_batch = view.encode([target_prompts[i] for i in target_index.tolist()])
    else:
        target_batch = target_cond.select(target_index)
    loss = ablation_loss(config.objective, view.predict(x_t, t, target_batch), noise, frozen)
    if config.regularization:
        loss = loss + regularization_loss(config.objective, view.predict(x_t, t, anchor_batch), noise, frozen)
    return loss


def _kept_loss(view: ModelView, adapters: AdapterSet, x_t: Tensor, t: Tensor, kept: Conditioning,
               base: AdapterSet | None = None) -> Tensor:
    """The kept rows held at the prediction without the adapters (and without ``base`` when given)."""
    with torch.no_grad(), adapters.disabled(), base.disabled() if base is not None else contextlib.nullcontext():
        frozen = view.predict(x_t, t, kept)
    return regularization_loss("model", view.predict(x_t, t, kept), frozen, frozen)


@contextlib.contextmanager
def _memory_options(view: ModelView, config: AblationConfig) -> Iterator[None]:
    """Gradient checkpointing and the text encoders set aside, while training, where the config asks for them."""
    with contextlib.ExitStack() as stack:
        if config.gradient_checkpointing:
            stack.enter_context(checkpointed(view.transformer_blocks()))
        if config.offload_text_encoder:
            stack.enter_context(set_aside(view.text_encoders_to_set_aside(), view.device))
        yield


@contextlib.contextmanager
def _oom_guard() -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise OutOfMemoryError(
            "the GPU ran out of memory; nothing was written. Try a smaller batch (--batch-size), fewer anchor images "
            "per sampling batch (--sample-batch-size), a smaller latent size, or the kv group") from err
