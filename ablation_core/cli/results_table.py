"""The README's quality tables: toy-world concepts x methods (x parameter groups x objectives), measured.

``python -m ablation_core.cli.results_table [--methods trained closed-form combined] [--pairs "grumpy cat:cat" ...]
[--groups kv] [--out results]`` erases each pair (default: every concept of the toy world with its suggested
anchor) from the embedded toy model with each method (``combined``: the closed form first, the trained ablation on
top), evaluates the patch with ``evaluate_toy`` and prints a markdown table of unpatched and patched figures side by
side, with the worst-kept neighbour. Nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..backends.loading import load_model
from ..evaluation.toy_eval import evaluate_toy
from ..files import write_text_atomic
from ..methods.ablation.loop import ablate
from ..methods.ablation.settings import make_config
from ..models.layers import GROUPS


def every_concept() -> list[tuple[str, str]]:
    from ..toy.concepts import CONCEPTS

    return [(concept.name, concept.anchor) for concept in CONCEPTS]


METHODS = ("trained", "closed-form", "combined")


def _erase(view, method: str, target: str, anchor: str, group: str, objective: str, seed: int,
           regularization: bool | None):
    """The patch and its own held-out figure (how far the targets moved onto their anchors, 1 = all the way)."""
    from ..methods.closed_form.settings import make_closed_form_config
    from ..methods.closed_form.solve import erase_closed_form

    closed = erase_closed_form(view, make_closed_form_config(target, anchor, seed=seed)) \
        if method in ("closed-form", "combined") else None
    if method == "closed-form":
        return closed.patch, closed.stats["target_moved_fraction"]
    config = make_config(target, anchor, group=group, objective=objective, seed=seed, regularization=regularization)
    result = ablate(view, config, base_patch=closed.patch if closed else None)
    return result.patch, result.check["erased_fraction"]


def measure(pairs: list[tuple[str, str]], groups: list[str], objectives: list[str], per_set: int, seed: int,
            regularize_overlapping: bool = False, methods: tuple[str, ...] = ("trained",)) -> list[dict]:
    view = load_model("toy")
    rows = []
    for target, anchor in pairs:
        overlapping = anchor in target
        for method in methods:
            for group, objective in [(g, o) for g in groups for o in objectives] if method != "closed-form" \
                    else [("kv", "-")]:
                started = time.perf_counter()
                patch, moved = _erase(view, method, target, anchor, group, objective, seed,
                                      (overlapping and regularize_overlapping) or None)
                evaluation = evaluate_toy(view, patch, target, anchor, per_set, seed)
                worst = min((s for s in evaluation.sets if s.name.startswith("surrounding")),
                            key=lambda s: s.shown_after - s.shown_before, default=None)
                rows.append({"target": target, "anchor": anchor, "method": method, "group": group,
                             "objective": objective, "regularization": bool(overlapping and regularize_overlapping),
                             "seconds": round(time.perf_counter() - started, 1), "moved_onto_anchor": moved,
                             "worst_neighbour": worst.concept if worst else None,
                             "worst_neighbour_before": worst.shown_before if worst else None,
                             "worst_neighbour_after": worst.shown_after if worst else None,
                             **evaluation.summary})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| target -> anchor | method | group | loss | target shown | misspelt shown | anchor kept "
            "| surrounding kept | worst neighbour |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        reg = " + reg" if r["regularization"] else ""
        typo = (f"{r['misspelt_recognised_before']:.0%} -> **{r['misspelt_recognised']:.0%}**"
                if "misspelt_recognised" in r else "-")
        worst = (f"{r['worst_neighbour']} {r['worst_neighbour_before']:.0%} -> {r['worst_neighbour_after']:.0%}"
                 if r.get("worst_neighbour") else "-")
        lines.append(
            f"| {r['target']} -> {r['anchor']} | {r['method']} | {r['group']} | {r['objective']}{reg} "
            f"| {r['target_recognised_before']:.0%} -> **{r['target_recognised']:.0%}** | {typo} "
            f"| {r['anchor_accuracy_before']:.0%} -> {r['anchor_accuracy_after']:.0%} (**{r['anchor_retained']:.0%}**) "
            f"| {r['surrounding_accuracy_before']:.0%} -> {r['surrounding_accuracy_after']:.0%} "
            f"(**{r['surrounding_retained']:.0%}**) | {worst} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablation_core.cli.results_table", description=__doc__)
    parser.add_argument("--pairs", nargs="+", default=None,
                        help="target:anchor pairs (default: every toy concept with its suggested anchor)")
    parser.add_argument("--methods", nargs="+", default=["trained"], choices=METHODS,
                        help="erasure methods (default: trained)")
    parser.add_argument("--groups", nargs="+", default=["kv"], choices=GROUPS, help="parameter groups (default: kv)")
    parser.add_argument("--regularize-overlapping", action="store_true",
                        help="regularize pairs whose target contains the anchor (default: off)")
    parser.add_argument("--objectives", nargs="+", default=["model"], choices=["model", "noise"],
                        help="objectives (default: model)")
    parser.add_argument("--per-set", type=int, default=48, help="samples per prompt set (default: 48)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--out", default=None, help="also write the rows (.json) and the table (.md) here")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else every_concept()
    rows = measure(pairs, args.groups, args.objectives, args.per_set, args.seed, args.regularize_overlapping,
                   tuple(args.methods))
    table = markdown(rows)
    print(table)
    if args.out:
        write_text_atomic(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
        write_text_atomic(Path(args.out).with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
