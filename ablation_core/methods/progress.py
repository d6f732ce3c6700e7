"""Progress reports and cancellation, shared by every method and every front end.

A method reports ``Progress`` through a callback and asks ``should_cancel()`` whether to stop. Between steps is not
often enough: one UNet pass of SD1.5 takes seconds on a CPU, so ``cancel_checks`` also asks inside the model's forward,
from a pre-hook on every linear and convolution layer, and inside the backward pass, from a gradient hook on each of
their outputs (at most every ``CHECK_INTERVAL_S``), and a cancel stops the run within about a second wherever it is.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from torch import Tensor, nn

from ..errors import AblationCancelled
from ..models.view import Conditioning, ModelView
from . import phases

CHECK_INTERVAL_S = 0.05
PULSE_INTERVAL_S = 1.0  # between two steps, a report at most this often (``Pacer``)
PULSE_CAP = 0.9  # the share of a step a pulse may claim before the step's own report comes
PULSE_KNEE = 0.75  # of the cap: past it a pulse slows down toward the cap, so an overrunning step still moves
# reports this close already move the bar often enough: pulses between them made ComfyUI's time left flicker (each
# came just before the next report, with a later clock and almost the same share)
PULSE_MIN_STEP_S = 2.0


@dataclass
class Progress:
    """What a progress bar shows: the phase, step of total, the loss and time left.

    Phases: "prompts" (encoding), "anchors" (sampling anchor images), "train", "check" (the held-out measure),
    "solve" (closed-form methods), "evaluate". ``within``: the steps done past ``step``, in a report sent while
    the next ones run (``Pacer``); bars that count whole steps ignore it.
    """

    phase: str
    step: int
    total: int
    loss: float | None = None
    eta_seconds: float | None = None
    within: float = 0.0


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

    def __init__(self, should_cancel: CancelFn | None, pulse: Callable[[], None] | None = None):
        self.should_cancel = should_cancel or never_cancel
        self.pulse = pulse  # called from inside the model's layers with each check (``Pacer.pulse``)
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
    """Check for cancel inside the forward and backward of ``modules`` (throttled), for the duration of the block;
    the canceller's ``pulse`` (progress between steps) is called from the same places."""
    if canceller.should_cancel is never_cancel and canceller.pulse is None:
        yield
        return
    last = time.monotonic()

    def check() -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= CHECK_INTERVAL_S:
            last = now
            canceller.check()
            if canceller.pulse is not None:
                canceller.pulse()

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


class Pacer:
    """A progress callback that also reports between a phase's steps. A step of SD1.5 or Flux takes tens of seconds
    on a CPU, and a bar that moves only when a step ends sits still that long: ``pulse`` (called from inside the
    model's layers, through ``Canceller.pulse``) sends the last report again, at most every ``PULSE_INTERVAL_S``,
    with ``within``: the steps done past ``step``, from the phase's own pace so far (the seconds a step and the
    steps a report moves), or, before the phase has timed a step, from the run's pace where the callback offers
    ``step_seconds(progress)`` (the front ends' plans do). ``within`` stays below ``PULSE_CAP`` of a report's steps
    (of the phase's, before its pace is known), so the next report moves the bar on; past ``PULSE_KNEE`` of that it
    slows down and creeps toward it (``eased``), so a step slower than its estimate never freezes the bar; the time
    left counts down.
    Nothing is sent after a phase's last step, nor where its reports come at least every ``PULSE_MIN_STEP_S``."""

    def __init__(self, report: ProgressFn, clock: Callable[[], float] = time.monotonic):
        self.report = report
        self.clock = clock
        self.step_seconds: Callable[[Progress], float | None] | None = getattr(report, "step_seconds", None)
        self.last: Progress | None = None
        self.last_at = self.first_at = self.sent_at = 0.0
        self.first_step = self.reports = 0  # the phase's first step reported, and the reports since

    def __call__(self, progress: Progress) -> None:
        if progress.within > 0:  # a pulse from a run inside this one: pass it on
            self.report(progress)
            return
        now = self.clock()
        last = self.last
        if last is None or last.phase != progress.phase or progress.step < last.step or last.total != progress.total:
            self.first_at, self.first_step, self.reports = now, progress.step, 0
        else:
            self.reports += 1
        self.last, self.last_at, self.sent_at = progress, now, now
        self.report(progress)

    def _pace(self, last: Progress) -> tuple[float, float] | None:
        """(seconds a step, the most steps a pulse may add): the phase's own pace, up to ``PULSE_CAP`` of the steps
        a report moves; before the phase has timed any, the run's guess of a step, up to ``PULSE_CAP`` of what is
        left of the phase (its first report may cover many steps: the check's first came 25 evaluations in)."""
        if self.reports and last.step > self.first_step:
            steps = last.step - self.first_step
            per_step, stride = (self.last_at - self.first_at) / steps, steps / self.reports
            return None if per_step * stride < PULSE_MIN_STEP_S else (per_step, PULSE_CAP * stride)
        seconds = self.step_seconds(last) if self.step_seconds is not None else None
        return (seconds, PULSE_CAP * (last.total - last.step)) if seconds else None

    def pulse(self) -> None:
        last, now = self.last, self.clock()
        if last is None or last.step >= last.total or now - self.sent_at < PULSE_INTERVAL_S:
            return
        pace = self._pace(last)
        if pace is None:
            return
        (per_step, most), waited = pace, now - self.last_at
        eta = max(last.eta_seconds - waited, 0.0) if last.eta_seconds is not None else None
        self.sent_at = now
        self.report(replace(last, within=eased(waited / per_step, most), eta_seconds=eta))


def eased(steps: float, most: float) -> float:
    """``steps`` up to ``PULSE_KNEE * most``, then ever slower toward ``most`` (never reaching it): continuous, with
    the same slope at the knee."""
    if most <= 0:
        return 0.0
    knee = PULSE_KNEE * most
    if steps <= knee:
        return steps
    room = most - knee
    return knee + room * (1 - math.exp(-(steps - knee) / room))


def paced(on_progress: ProgressFn | None, should_cancel: CancelFn | None) -> tuple[ProgressFn, Canceller]:
    """The report and canceller of a run that draws models: ``on_progress`` through a ``Pacer`` whose pulses come
    from the canceller's checks (inside ``cancel_checks``). Without ``on_progress``, no pulses."""
    if on_progress is None:
        return no_progress, Canceller(should_cancel)
    pacer = Pacer(on_progress)
    return pacer, Canceller(should_cancel, pacer.pulse)


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
