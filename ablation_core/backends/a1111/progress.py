"""One progress plan for a whole press of the tab's button: prompts, anchors, training, check (or the solve) and the
preview, declared before the first step, so A1111's bar moves once from 0 to 100 % and its ETA covers the whole run.

A1111 (and Forge) draw the bar and its ETA from ``shared.state``: ``sampling_step / sampling_steps`` of one job, and
``elapsed / fraction - elapsed`` since ``state.time_start``. The plan keeps that fraction in ``sampling_step`` (of
``SCALE``), never lets it go back, and writes the same ETA into the text, so the text's "left" and the bar's agree.

Each phase's share is its estimated cost in UNet passes of a 512 px SD1 image (``unet_pass``): the model's own
passes scale with the latent's area, a prompt's encoding and a closed-form layer's solve cost a fixed share. The
estimate only sets the shares; within a phase the run's own step counts move the bar.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...methods.progress import Progress

SCALE = 10000  # sampling_steps of the one job: the bar moves in hundredths of a percent
PROMPT_COST = 0.025  # one prompt through the text encoder, in 512 px UNet passes (CLIP-L: ~2 % of the UNet's work)
SOLVE_COST = 0.02  # one layer's closed-form solve
DECODE_COST = 2.0  # one VAE decode, in UNet passes at the same size
PHASE_TITLES = {"prompts": "Encoding prompts", "anchors": "Sampling anchor images", "train": "Training",
                "check": "Checking the effect", "solve": "Solving", "preview": "Drawing the before/after preview"}


def unet_pass(latent_size: int) -> float:
    """One UNet pass of one image at ``latent_size``, against one at 64 (512 px); small latents keep a floor (the
    deep blocks' weights are read whatever the size)."""
    return (latent_size / 64) ** 2 + 0.02


def preview_passes(steps: int) -> int:
    """UNet passes of the tab's preview: two prompts, before and after, with guidance (two passes a step)."""
    return 2 * 2 * 2 * max(int(steps), 1)


def preview_cost(steps: int, latent_size: int) -> float:
    return preview_passes(steps) * unet_pass(latent_size) + 4 * DECODE_COST * unet_pass(latent_size)


@dataclass
class Phase:
    offset: float
    units: float


class RunProgress:
    """Progress of one run into A1111's ``shared.state``. ``plan`` every phase first (in order, with its cost);
    then pass ``Progress`` reports. A phase nobody planned (a robust round's adversary) is added at the end."""

    def __init__(self, state: Any, clock: Callable[[], float] = time.time):
        self.state, self.clock = state, clock
        self.phases: dict[str, Phase] = {}
        self.total = 0.0
        self.fraction = 0.0
        start = getattr(state, "time_start", None)
        self.started = float(start) if isinstance(start, (int, float)) and start > 0 else clock()
        state.job_count, state.job_no = 1, 0
        state.sampling_steps, state.sampling_step = SCALE, 0

    def plan(self, phase: str, units: float) -> None:
        """Declare a phase (in order) and its cost in 512 px UNet passes."""
        self.phases[phase] = Phase(self.total, max(float(units), 1e-6))
        self.total += self.phases[phase].units

    def eta(self) -> float | None:
        """What A1111's bar shows: the time since the job began, stretched to the fraction done."""
        shown = int(getattr(self.state, "sampling_step", 0)) / SCALE  # the bar's own fraction
        if shown <= 0:
            return None
        elapsed = max(self.clock() - self.started, 0.0)
        return elapsed / shown - elapsed

    def __call__(self, progress: Progress) -> None:
        if progress.phase not in self.phases:
            self.plan(progress.phase, max(progress.total, 1))
        phase = self.phases[progress.phase]
        share = min(max(progress.step / progress.total, 0.0), 1.0) if progress.total > 0 else 1.0
        self.fraction = min(max(self.fraction, (phase.offset + share * phase.units) / self.total), 1.0)
        self.state.sampling_step = min(max(int(self.fraction * SCALE), int(getattr(self.state, "sampling_step", 0))),
                                       SCALE)
        title = PHASE_TITLES.get(progress.phase, progress.phase)
        text = f"{title}: {progress.step}/{progress.total}"
        if progress.loss is not None:
            text += f", loss {progress.loss:.4g}"
        text += f"; {self.fraction:.0%} of the run"
        eta = self.eta()
        if eta is not None and self.fraction < 1:
            text += f", {format_seconds(eta)} left"
        self.state.job = title
        self.state.textinfo = text


def format_seconds(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"
