"""One progress plan for a whole press of the tab's button (``methods.run_plan``), drawn in A1111's (and Forge's)
``shared.state``: their bar and ETA come from ``sampling_step / sampling_steps`` of one job and
``elapsed / fraction - elapsed`` since ``state.time_start``. The plan's fraction goes into ``sampling_step`` (of
``SCALE``), never back, and the same ETA into the text, so the text's "left" and the bar's agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ...methods.progress import Progress
from ...methods.run_plan import (  # noqa: F401  (the tab's flows and older callers import them from here)
    DECODE_COST,
    PROMPT_COST,
    SCALE,
    SOLVE_COST,
    RunPlan,
    format_seconds,
    preview_cost,
    preview_passes,
    title,
    unet_pass,
)


class RunProgress:
    """Progress of one run into A1111's ``shared.state``. ``plan`` every phase first (in order, with its cost);
    then pass ``Progress`` reports. A phase nobody planned (a robust round's adversary) is added at the end."""

    def __init__(self, state: Any, clock: Callable[[], float] = time.time):
        self.state = state
        start = getattr(state, "time_start", None)
        self.run = RunPlan(clock, float(start) if isinstance(start, (int, float)) and start > 0 else None)
        state.job_count, state.job_no = 1, 0
        state.sampling_steps, state.sampling_step = SCALE, 0

    @property
    def fraction(self) -> float:
        return self.run.fraction

    def plan(self, phase: str, units: float) -> str:
        """Declare a phase (in order) and its cost in 512 px UNet passes."""
        return self.run.plan(phase, units)

    def step_seconds(self, progress: Progress) -> float | None:
        """One step of ``progress``'s phase at the run's pace so far (``methods.progress.Pacer``)."""
        return self.run.step_seconds(progress)

    def eta(self) -> float | None:
        """What A1111's bar shows: the time since the job began, stretched to the fraction done."""
        return self.run.eta(int(getattr(self.state, "sampling_step", 0)) / SCALE)  # the bar's own fraction

    def __call__(self, progress: Progress) -> None:
        fraction = self.run.advance(progress)
        if fraction <= 0:  # a phase's "0 done" before anything is: A1111's own text says the job began
            return
        self.state.sampling_step = min(max(int(fraction * SCALE), int(getattr(self.state, "sampling_step", 0))),
                                       SCALE)
        shown = title(self.run.current or progress.phase)
        text = f"{shown}: {progress.step}/{progress.total}"
        if progress.loss is not None:
            text += f", loss {progress.loss:.4g}"
        text += f"; {fraction:.0%} of the run"
        eta = self.eta()
        if eta is not None and fraction < 1:
            text += f", {format_seconds(eta)} left"
        self.state.job = shown
        self.state.textinfo = text
