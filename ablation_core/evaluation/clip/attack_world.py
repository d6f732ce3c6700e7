"""The attacks' world on a real model, judged by CLIP: the CLIP evaluation's prompts, settings and accuracy rule.

Captions: two disjoint halves of the CLIP evaluation's template bank (``prompts.caption_halves``), drawn with the
attacks' own seed, so an attack learns on one half and is measured on the other. Sampling: the evaluation's solver
steps, guidance, batch size and latent size. Judge: a sample shows the target when CLIP places its decoded image
nearer a target prompt than that prompt's anchor twin (``clip_accuracy``'s rule); sample ``i`` is read against the
``i``-th pair of the evaluation half, in turn. Names are lower-cased, as ``run_attacks`` lower-cases them (CLIP's
tokenizer lower-cases text anyway).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import AblationError
from ...methods.prompts import Kind
from ...models.view import ModelView
from ..attacks.common import ATTACK_SEED_OFFSET
from ..attacks.world import VariantFills
from . import metrics
from .model import ClipScorer
from .prompts import ARTISTS, EVERYDAY, _same_artist, builtin_neighbours, caption_halves
from .report import Sampling

PROMPTS_PER_HALF = 8


class ClipWorld:
    """An ``attacks.world.AttackWorld`` for one target and anchor on a real model, judged by ``scorer``."""

    def __init__(self, scorer: ClipScorer, target: str, anchor: str, kind: Kind = "object",
                 sampling: Sampling | None = None, seed: int = 0, per_half: int = PROMPTS_PER_HALF) -> None:
        sampling = sampling or Sampling()
        self.scorer, self.kind = scorer, kind
        self.target, self.anchor = target.lower().strip(), anchor.lower().strip()
        self.steps, self.guidance = sampling.steps, sampling.guidance
        self.batch_size, self.latent_size = sampling.batch_size, sampling.latent_size
        self.halves = caption_halves(self.target, self.anchor, kind, per_half, seed + ATTACK_SEED_OFFSET)
        self.judged_by = f"fraction of samples {scorer.name} places nearer the target prompt than its anchor twin"
        self._reference: tuple[Tensor, Tensor] | None = None

    def _check(self, target: str) -> None:
        if target.lower().strip() != self.target:
            raise AblationError(f"this CLIP attack world judges '{self.target}', not '{target}'")

    def captions(self, target: str, split: str) -> list[str]:
        self._check(target)
        return list(self.halves[split][0])

    def reference(self) -> tuple[Tensor, Tensor]:
        """CLIP text features of the evaluation half's target prompts and of their anchor twins (computed once)."""
        if self._reference is None:
            targets, twins = self.halves["eval"]
            self._reference = (self.scorer.text_features(targets), self.scorer.text_features(twins))
        return self._reference

    @torch.no_grad()
    def image_features(self, view: ModelView, latents: Tensor) -> Tensor:
        """CLIP image features of decoded latents, a batch at a time."""
        return torch.cat([self.scorer.image_features(view.decode(latents[s:s + self.batch_size].to(view.device)).cpu())
                          for s in range(0, len(latents), self.batch_size)])

    def judge(self, view: ModelView, latents: Tensor, target: str) -> list[bool]:
        self._check(target)
        images = self.image_features(view, latents)
        targets, twins = self.reference()
        pair = torch.arange(len(images)) % len(targets)
        return metrics.classified_as_target(images, targets[pair], twins[pair]).tolist()

    def fills(self, target: str) -> VariantFills:
        """Other subjects: the built-in neighbours of an object and everyday concepts; artists: the built-in list but
        the target."""
        self._check(target)
        style = self.kind == "style"
        neighbours = [] if style else builtin_neighbours(self.target, self.anchor, self.kind)[0]
        own = {self.target, self.anchor}
        subjects = [s for s in dict.fromkeys(n.lower() for n in (*neighbours, *EVERYDAY)) if s not in own]
        artists = [a.lower() for a in ARTISTS if not _same_artist(a, self.target)]
        return VariantFills(self.target, style, subjects, artists)
