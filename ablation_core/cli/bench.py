"""``bench``: time a real ablation on a random-weight model of the real SD1.5/SD2/SDXL shape.

Random weights compute exactly what real ones do, so the timings and memory hold for real models. On a CPU the
default preset takes very long; pass smaller ``--steps/--anchor-images/--sampler-steps`` and read the measured
rates and the projection to the default preset (labelled as a projection).
"""

from __future__ import annotations

import platform
import resource
import time

import torch

from ..backends.diffusers import DiffusersModelView
from ..methods.ablation.loop import ablate
from ..methods.ablation.settings import make_config, resolve_config
from ..models.random_models import build_components

ARCH_FAMILY = {"sd15": "sd1", "sd2": "sd2", "sdxl": "sdxl"}


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_bench(arch: str, device: str, dtype: torch.dtype, steps: int | None = None, anchor_images: int | None = None,
              sampler_steps: int | None = None, batch_size: int | None = None) -> dict[str, object]:
    family = ARCH_FAMILY[arch]
    started = time.perf_counter()
    components = build_components(family, tiny=False, prompt_sensitive=False)
    view = DiffusersModelView(components, device=device, dtype=dtype)
    build_seconds = time.perf_counter() - started
    config = resolve_config(make_config("Grumpy Cat", "cat", steps=steps, anchor_images=anchor_images,
                                        sampler_steps=sampler_steps, batch_size=batch_size), family)
    default = resolve_config(make_config("Grumpy Cat", "cat"), family)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = ablate(view, config)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    end_to_end = time.perf_counter() - started
    per_step = result.seconds_training / config.steps
    per_image_step = result.seconds_anchors / (config.anchor_images * config.sampler_steps)
    projected = (per_step * default.steps + per_image_step * default.anchor_images * default.sampler_steps)
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "arch": arch,
        "device": device_name,
        "dtype": str(dtype).replace("torch.", ""),
        "latent_size": view.default_latent_size,
        "group": config.group,
        "unet_parameters_m": round(sum(p.numel() for p in view.unet.parameters()) / 1e6, 1),
        "model_build_s": round(build_seconds, 2),
        "steps": config.steps,
        "batch_size": config.batch_size,
        "anchor_images": config.anchor_images,
        "sampler_steps": config.sampler_steps,
        "anchor_generation_s": round(result.seconds_anchors, 3),
        "anchor_s_per_image_per_sampler_step": round(per_image_step, 4),
        "training_s": round(result.seconds_training, 3),
        "training_s_per_step": round(per_step, 4),
        "end_to_end_s": round(end_to_end, 3),
        "peak_memory_gib": round(_peak_memory_gib(device), 2),
        "projected_default_preset_s": round(projected, 1),
        "default_preset": f"{default.steps} steps x batch {default.batch_size}, "
                          f"{default.anchor_images} anchor images x {default.sampler_steps} sampler steps",
    }


CELEBRITY_STAND_INS = [f"Person Number {i}" for i in range(1000)]  # distinct names; compute is what is measured


def run_closed_form_bench(arch: str, device: str, dtype: torch.dtype,
                          concepts: tuple[int, ...] = (1, 100)) -> dict[str, object]:
    """Seconds for closed-form erasures of N concepts at once on a random-weight model of the real shape (after
    the model is loaded): prompt encoding and the solve, the whole of the method's work."""
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
        config = make_closed_form_config(CELEBRITY_STAND_INS[:count], "a person")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = erase_closed_form(view, config)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        report[f"concepts_{count}_s"] = round(time.perf_counter() - started, 3)
        report[f"concepts_{count}_prompts_encoded"] = (2 * len(config.targets) * int(result.config.prompts_per_target)
                                                       + len(result.config.preserved_prompts or ()))
        report[f"concepts_{count}_rank"] = result.stats["rank"]
    report["peak_memory_gib"] = round(_peak_memory_gib(device), 2)
    return report


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
