"""Concept-type presets, several targets in one run and an erasure on top of an earlier one, measured on the toy world.

``python -m tests.recipe_cases [--model toy|toy-flux] [--per-set 24] [--cases preset three second] [--out F]``

Each case makes a patch through the Python API as a user would (``make_config(..., concept_type=...)``, several
targets, ``ablate(..., base_patch=first)``) and measures every target it erased with ``evaluate_toy`` (evaluation
templates and noise disjoint from the run's). A case passes when each target is shown in <= 5 % of samples and the
anchors and surroundings keep >= 95 %; the table says which did not.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ablation_core import ablate, evaluate_toy, load_model, make_config
from ablation_core.files import write_text_atomic

TARGET_MAX, KEPT_MIN = 0.05, 0.95

# (case, [(target, anchor), ...], concept type); memorized images and inappropriate content have no toy-world
# counterpart (no memorized sample, no detector), so they are not measured here.
PRESET_CASES = (
    ("preset object", [("car", "house")], "object"),
    ("preset instance", [("snoopy", "dog")], "instance"),
    ("preset instance (overlapping words)", [("grumpy cat", "cat")], "instance"),
    ("preset style", [("van gogh", "painting")], "style"),
)
JOINT_CASE = ("three targets in one run", [("nemo", "fish"), ("monet", "painting"), ("car", "house")], None)
# the joint run a user tried in the preservation issue: an instance, a style and an object
JOINT_MIXED_CASE = ("three targets in one run (instance, style, object)",
                    [("snoopy", "dog"), ("van gogh", "painting"), ("bird", "fish")], None)
SETTINGS: dict[str, object] = {}  # --settings: config settings for every trained case
FIRST, SECOND = ("snoopy", "dog"), ("picasso", "painting")


def measure(view, patch, pairs: list[tuple[str, str]], per_set: int) -> list[dict]:
    rows = []
    for target, anchor in pairs:
        evaluation = evaluate_toy(view, patch, target, anchor, per_set=per_set)
        summary = evaluation.summary
        kept = evaluation.preservation.as_json() if evaluation.preservation is not None else {}
        rows.append({"target": target, "anchor": anchor, **{k: summary[k] for k in (
            "target_recognised_before", "target_recognised", "anchor_retained", "surrounding_retained")},
            "neighbour_change": kept.get("neighbour_change"),
            "worst_neighbour": min(([s.concept, s.shown_after] for s in evaluation.sets
                                    if s.name.startswith("surrounding")), key=lambda w: w[1], default=None)})
    return rows


def passed(rows: list[dict]) -> bool:
    return all(r["target_recognised"] <= TARGET_MAX and r["anchor_retained"] >= KEPT_MIN
               and r["surrounding_retained"] >= KEPT_MIN for r in rows)


def run(per_set: int, cases: list[str] | None = None, model: str = "toy") -> list[dict]:
    view = load_model(model)
    results = []

    def record(case: str, pairs: list[tuple[str, str]], patch, seconds: float) -> None:
        rows = measure(view, patch, pairs, per_set)
        results.append({"case": case, "seconds": round(seconds, 1), "passed": passed(rows), "targets": rows,
                        "concept_type": patch.metadata.get("ablation.concept_type", ""),
                        "settings": json.loads(patch.metadata.get("ablation.settings", "{}"))})
        print(json.dumps(results[-1]), flush=True)

    def wanted(case: str) -> bool:
        return not cases or any(case.startswith(c) for c in cases)

    for case, pairs, concept_type in PRESET_CASES + (JOINT_CASE, JOINT_MIXED_CASE):
        if not wanted(case):
            continue
        targets, anchors = [t for t, _ in pairs], [a for _, a in pairs]
        started = time.perf_counter()
        patch = ablate(view, make_config(targets, anchors, concept_type=concept_type, **SETTINGS)).patch
        record(case, pairs, patch, time.perf_counter() - started)
    if wanted("three targets in one closed-form solve"):
        from ablation_core.methods.closed_form.settings import make_closed_form_config
        from ablation_core.methods.closed_form.solve import erase_closed_form

        pairs = JOINT_CASE[1]
        started = time.perf_counter()
        patch = erase_closed_form(view, make_closed_form_config([t for t, _ in pairs], [a for _, a in pairs])).patch
        record("three targets in one closed-form solve", pairs, patch, time.perf_counter() - started)

    if not wanted("second erasure"):
        return results
    started = time.perf_counter()
    first = ablate(view, make_config(*FIRST, **SETTINGS)).patch
    both = ablate(view, make_config(*SECOND, **SETTINGS), base_patch=first).patch
    record("second erasure on top of a first", [FIRST, SECOND], both, time.perf_counter() - started)
    return results


def _change_text(change: dict | None) -> str:
    return f"{change['mean']:.2f} / **{change['worst']:.2f}**" if change else "-"


def markdown(results: list[dict]) -> str:
    lines = ["| case | target -> anchor | target shown (before -> after) | anchor kept | surroundings kept "
             "| worst neighbour | neighbour change mean / worst | ok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for result in results:
        for row in result["targets"]:
            worst, change = row.get("worst_neighbour"), row.get("neighbour_change")
            lines.append(f"| {result['case']} | {row['target']} -> {row['anchor']} "
                         f"| {row['target_recognised_before']:.0%} -> **{row['target_recognised']:.0%}** "
                         f"| {row['anchor_retained']:.0%} | {row['surrounding_retained']:.0%} "
                         f"| {f'{worst[0]} {worst[1]:.0%}' if worst else '-'} | {_change_text(change)} "
                         f"| {'yes' if result['passed'] else 'NO'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.recipe_cases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("toy", "toy-flux"), default="toy")
    parser.add_argument("--per-set", type=int, default=24)
    parser.add_argument("--cases", nargs="+", default=None,
                        help="only the cases whose names start so: preset, three, second (default: all)")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    parser.add_argument("--settings", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config settings for every trained case (values read as JSON, else as text)")
    args = parser.parse_args(argv)
    from ablation_core.cli.common import parse_settings

    SETTINGS.update(parse_settings(args.settings))
    results = run(args.per_set, args.cases, args.model)
    table = markdown(results)
    print(table)
    if args.out:
        write_text_atomic(Path(args.out).with_suffix(".json"), json.dumps(results, indent=1) + "\n")
        write_text_atomic(Path(args.out).with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
