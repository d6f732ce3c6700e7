"""Argument checks that run before any work: a bad argument costs the user one line, not a training run.

The ``argparse`` types here reject bad values while the command line is parsed; ``check_text`` and the path checks
of ``files`` run right after, before a model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
import unicodedata

import torch

from ..errors import AblationError, PromptError
from ..methods.prompts import check_pair

MAX_PROMPT_CHARS = 300
MAX_SEED = 2**63 - 1  # torch's generators take seeds up to 2**64 - 1; random.Random any
DEVICE_TYPES = ("cpu", "cuda", "mps")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative, got {value}")
    return value


def seed(text: str) -> int:
    value = non_negative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED}, got {value}")
    return value


def device(text: str) -> str:
    """``auto`` or a device torch knows (``cpu``, ``cuda``, ``cuda:1``, ``mps``); whether it is there is checked
    before the model loads."""
    if text == "auto":
        return text
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def finite_float(text: str) -> float:
    return _float(text)


def non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative, got {value:g}")
    return value


def fraction(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def check_text(text: str, what: str) -> str:
    """A prompt or concept name: not empty, no control characters, not absurdly long. Non-ASCII text is fine."""
    stripped = text.strip()
    if not stripped:
        raise PromptError(f"the {what} is empty")
    if any(unicodedata.category(c) == "Cc" for c in stripped):
        raise PromptError(f"the {what} contains control characters (a tab, newline or escape); write it on one line")
    if len(stripped) > MAX_PROMPT_CHARS:
        raise PromptError(f"the {what} is {len(stripped)} characters long; the text encoder reads about 75 tokens, so "
                          f"keep it under {MAX_PROMPT_CHARS} characters")
    return stripped


def check_concepts(target: str, anchor: str) -> tuple[str, str]:
    target, anchor = check_text(target, "target"), check_text(anchor, "anchor")
    return check_pair(target, anchor)


def check_model_spec(spec: str) -> None:
    """``toy``, ``toy-flux``, or a path that exists (the loader says what is wrong with a file that does)."""
    from ..backends.loading import TOY_MODELS

    if spec in TOY_MODELS:
        return
    if not spec.strip():
        raise AblationError("the --model path is empty: give a .safetensors checkpoint, a diffusers folder, or 'toy'")
    if not os.path.exists(os.path.expanduser(spec)):  # False for a name too long, where Path.exists() raises
        raise AblationError(f"model {spec!r} not found: give a .safetensors checkpoint, a diffusers folder, 'toy' "
                            "for the embedded toy model or 'toy-flux' for its Flux twin")


def check_toy_concepts(*names: str) -> None:
    """On the toy model, every concept must be one it knows (checked before loading anything)."""
    from ..toy.prompts import KNOWN, is_toy_concept

    for name in names:
        if not is_toy_concept(name):
            raise PromptError(f"the toy model does not know '{name}'; it knows {', '.join(KNOWN)}")
