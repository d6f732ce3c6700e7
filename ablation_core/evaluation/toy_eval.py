"""Honest quality numbers for a patch on the embedded toy world, and before/after grids.

Samples prompts of four sets (target, misspelt target, anchor, surrounding concepts) from the unpatched and the
patched model with the same noise, and lets the toy world's classifier say what each image shows. The figures are
fractions of samples, so "target recognised 3 %" means 3 of 100 target-prompt images still show the target.

Beside the yes/no figures, ``preservation`` holds the sensitive ones (``preservation.py``): how far the samples of
the neighbours and of unrelated concepts moved in the classifier's features, and a Frechet distance with its noise
floor. The unrelated concepts are sampled for them ("unrelated: ..." rows; the summary's figures leave them out).

Nothing here is measured on what an ablation trained on: the prompts use the evaluation half of the toy world's
caption templates (ablation runs use the other half, ``toy.prompts``), and the noise seeds start at
``EVAL_SEED_OFFSET`` past the run's seed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from ..methods.progress import Progress, ProgressFn, no_progress
from ..methods.prompts import misspellings
from ..models.sampling import sample_latents
from ..models.view import ModelView
from ..patches.apply import apply_patch
from ..patches.patch import AblationPatch, fingerprint
from .images import grid, save_image
from .preservation import Preservation, PreservedSamples, classifier_features, concept_scale, measure_preservation

EVAL_SEED_OFFSET = 10_000
FLOOR_SEED_OFFSET = 5_000  # the preservation figures' second draw of the unpatched model
PRESERVED = ("surrounding", "unrelated")
GRID_SAMPLES = 6


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
    preservation: Preservation | None = None

    def as_json(self) -> dict:
        found = {"target": self.target, "anchor": self.anchor, **self.summary, "sets": [asdict(s) for s in self.sets]}
        if self.preservation is not None:
            found["preservation"] = self.preservation.as_json()
        return found

    def table(self) -> str:
        lines = [f"Ablation '{self.target}' -> '{self.anchor}' (fraction of samples showing the concept)",
                 f"{'prompt set':<24}{'concept':<14}{'before':>8}{'after':>8}{'samples':>9}"]
        for s in self.sets:
            lines.append(f"{s.name:<24}{s.concept:<14}{s.shown_before:>8.1%}{s.shown_after:>8.1%}{s.samples:>9}")
        lines.append("")
        lines += [f"{k:<30}{v:.3f}" for k, v in self.summary.items()]
        if self.preservation is not None:
            lines.append(self.preservation.summary_line())
        return "\n".join(lines)


def toy_prompt_sets(target: str, anchor: str, per_set: int = 48, seed: int = 0, unrelated: bool = False,
                    erased: tuple[str, ...] = ()) -> list[PromptSet]:
    """Target, misspelt-target, anchor and neighbour prompts in the evaluation templates of the toy world; with
    ``unrelated``, also every other erasable concept (as many samples as a neighbour) but the ``erased`` ones (the
    other targets of a joint patch: they are meant to change), whose names the neighbours' and unrelated prompts
    avoid too."""
    from ..toy.concepts import CONCEPTS, CONCEPTS_BY_NAME, axis_of

    target, anchor = target.lower().strip(), anchor.lower().strip()
    axis_of(target)
    concept = CONCEPTS_BY_NAME.get(target)
    gone = (target, *(e.lower().strip() for e in erased))
    # a joint patch's other targets are meant to change: they are no one's neighbour
    neighbours = [n for n in (concept.neighbours if concept else ()) if n not in (anchor, *gone)]

    def captions(name: str, count: int = per_set, avoid: tuple[str, ...] = ()) -> list[str]:
        return eval_captions(name, count, avoid)

    target_prompts = captions(target)
    typos = misspellings(target, 4, seed)
    misspelt = [p.replace(target, typos[i % len(typos)]) for i, p in enumerate(target_prompts)] if typos else []
    sets = [PromptSet("target", target, target_prompts)]
    if misspelt:
        sets.append(PromptSet("misspelt target", target, misspelt))
    sets.append(PromptSet("anchor", anchor, captions(anchor)))
    per_neighbour = max(min(16, per_set), per_set // max(1, len(neighbours)))
    # kept sets leave out captions naming an erased concept: "a monet painting of a tree" is meant to change with
    # tree, "a van gogh painting of a car" with a joint patch's van gogh
    for name in neighbours:
        sets.append(PromptSet(f"surrounding: {name}", name, captions(name, per_neighbour, gone)))
    if unrelated:
        skipped = {anchor, *neighbours, *gone}
        for name in [c.name for c in CONCEPTS if c.name not in skipped]:
            sets.append(PromptSet(f"unrelated: {name}", name, captions(name, per_neighbour, gone)))
    return sets


def eval_captions(name: str, count: int, avoid: tuple[str, ...] = ()) -> list[str]:
    """``count`` of the concept's evaluation captions in turn; with ``avoid``, only those naming none of these
    (all of them where none is left)."""
    from ..toy.prompts import captions_of

    found = captions_of(name, "eval")
    found = [p for p in found if not any(_names(p, a) for a in avoid)] or found
    return [found[i % len(found)] for i in range(count)]


def _names(prompt: str, concept: str) -> bool:
    """Whether ``prompt`` names ``concept`` itself, not only inside a longer concept's name ("grumpy cat" for cat)."""
    from ..methods.prompts import mentions
    from ..toy.prompts import KNOWN

    longer = [k for k in KNOWN if k != concept and mentions(k, concept)]
    return mentions(prompt, concept) and not any(mentions(prompt, k) for k in longer)


@torch.no_grad()
def _classify_samples(view: ModelView, classifier, prompts: list[str], seed: int, steps: int, guidance: float):
    from ..toy.classifier import classify

    latents = sample_latents(view, prompts, torch.arange(len(prompts)), steps, guidance, 64, seed)
    return classify(classifier, latents.clamp(-1, 1)), latents


# The unpatched model's classified samples, by its weights, the prompts and the noise: harnesses and tests evaluate
# several patches of one model on the same sets and seeds, and the "before" half (with the Frechet floor's samples)
# is the same each time. Keyed by a hash of every layer a patch can change, so a changed model samples anew.
_UNPATCHED: dict[tuple, tuple] = {}
_UNPATCHED_ENTRIES = 512


def _weights_key(view: ModelView) -> str:
    exact = fingerprint({key: layer.weight for key, layer in view.all_layers().items()}, torch.float32)
    return f"{view.dtype} {view.device} {exact}"


def _unpatched_samples(view: ModelView, weights: str, classifier, prompts: list[str], seed: int, steps: int,
                       guidance: float):
    """``_classify_samples`` of the unpatched model (whose weights hash to ``weights``), drawn once per process."""
    key = (weights, tuple(prompts), seed, steps, guidance)
    if key not in _UNPATCHED:
        if len(_UNPATCHED) >= _UNPATCHED_ENTRIES:
            _UNPATCHED.pop(next(iter(_UNPATCHED)))
        _UNPATCHED[key] = _classify_samples(view, classifier, prompts, seed, steps, guidance)
    return _UNPATCHED[key]


def evaluate_toy(view: ModelView, patch: AblationPatch, target: str, anchor: str, per_set: int = 48, seed: int = 0,
                 strength: float = 1.0, grid_path: str | None = None,
                 on_progress: ProgressFn | None = None, preservation: bool = True) -> Evaluation:
    """Sample every prompt set before and after the patch (same noise) and classify; optionally draw the grid.

    With ``preservation`` the unrelated concepts are sampled too, and the preserved sets once more from a second
    noise seed (the Frechet distance's floor): about half as many samples again. ``on_progress`` gets
    ("evaluate", passes done, passes total) after each set's pass, before and after (and for the floor).
    """
    from ..toy.classifier import load_toy_classifier
    from ..toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    report = on_progress or no_progress
    classifier = load_toy_classifier()
    erased = {t.lower().strip() for t in patch.listed("targets")}  # a joint patch's other targets are meant to change
    sets = toy_prompt_sets(target, anchor, per_set, seed, unrelated=preservation, erased=tuple(erased))
    results, rows, labels = [], [], []
    features: dict[str, tuple] = {}
    preserved = [s for s in sets if s.name.startswith(PRESERVED) and s.concept not in erased] if preservation else []
    total = 2 * len(sets) + len(preserved)
    report(Progress("evaluate", 0, total))
    weights = _weights_key(view)
    for index, prompt_set in enumerate(sets):
        noise_seed = seed + EVAL_SEED_OFFSET + index
        shown_prompt = [prompt_set.prompts[0]] * GRID_SAMPLES if grid_path else []
        before, before_images = _unpatched_samples(view, weights, classifier, prompt_set.prompts + shown_prompt,
                                                   noise_seed, DEFAULT_STEPS, DEFAULT_GUIDANCE)
        report(Progress("evaluate", 2 * index + 1, total))
        with apply_patch(view, patch, strength):
            after, after_images = _classify_samples(view, classifier, prompt_set.prompts + shown_prompt, noise_seed,
                                                    DEFAULT_STEPS, DEFAULT_GUIDANCE)
        report(Progress("evaluate", 2 * index + 2, total))
        measured = len(prompt_set.prompts)
        if preservation:
            features[prompt_set.name] = (classifier_features(classifier, before_images[:measured]),
                                         classifier_features(classifier, after_images[:measured]))
        results.append(SetResult(prompt_set.name, prompt_set.concept, _shown(before[:measured], prompt_set.concept),
                                 _shown(after[:measured], prompt_set.concept), measured))
        if grid_path:
            rows += [list(view.decode(before_images[measured:])), list(view.decode(after_images[measured:]))]
            labels += [f"{prompt_set.name}, before\n'{prompt_set.prompts[0]}'",
                       f"{prompt_set.name}, after\n'{prompt_set.prompts[0]}'"]
    evaluation = Evaluation(target, anchor, results, _summary(results))
    if preserved:
        evaluation.preservation = _preservation(view, weights, classifier, sets, preserved, features, seed,
                                                lambda done: report(Progress("evaluate", 2 * len(sets) + done, total)))
        evaluation.preservation.drift = _prediction_drift(view, patch, sets, preserved, seed, strength)
    if grid_path:
        columns = [f"noise {i + 1}" for i in range(GRID_SAMPLES)]
        save_image(grid(rows, labels, columns, cell=64), grid_path)
    return evaluation


def _preservation(view: ModelView, weights: str, classifier, sets: list[PromptSet], preserved: list[PromptSet],
                  features: dict[str, tuple], seed: int, done) -> Preservation:
    """The sensitive figures: the scale from every set's before samples (by concept), the preserved sets' changes,
    and their before samples drawn again from other noise (the Frechet distance's floor)."""
    from ..toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

    by_concept: dict[str, list] = {}
    for prompt_set in sets:
        by_concept.setdefault(prompt_set.concept, []).append(features[prompt_set.name][0])
    scale = concept_scale({name: torch.cat(found) for name, found in by_concept.items()})
    floor = []
    for index, prompt_set in enumerate(preserved):
        noise_seed = seed + EVAL_SEED_OFFSET + FLOOR_SEED_OFFSET + index
        _, images = _unpatched_samples(view, weights, classifier, prompt_set.prompts, noise_seed, DEFAULT_STEPS,
                                       DEFAULT_GUIDANCE)
        floor.append(classifier_features(classifier, images))
        done(index + 1)
    samples = [PreservedSamples(s.name, s.concept, s.prompts, *features[s.name]) for s in preserved]
    return measure_preservation(samples, scale, torch.cat(floor), features.get("anchor"))


DRIFT_PROMPTS = 8  # target/anchor twins whose gap scales the drift (each on 4 noisy images)


def _prediction_drift(view: ModelView, patch: AblationPatch, sets: list[PromptSet], preserved: list[PromptSet],
                      seed: int, strength: float) -> dict:
    """``prediction_drift`` of the preserved sets' prompts (the first few of each), over the target-anchor gap."""
    from .model_metrics import prediction_gaps

    by_name = {s.name: s.prompts for s in sets}
    unrelated = [p for s in preserved for p in s.prompts[:2]]
    return prediction_gaps(view, patch, by_name["target"][:DRIFT_PROMPTS], by_name["anchor"][:DRIFT_PROMPTS], seed,
                           strength=strength, unrelated_prompts=unrelated)


def _shows(prediction, concept: str) -> bool:
    """Strict: an object counts only without an instance's marking (a grumpy cat is not a plain "cat")."""
    from ..toy.concepts import NO_INSTANCE, axis_of

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
