"""``bench``: what a trained ablation costs, phase by phase, on a random-weight model of the real shape (or the toy).

Random weights compute exactly what real ones do, so evaluations, FLOPs, seconds and memory hold for real models.
Every run reports, per phase (setup, prompt encoding, anchor sampling, training, check, patch extraction and
compression): seconds, UNet evaluations (counted by a hook), FLOPs (counted, ``evaluation.cost``) and peak memory;
plus the evaluations and FLOPs of the full default preset, computed from the cost model (``budget``, checked against
the counted evaluations of the run) and FLOPs measured per evaluation at the default latent size. ``--quick`` runs
the same phases with a few steps on small latents; ``--compare-default`` also runs the ``thorough`` preset (the
earlier default, about 4x the evaluations) in the same invocation (same machine, same load) and reports the default's
speed-up over it. Before building anything it checks that the model and the run fit the device's memory and says
what to change if not.
"""

from __future__ import annotations

import platform
import time

import torch

from ..backends.diffusers import DiffusersModelView
from ..backends.loading import load_model
from ..evaluation.cost import RunMeter
from ..methods.ablation.loop import ablate
from ..methods.ablation.settings import make_config, resolve_config
from ..models.layers import select_unet_modules
from ..models.memory import check_fits, estimate
from ..models.random_models import build_components
from .bench_report import default_preset_costs, run_report

ARCH_FAMILY = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl", "toy": "toy"}
TARGETS = {"toy": ("cat", "dog")}
DEFAULT_TARGET = ("Grumpy Cat", "cat")
QUICK = {"steps": 2, "batch_size": 1, "anchor_images": 1, "sampler_steps": 2, "sample_batch_size": 1}
QUICK_LATENT = 16
QUICK_PROMPTS = 2
QUICK_LORA_RANK = 8  # SDXL's full-rank kv deltas with AdamW state are 5 GiB: more than the quick run itself


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _one_held_out_prompt(family: str, anchor: str) -> tuple[str]:
    if family == "toy":
        from ..toy.prompts import anchor_prompts

        return (anchor_prompts(anchor, "eval")[0],)
    return (f"a photo of a {anchor}",)


def _build_view(arch: str, device: str, dtype: torch.dtype, latent: int | None, batch: int, group: str,
                lora_rank: int, checkpointing: bool = False) -> tuple[DiffusersModelView, dict[str, object]]:
    """The model to measure; a full-size one only after checking that it and the run fit the device's memory."""
    started = time.perf_counter()
    if arch == "toy":
        view = load_model("toy", device, dtype)
        return view, {"model_build_s": round(time.perf_counter() - started, 2)}
    family = ARCH_FAMILY[arch]
    with torch.device("meta"):
        twin = build_components(family, tiny=False, prompt_sensitive=False)
    weights = sum(p.numel() for m in [twin.unet, *twin.text_encoders] for p in m.parameters())
    modules = [m for _, m in select_unet_modules(twin.unet.named_modules(), group)]
    trained = sum(lora_rank * sum(m.weight.shape[:2]) if lora_rank else m.weight.numel() for m in modules)
    size = latent or int(twin.unet.config.sample_size)
    needed = estimate(family, size, batch, dtype, trained, weights, checkpointing)
    check_fits(needed, device, batch, size, dtype, checkpointing)
    components = build_components(family, tiny=False, prompt_sensitive=False, dtype=dtype)
    view = DiffusersModelView(components, device=device, dtype=dtype)
    return view, {"model_build_s": round(time.perf_counter() - started, 2),
                  "memory_estimate_bytes": needed.total, "memory_estimate": needed.describe()}


def _measure(view: DiffusersModelView, config, family: str) -> tuple[dict[str, object], RunMeter, object]:
    """One ablation under the meters, then its patch compressed (the phase a saved patch goes through)."""
    meter = RunMeter(view.unet, view.text_encoders, view.device)
    with meter.measuring():
        started = time.perf_counter()
        result = ablate(view, config)
        meter.enter("patch_compression")
        result.patch.compressed()
        meter.close()
        end_to_end = time.perf_counter() - started
    trained = [layer.module for layer in view.layers(result.config.group)]
    meter.count_flops(trained)
    return run_report(meter, result, end_to_end), meter, result


def run_bench(arch: str, device: str, dtype: torch.dtype, steps: int | None = None, anchor_images: int | None = None,
              sampler_steps: int | None = None, batch_size: int | None = None, quick: bool = False,
              compare_default: bool = False, latent_size: int | None = None, gradient_checkpointing: bool = False,
              offload_text_encoder: bool = False) -> dict[str, object]:
    family = ARCH_FAMILY[arch]
    target, anchor = TARGETS.get(family, DEFAULT_TARGET)
    scale: dict[str, object] = dict(QUICK) if quick and not compare_default else {}
    scale.update({k: v for k, v in {"steps": steps, "anchor_images": anchor_images, "sampler_steps": sampler_steps,
                                    "batch_size": batch_size}.items() if v is not None})
    if quick:
        scale["held_out_prompts"] = _one_held_out_prompt(family, anchor)
    if quick and family != "toy":
        latent_size = latent_size or QUICK_LATENT
        scale["anchor_prompt_count"] = QUICK_PROMPTS
        if not compare_default:
            scale["lora_rank"] = QUICK_LORA_RANK
    if latent_size is not None:
        scale["latent_size"] = latent_size
    scale.update(gradient_checkpointing=gradient_checkpointing or None,
                 offload_text_encoder=offload_text_encoder or None)
    config = resolve_config(make_config(target, anchor, **scale), family)
    view, built = _build_view(arch, device, dtype, latent_size, int(config.batch_size), str(config.group),
                              int(config.lora_rank), gradient_checkpointing)
    report: dict[str, object] = {
        "arch": arch, "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "latent_size": latent_size or view.default_latent_size, "default_latent_size": view.default_latent_size,
        "unet_parameters_m": round(sum(p.numel() for p in view.unet.parameters()) / 1e6, 1), **built}
    measured, meter, result = _measure(view, config, family)
    report.update(measured)
    default = resolve_config(make_config(target, anchor), family)
    report.update(default_preset_costs(view, meter, default, "default_preset"))
    thorough_preset = resolve_config(make_config(target, anchor, preset="thorough"), family)
    report.update(default_preset_costs(view, meter, thorough_preset, "thorough_preset"))
    report["default_preset_flops_ratio_to_thorough"] = round(report["default_preset_flops"]
                                                             / max(1, report["thorough_preset_flops"]), 3)
    if compare_default:
        thorough = resolve_config(make_config(target, anchor, preset="thorough", **scale), family)
        earlier, _, _ = _measure(view, thorough, family)
        report["compare"] = {
            "default": measured, "thorough": earlier,
            "speedup_end_to_end": round(earlier["end_to_end_s"] / measured["end_to_end_s"], 2),
            "unet_evaluation_ratio": round(earlier["unet_evaluations"] / max(1, measured["unet_evaluations"]), 2)}
    return report


CELEBRITY_STAND_INS = [f"Person Number {i}" for i in range(1000)]  # distinct names; compute is what is measured


def run_closed_form_bench(arch: str, device: str, dtype: torch.dtype,
                          concepts: tuple[int, ...] = (1, 100)) -> dict[str, object]:
    """Seconds for closed-form erasures of N concepts at once on a random-weight model of the real shape (after
    the model is loaded): prompt encoding and the solve, the whole of the method's work."""
    from ..methods.closed_form.embeddings import MOMENT_CACHE
    from ..methods.closed_form.settings import make_closed_form_config
    from ..methods.closed_form.solve import erase_closed_form

    family = ARCH_FAMILY[arch]
    started = time.perf_counter()
    components = build_components(family, tiny=False, prompt_sensitive=False)
    view = DiffusersModelView(components, device=device, dtype=dtype)
    report: dict[str, object] = {"arch": arch, "method": "closed-form", "device": _device_name(device),
                                 "dtype": str(dtype).replace("torch.", ""),
                                 "model_build_s": round(time.perf_counter() - started, 2)}
    for count in concepts:
        # cold: the first erasure in a fresh process; warm: the next one (other targets, same anchor), which finds
        # the preserved bank's moments in the process's cache and encodes only its own prompts
        MOMENT_CACHE.clear()
        for label, targets in (("", CELEBRITY_STAND_INS[:count]), ("_warm", CELEBRITY_STAND_INS[count:2 * count])):
            config = make_closed_form_config(targets, "a person")
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            encoded_before = MOMENT_CACHE.misses
            result = erase_closed_form(view, config)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            report[f"concepts_{count}{label}_s"] = round(time.perf_counter() - started, 3)
            report[f"concepts_{count}{label}_chunks_encoded"] = MOMENT_CACHE.misses - encoded_before
        report[f"concepts_{count}_prompts"] = (2 * len(config.targets) * int(result.config.prompts_per_target)
                                               + len(result.config.preserved_prompts or ()))
        report[f"concepts_{count}_rank"] = result.stats["rank"]
    report["peak_memory_gib"] = round(_peak_memory_gib(device), 2)
    return report


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
