"""One progress plan per node execution (``methods.run_plan``), drawn by ComfyUI's own bar and, as websocket events,
by the web extension (the loss chart of Ablate Concept, the status line of the other nodes).

The bar is made when the node starts, with one fixed total (``SCALE``), and moves only forward: every phase of the
node (prompts, anchor images, training, the check, the solve, fusing, compressing, writing, a robust run's rounds)
is planned first with its cost, so ComfyUI's bar and queue show the whole run from its first prompts. Each event
carries the phase's own step of total and loss, the run's ``fraction`` done and ``eta``: seconds left of the whole
node, from the plan; ``within`` > 0 marks a report sent while a step runs (``methods.progress.Pacer``), which moves the
bar and the time left but adds no point to the loss curve.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ...methods.progress import Progress
from ...methods.run_plan import SCALE, RunPlan, title

PROGRESS_EVENT = "concept_ablation.progress"


def send_event(data: dict) -> None:
    """A websocket event to the web extension (nothing outside a ComfyUI server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is not None:
        PromptServer.instance.send_sync(PROGRESS_EVENT, data)


class NodeProgress:
    """ComfyUI's progress bar over the node's whole plan, plus a websocket message per report. ``plan`` the phases
    (in order, with their costs), then pass ``Progress`` reports; ``finish`` fills the bar and sends the summary."""

    def __init__(self, node_id: str | None, clock: Callable[[], float] = time.monotonic):
        import comfy.utils

        self.node_id = node_id
        self.run = RunPlan(clock)
        self.bar = comfy.utils.ProgressBar(SCALE)
        self.value = 0

    def plan(self, phase: str, units: float) -> str:
        return self.run.plan(phase, units)

    def __call__(self, progress: Progress) -> None:
        fraction = self.run.advance(progress)
        self.value = min(max(int(fraction * SCALE), self.value), SCALE)
        self.bar.update_absolute(self.value, SCALE)
        eta = self.run.eta(self.value / SCALE) if self.value < SCALE else 0.0
        send_event({"node": self.node_id, "phase": progress.phase, "step": progress.step, "total": progress.total,
                    "loss": progress.loss, "eta": eta, "fraction": self.value / SCALE, "within": progress.within,
                    "title": title(self.run.current or progress.phase)})

    def step_seconds(self, progress: Progress) -> float | None:
        """One step of ``progress``'s phase at the node's pace so far (``methods.progress.Pacer``)."""
        return self.run.step_seconds(progress)

    def step(self, phase: str) -> Callable[[int, int], None]:
        """``(done, total)`` reports of ``phase``, for callbacks that count (an SVD per layer, images drawn)."""
        return lambda done, total: self(Progress(phase, int(done), int(total)))

    def finish(self, summary: str = "", losses: list[float] | None = None, cached: bool = False) -> None:
        self.value = SCALE
        self.bar.update_absolute(SCALE, SCALE)
        send_event({"node": self.node_id, "phase": "done", "cached": cached, "losses": list(losses or []),
                    "summary": summary, "fraction": 1.0, "eta": 0.0})
