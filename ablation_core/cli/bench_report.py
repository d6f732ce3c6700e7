"""The figures ``bench`` prints: one measured run, and the full default preset's cost from measured FLOPs per row.

The default preset's UNet evaluations come from the cost model (``methods.ablation.budget``), which every run checks
against the counted evaluations (``unet_evaluations`` vs ``unet_evaluations_expected``). Its FLOPs: one UNet
evaluation at the model's default latent size is replayed on a weightless copy (``models.meta``) without and with
gradients, and multiplied by the preset's frozen and training evaluations; the text encoders add what the run
measured per prompt times the preset's prompts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..evaluation.cost import RunMeter, Signature
from ..methods.ablation.budget import gradient_passes_per_step, training_passes_per_step, unet_evaluations
from ..methods.ablation.check import CHECK_PROMPTS, drawn_prompts_encoded, gap_evaluations
from ..methods.ablation.preserve import preserved_prompts
from ..methods.ablation.reuse import uses_sampler_states
from ..models.meta import call_cost, parameter_names

SETTINGS = ("preset", "group", "objective", "steps", "batch_size", "learning_rate", "anchor_images", "sampler_steps",
            "sample_batch_size", "guidance", "anchor_prompt_count", "latent_size", "reuse_sampler_states")


def settings_of(config) -> dict[str, object]:
    values = {name: getattr(config, name) for name in SETTINGS}
    values["training_inputs"] = "sampler states" if uses_sampler_states(config) else "re-noised anchor images"
    return values


def run_report(meter: RunMeter, result, end_to_end: float) -> dict[str, object]:
    phases = meter.report()
    expected = unet_evaluations(result.config, int(result.check.get("held_out_prompts", 0)))
    return {
        "settings": settings_of(result.config),
        "phases": phases,
        "end_to_end_s": round(end_to_end, 3),
        "unet_evaluations": sum(int(p["unet_evaluations"]) for p in phases.values()),
        "unet_evaluations_expected": sum(expected.values()),
        "unet_evaluations_expected_by_phase": expected,
        "flops": sum(int(p["flops"]) for p in phases.values()),
        "peak_memory_bytes": max(int(p["peak_memory_bytes"]) for p in phases.values()),
        "erased_fraction_held_out": result.check.get("erased_fraction"),
        "final_loss": round(result.losses[-1], 6) if result.losses else None,
    }


def _one_row(value: object, rows: int, latent: int) -> object:
    """A meta argument of a recorded call, cut to one row (and the latent resized to ``latent``)."""
    if isinstance(value, Tensor):
        shape = list(value.shape)
        if shape and shape[0] == rows:
            shape[0] = 1
        if len(shape) == 4:
            shape[2:] = [latent, latent]
        return torch.empty(shape, dtype=value.dtype, device="meta")
    if isinstance(value, dict):
        return {k: _one_row(v, rows, latent) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_one_row(v, rows, latent) for v in value)
    return value


def _unet_signature(meter: RunMeter, grad: bool) -> Signature | None:
    for phase in meter.phases.values():
        for sig in phase.signatures.values():
            if sig.module == "unet" and sig.grad == grad:
                return sig
    return None


def flops_per_row(meter: RunMeter, latent: int, trained: list[str], grad: bool) -> int:
    sig = _unet_signature(meter, grad) or _unet_signature(meter, not grad)
    twin = meter.twin("unet")
    if sig is None or twin is None:
        return 0
    args, kwargs = _one_row(sig.args, sig.rows, latent), _one_row(sig.kwargs, sig.rows, latent)
    return call_cost(twin, args, kwargs, trained, grad)["flops"]


def default_preset_costs(view, meter: RunMeter, config, prefix: str) -> dict[str, object]:
    """``<prefix>_unet_evaluations`` and ``<prefix>_flops`` of a resolved preset config, with the details."""
    evaluations = unet_evaluations(config)
    latent = int(config.latent_size or view.default_latent_size)
    trained = parameter_names(view.unet, [layer.module for layer in view.layers(config.group)])
    grad_rows = int(config.steps) * gradient_passes_per_step(config)
    frozen_rows = sum(evaluations.values()) - grad_rows
    frozen, training = flops_per_row(meter, latent, trained, False), flops_per_row(meter, latent, trained, True)
    encoding = meter.phases.get("prompt_encoding")
    per_prompt = encoding.flops // encoding.text_encoder_prompts if encoding and encoding.text_encoder_prompts else 0
    variants = 1 + int(config.misspelled_targets)
    kept = len(preserved_prompts(config, view.family.name)) if config.preserved_rows else 0  # encoded once
    prompts = (int(config.anchor_prompt_count) * (1 + variants) + 1 + kept
               + gap_evaluations(CHECK_PROMPTS * len(config.pairs()))  # the gap encodes a prompt per evaluation
               + drawn_prompts_encoded(len(config.pairs())))
    return {
        f"{prefix}_unet_evaluations": sum(evaluations.values()),
        f"{prefix}_flops": frozen_rows * frozen + grad_rows * training + prompts * per_prompt,
        prefix: {"settings": settings_of(config), "latent_size": latent, "unet_evaluations_by_phase": evaluations,
                 "training_passes_per_step": training_passes_per_step(config),
                 "flops_per_frozen_unet_evaluation": frozen, "flops_per_training_unet_evaluation": training,
                 "text_encoder_prompts": prompts, "flops_per_prompt": per_prompt},
    }
