"""Trainable weight changes attached to a frozen model with forward hooks, never touching its weights.

Each adapter adds ``delta(input)`` to its module's output: a full-rank delta of the weight's shape, or a LoRA pair.
The model's own weights stay as they were (ComfyUI's may be inference tensors, fp8, or shared with other graphs),
switching adapters off gives the frozen model back for the anchor branch, and removing the hooks restores it
exactly, whatever happens during training.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.layers import Layer
from ...patches.apply import resolve


def rows_mask(layer: Layer, row_mask: Tensor | None) -> Tensor | None:
    """Which output rows of the layer's weight may change (1) and which stay (0): the given mask, the layer's own
    ``rows`` (a fused projection's K and V), both, or None for every row."""
    if layer.rows is None:
        return row_mask
    start, stop = layer.rows
    mask = torch.zeros(layer.weight.shape[0])
    mask[start:stop] = 1.0
    return mask if row_mask is None else mask * row_mask.to(mask.device)


class DeltaAdapter(nn.Module):
    """A trainable change of one layer's weight: full rank (``rank == 0``) or LoRA of ``rank``. Rows outside the
    mask start at zero and get no gradient, so they stay zero."""

    def __init__(self, layer: Layer, rank: int = 0, row_mask: Tensor | None = None):
        super().__init__()
        self.layer, self.rank = layer, rank
        weight = layer.weight
        shape, device = tuple(weight.shape), weight.device
        self.enabled = True
        row_mask = rows_mask(layer, row_mask)
        if rank == 0:
            self.delta = nn.Parameter(torch.zeros(shape, device=device, dtype=torch.float32))
            rows_changed = self.delta
        else:
            fan_in = math.prod(shape[1:])
            down_shape = (rank, *shape[1:]) if layer.kind == "conv" else (rank, fan_in)
            self.down = nn.Parameter(torch.randn(down_shape, device=device) / math.sqrt(fan_in))
            self.up = nn.Parameter(torch.zeros(shape[0], rank, *([1, 1] if layer.kind == "conv" else []),
                                               device=device))
            rows_changed = self.up
        if row_mask is not None:
            mask = row_mask.to(device=device, dtype=torch.float32).view(-1, *([1] * (rows_changed.dim() - 1)))
            rows_changed.register_hook(lambda grad: grad * mask)

    def weight_delta(self) -> Tensor:
        """The dense change of the weight this adapter makes (what a patch stores)."""
        if self.rank == 0:
            return self.delta
        up = self.up.flatten(1)
        return (up @ self.down.flatten(1)).view(self.layer.weight.shape)

    def extra_output(self, inputs: Tensor) -> Tensor:
        module, dtype = self.layer.module, inputs.dtype
        if self.layer.kind == "embedding":
            return F.embedding(inputs, self.weight_delta().to(dtype=module.weight.dtype))
        if self.layer.kind == "linear":
            if self.rank == 0:
                return F.linear(inputs, self.delta.to(dtype))
            return F.linear(F.linear(inputs, self.down.to(dtype)), self.up.to(dtype))
        conv = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
        if self.rank == 0:
            return F.conv2d(inputs, self.delta.to(dtype), **conv)
        hidden = F.conv2d(inputs, self.down.to(dtype), **conv)
        return F.conv2d(hidden, self.up.to(dtype))

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not self.enabled:
            return output
        return output + self.extra_output(args[0]).to(output.dtype)


class AdapterSet(nn.Module):
    """All adapters of one run, attached for the duration of a ``with`` block."""

    def __init__(self, layers: list[Layer], rank: int = 0, row_masks: dict[str, Tensor] | None = None):
        super().__init__()
        row_masks = row_masks or {}
        self.adapters = nn.ModuleList(DeltaAdapter(layer, rank, row_masks.get(layer.key)) for layer in layers)

    @contextlib.contextmanager
    def attached(self) -> Iterator[AdapterSet]:
        handles = [a.layer.module.register_forward_hook(a.hook) for a in self.adapters]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        for adapter in self.adapters:
            adapter.enabled = False
        try:
            yield
        finally:
            for adapter in self.adapters:
                adapter.enabled = True

    @classmethod
    def fixed(cls, changes: list[tuple[Layer, Tensor]]) -> AdapterSet:
        """Frozen adapters holding given weight changes (an earlier patch the new run builds on)."""
        adapters = cls([layer for layer, _ in changes])
        with torch.no_grad():
            for adapter, (_, delta) in zip(adapters.adapters, changes):
                adapter.delta.copy_(delta)
        return adapters.requires_grad_(False)

    @classmethod
    def of_patch(cls, view, patch) -> AdapterSet:
        """Frozen adapters holding ``patch``'s changes: the patch applied through hooks, the weights untouched (for
        weights that must not change in place, such as ComfyUI's inference tensors)."""
        layers = view.all_layers()
        return cls.fixed([(layers[key], dense) for key, (_, dense) in resolve(patch, view).items()])

    def weight_deltas(self) -> dict[str, Tensor]:
        with torch.no_grad():
            return {a.layer.key: a.weight_delta().detach().float().cpu().clone() for a in self.adapters}
