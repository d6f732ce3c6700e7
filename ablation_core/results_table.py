"""The README's quality table: every parameter group and objective on several toy-world pairs, measured.

``python -m ablation_core.results_table [--pairs "grumpy cat:cat" ...] [--out results.md]`` ablates each pair with
each group and objective from the embedded toy model, evaluates the patch with ``evaluate_toy`` and prints a
markdown table of unpatched and patched figures side by side. Nothing here is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .ablate import ablate
from .backends.diffusers import load_model
from .evaluate import evaluate_toy
from .layers import GROUPS
from .settings import toy_config

DEFAULT_PAIRS = ("snoopy:dog", "van gogh:painting", "grumpy cat:cat")


def measure(pairs: list[tuple[str, str]], groups: list[str], objectives: list[str], per_set: int, seed: int,
            regularize_overlapping: bool = True) -> list[dict]:
    view = load_model("toy")
    rows = []
    for target, anchor in pairs:
        overlapping = anchor in target
        for group in groups:
            for objective in objectives:
                started = time.perf_counter()
                config = toy_config(target, anchor, group=group, objective=objective, seed=seed,
                                    regularization=overlapping and regularize_overlapping or None)
                result = ablate(view, config)
                evaluation = evaluate_toy(view, result.patch, target, anchor, per_set, seed)
                rows.append({"target": target, "anchor": anchor, "group": group, "objective": objective,
                             "regularization": config.regularization, "seconds": round(time.perf_counter() - started),
                             **evaluation.summary})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| target -> anchor | group | loss | target shown | misspelt shown | anchor kept | surrounding kept |\n"
            "| --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        reg = " + reg" if r["regularization"] else ""
        typo_before = r.get("misspelt_recognised_before", float("nan"))
        typo_after = r.get("misspelt_recognised", float("nan"))
        lines.append(
            f"| {r['target']} -> {r['anchor']} | {r['group']} | {r['objective']}{reg} "
            f"| {r['target_recognised_before']:.0%} -> **{r['target_recognised']:.0%}** "
            f"| {typo_before:.0%} -> **{typo_after:.0%}** "
            f"| {r['anchor_accuracy_before']:.0%} -> {r['anchor_accuracy_after']:.0%} (**{r['anchor_retained']:.0%}**) "
            f"| {r['surrounding_accuracy_before']:.0%} -> {r['surrounding_accuracy_after']:.0%} "
            f"(**{r['surrounding_retained']:.0%}**) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablation_core.results_table", description=__doc__)
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="target:anchor pairs")
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=GROUPS)
    parser.add_argument("--objectives", nargs="+", default=["model", "noise"])
    parser.add_argument("--per-set", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the rows (JSON) and the table (markdown) here")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs]
    rows = measure(pairs, args.groups, args.objectives, args.per_set, args.seed)
    table = markdown(rows)
    print(table)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
