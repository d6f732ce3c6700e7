"""Memory options for small cards: gradient checkpointing of the UNet's transformer blocks, text encoders set aside.

Both act on a loaded model for the length of a ``with`` block and leave it exactly as it was, whatever happens
inside (the adapters are hooks, so the model's own modules are never replaced, only their ``forward`` shadowed).

- ``checkpointed(blocks)``: each block keeps only its inputs during a pass with gradients and recomputes its inner
  activations (attention maps, feed-forward hiddens) in the backward pass: about one more forward pass of compute
  for most of the activation memory. Passes without gradients (anchor sampling, frozen predictions) are unchanged.
- ``set_aside(modules, device)``: the text encoders wait on the CPU while the UNet trains (they are needed again
  for the held-out check), which frees their GPU memory (CLIP-L 0.25 GB, SDXL's two 1.6 GB in fp16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# The classes every host names its transformer blocks with: diffusers, ComfyUI (comfy.ldm), A1111 (ldm, sgm); Flux
# (BFL, ComfyUI comfy.ldm.flux, this package) its double and single stream blocks.
TRANSFORMER_BLOCK_NAMES = ("BasicTransformerBlock", "DoubleStreamBlock", "SingleStreamBlock")


def transformer_blocks(unet: nn.Module) -> list[nn.Module]:
    """The UNet's transformer blocks (self-attention, cross-attention, feed-forward), outermost first."""
    return [m for m in unet.modules() if type(m).__name__ in TRANSFORMER_BLOCK_NAMES]


def _on_a_copy(forward, x, *args, **kwargs):
    """The block on a copy of its input: a block that adds to its input in place (Forge's ``x += n``) would
    otherwise change what the recompute starts from, and autograd refuses the changed tensor."""
    return forward(x.clone() if isinstance(x, torch.Tensor) else x, *args, **kwargs)


@contextlib.contextmanager
def checkpointed(blocks: list[nn.Module]) -> Iterator[int]:
    """Gradient checkpointing of ``blocks`` inside the block; yields how many blocks are checkpointed."""
    shadowed = []
    for block in blocks:
        if "forward" in vars(block):  # already shadowed by someone else: leave it alone
            continue
        forward = block.forward

        def run(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_on_a_copy, _forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        block.forward = run
        shadowed.append(block)
    try:
        yield len(shadowed)
    finally:
        for block in shadowed:
            del block.forward


@contextlib.contextmanager
def set_aside(modules: list[nn.Module], device: torch.device | str) -> Iterator[None]:
    """Move ``modules`` to the CPU inside the block and back to ``device`` after it (a no-op on a CPU run)."""
    device = torch.device(device)
    if device.type == "cpu":
        yield
        return
    for module in modules:
        module.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        for module in modules:
            module.to(device)
