"""Will a run fit? An estimate of the memory a trained ablation needs, checked before anything heavy starts.

A run that does not fit should say so and what to change, not be killed by the kernel after minutes (or die with
a CUDA error half-way). The estimate is deliberately simple and a little generous:

- weights: parameters x bytes per parameter (only when the model is still to be loaded: the benchmark),
- training activations: what autograd saves for one training pass, per latent pixel and batch row, measured per
  family with ``models.meta.call_cost`` on the full-size UNet (kv group, bf16, 32x32 latents, weights excluded),
  scaled by the latent area, the batch and the bytes per value; with gradient checkpointing
  (``models.checkpointing``) the same count without the transformer blocks' inner activations (``call_cost``'s
  ``saved_bytes_checkpointed``),
- the trained deltas with their gradients and Adam's two moments (4 x float32 each),
- a fixed allowance for the framework itself and transient buffers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..errors import OutOfMemoryError
from .families import FAMILIES

# Bytes autograd saves per latent pixel for one bf16 training row (see the module docstring).
SAVED_BYTES_PER_PIXEL = {"sd1": 524_000, "sd2": 418_000, "sdxl": 583_000}
DEFAULT_SAVED_BYTES_PER_PIXEL = 583_000
SAVED_BYTES_PER_PIXEL_CHECKPOINTED = {"sd1": 163_000, "sd2": 126_000, "sdxl": 80_000}
DEFAULT_SAVED_BYTES_PER_PIXEL_CHECKPOINTED = 163_000
# Flux.1 (full width): joint attention over image and text tokens grows with their square, so the bytes per training
# row are ``a * tokens + b * tokens**2`` (tokens = (latent / 2)**2 image patches + 512 text tokens), fitted to
# ``bench --arch flux``'s counts at 512 and 1024 px (33.9 and 245.9 GiB; 1.19 and 6.11 GiB checkpointed).
FLUX_SAVED_BYTES = (6_930_000, 10_932)
FLUX_SAVED_BYTES_CHECKPOINTED = (536_000, 193)
FLUX_TEXT_TOKENS = 512
FLUX_WIDTH_X_BLOCKS = 3072 * (19 + 38)  # Flux.1's hidden size x its double and single blocks
FRAMEWORK_BYTES = 1 << 30
GIB = 1 << 30


@dataclass
class MemoryEstimate:
    weights: int
    activations: int
    trained: int
    framework: int = FRAMEWORK_BYTES

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.trained + self.framework

    def describe(self) -> str:
        return (f"{self.total / GIB:.1f} GiB (weights {self.weights / GIB:.1f}, training activations "
                f"{self.activations / GIB:.1f}, trained deltas and optimizer {self.trained / GIB:.2f}, framework "
                f"{self.framework / GIB:.1f})")


def activation_bytes(family: str, latent_size: int, batch: int, dtype: torch.dtype,
                     checkpointing: bool = False, scale_of_model: float = 1.0) -> int:
    """What autograd saves for ``batch`` training rows; ``scale_of_model``: the model's width x depth over the
    measured one's (Flux models narrower or shallower than Flux.1, such as toy-flux)."""
    scale = torch.empty((), dtype=dtype).element_size() / 2
    if getattr(FAMILIES.get(family), "flow", False):  # Flux.1 and the toy-flux world
        tokens = (latent_size // 2) ** 2 + FLUX_TEXT_TOKENS
        linear, square = FLUX_SAVED_BYTES_CHECKPOINTED if checkpointing else FLUX_SAVED_BYTES
        return int((linear * tokens + square * tokens * tokens) * batch * scale * scale_of_model)
    if checkpointing:
        per_pixel = SAVED_BYTES_PER_PIXEL_CHECKPOINTED.get(family, DEFAULT_SAVED_BYTES_PER_PIXEL_CHECKPOINTED)
    else:
        per_pixel = SAVED_BYTES_PER_PIXEL.get(family, DEFAULT_SAVED_BYTES_PER_PIXEL)
    return int(per_pixel * latent_size * latent_size * batch * scale)


def estimate(family: str, latent_size: int, batch: int, dtype: torch.dtype, trained_parameters: int,
             weight_parameters: int = 0, checkpointing: bool = False, scale_of_model: float = 1.0) -> MemoryEstimate:
    """What a run needs beyond what is already loaded (``weight_parameters`` = 0 when the model is in memory)."""
    bytes_per = torch.empty((), dtype=dtype).element_size()
    return MemoryEstimate(weights=weight_parameters * bytes_per,
                          activations=activation_bytes(family, latent_size, batch, dtype, checkpointing,
                                                       scale_of_model),
                          trained=trained_parameters * 4 * 4)


def available_bytes(device: torch.device | str) -> int:
    """Free memory on ``device``: the CUDA allocator's free bytes, or the system's MemAvailable on a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as f:
            found = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# How each entry point names the settings a memory hint suggests ({batch}, {latent}, {pixels}: the run's own);
# a setting it does not offer is left out of its hints
CLI_SETTING_NAMES = {
    "lora": "--lora-rank 8", "checkpointing": "--gradient-checkpointing", "batch": "--batch-size, now {batch}",
    "latents": "smaller latents (--latent-size, now {latent})", "dtype": "bf16 weights (--dtype bf16)",
    "device": "a larger device, or --device cpu",
}


def check_fits(needed: MemoryEstimate, device: torch.device | str, batch: int, latent_size: int,
               dtype: torch.dtype, checkpointing: bool | None = None,
               names: dict[str, str | None] | None = None) -> None:
    """Raise ``OutOfMemoryError`` naming what to change when ``needed`` exceeds the free memory of ``device``, in
    the words of the entry point (``names``, default the command line's)."""
    free = available_bytes(device)
    if needed.total <= free:
        return
    named = {key: text.format(batch=batch, latent=latent_size, pixels=8 * latent_size) if text else None
             for key, text in {**CLI_SETTING_NAMES, **(names or {})}.items()}
    hints = []
    if needed.trained > GIB and named["lora"]:
        hints.append(f"low-rank deltas ({named['lora']}; full-rank deltas with their optimizer state take "
                     f"{needed.trained / GIB:.1f} GiB)")
    if checkpointing is False and needed.activations > GIB and named["checkpointing"]:
        hints.append(f"gradient checkpointing ({named['checkpointing']}; training activations take "
                     f"{needed.activations / GIB:.1f} GiB, about a third or less with it)")
    if batch > 1 and named["batch"]:
        hints.append(f"a smaller training batch ({named['batch']})")
    if latent_size > 16 and named["latents"]:
        hints.append(named["latents"])
    if torch.empty((), dtype=dtype).element_size() > 2 and named["dtype"]:
        hints.append(named["dtype"])
    if torch.device(device).type != "cpu" and named["device"]:
        hints.append(named["device"])
    raise OutOfMemoryError(f"this run needs about {needed.describe()}, but {torch.device(device)} has "
                           f"{free / GIB:.1f} GiB free; nothing was started. Try " + ", ".join(hints)
                           + " (or set ABLATION_SKIP_MEMORY_CHECK=1 to try anyway)")
