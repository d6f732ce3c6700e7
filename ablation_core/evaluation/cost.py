"""What a run costs, phase by phase: seconds, UNet evaluations, FLOPs and peak memory. For ``bench``.

- Evaluations are counted, not computed: a forward pre-hook on the UNet adds the batch rows of every call (one row =
  one evaluation of one latent; a guided sampler step of 16 images is 32), and the same for each text encoder.
- FLOPs: every distinct call (phase, shapes, with or without gradients) is replayed once on a weightless copy of the
  module (``models.meta``) under ``torch.utils.flop_counter`` (a training call with its backward pass, gradients for
  the trained weights only) and multiplied by the number of such calls counted. Work outside the UNet and the text
  encoders (the adapters' small extra matmuls, the solver's arithmetic, the patch's SVD) is not in the figure.
- Peak memory per phase: the CUDA allocator's peak on a GPU; on a CPU the resident-set high-water mark (VmHWM),
  reset at the start of each phase through ``/proc/self/clear_refs`` (Linux; elsewhere the process's peak so far).
"""

from __future__ import annotations

import contextlib
import re
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods.phases import listening
from ..models.meta import call_cost, meta_copy, parameter_names, to_meta

PHASE_NAMES = {"starting": "setup", "encoding prompts": "prompt_encoding", "sampling anchor images": "anchor_sampling",
               "training": "training", "checking the result": "check", "building the patch": "patch_extraction"}


@dataclass
class Signature:
    module: str
    grad: bool
    calls: int
    rows: int
    args: tuple
    kwargs: dict


@dataclass
class PhaseCost:
    name: str
    seconds: float = 0.0
    unet_evaluations: int = 0
    unet_calls: int = 0
    text_encoder_prompts: int = 0
    peak_memory_bytes: int = 0
    flops: int = 0
    signatures: dict[tuple, Signature] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {"seconds": round(self.seconds, 4), "unet_evaluations": self.unet_evaluations,
                "unet_calls": self.unet_calls, "text_encoder_prompts": self.text_encoder_prompts,
                "flops": self.flops, "peak_memory_bytes": self.peak_memory_bytes}


def _rows(args: tuple, kwargs: dict) -> tuple[int, tuple]:
    first = args[0] if args else next(iter(kwargs.values()))
    return int(first.shape[0]), tuple(first.shape)


class _Memory:
    """Peak memory since the last ``reset`` on one device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        with contextlib.suppress(OSError):
            with open("/proc/self/status") as f:
                found = re.search(r"VmHWM:\s+(\d+) kB", f.read())
            if found:
                return int(found.group(1)) * 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class RunMeter:
    """Counts a run's UNet and text-encoder calls per phase (phases come from ``methods.phases``)."""

    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], device: torch.device | str):
        self.modules = {"unet": unet, **{f"text_encoder_{i}": m for i, m in enumerate(text_encoders)}}
        self.memory = _Memory(torch.device(device))
        self.phases: dict[str, PhaseCost] = {}
        self.current: PhaseCost | None = None
        self.started = 0.0
        self._twins: dict[str, nn.Module | None] = {}

    def enter(self, phase: str) -> None:
        """Close the current phase and open ``phase`` (names as ``Canceller.phase`` sets them, or our own)."""
        self.close()
        name = PHASE_NAMES.get(phase, phase)
        self.current = self.phases.setdefault(name, PhaseCost(name))
        self.memory.reset()
        self.started = time.perf_counter()

    def close(self) -> None:
        if self.current is None:
            return
        if self.memory.cuda:
            torch.cuda.synchronize(self.memory.device)
        self.current.seconds += time.perf_counter() - self.started
        self.current.peak_memory_bytes = max(self.current.peak_memory_bytes, self.memory.peak())
        self.current = None

    def _hook(self, module_name: str):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self.current is None:
                return
            rows, shape = _rows(args, kwargs)
            grad = torch.is_grad_enabled()
            if module_name == "unet":
                self.current.unet_evaluations += rows
                self.current.unet_calls += 1
            else:
                self.current.text_encoder_prompts += rows
            key = (module_name, grad, shape, tuple(sorted(kwargs)))
            found = self.current.signatures.get(key)
            if found is None:
                self.current.signatures[key] = Signature(module_name, grad, 1, rows, to_meta(args), to_meta(kwargs))
            else:
                found.calls += 1
        return pre_hook

    @contextlib.contextmanager
    def measuring(self) -> Iterator[RunMeter]:
        handles = [m.register_forward_pre_hook(self._hook(name), with_kwargs=True) for name, m in self.modules.items()]
        try:
            with listening(self.enter):
                yield self
        finally:
            self.close()
            for handle in handles:
                handle.remove()

    def twin(self, name: str) -> nn.Module | None:
        """The weightless copy of module ``name`` (built once)."""
        if name not in self._twins:
            self._twins[name] = meta_copy(self.modules[name])
        return self._twins[name]

    def count_flops(self, trained_modules: list[nn.Module]) -> dict[tuple, int]:
        """Fill each phase's ``flops`` (see the module docstring); returns the FLOPs per call of each signature."""
        per_call: dict[tuple, int] = {}
        unet_trained = parameter_names(self.modules["unet"], trained_modules)
        for phase in self.phases.values():
            phase.flops = 0
            for key, sig in phase.signatures.items():
                if key not in per_call:
                    twin = self.twin(sig.module)
                    trained = unet_trained if sig.module == "unet" else []
                    per_call[key] = call_cost(twin, sig.args, sig.kwargs, trained, sig.grad)["flops"] if twin else 0
                phase.flops += per_call[key] * sig.calls
        return per_call

    def report(self) -> dict[str, dict[str, object]]:
        return {name: phase.as_json() for name, phase in self.phases.items()}
