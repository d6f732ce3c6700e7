"""The toy world's own phrasing for ablation: which captions train an erasure and which evaluate it.

The toy text encoder knows only the words of its captions, so ablating on the toy model needs anchor prompts in
that phrasing. Caption templates are split in two: ablation runs use the first half of each style's templates, the
evaluation and the held-out check the second half, so no figure is measured on a prompt the erasure trained on.
"""

from __future__ import annotations

from .concepts import ARTISTS, INSTANCES, OBJECTS, STYLES, axis_of
from .data import ARTIST_TEMPLATES, PAINTING_TEMPLATES, PHOTO_TEMPLATES, SUBJECTS, ToyLabel, caption

KNOWN = OBJECTS + INSTANCES + STYLES


def _template_count(style: str) -> int:
    if style == "photo":
        return len(PHOTO_TEMPLATES)
    return len(PAINTING_TEMPLATES) if style == "painting" else len(ARTIST_TEMPLATES)


def templates(style: str, split: str) -> range:
    """Template indices of ``split`` ("train" or "eval") for captions in ``style``: disjoint halves."""
    count = _template_count(style)
    half = (count + 1) // 2
    return range(0, half) if split == "train" else range(half, count)


def is_toy_concept(name: str) -> bool:
    return name.lower().strip() in KNOWN


def labels_of(concept: str) -> list[ToyLabel]:
    """Every subject x style combination that shows ``concept``."""
    if axis_of(concept) == "style":
        return [ToyLabel(subject, concept) for subject in SUBJECTS]
    return [ToyLabel(concept, style) for style in STYLES]


def captions_of(concept: str, split: str) -> list[str]:
    """All distinct captions of ``concept`` in the templates of ``split``, every subject/style once before any
    repeats in another template (so the first few prompts already cover the concept's variety)."""
    labels = labels_of(concept)
    rounds = max(len(templates(label.style, split)) for label in labels)
    found = [caption(label, templates(label.style, split)[k % len(templates(label.style, split))])
             for k in range(rounds) for label in labels]
    return list(dict.fromkeys(found))


def kind_of(target: str) -> str:
    return "style" if target in ARTISTS else "object"


def anchor_prompts(anchor: str, split: str = "train") -> list[str]:
    """Anchor prompts for an ablation: the anchor's captions in the templates of ``split``."""
    return captions_of(anchor, split)
