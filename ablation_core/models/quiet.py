"""Loading without the libraries' chatter: diffusers and transformers log advice (install ``accelerate``) and draw
"Loading weights" bars that mean nothing to a user of this tool; our own progress is what they should see."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

_LOGGERS = ("diffusers", "transformers")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Within the block, diffusers/transformers log errors only and draw no progress bars."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [logger.level for logger in loggers]
    bars = []
    try:
        from transformers.utils import logging as transformers_logging

        bars.append((transformers_logging.is_progress_bar_enabled(), transformers_logging.enable_progress_bar,
                     transformers_logging.disable_progress_bar))
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as diffusers_logging

        bars.append((diffusers_logging.is_progress_bar_enabled(), diffusers_logging.enable_progress_bar,
                     diffusers_logging.disable_progress_bar))
    except ImportError:
        pass
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    for _, _, disable in bars:
        disable()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for was_enabled, enable, _ in bars:
            if was_enabled:
                enable()
