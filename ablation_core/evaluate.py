"""Honest quality numbers for a patch on the embedded toy world, and before/after grids.

Samples prompts of four sets (target, misspelt target, anchor, surrounding concepts) from the unpatched and the
patched model with the same noise, and lets the toy world's classifier say what each image shows. The figures are
fractions of samples, so "target recognised 3 %" means 3 of 100 target-prompt images still show the target.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .anchors import sample_latents
from .backends.base import ModelView
from .images import grid
from .patch import AblationPatch, apply_patch
from .prompts import misspellings


@dataclass
class PromptSet:
    name: str
    concept: str
    prompts: list[str]


@dataclass
class SetResult:
    name: str
    concept: str
    shown_before: float
    shown_after: float
    samples: int


@dataclass
class Evaluation:
    target: str
    anchor: str
    sets: list[SetResult]
    summary: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"target": self.target, "anchor": self.anchor, **self.summary,
                "sets": [asdict(s) for s in self.sets]}

    def table(self) -> str:
        lines = [f"Ablation '{self.target}' -> '{self.anchor}' (fraction of samples showing the concept)",
                 f"{'prompt set':<24}{'concept':<14}{'before':>8}{'after':>8}{'samples':>9}"]
        for s in self.sets:
            lines.append(f"{s.name:<24}{s.concept:<14}{s.shown_before:>8.1%}{s.shown_after:>8.1%}{s.samples:>9}")
        lines.append("")
        lines += [f"{k:<30}{v:.3f}" for k, v in self.summary.items()]
        return "\n".join(lines)


def toy_prompt_sets(target: str, anchor: str, per_set: int = 48, seed: int = 0) -> list[PromptSet]:
    """Target, misspelt-target, anchor and neighbour prompts in the toy world's own phrasing."""
    from .toy.concepts import CONCEPTS_BY_NAME, axis_of
    from .toy.data import STYLES, SUBJECTS, ToyLabel, caption

    target, anchor = target.lower().strip(), anchor.lower().strip()
    axis_of(target)
    concept = CONCEPTS_BY_NAME.get(target)
    neighbours = [n for n in (concept.neighbours if concept else ()) if n not in (target, anchor)]

    def captions(name: str, count: int = per_set) -> list[str]:
        if axis_of(name) == "style":
            labels = [ToyLabel(s, name) for s in SUBJECTS]
        else:
            labels = [ToyLabel(name, s) for s in STYLES]
        return [caption(labels[i % len(labels)], i // len(labels)) for i in range(count)]

    target_prompts = captions(target)
    typos = misspellings(target, 4, seed)
    misspelt = [p.replace(target, typos[i % len(typos)]) for i, p in enumerate(target_prompts)] if typos else []
    sets = [PromptSet("target", target, target_prompts)]
    if misspelt:
        sets.append(PromptSet("misspelt target", target, misspelt))
    sets.append(PromptSet("anchor", anchor, captions(anchor)))
    per_neighbour = max(min(16, per_set), per_set // max(1, len(neighbours)))
    for name in neighbours:
        sets.append(PromptSet(f"surrounding: {name}", name, captions(name, per_neighbour)))
    return sets


def toy_anchor_prompts(anchor: str, kind: str) -> list[str]:
    """Anchor prompts for training on the toy world, in its own phrasing (its text encoder knows no other words)."""
    from .toy.data import STYLES, SUBJECTS, ToyLabel, caption

    if kind == "style":
        labels = [ToyLabel(s, anchor) for s in SUBJECTS]
    else:
        labels = [ToyLabel(anchor, s) for s in STYLES]
    return list(dict.fromkeys(caption(label, t) for label in labels for t in range(5)))


@torch.no_grad()
def _classify_samples(view: ModelView, classifier, prompts: list[str], seed: int, steps: int, guidance: float):
    from .toy.classifier import classify

    latents = sample_latents(view, prompts, torch.arange(len(prompts)), steps, guidance, 64, seed)
    return classify(classifier, latents.clamp(-1, 1)), latents


def evaluate_toy(view: ModelView, patch: AblationPatch, target: str, anchor: str, per_set: int = 48, seed: int = 0,
                 strength: float = 1.0, grid_path: str | None = None) -> Evaluation:
    from .toy.classifier import load_toy_classifier
    from .toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    classifier = load_toy_classifier()
    sets = toy_prompt_sets(target, anchor, per_set, seed)
    results, pictures = [], []
    for index, prompt_set in enumerate(sets):
        before, before_images = _classify_samples(view, classifier, prompt_set.prompts, seed + index,
                                                  DEFAULT_STEPS, DEFAULT_GUIDANCE)
        applied = apply_patch(view, patch, strength)
        try:
            after, after_images = _classify_samples(view, classifier, prompt_set.prompts, seed + index,
                                                    DEFAULT_STEPS, DEFAULT_GUIDANCE)
        finally:
            applied.remove()
        results.append(SetResult(prompt_set.name, prompt_set.concept, _shown(before, prompt_set.concept),
                                 _shown(after, prompt_set.concept), len(before)))
        pictures.append((prompt_set, before_images[:6], after_images[:6]))
    evaluation = Evaluation(target, anchor, results, _summary(results))
    if grid_path:
        rows, labels = [], []
        for prompt_set, before_images, after_images in pictures:
            rows += [list(view.decode(before_images)), list(view.decode(after_images))]
            labels += [f"before | {prompt_set.name}", f"after  | {prompt_set.name}"]
        grid(rows, labels, [f"sample {i + 1}" for i in range(6)], cell=64).save(grid_path)
    return evaluation


def _shows(prediction, concept: str) -> bool:
    """Strict: an object counts only without an instance's marking (a grumpy cat is not a plain "cat")."""
    from .toy.concepts import NO_INSTANCE, axis_of

    if axis_of(concept) == "object":
        return prediction.object == concept and prediction.instance == NO_INSTANCE
    return prediction.shows(concept)


def _shown(predictions: list, concept: str) -> float:
    return sum(_shows(p, concept) for p in predictions) / len(predictions)


def _summary(results: list[SetResult]) -> dict[str, float]:
    by_name = {r.name: r for r in results}
    surrounding = [r for r in results if r.name.startswith("surrounding")]

    def retained(rows: list[SetResult]) -> float:
        before = sum(r.shown_before for r in rows)
        return sum(r.shown_after for r in rows) / before if before else float("nan")

    summary = {"target_recognised": by_name["target"].shown_after,
               "target_recognised_before": by_name["target"].shown_before}
    if "misspelt target" in by_name:
        summary["misspelt_recognised"] = by_name["misspelt target"].shown_after
        summary["misspelt_recognised_before"] = by_name["misspelt target"].shown_before
    summary["anchor_retained"] = retained([by_name["anchor"]])
    summary["anchor_accuracy_before"] = by_name["anchor"].shown_before
    summary["anchor_accuracy_after"] = by_name["anchor"].shown_after
    if surrounding:
        summary["surrounding_retained"] = retained(surrounding)
        summary["surrounding_accuracy_before"] = sum(r.shown_before for r in surrounding) / len(surrounding)
        summary["surrounding_accuracy_after"] = sum(r.shown_after for r in surrounding) / len(surrounding)
    return summary


def to_json(evaluation: Evaluation) -> str:
    return json.dumps(evaluation.as_json(), indent=2)
