"""Concepts a trained run keeps: prompts held at the frozen model's prediction while the target moves.

On a model whose text encoder is bidirectional (Flux's T5) every token of a prompt carries its concept, the
template words too, so K/V trained to move "snoopy" prompts also move the words that "grumpy cat" prompts share
with them (measured on toy-flux: snoopy -> dog took grumpy cat from 100 % to 6 %, monet -> painting the photo
style to 12 %). A few preserved rows per step stop that: each is one prompt of the kept set on one of the step's
noisy images, trained to keep the frozen model's prediction (two passes a row: one frozen, one with gradients).
The kept set is the closed form's preserved set for these targets (on the toy world every other concept in its
training captions; elsewhere a built-in bank of everyday concepts and the anchors). Robust rounds keep the same set
with a whole batch of rows each step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...models.view import Conditioning, ModelView
from ..progress import Canceller, ProgressFn, encode_with_progress


def preserved_prompts(config, family: str) -> list[str]:
    """Every prompt a run with preserved rows keeps (``config``: an ``AblationConfig``)."""
    from ..closed_form.settings import make_closed_form_config, resolve_closed_form

    pairs = config.pairs()
    closed = resolve_closed_form(make_closed_form_config([t for t, _ in pairs], [a for _, a in pairs],
                                                         kind=config.kind if config.kind != "memorization" else None),
                                 family)
    return list(closed.preserved_prompts)


def encode_preserved(view: ModelView, config, report: ProgressFn, canceller: Canceller) -> Conditioning:
    """``preserved_prompts`` encoded in the view's steps, reporting ("preserved", done, total)."""
    with torch.no_grad():
        return encode_with_progress(view, preserved_prompts(config, view.family.name), report, canceller, "preserved")


def kept_rows(batch: int, rows: int, preserved: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which of the step's ``batch`` noisy images carry a preserved prompt, and which prompts: every image when
    ``rows`` covers the batch (robust rounds), else ``rows`` images drawn at random."""
    images = torch.arange(batch) if rows >= batch else torch.randperm(batch, generator=generator)[:rows]
    return images, torch.randint(preserved, (len(images),), generator=generator)
