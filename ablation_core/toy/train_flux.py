"""Training toy-flux: flow matching on the toy world's generator, then guidance distillation, as Flux.1 dev was made.

1. Base: transformer and both text encoders from scratch, velocity loss ``|v(x_t) - (noise - x0)|^2`` at flow times
   drawn toward the noisy end, 10 % empty captions, guidance input held at 1, EMA of the weights.
2. Distillation: a student (initialised from the base) learns to give, from the guidance scale ``g`` as an input, the
   base model's classifier-free-guided velocity ``v_empty + g (v_prompt - v_empty)`` for ``g`` in [1, 6]; it then
   samples with one pass per step, as Flux dev does. The text encoders stay frozen (as Flux's do).
Prompt following is measured the way the evaluation uses the model (DPM-Solver++ on the flow, the shipped classifier).
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.flux.text import FluxTextEncoders
from ..models.flux.transformer import FluxTransformer
from ..resources import TOY_CLASSIFIER
from .classifier import load_toy_classifier
from .concepts import ARTISTS, CONCEPTS, INSTANCES, OBJECTS, STYLES
from .data import IMAGE_SIZE, make_batch
from .flux import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    SEQUENCE_LENGTH,
    SHIFT,
    T5_CONFIG,
    TOY_FLUX_CONFIG,
    build_toy_flux,
    load_toy_flux,
    sample_toy_flux,
    save_toy_flux,
    schedule,
)
from .train import ToyRecipe, ema_update, lr_at, parameter_count, prompt_following, sample_timesteps

log = logging.getLogger(__name__)

GUIDANCE_RANGE = (1.0, 6.0)


@dataclass
class ToyFluxRecipe(ToyRecipe):
    """The SD toy's recipe fields (steps, batch, lr schedule, EMA, caption dropout ...) plus distillation."""

    steps: int = 3000
    lr: float = 6e-4
    distill_steps: int = 600
    distill_lr: float = 2e-4


def _train_base(recipe: ToyFluxRecipe) -> tuple[FluxTransformer, FluxTextEncoders, list[float]]:
    transformer, encoders = build_toy_flux(recipe.seed)
    ema_transformer = copy.deepcopy(transformer).requires_grad_(False)
    ema_encoders = copy.deepcopy(encoders).requires_grad_(False)
    params = list(transformer.parameters()) + list(encoders.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng, generator = np.random.default_rng([recipe.seed, 3]), torch.Generator().manual_seed(recipe.seed + 3)
    flow, losses, started = schedule(), [], time.time()
    transformer.train()
    encoders.train()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        images, captions, _ = make_batch(rng, recipe.batch_size)
        drop = torch.rand(len(captions), generator=generator) < recipe.uncond_prob
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        t = sample_timesteps(len(captions), recipe.timestep_power, generator)
        noise = torch.randn(images.shape, generator=generator)
        text = encoders(captions)
        velocity = transformer(flow.noisy(images, noise, t), flow.sigmas(t).float(), text.context, text.pooled,
                               torch.ones(len(captions)))
        loss = F.mse_loss(velocity, flow.noise_target(images, noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        ema_update([(ema_transformer, transformer), (ema_encoders, encoders)], step, recipe.ema_decay)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == recipe.steps - 1:
            log.info("base step %d/%d loss %.4f (%.0f s)", step, recipe.steps, float(np.mean(losses[-50:])),
                     time.time() - started)
    return ema_transformer.eval(), ema_encoders.eval(), losses


def _distill(teacher: FluxTransformer, encoders: FluxTextEncoders, recipe: ToyFluxRecipe
             ) -> tuple[FluxTransformer, list[float]]:
    """A student that reads the guidance scale and gives the teacher's guided velocity in one pass."""
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    ema_student = copy.deepcopy(teacher).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=recipe.distill_lr, weight_decay=0.0)
    rng, generator = np.random.default_rng([recipe.seed, 5]), torch.Generator().manual_seed(recipe.seed + 5)
    flow, losses, started = schedule(), [], time.time()
    with torch.no_grad():
        empty = encoders([""])
    low, high = GUIDANCE_RANGE
    for step in range(recipe.distill_steps):
        images, captions, _ = make_batch(rng, recipe.batch_size)
        t = sample_timesteps(len(captions), recipe.timestep_power, generator)
        noise = torch.randn(images.shape, generator=generator)
        guidance = low + (high - low) * torch.rand(len(captions), generator=generator)
        x_t = flow.noisy(images, noise, t)
        with torch.no_grad():
            text = encoders(captions)
            count = len(captions)
            unconditional, own = teacher(torch.cat([x_t, x_t]), flow.sigmas(torch.cat([t, t])).float(),
                                         torch.cat([empty.context.expand(count, -1, -1), text.context]),
                                         torch.cat([empty.pooled.expand(count, -1), text.pooled]),
                                         torch.ones(2 * count)).chunk(2)
            wanted = unconditional + guidance.view(-1, 1, 1, 1) * (own - unconditional)
        loss = F.mse_loss(student(x_t, flow.sigmas(t).float(), text.context, text.pooled, guidance), wanted)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), recipe.grad_clip)
        optimizer.step()
        ema_update([(ema_student, student)], step, recipe.ema_decay)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == recipe.distill_steps - 1:
            log.info("distill step %d/%d loss %.4f (%.0f s)", step, recipe.distill_steps,
                     float(np.mean(losses[-50:])), time.time() - started)
    return ema_student.eval(), losses


def flux_sampler(transformer: FluxTransformer, encoders: FluxTextEncoders, recipe: ToyRecipe, distilled=None):
    return lambda prompts, seed: sample_toy_flux(transformer, encoders, prompts, seed=seed,
                                                 steps=recipe.eval_sampler_steps, guidance=recipe.eval_guidance,
                                                 distilled=distilled)


def train_toy_flux(recipe: ToyFluxRecipe, out: str | Path, command: str | None = None) -> dict:
    """Train, distill, measure and write the toy-flux weights folder with its ``toy_world.json``; return the info."""
    out = Path(out)
    started = time.time()
    classifier = load_toy_classifier(TOY_CLASSIFIER)
    base, encoders, base_losses = _train_base(recipe)
    base_seconds = time.time() - started
    base_following, _ = prompt_following(flux_sampler(base, encoders, recipe, distilled=False), classifier, recipe)
    log.info("base model, classifier-free guidance: %s", base_following)
    distill_started = time.time()
    student, distill_losses = _distill(base, encoders, recipe) if recipe.distill_steps else (base, [])
    distill_seconds = time.time() - distill_started
    save_toy_flux(student, encoders, out)
    student16, encoders16 = load_toy_flux(weights_dir=out)
    following, _ = prompt_following(flux_sampler(student16, encoders16, recipe), classifier, recipe)
    log.info("shipped model (fp16 weights, guidance as input): %s", following)
    info = {
        "architecture": "flux", "image_size": IMAGE_SIZE, "pixel_space": True, "prediction": "velocity",
        "schedule": f"rectified flow, shift {SHIFT}", "sequence_length": SEQUENCE_LENGTH,
        "concepts": [c.as_json() for c in CONCEPTS], "objects": list(OBJECTS), "instances": list(INSTANCES),
        "styles": list(STYLES), "artists": list(ARTISTS),
        "recipe": asdict(recipe), "transformer_config": asdict(TOY_FLUX_CONFIG), "t5_config": T5_CONFIG,
        "parameters": {"transformer": parameter_count(student), "t5": parameter_count(encoders.t5),
                       "clip": parameter_count(encoders.clip)},
        "final_loss_last_100": round(float(np.mean(base_losses[-100:])), 5),
        "distill_loss_last_100": round(float(np.mean(distill_losses[-100:])), 5) if distill_losses else None,
        "prompt_following_base_cfg": base_following,
        "prompt_following": following,
        "sampler": f"dpmpp_2m {DEFAULT_STEPS} steps on the flow, guidance {DEFAULT_GUIDANCE} as input",
        "training_seconds": {"base": round(base_seconds, 1), "distill": round(distill_seconds, 1),
                             "total_with_eval": round(time.time() - started, 1)},
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "command": command or " ".join(["python", "-m", "ablation_core.toy"] + sys.argv[1:]),
        "weights_dtype": "float16",
    }
    (out / "toy_world.json").write_text(json.dumps(info, indent=1))
    return info
