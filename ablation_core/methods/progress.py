"""Progress reports and cancellation, shared by every method and every front end.

A method reports ``Progress`` through a callback and asks ``should_cancel()`` whether to stop. Between steps is not
often enough: one UNet pass of SD1.5 takes seconds on a CPU, so ``cancel_checks`` also asks inside the model's forward,
from a pre-hook on every linear and convolution layer, and inside the backward pass, from a gradient hook on each of
their outputs (at most every ``CHECK_INTERVAL_S``), and a cancel stops the run within about a second wherever it is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from ..errors import AblationCancelled
from ..models.view import Conditioning, ModelView
from . import phases

CHECK_INTERVAL_S = 0.05


@dataclass
class Progress:
    """What a progress bar shows: the phase, step of total, the loss and time left.

    Phases: "prompts" (encoding), "anchors" (sampling anchor images), "train", "check" (the held-out measure),
    "solve" (closed-form methods), "evaluate".
    """

    phase: str
    step: int
    total: int
    loss: float | None = None
    eta_seconds: float | None = None


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def no_progress(progress: Progress) -> None:
    """The progress callback used when the caller passes none."""


def never_cancel() -> bool:
    return False


class Canceller:
    """Turns ``should_cancel()`` into ``AblationCancelled`` naming the phase the run was in.

    Setting ``phase`` also tells the listeners of ``methods.phases`` (the benchmark's meters), so the run needs no
    second set of phase markers."""

    def __init__(self, should_cancel: CancelFn | None):
        self.should_cancel = should_cancel or never_cancel
        self.phase = "starting"

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        self._phase = name
        phases.announce(name)

    def check(self) -> None:
        if self.should_cancel():
            raise AblationCancelled(f"cancelled while {self.phase}; nothing was written and the model is unchanged")


@contextlib.contextmanager
def cancel_checks(modules: Iterable[nn.Module], canceller: Canceller) -> Iterator[None]:
    """Check for cancel inside the forward and backward of ``modules`` (throttled), for the duration of the block."""
    if canceller.should_cancel is never_cancel:
        yield
        return
    last = time.monotonic()

    def check() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= CHECK_INTERVAL_S:
            last = now
            canceller.check()

    def pre_hook(module: nn.Module, args: tuple) -> None:
        check()

    def gradient_hook(grad: Tensor) -> None:
        check()

    def post_hook(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, Tensor) and output.requires_grad:  # the backward pass reaches this layer's output
            output.register_hook(gradient_hook)

    modules = list(modules)
    handles = [module.register_forward_pre_hook(pre_hook) for module in modules]
    handles += [module.register_forward_hook(post_hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class EncodeCount:
    """Prompts through the text encoder out of a phase's ``total`` when the phase spans several lists (a closed
    form's probes, pairs and preserved prompts): ``add`` reports (phase, done, total) in prompts encoded."""

    report: ProgressFn
    canceller: Canceller
    total: int
    phase: str = "prompts"
    done: int = 0

    def add(self, count: int) -> None:
        self.done += count
        self.report(Progress(self.phase, min(self.done, self.total), max(self.total, 1)))


def encode_counted(view: ModelView, prompts: list[str], count: EncodeCount) -> Conditioning:
    """``view.encode(prompts)`` in steps of ``view.encode_step`` prompts, adding each step to ``count`` and checking
    cancel between steps."""
    parts, step = [], view.encode_step
    for start in range(0, len(prompts), step):
        count.canceller.check()
        parts.append(view.encode(prompts[start:start + step]))
        count.add(len(prompts[start:start + step]))
    return Conditioning.cat(parts)


def encode_with_progress(view: ModelView, prompts: list[str], report: ProgressFn, canceller: Canceller,
                         phase: str = "prompts") -> Conditioning:
    """``encode_counted`` for one list: reports (phase, done, len(prompts)) from 0."""
    count = EncodeCount(report, canceller, len(prompts), phase)
    count.add(0)
    return encode_counted(view, prompts, count)
