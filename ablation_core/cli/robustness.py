"""The README's robustness table: toy-world concepts x erasure methods x attacks, before and after, with the cost.

``python -m ablation_core.cli.robustness [--model toy|toy-flux] [--concepts nemo "van gogh" ...] [--methods trained
trained-robust closed-form closed-form-robust] [--rounds 2] [--attack-budget small|full] [--per-set 16] [--preset P]
[--settings KEY=VALUE ...] [--out F]``

For each concept (default: every concept of the toy world, with its anchor) and each method, erases it from the
embedded toy model, measures the patch with ``evaluate_toy`` (target, anchor and every neighbour, on the evaluation
templates and noise) and runs every attack against it. Each attack learns from the unpatched model once per concept
and its success on the unpatched model is measured once (it does not depend on the patch). Rows are written to
``F.json`` as they finish and the markdown table to ``F.md``; the last rows average each method over the concepts.
Nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..backends.loading import load_model
from ..evaluation.attacks import ATTACK_NAMES, ATTACKS, budget_of, run_attack
from ..evaluation.toy_eval import evaluate_toy
from ..files import write_text_atomic
from ..methods.ablation.settings import PRESET_NAMES, make_config
from ..methods.closed_form.settings import make_closed_form_config
from ..methods.robust.rounds import robust_ablate, robust_erase_closed_form
from ..patches.apply import apply_patch
from .common import parse_settings

METHODS = ("trained", "trained-robust", "closed-form", "closed-form-robust")


def erase(view, method: str, target: str, anchor: str, rounds: int, seed: int, preset: str = "default",
          settings: dict[str, object] | None = None):
    """The patch of one method (robust methods with ``rounds`` adversarial rounds; trained ones with ``preset``;
    ``settings`` of the method's config on top)."""
    robust = rounds if method.endswith("-robust") else 0
    settings = settings or {}
    if method.startswith("closed-form"):
        config = make_closed_form_config(target, anchor, seed=seed, **settings)
        return robust_erase_closed_form(view, replace(config, robust_rounds=robust)).patch
    config = make_config(target, anchor, preset, seed=seed, robust_rounds=robust or None, **settings)
    return robust_ablate(view, config).patch


def measure_concept(view, target: str, anchor: str, methods: list[str], rounds: int, budget: str, per_set: int,
                    seed: int, on_row, patch_dir: Path | None = None,
                    attacks: tuple[str, ...] = ATTACK_NAMES, preset: str = "default",
                    settings: dict[str, object] | None = None) -> list[dict]:
    if not methods:
        return []
    prepared, before = {}, {}
    for name in attacks:
        chosen = budget_of(name, budget)
        prepared[name] = ATTACKS[name].prepare(view, target, chosen, seed)
        before[name] = run_attack(view, name, target, anchor, chosen, seed, prepared[name])
    rows = []
    for method in methods:
        started = time.perf_counter()
        patch = erase(view, method, target, anchor, rounds, seed, preset, settings)
        seconds = time.perf_counter() - started
        if patch_dir is not None:
            patch.save(patch_dir / f"{target.replace(' ', '_')}_{method}.safetensors")
        evaluation = evaluate_toy(view, patch, target, anchor, per_set, seed)
        found = {}
        with apply_patch(view, patch):
            for name in attacks:
                after = run_attack(view, name, target, anchor, budget_of(name, budget), seed, prepared[name])
                found[name] = {"success_before": before[name].success, "success_after": after.success,
                                 "samples": after.samples}
        neighbours = {s.concept: [s.shown_before, s.shown_after] for s in evaluation.sets
                      if s.name.startswith("surrounding")}
        row = {"target": target, "anchor": anchor, "method": method, "rounds": rounds if "robust" in method else 0,
               "seconds_erase": round(seconds, 1), **evaluation.summary, "neighbours": neighbours,
               "preservation": evaluation.preservation.as_json() if evaluation.preservation else None,
               "attacks": found}
        rows.append(row)
        on_row(row)
    return rows


def _pct(value: float) -> str:
    return f"{value:.0%}"


def _worst(row: dict) -> str:
    """The neighbour that lost the most (before -> after), or "-" when none did."""
    changes = {name: after - before for name, (before, after) in row.get("neighbours", {}).items()}
    if not changes or min(changes.values()) >= 0:
        return "-"
    name = min(changes, key=changes.get)
    before, after = row["neighbours"][name]
    return f"{name} {_pct(before)} -> {_pct(after)}"


def _change(row: dict) -> str:
    """The worst neighbour change of the row's evaluation (the set), or "-" for rows measured without it."""
    change = (row.get("preservation") or {}).get("neighbour_change")
    if not change:
        return "-"
    return f"{change['worst']:.2f} ({change['worst_set'].split(': ')[-1]})"


def _mean_change(rows: list[dict]) -> str:
    found = [r["preservation"]["neighbour_change"]["worst"] for r in rows if (r.get("preservation") or {})
             .get("neighbour_change")]
    return f"{sum(found) / len(found):.2f}" if found else "-"


def markdown(rows: list[dict], budget: dict) -> str:
    names = [n for n in ATTACK_NAMES if rows and n in rows[0]["attacks"]]
    concepts = list(dict.fromkeys(r["target"] for r in rows))
    rows = sorted(rows, key=lambda r: (concepts.index(r["target"]), METHODS.index(r["method"])))
    head = ("| concept -> anchor | method | target shown | anchor kept | surrounding kept | "
            + " | ".join(names) + " | worst neighbour | neighbour change worst | erase s |\n|"
            + " --- |" * (8 + len(names)))
    lines = [head]
    for r in rows:
        attacks = " | ".join(f"{_pct(r['attacks'][n]['success_before'])} -> "
                             f"**{_pct(r['attacks'][n]['success_after'])}**" for n in names)
        lines.append(f"| {r['target']} -> {r['anchor']} | {r['method']} | {_pct(r['target_recognised_before'])} -> "
                     f"**{_pct(r['target_recognised'])}** | {_pct(r['anchor_retained'])} | "
                     f"{_pct(r.get('surrounding_retained', float('nan')))} | {attacks} | {_worst(r)} | "
                     f"{_change(r)} | {r['seconds_erase']:.0f} |")
    for method in [m for m in METHODS if any(r["method"] == m for r in rows)]:
        mine = [r for r in rows if r["method"] == method]

        def mean(values: list[float]) -> float:
            return sum(values) / len(values)

        attacks = " | ".join(f"{_pct(mean([r['attacks'][n]['success_before'] for r in mine]))} -> "
                             f"**{_pct(mean([r['attacks'][n]['success_after'] for r in mine]))}**"
                             for n in names)
        lines.append(f"| **mean of {len(mine)}** | {method} | "
                     f"{_pct(mean([r['target_recognised_before'] for r in mine]))} -> "
                     f"**{_pct(mean([r['target_recognised'] for r in mine]))}** | "
                     f"{_pct(mean([r['anchor_retained'] for r in mine]))} | "
                     f"{_pct(mean([r.get('surrounding_retained', 1.0) for r in mine]))} | {attacks} | - | "
                     f"{_mean_change(mine)} | {mean([r['seconds_erase'] for r in mine]):.0f} |")
    budgets = "; ".join(f"{name}: {json.dumps(b)}" for name, b in budget.items())
    return "\n".join(lines) + f"\n\nAttack budgets: {budgets}\n"


def _earlier_rows(args: argparse.Namespace, budget: dict) -> list[dict]:
    path = Path(args.out).with_suffix(".json")
    if not path.exists():
        return []
    report = json.loads(path.read_text())
    # reports from before the presets were renamed were made with today's "thorough" (then the default)
    same = (report.get("budgets") == budget and report.get("rounds") == args.rounds
            and report.get("per_set") == args.per_set and report.get("seed") == args.seed
            and report.get("preset", "thorough") == args.preset and report.get("model", "toy") == args.model
            and report.get("settings", {}) == parse_settings(args.settings))
    if not same:
        raise SystemExit(f"{path} was measured with other settings; remove it or leave out --resume")
    return list(report["rows"])


def main(argv: list[str] | None = None) -> int:
    from ..toy.concepts import CONCEPTS, CONCEPTS_BY_NAME

    parser = argparse.ArgumentParser(prog="python -m ablation_core.cli.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("toy", "toy-flux"), default="toy", help="toy world (default: toy)")
    parser.add_argument("--concepts", nargs="+", default=None,
                        help="toy concepts to erase, each with its own anchor (default: every one)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="erasure methods (default: all four)")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACK_NAMES), choices=ATTACK_NAMES,
                        help="attacks to run (default: all three)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the robust methods (default: 2)")
    parser.add_argument("--attack-budget", choices=["full", "small"], default="full",
                        help="the attacks' budgets (default: full)")
    parser.add_argument("--per-set", type=int, default=16, help="evaluation samples per prompt set (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="default",
                        help="preset of the trained methods (default: default)")
    parser.add_argument("--settings", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config settings of every method measured (values read as JSON, else as text), e.g. "
                             "preserve_focus=4 for the closed forms")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None,
                        help="write the rows (.json), the table (.md) and the patches (folder F_patches) here")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in F.json (same budget, rounds, samples and seed) and measure only "
                             "the missing concept x method pairs (default: start over)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.concepts or [c.name for c in CONCEPTS]
    unknown = [n for n in names if n not in CONCEPTS_BY_NAME]
    if unknown:
        parser.error(f"unknown toy concept {unknown[0]!r}; known: {', '.join(CONCEPTS_BY_NAME)}")
    settings = parse_settings(args.settings)
    view = load_model(args.model)
    budget = {name: budget_of(name, args.attack_budget).as_json() for name in args.attacks}
    rows: list[dict] = _earlier_rows(args, budget) if args.resume and args.out else []
    patch_dir = Path(args.out + "_patches") if args.out else None
    if patch_dir is not None:
        patch_dir.mkdir(parents=True, exist_ok=True)

    def on_row(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            report = {"model": args.model, "attack_budget": args.attack_budget, "budgets": budget,
                      "preset": args.preset, "rounds": args.rounds, "per_set": args.per_set,
                      "seed": args.seed, "settings": settings, "rows": rows}
            write_text_atomic(Path(args.out).with_suffix(".json"), json.dumps(report, indent=2) + "\n")
            write_text_atomic(Path(args.out).with_suffix(".md"), markdown(rows, budget))

    for name in names:
        concept = CONCEPTS_BY_NAME[name]
        done = {r["method"] for r in rows if r["target"] == concept.name}
        measure_concept(view, concept.name, concept.anchor, [m for m in args.methods if m not in done], args.rounds,
                        args.attack_budget, args.per_set, args.seed, on_row, patch_dir, tuple(args.attacks),
                        args.preset, settings)
    print(markdown(rows, budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
