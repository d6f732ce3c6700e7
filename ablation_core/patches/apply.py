"""Applying a patch to a model view: match keys to weights, check shapes and the base-model fingerprint, apply.

Everything that can fail is checked before the first weight changes, and a failure while changing them (a sum that
overflows the weights' dtype shows only then) puts back what was already changed, so a model is never left
half-patched.
"""

from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PatchError, PatchMismatchError, quoted
from ..models.fp8 import is_fp8
from ..models.view import ModelView
from .patch import AblationPatch, LayerDelta, fingerprint

log = logging.getLogger(__name__)


def _expected_shape_error(delta: LayerDelta, shape: tuple[int, ...]) -> str | None:
    """Why ``delta`` cannot change a weight of ``shape``, or None when it fits."""
    if delta.diff is not None:
        return None if tuple(delta.diff.shape) == shape else f"has shape {tuple(delta.diff.shape)}"
    up, down = delta.up, delta.down
    fan_in = math.prod(shape[1:])
    if up.shape[0] != shape[0] or down.flatten(1).shape[1] != fan_in:
        return f"has LoRA up {tuple(up.shape)} / down {tuple(down.shape)}"
    return None


def resolve(patch: AblationPatch, view: ModelView) -> dict[str, tuple[nn.Module, Tensor]]:
    """Match every patch key to a model weight and check shapes; raise naming what does not fit."""
    layers = view.all_layers()
    unknown = [k for k in patch.deltas if k not in layers]
    if unknown:
        raise PatchError(f"{len(unknown)} patch key(s) match no layer of this {view.family.title} model (e.g. "
                         f"{quoted(unknown[0])}); the patch was made for another architecture")
    resolved: dict[str, tuple[nn.Module, Tensor]] = {}
    seen: dict[int, str] = {}
    for key, delta in patch.deltas.items():
        layer = layers[key]
        if id(layer.module) in seen:
            raise PatchError(f"patch keys {quoted(seen[id(layer.module)])} and {quoted(key)} name the same layer; "
                             "the file holds it twice")
        seen[id(layer.module)] = key
        shape = tuple(layer.weight.shape)
        problem = _expected_shape_error(delta, shape)
        if problem:
            raise PatchError(f"patch layer {quoted(key)} {problem} but the model's weight is {shape}; the patch was "
                             "made for another model size")
        dense = delta.full(shape)
        if not torch.isfinite(dense).all():  # finite factors, but their product (times alpha) overflows
            raise PatchError(f"patch layer {quoted(key)} has values too large to compute (its LoRA factors times "
                             "alpha overflow float32); the file is damaged")
        resolved[key] = (layer.module, dense)
    return resolved


def check_fingerprint(patch: AblationPatch, view: ModelView, strict: bool = False) -> bool:
    """True when the model's weights are the ones the patch was made from. Warns, or raises if ``strict``."""
    expected = patch.base_fingerprint
    if not expected:
        return True
    if not re.fullmatch(r"[0-9a-f]{16}", expected):
        log.warning("the patch's base-model fingerprint %r is malformed; it cannot be checked", expected[:40])
        return False
    layers = view.all_layers()
    actual = fingerprint({k: layers[k].weight for k in patch.deltas if k in layers})
    if actual == expected:
        return True
    message = (f"this patch was made for another base model (fingerprint {expected}, this model {actual}); "
               "it may not remove the concept here")
    if strict:
        raise PatchMismatchError(message)
    log.warning(message)
    return False


class AppliedPatch:
    """Weights changed in place by ``apply_patch``; ``remove()`` puts the exact originals back."""

    def __init__(self, originals: dict[str, tuple[nn.Module, Tensor]]):
        self._originals = originals
        self._hooks: list = []

    def add_on_top(self, module: nn.Module, dense: Tensor) -> None:
        """A change applied as a forward hook (``output + x @ dense.T``), for fp8 weights: rounding a small delta
        into them would lose most of it."""
        self._hooks.append(module.register_forward_hook(
            lambda _m, args, out: out + F.linear(args[0], dense.to(args[0].device, args[0].dtype)).to(out.dtype)))

    def remove(self) -> None:
        with torch.no_grad():
            for module, original in self._originals.values():
                module.weight.copy_(original)
        for hook in self._hooks:
            hook.remove()
        self._originals, self._hooks = {}, []

    def __enter__(self) -> AppliedPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_patch(view: ModelView, patch: AblationPatch, strength: float = 1.0, strict: bool = False) -> AppliedPatch:
    """Add ``strength`` x the patch to the model's weights in place; ``remove()`` (or ``with``) undoes it exactly."""
    if not math.isfinite(strength):
        raise PatchError(f"the strength must be a finite number, not {strength}")
    resolved = resolve(patch, view)
    check_fingerprint(patch, view, strict)
    applied = AppliedPatch({})
    try:
        with torch.no_grad():
            for key, (module, dense) in resolved.items():
                if is_fp8(module.weight) and isinstance(module, nn.Linear):
                    applied.add_on_top(module, (dense * strength).float())
                    continue
                original = module.weight.detach().clone()
                applied._originals[key] = (module, original)
                module.weight.add_((dense * strength).to(module.weight.device, module.weight.dtype))
                if not torch.isfinite(module.weight).all() and torch.isfinite(original).all():
                    raise PatchError(f"patch layer {quoted(key)} at strength {strength:g} would make the model's "
                                     f"{str(original.dtype).removeprefix('torch.')} weights overflow; use a smaller "
                                     "strength")
    except BaseException:
        applied.remove()
        raise
    return applied
