"""Progress bars for the command line (the library itself only reports through callbacks).

One bar per phase, drawn while the phase runs and closed as soon as the next begins, so finished bars never overlap
running ones.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..methods.progress import Progress, ProgressFn

PHASE_LABELS = {"prompts": "encoding prompts", "anchors": "anchor images", "train": "training",
                "check": "held-out check", "solve": "solving", "evaluate": "evaluating"}
PHASE_UNITS = {"prompts": "prompt", "anchors": "image", "train": "step", "check": "UNet pass", "solve": "layer",
               "evaluate": "pass"}


@contextlib.contextmanager
def progress_bars(prefix: str = "") -> Iterator[ProgressFn]:
    """A progress callback that draws the current phase's bar (with the loss while training); closes cleanly."""
    current: dict[str, tqdm] = {}

    def close() -> None:
        for bar in current.values():
            bar.close()
        current.clear()

    def on_progress(progress: Progress) -> None:
        bar = current.get(progress.phase)
        if bar is None or bar.total != progress.total:
            close()
            label = prefix + PHASE_LABELS.get(progress.phase, progress.phase)
            bar = current.setdefault(progress.phase, tqdm(total=progress.total, desc=label, file=sys.stderr,
                                                          unit=PHASE_UNITS.get(progress.phase, "it"),
                                                          dynamic_ncols=True))
        bar.update(progress.step - bar.n)
        if progress.loss is not None:
            bar.set_postfix(loss=f"{progress.loss:.4g}", refresh=False)

    try:
        with logging_redirect_tqdm():  # warnings print above the bar instead of through it
            yield on_progress
    finally:
        close()
