"""Training the toy world (classifier, then text encoder + UNet) and measuring it, deterministically per seed.

The recipe is tuned for two CPU cores: fresh generator batches every step (no data set to store), eps prediction
on SD's schedule with timesteps drawn towards the noisy end (where the prompt decides what is drawn), 10 % empty
captions for classifier-free guidance, AdamW with warm-up and cosine decay, and an EMA of the weights, which is what
ships. Prompt following is then measured the way the evaluation will use the model: DPM-Solver++ samples with CFG,
read by the classifier.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel

from ..models.schedules import sd_alphas_cumprod
from ..models.tokenizer import sd_clip_tokenizer
from .classifier import (
    CLASSIFIER_FILE,
    ToyClassifier,
    classify,
    held_out_accuracy,
    save_classifier,
    train_classifier,
)
from .concepts import ARTISTS, CONCEPTS, INSTANCES, OBJECTS, STYLES
from .data import IMAGE_SIZE, SUBJECTS, ToyLabel, caption, make_batch
from .model import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    TEXT_CONFIG,
    UNET_CONFIG,
    build_toy_model,
    parameter_count,
    sample_images,
    tokenize,
)

log = logging.getLogger(__name__)


@dataclass
class ToyRecipe:
    """Everything that decides the trained weights; stored beside them."""

    seed: int = 0
    steps: int = 2400
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    min_lr_fraction: float = 0.1
    uncond_prob: float = 0.1
    timestep_power: float = 0.75
    ema_decay: float = 0.998
    grad_clip: float = 1.0
    classifier_steps: int = 500
    eval_samples_per_pair: int = 6
    eval_guidance: float = DEFAULT_GUIDANCE
    eval_sampler_steps: int = DEFAULT_STEPS


def lr_at(step: int, recipe: ToyRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return recipe.lr * (recipe.min_lr_fraction + (1 - recipe.min_lr_fraction) * cosine)


def sample_timesteps(n: int, power: float, generator: torch.Generator) -> torch.Tensor:
    """t = 1000 * u**power: power < 1 leans towards high noise, where the caption matters most."""
    u = torch.rand(n, generator=generator)
    return (u**power * 1000).long().clamp(0, 999)


def train_model(recipe: ToyRecipe, on_step=None) -> tuple[UNet2DConditionModel, CLIPTextModel, list[float]]:
    """Jointly train text encoder and UNet from scratch; returns the EMA copies and the loss history."""
    unet, text_encoder = build_toy_model(recipe.seed)
    tokenizer = sd_clip_tokenizer()
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    rng = np.random.default_rng([recipe.seed, 3])
    generator = torch.Generator().manual_seed(recipe.seed + 3)
    acp = sd_alphas_cumprod().float()
    losses: list[float] = []
    unet.train()
    text_encoder.train()
    started = time.time()
    for step in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        images, captions, _ = make_batch(rng, recipe.batch_size)
        drop = torch.rand(len(captions), generator=generator) < recipe.uncond_prob
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        t = sample_timesteps(len(captions), recipe.timestep_power, generator)
        noise = torch.randn(images.shape, generator=generator)
        a = acp[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        context = text_encoder(tokenize(tokenizer, captions)).last_hidden_state
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        optimizer.step()
        ema_update([(ema_unet, unet), (ema_text, text_encoder)], step, recipe.ema_decay)
        losses.append(float(loss.detach()))
        if step % 50 == 0 or step == recipe.steps - 1:
            recent = float(np.mean(losses[-50:]))
            log.info("model step %d/%d loss %.4f (%.0f s)", step, recipe.steps, recent, time.time() - started)
        if on_step is not None:
            on_step(step, losses[-1])
    return ema_unet.eval(), ema_text.eval(), losses


@torch.no_grad()
def ema_update(pairs: list[tuple[torch.nn.Module, torch.nn.Module]], step: int, decay: float) -> None:
    """Move each EMA copy toward its live module (a short warm-up: the EMA starts close to the live weights)."""
    decay = min(decay, (1 + step) / (10 + step))
    for ema, live in pairs:
        for p_ema, p in zip(ema.parameters(), live.parameters(), strict=True):
            p_ema.lerp_(p, 1 - decay)


def evaluation_prompts(samples_per_pair: int) -> tuple[list[str], list[ToyLabel]]:
    """Every subject in every style, ``samples_per_pair`` times, cycling through the caption templates."""
    prompts, labels = [], []
    for subject in SUBJECTS:
        for style in STYLES:
            for k in range(samples_per_pair):
                label = ToyLabel(subject, style)
                prompts.append(caption(label, k))
                labels.append(label)
    return prompts, labels


def prompt_following(draw: Callable[[list[str], int], torch.Tensor], classifier: ToyClassifier,
                     recipe: ToyRecipe, seed: int = 1234) -> tuple[dict, torch.Tensor]:
    """Per concept: the fraction of samples of prompts naming it that the classifier says show it.

    ``draw(prompts, seed)`` samples one image per prompt (the SD toy's or toy-flux's sampler). Objects count over
    prompts naming the class (not its instances), instances over prompts naming them, styles over all subjects;
    "all_axes" is the fraction where object, instance and style are all as asked.
    """
    prompts, labels = evaluation_prompts(recipe.eval_samples_per_pair)
    images = draw(prompts, seed)
    preds = classify(classifier, images)

    def fraction(selected: list[int], ok) -> float:
        return round(float(np.mean([ok(preds[i], labels[i]) for i in selected])), 4)

    per_concept: dict[str, float] = {}
    for name in OBJECTS:
        idx = [i for i, lb in enumerate(labels) if lb.subject == name]
        per_concept[name] = fraction(idx, lambda p, lb: p.object == lb.object and p.instance == lb.instance)
    for name in INSTANCES:
        idx = [i for i, lb in enumerate(labels) if lb.subject == name]
        per_concept[name] = fraction(idx, lambda p, lb: p.instance == lb.instance)
    for name in STYLES:
        idx = [i for i, lb in enumerate(labels) if lb.style == name]
        per_concept[name] = fraction(idx, lambda p, lb: p.style == lb.style)
    everything = list(range(len(labels)))
    return {
        "per_concept": per_concept,
        "all_axes": fraction(everything, lambda p, lb: (p.object, p.instance, p.style) == (lb.object, lb.instance,
                                                                                           lb.style)),
        "samples": len(prompts), "sampler": f"dpmpp_2m {recipe.eval_sampler_steps} steps",
        "guidance": recipe.eval_guidance, "noise_seed": seed,
    }, images


def sd_sampler(unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
               recipe: ToyRecipe) -> Callable[[list[str], int], torch.Tensor]:
    return lambda prompts, seed: sample_images(unet, text_encoder, sd_clip_tokenizer(), prompts, seed=seed,
                                               steps=recipe.eval_sampler_steps, guidance=recipe.eval_guidance)


def _save_fp16(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, out: Path) -> None:
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    text_encoder.to(torch.float16).save_pretrained(out / "text_encoder", safe_serialization=True)
    unet.to(torch.float32)
    text_encoder.to(torch.float32)


def train_toy_world(recipe: ToyRecipe, out: str | Path, command: str | None = None) -> dict:
    """Train classifier and model, measure them, write the weights folder and ``toy_world.json``; return the info."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    classifier = train_classifier(recipe.seed, steps=recipe.classifier_steps)
    classifier_time = time.time() - started
    accuracy = held_out_accuracy(classifier, seed=recipe.seed + 1000)
    degraded = held_out_accuracy(classifier, seed=recipe.seed + 1000, degrade=True)
    log.info("classifier held-out accuracy %s (degraded %s)", accuracy, degraded)
    save_classifier(classifier, out / CLASSIFIER_FILE, {"held_out_accuracy": accuracy})
    model_started = time.time()
    unet, text_encoder, losses = train_model(recipe)
    model_time = time.time() - model_started
    _save_fp16(unet, text_encoder, out)
    from .model import load_toy_model

    unet16, text16, _ = load_toy_model(weights_dir=out)
    following, _ = prompt_following(sd_sampler(unet16, text16, recipe), classifier, recipe)
    log.info("prompt following %s", following)
    info = {
        "image_size": IMAGE_SIZE, "pixel_space": True, "prediction": "epsilon", "schedule": "sd scaled_linear 1000",
        "concepts": [c.as_json() for c in CONCEPTS], "objects": list(OBJECTS), "instances": list(INSTANCES),
        "styles": list(STYLES), "artists": list(ARTISTS),
        "recipe": asdict(recipe), "unet_config": {k: list(v) if isinstance(v, tuple) else v
                                                  for k, v in UNET_CONFIG.items()},
        "text_config": TEXT_CONFIG,
        "parameters": {"unet": parameter_count(unet), "text_encoder": parameter_count(text_encoder)},
        "final_loss_last_100": round(float(np.mean(losses[-100:])), 5),
        "classifier_held_out_accuracy": accuracy, "classifier_held_out_accuracy_degraded": degraded,
        "classifier_held_out": "2000 fresh images from seed + 1000",
        "prompt_following": following,
        "training_seconds": {"classifier": round(classifier_time, 1), "model": round(model_time, 1),
                             "total_with_eval": round(time.time() - started, 1)},
        "torch_threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "command": command or " ".join(["python", "-m", "ablation_core.toy"] + sys.argv[1:]),
        "weights_dtype": "float16",
    }
    (out / "toy_world.json").write_text(json.dumps(info, indent=1))
    return info


def measure_weights(weights_dir: str | Path, guidance: float | None = None, seed: int = 1234,
                    sampler_steps: int | None = None, samples_per_pair: int | None = None, write: bool = False,
                    command: str | None = None) -> dict:
    """Prompt following of a trained folder, measured afresh; with ``write``, recorded in its ``toy_world.json``."""
    from .classifier import load_toy_classifier
    from .model import load_toy_model, toy_world_info

    weights_dir = Path(weights_dir)
    info = toy_world_info(weights_dir)
    recipe = ToyRecipe(**info["recipe"])
    recipe.eval_guidance = guidance if guidance is not None else recipe.eval_guidance
    recipe.eval_sampler_steps = sampler_steps or recipe.eval_sampler_steps
    recipe.eval_samples_per_pair = samples_per_pair or recipe.eval_samples_per_pair
    unet, text_encoder, _ = load_toy_model(weights_dir=weights_dir)
    started = time.time()
    following, _ = prompt_following(sd_sampler(unet, text_encoder, recipe),
                                    load_toy_classifier(weights_dir / CLASSIFIER_FILE), recipe, seed=seed)
    following["seconds"] = round(time.time() - started, 1)
    if command:
        following["command"] = command
    if write:
        info["prompt_following"] = following
        (weights_dir / "toy_world.json").write_text(json.dumps(info, indent=1))
    return following
