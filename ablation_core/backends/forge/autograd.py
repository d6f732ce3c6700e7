"""Two things Forge's UNet does that autograd refuses, and the least invasive way through each while a run trains.

- Its weights are inference tensors (Forge loads under ``torch.inference_mode()``): a pass with gradients that saves
  one for backward fails ("Inference tensors cannot be saved for backward"). As ComfyUI's backend does with its weight
  wrappers, each module runs on copies of its weights while gradients flow (a forward pre-hook swaps them in, a
  forward hook puts the module's own parameters back); passes without gradients use the weights as they are.
- ``BasicTransformerBlock`` adds residuals in place (``x += n``) after ``norm1`` / ``norm2`` saved ``x``, which
  breaks backward ("modified by an inplace operation"). While gradients flow, those norms read a copy of ``x``.

Both are hooks, removed when the block ends however it ends; the module's own parameter objects are back in place
then, so the loaded model is exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

NORMS_BEFORE_IN_PLACE_ADDS = ("norm1", "norm2")


def _inference_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in module._parameters.items() if p is not None and p.is_inference()}


@contextlib.contextmanager
def copied_inference_weights(root: nn.Module) -> Iterator[int]:
    """Every module under ``root`` holding inference-tensor parameters runs on copies of them during passes with
    gradients; yields how many modules are hooked."""
    owners = [m for m in root.modules() if _inference_parameters(m)]
    swapped: dict[nn.Module, dict[str, nn.Parameter]] = {}

    def restore(module: nn.Module) -> None:
        for name, parameter in swapped.pop(module, {}).items():
            module._parameters[name] = parameter

    def swap_in(module: nn.Module, args: tuple) -> None:
        if not torch.is_grad_enabled() or module in swapped:
            return
        originals = _inference_parameters(module)
        swapped[module] = originals
        for name, parameter in originals.items():
            module._parameters[name] = nn.Parameter(parameter.clone(), requires_grad=False)

    def swap_out(module: nn.Module, args: tuple, output: object) -> None:
        restore(module)

    handles = [h for m in owners for h in (m.register_forward_pre_hook(swap_in), m.register_forward_hook(swap_out))]
    try:
        yield len(owners)
    finally:
        for handle in handles:
            handle.remove()
        for module in list(swapped):  # a forward that raised (an Interrupt inside it) left its copies in place
            restore(module)


@contextlib.contextmanager
def out_of_place_residuals(blocks: list[nn.Module]) -> Iterator[int]:
    """The norms whose input a block then adds to in place read a copy of it while gradients flow."""
    def copy_input(module: nn.Module, args: tuple) -> tuple | None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return None
        return (args[0].clone(), *args[1:])

    norms = [getattr(b, name) for b in blocks for name in NORMS_BEFORE_IN_PLACE_ADDS
             if isinstance(getattr(b, name, None), nn.Module)]
    handles = [norm.register_forward_pre_hook(copy_input) for norm in norms]
    try:
        yield len(norms)
    finally:
        for handle in handles:
            handle.remove()
