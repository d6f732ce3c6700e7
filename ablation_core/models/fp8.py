"""fp8 base weights: a transformer's Linear weights stored in float8 (e4m3) and cast to the compute dtype one layer at a
time, as ComfyUI's ``fp8_e4m3fn`` weight dtype does. Flux.1's 12B weights take 11 GiB instead of 22: what lets a
trained ablation fit a 24 GB card.

Only the weights change storage; each module's ``forward`` is shadowed to run ``F.linear`` with its weight cast to
the input's dtype, so hooks on the module (the trainable adapters, the meters) see the same inputs and outputs as
before. Biases, norms and embeddings keep the compute dtype. The base weights never train, so rounding them once is
all fp8 costs (the trained deltas are float32 and apply on top).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8 = torch.float8_e4m3fn
FP8_NAMES = ("fp8", "fp8_e4m3fn")


def _cast_forward(module: nn.Linear):
    def forward(x: Tensor) -> Tensor:
        bias = module.bias.to(x.dtype) if module.bias is not None else None
        return F.linear(x, module.weight.to(x.dtype), bias)

    return forward


def store_fp8(root: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Store the weights of every ``nn.Linear`` under ``root`` whose name starts with one of ``prefixes`` in fp8
    (in place); returns how many were converted. The model must not be trained through these weights' gradients."""
    converted = 0
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear) or not name.startswith(prefixes) or module.weight.dtype == FP8:
            continue
        module.weight = nn.Parameter(module.weight.detach().to(FP8), requires_grad=False)
        module.forward = _cast_forward(module)
        converted += 1
    return converted


def is_fp8(tensor: Tensor) -> bool:
    return tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def cast_keeping_fp8(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``module.to(dtype)`` for every floating parameter and buffer except fp8 ones (``Module.to`` would widen them)."""
    return module._apply(lambda t: t if is_fp8(t) or not t.is_floating_point() else t.to(dtype))
