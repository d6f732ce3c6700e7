"""Cost of a UNet call without running it: FLOPs and saved activations, counted on a weightless (meta) copy.

A copy of the UNet on PyTorch's ``meta`` device has every shape and no data, so a full-size SDXL forward and
backward are "run" in milliseconds: ``torch.utils.flop_counter`` counts the FLOPs of each operator from the shapes,
and a saved-tensor hook adds up what autograd would keep for the backward pass. The benchmark uses this to put a
FLOP count on every UNet call it counted, and the memory check to know what training needs before it starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def meta_copy(unet: nn.Module) -> nn.Module | None:
    """A weightless twin of a diffusers UNet or transformers text encoder (built from its config on the meta
    device), or None for other modules (then there is nothing to build it from)."""
    config = getattr(unet, "config", None)
    if config is None:
        return None
    with torch.device("meta"):
        if hasattr(type(unet), "_from_config"):  # transformers (the text encoders)
            twin = type(unet)._from_config(config)
        elif hasattr(type(unet), "from_config"):  # diffusers
            twin = type(unet).from_config(dict(config))
        else:
            return None
    dtype = next(unet.parameters()).dtype
    return twin.to(dtype).eval().requires_grad_(False)


def to_meta(value: object) -> object:
    """Tensors (also inside dicts, lists and tuples) replaced by meta tensors of the same shape and dtype."""
    if isinstance(value, Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_meta(v) for v in value)
    return value


def _first_tensor(out: object) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def call_cost(twin: nn.Module, args: tuple, kwargs: dict, trained: Iterable[str] = (),
              grad: bool = False) -> dict[str, int]:
    """FLOPs of one call of ``twin`` with these (meta) arguments, and the bytes autograd saves for its backward.

    With ``grad`` the call is a training pass: the weights named in ``trained`` require gradients, the output is
    back-propagated (FLOPs of forward + backward), and ``saved_bytes`` is what the forward kept for it.
    ``saved_bytes_checkpointed`` is what it would keep with the transformer blocks checkpointed
    (``models.checkpointing``): everything saved outside the blocks, each block's inputs, and the inner activations of
    the largest block, which are alive while that block is recomputed in the backward pass."""
    from .checkpointing import transformer_blocks

    names = set(trained)
    params = [p for n, p in twin.named_parameters() if n in names]
    weights = {id(p) for p in twin.parameters()}
    saved = 0
    per_block: list[int] = []
    block_inputs = 0
    inside: list[int] = []

    def pack(tensor: Tensor) -> Tensor:
        nonlocal saved
        if id(tensor) not in weights and id(tensor._base) not in weights:  # weights are kept anyway, not extra
            size = tensor.numel() * tensor.element_size()
            saved += size
            if inside:
                per_block[inside[-1]] += size
        return tensor

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        nonlocal block_inputs
        inside.append(len(per_block))
        per_block.append(0)
        block_inputs += sum(a.numel() * a.element_size() for a in args if isinstance(a, Tensor))

    def leave(module: nn.Module, args: tuple, out: object) -> None:
        inside.pop()

    handles = []
    if grad:
        for block in transformer_blocks(twin):
            handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(block.register_forward_hook(leave))
    counter = FlopCounterMode(display=False)
    try:
        for p in params:
            p.requires_grad_(grad)
        with counter, torch.set_grad_enabled(grad):
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if grad else contextlib.nullcontext()
            with hooks:
                out = _first_tensor(twin(*args, **kwargs))
            if grad and out.requires_grad:
                out.float().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    checkpointed = saved - sum(per_block) + block_inputs + max(per_block, default=0)
    return {"flops": int(counter.get_total_flops()), "saved_bytes": int(saved),
            "saved_bytes_checkpointed": int(checkpointed)}


def parameter_names(unet: nn.Module, modules: Iterable[nn.Module]) -> list[str]:
    """The names (in ``unet``) of the weights of ``modules``: what a training pass differentiates."""
    wanted = {id(m) for m in modules}
    return [f"{name}.weight" if name else "weight" for name, module in unet.named_modules() if id(module) in wanted]
