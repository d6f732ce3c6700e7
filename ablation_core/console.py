"""tqdm progress bars for the command line (the library itself only reports through callbacks)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tqdm import tqdm

from .ablate import Progress

PHASE_LABELS = {"prompts": "encoding prompts", "anchors": "anchor images", "train": "training"}


@contextlib.contextmanager
def progress_bars() -> Iterator[Callable[[Progress], None]]:
    """A progress callback drawing one bar per phase (prompts, anchor images, training) with the loss; closes them."""
    bars: dict[str, tqdm] = {}

    def on_progress(progress: Progress) -> None:
        label = PHASE_LABELS.get(progress.phase, progress.phase)
        bar = bars.get(progress.phase) or bars.setdefault(progress.phase, tqdm(total=progress.total, desc=label))
        bar.update(progress.step - bar.n)
        if progress.loss is not None:
            bar.set_postfix(loss=f"{progress.loss:.4g}")

    try:
        yield on_progress
    finally:
        for bar in bars.values():
            bar.close()
