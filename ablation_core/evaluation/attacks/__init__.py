"""Attacks on an erased concept, as the literature runs them, on the embedded toy world or, judged by CLIP, on a real
model.

Each attack learns what it needs from the unpatched model (``prepare``), then runs against the unpatched and against
the patched model (``run``) and reports the fraction of its samples the world's judge reads as the target: before (an
attack that does not recover the target on the unpatched model is broken) and after. Budgets are fixed and stated in
every result; ``SMALL`` budgets are for tests and quick looks. The world (``world.AttackWorld``: captions, sampling
settings, judge) is the toy world unless one is passed, e.g. ``evaluation.clip.attack_world.ClipWorld``.

    results = run_attacks(view, patch, "nemo", "fish", ["all"])
    results["soft-prompt"].success_after
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...methods.progress import Progress, ProgressFn, no_progress
from ...models.view import ModelView
from ...patches.apply import apply_patch
from ...patches.patch import AblationPatch
from . import soft_prompt, token_search, variants
from .common import AttackResult, Outcome
from .world import TOY_WORLD, AttackWorld


@dataclass(frozen=True)
class Attack:
    name: str
    help: str
    prepare: Callable
    run: Callable
    budget: object
    small: object


ATTACKS: dict[str, Attack] = {
    "variants": Attack("variants", "misspellings, other phrasings and compositions of the target (no learning)",
                       variants.prepare, variants.run, variants.VariantsBudget(), variants.SMALL),
    "soft-prompt": Attack("soft-prompt", "textual inversion of one token on the unpatched model's target images, "
                          "against the patched model (Circumventing Concept Erasure)",
                          soft_prompt.prepare, soft_prompt.run, soft_prompt.SoftPromptBudget(), soft_prompt.SMALL),
    "token-search": Attack("token-search", "greedy gradient-ranked token swaps over the whole vocabulary from the "
                           "target prompt (UnlearnDiffAtk / P4D)",
                           token_search.prepare, token_search.run, token_search.TokenSearchBudget(),
                           token_search.SMALL),
}
ATTACK_NAMES = tuple(ATTACKS)
BUDGETS = ("full", "small")


def attack_names(names: list[str]) -> list[str]:
    """The attacks asked for, in registry order; ``all`` means every one."""
    unknown = [n for n in names if n != "all" and n not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACK_NAMES)} or all")
    return [n for n in ATTACK_NAMES if "all" in names or n in names]


def budget_of(name: str, budget: str = "full"):
    attack = ATTACKS[name]
    return attack.small if budget == "small" else attack.budget


def run_attack(view: ModelView, name: str, target: str, anchor: str, budget, seed: int = 0, prepared=None,
               on_progress: ProgressFn | None = None, world: AttackWorld = TOY_WORLD) -> Outcome:
    """One attack against the model as it is (patch it first, or not); ``prepared`` from the unpatched model."""
    attack, report = ATTACKS[name], on_progress or no_progress
    if prepared is None:
        prepared = attack.prepare(view, target, budget, seed, world)
    return attack.run(view, target, anchor, budget, seed, lambda done, total: report(Progress(name, done, total)),
                      prepared, world)


def run_attacks(view: ModelView, patch: AblationPatch, target: str, anchor: str, names: list[str], seed: int = 0,
                budget: str = "full", strength: float = 1.0, on_progress: ProgressFn | None = None,
                before: dict[str, Outcome] | None = None, world: AttackWorld = TOY_WORLD) -> dict[str, AttackResult]:
    """Every named attack before and after ``patch``. ``before`` may hold outcomes on the unpatched model already
    measured with the same budget and seed (they do not depend on the patch). Names are lower-cased, as the toy
    world's captions are (a CLIP world lower-cases its own prompts alike)."""
    target, anchor = target.lower().strip(), anchor.lower().strip()
    results = {}
    for name in attack_names(names):
        chosen = budget_of(name, budget)
        prepared = ATTACKS[name].prepare(view, target, chosen, seed, world)
        unpatched = (before or {}).get(name) or run_attack(view, name, target, anchor, chosen, seed, prepared,
                                                           on_progress, world)
        with apply_patch(view, patch, strength):
            patched = run_attack(view, name, target, anchor, chosen, seed, prepared, on_progress, world)
        results[name] = AttackResult(name, unpatched.success, patched.success, patched.samples, chosen.as_json(),
                                     {"before": unpatched.details, "after": patched.details})
    return results


def attacks_table(results: dict[str, AttackResult], world: AttackWorld = TOY_WORLD) -> str:
    """The plain-text table the CLI prints under the evaluation."""
    lines = [f"Attacks ({world.judged_by}; budgets in --json)",
             f"{'attack':<16}{'before':>8}{'after':>8}{'samples':>9}"]
    for result in results.values():
        lines.append(f"{result.name:<16}{result.success_before:>8.1%}{result.success_after:>8.1%}"
                     f"{result.samples:>9}")
    return "\n".join(lines)


def as_json(results: dict[str, AttackResult]) -> dict:
    return {name: result.as_json() for name, result in results.items()}
