"""The world an attack runs in: where its captions come from, how its samples are drawn, and who judges them.

An attack needs three things besides the model: captions of the target (a training half it learns from and an
evaluation half it is measured on), the sampling settings its images are drawn with, and a judge that says whether a
sampled latent shows the target. The embedded toy world (``TOY_WORLD``, the default everywhere) takes them from the
toy's caption templates, its sampler defaults and its classifier; ``evaluation.clip.attack_world.ClipWorld`` takes
them from the CLIP evaluation's prompt sets and settings and judges with a CLIP model, for real checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from ...models.view import ModelView


@dataclass(frozen=True)
class VariantFills:
    """What the prompt-variants attack fills its phrasings with: the target as a caption names it, whether it is a
    style, and other subjects (caption phrasing) and artists to compose it with."""

    subject: str
    style: bool
    subjects: list[str]
    artists: list[str]


class AttackWorld(Protocol):
    """Captions, sampling settings and the judge of an attack (see the module's description)."""

    judged_by: str  # what success means, for the attacks table's header
    steps: int
    guidance: float
    batch_size: int
    latent_size: int | None

    def captions(self, target: str, split: str) -> list[str]:
        """Captions of ``target`` in the ``"train"`` or ``"eval"`` half."""
        ...

    def judge(self, view: ModelView, latents: Tensor, target: str) -> list[bool]:
        """Per sampled latent (row), whether it shows ``target``."""
        ...

    def fills(self, target: str) -> VariantFills:
        ...


class ToyWorld:
    """The embedded toy world: its caption templates, its sampler's defaults, its classifier (strict, as
    ``evaluate_toy`` counts)."""

    judged_by = "fraction of samples showing the target"
    batch_size = 64
    latent_size = None

    @property
    def steps(self) -> int:
        from ...toy.model import DEFAULT_STEPS

        return DEFAULT_STEPS

    @property
    def guidance(self) -> float:
        from ...toy.model import DEFAULT_GUIDANCE

        return DEFAULT_GUIDANCE

    def captions(self, target: str, split: str) -> list[str]:
        from ...toy.prompts import captions_of

        return captions_of(target, split)

    def judge(self, view: ModelView, latents: Tensor, target: str) -> list[bool]:
        from ...toy.classifier import classify, load_toy_classifier
        from ..toy_eval import _shows

        return [_shows(p, target) for p in classify(load_toy_classifier(), latents.clamp(-1, 1))]

    def fills(self, target: str) -> VariantFills:
        from ...toy.concepts import ARTISTS, CONCEPTS_BY_NAME, OBJECTS, axis_of
        from ...toy.data import subject_phrase

        concept = CONCEPTS_BY_NAME.get(target)
        own = {target, concept.anchor} if concept else {target}
        return VariantFills(subject_phrase(target), axis_of(target) == "style",
                            [subject_phrase(o) for o in OBJECTS if o not in own], [a for a in ARTISTS if a != target])


TOY_WORLD = ToyWorld()
