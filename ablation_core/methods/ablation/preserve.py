"""Concepts a trained run keeps: prompts held at the frozen model's prediction while the target moves.

On a model whose text encoder is bidirectional (Flux's T5) every token of a prompt carries its concept, the
template words too, so K/V trained to move "snoopy" prompts also move the words that "grumpy cat" prompts share
with them (measured on toy-flux: snoopy -> dog took grumpy cat from 100 % to 6 %, monet -> painting the photo
style to 12 %). A few preserved rows per step stop that: each is one prompt of the kept set on one of the step's
noisy images, trained to keep the frozen model's prediction (two passes a row: one frozen, one with gradients).
The kept set is the closed form's preserved set for these targets (on the toy world every other concept in its
training captions; elsewhere a built-in bank of everyday concepts and the anchors). Robust rounds keep the same set
with a whole batch of rows each step.

A run of several targets shares each step's rows among them (its steps grow with them), so its kept
rows weigh ``2 / (n (n + 1))`` for ``n`` targets: 1 for one, 1/3 for two, 1/6 for three. At full weight they
outweighed each target of a joint run and held part of it; the targets' edits also pull against each other (three
single-target patches summed brought nemo back to 69 %), which asks for less than a third. Toy world, per-set 16,
three targets (nemo + monet + car; snoopy + nemo + grumpy cat; snoopy + van gogh + bird): full weight left nemo in
38 % and 88 %, van gogh and bird in 12 %; a third, nemo in 0 % and 19 %, van gogh in 6 %; a sixth, every target 0 %
but van gogh 6 % (1 of 16), every neighbour kept, worst neighbour change 0.11 (0.63 with no kept rows).
Two targets at a third (snoopy + nemo, monet + car, van gogh + bird, nemo + grumpy cat): every target 0 % but bird
6 % (1 of 16), every neighbour kept, worst change 0.27 (nemo + grumpy cat).
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


def kept_weight(targets: int) -> float:
    """The weight of the kept rows' loss in a run of ``targets`` targets (a single target's run: 1)."""
    targets = max(1, targets)
    return 2.0 / (targets * (targets + 1))


def kept_rows(batch: int, rows: int, preserved: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which of the step's ``batch`` noisy images carry a preserved prompt, and which prompts: every image when
    ``rows`` covers the batch (robust rounds), else ``rows`` images drawn at random."""
    images = torch.arange(batch) if rows >= batch else torch.randperm(batch, generator=generator)[:rows]
    return images, torch.randint(preserved, (len(images),), generator=generator)
