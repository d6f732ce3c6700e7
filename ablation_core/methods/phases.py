"""Which phase a run is in, for whoever measures it (``python -m ablation_core bench``).

A method names its phases as it enters them (``Canceller.phase``); ``listening(fn)`` calls ``fn(name)`` on each,
for the duration of the block. Nothing listens in normal runs, so this costs nothing there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

PhaseFn = Callable[[str], None]
_listeners: list[PhaseFn] = []


def announce(name: str) -> None:
    for listener in list(_listeners):
        listener(name)


@contextlib.contextmanager
def listening(listener: PhaseFn) -> Iterator[None]:
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
