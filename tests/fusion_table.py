"""Fusion vs weighted sum of N separately made patches on the toy world (issue 10's fusion figures).

``python -m tests.fusion_table [--method closed-form|trained] [--sizes 2 5 10] [--per-set 16] [--out F]``

Makes one patch per concept (each on its own, the way a user makes them one at a time), then merges the first N of
them two ways: the weighted sum (all weights 1) and the closed-form fusion (``fuse_patches``, MACE). Every concept of
the toy world is sampled once before (same noise for all patches) and once after each patch, and the toy
classifier says what each image shows. For each merge:

- *target shown*: per source target, the share of its prompts' images still showing it, under the merge and under
  the source's own patch; "gap" is merge minus own (how much of each erasure did not survive the merge);
- *anchors kept*: images of the anchors still showing their anchor, relative to before (sum over anchors);
- *surroundings kept*: the same for every concept that is neither a target nor an anchor of the merge;
- the preservation figures of ``eval --json`` over every concept the merge should keep (anchors and surroundings),
  on their captions that name no target of the merge (as ``eval`` leaves them out):
  *neighbour change* (mean and worst concept; 1.0 = the typical distance between two concepts' samples) and
  *neighbour FID* with its noise floor (the unpatched model's samples from a second noise seed). The model-side
  prediction drift is left out: it is scaled by one target-anchor gap, and a merge has several.

Sampling uses the evaluation caption templates (the patches were made on the others) and seeds past the runs'.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ablation_core import apply_patch, load_model, make_config, merge_weighted
from ablation_core.evaluation.preservation import (
    PreservedSamples,
    classifier_features,
    concept_scale,
    measure_preservation,
)
from ablation_core.evaluation.toy_eval import (
    EVAL_SEED_OFFSET,
    FLOOR_SEED_OFFSET,
    _classify_samples,
    _shown,
    eval_captions,
)
from ablation_core.files import write_text_atomic
from ablation_core.methods.ablation.loop import ablate
from ablation_core.methods.closed_form.fusion import fuse_patches
from ablation_core.methods.closed_form.settings import make_closed_form_config
from ablation_core.methods.closed_form.solve import erase_closed_form
from ablation_core.toy.concepts import CONCEPTS_BY_NAME

# Ten erasures whose anchors are never erased (the five kept concepts are the anchors and "photo").
PAIRS = [("snoopy", "dog"), ("grumpy cat", "cat"), ("nemo", "fish"), ("van gogh", "painting"), ("monet", "painting"),
         ("picasso", "painting"), ("bird", "fish"), ("car", "dog"), ("house", "cat"), ("tree", "dog")]
WORLD = ["cat", "dog", "fish", "bird", "car", "house", "tree", "grumpy cat", "snoopy", "nemo", "photo", "painting",
         "van gogh", "monet", "picasso"]


def make_patch(view, method: str, target: str, anchor: str):
    if method == "closed-form":
        return erase_closed_form(view, make_closed_form_config(target, anchor)).patch
    return ablate(view, make_config(target, anchor)).patch


class Shown:
    """Share of each concept's evaluation prompts whose images show it, before (cached) and after a patch; and the
    preservation figures of a merge's kept concepts."""

    def __init__(self, view, per_set: int):
        from ablation_core.toy.classifier import load_toy_classifier
        from ablation_core.toy.model import DEFAULT_GUIDANCE, DEFAULT_STEPS

        self.view, self.per_set = view, per_set
        self.classifier = load_toy_classifier()
        self.settings = (DEFAULT_STEPS, DEFAULT_GUIDANCE)
        features: dict[str, torch.Tensor] = {}
        self.before = {c: self._sample(c, self._prompts(c), features) for c in WORLD}
        self.scale = concept_scale(features)  # the typical distance between two concepts' samples
        self.unpatched: dict[tuple, torch.Tensor] = {}

    def _prompts(self, concept: str, avoid: tuple[str, ...] = ()) -> list[str]:
        """Its evaluation captions; with ``avoid``, those naming none of them (a kept concept's captions that name
        an erased one, "a monet painting of a cat", are meant to change)."""
        return eval_captions(concept, self.per_set, tuple(a for a in avoid if a != concept))

    def _sample(self, concept: str, prompts: list[str], features: dict | None = None, offset: int = 0) -> float:
        seed = EVAL_SEED_OFFSET + offset + WORLD.index(concept)
        predictions, images = _classify_samples(self.view, self.classifier, prompts, seed, *self.settings)
        if features is not None:
            features[concept] = classifier_features(self.classifier, images)
        return _shown(predictions, concept)

    def after(self, patch, concepts: list[str]) -> dict[str, float]:
        with apply_patch(self.view, patch):
            return {c: self._sample(c, self._prompts(c)) for c in concepts}

    def _unpatched(self, concept: str, prompts: list[str], offset: int) -> torch.Tensor:
        key = (concept, tuple(prompts), offset)
        if key not in self.unpatched:
            found: dict[str, torch.Tensor] = {}
            self._sample(concept, prompts, found, offset)
            self.unpatched[key] = found[concept]
        return self.unpatched[key]

    def preservation(self, patch, kept_concepts: list[str], targets: list[str]) -> dict:
        """``eval --json``'s figures over the concepts a merge keeps, on their captions that name no target of it;
        the floor: the unpatched model's samples of the same prompts from a second noise seed."""
        samples, floor = [], []
        for c in kept_concepts:
            prompts = self._prompts(c, tuple(targets))
            after: dict[str, torch.Tensor] = {}
            with apply_patch(self.view, patch):
                self._sample(c, prompts, after)
            samples.append(PreservedSamples(c, c, prompts, self._unpatched(c, prompts, 0), after[c]))
            floor.append(self._unpatched(c, prompts, FLOOR_SEED_OFFSET))
        return measure_preservation(samples, self.scale, torch.cat(floor)).as_json()


def kept(shown: Shown, after: dict[str, float], concepts: list[str]) -> float:
    before = sum(shown.before[c] for c in concepts)
    return sum(after[c] for c in concepts) / before if before else float("nan")


def run(method: str, sizes: list[int], per_set: int) -> list[dict]:
    view = load_model("toy")
    shown = Shown(view, per_set)
    pairs = PAIRS[:max(sizes)]
    started = time.perf_counter()
    patches = [make_patch(view, method, t, a) for t, a in pairs]
    print(f"made {len(patches)} {method} patches in {time.perf_counter() - started:.1f}s", flush=True)
    own = {t: shown.after(p, [t])[t] for (t, _), p in zip(pairs, patches)}
    rows = []
    for size in sizes:
        chosen = pairs[:size]
        targets = [t for t, _ in chosen]
        anchors = list(dict.fromkeys(a for _, a in chosen))
        surroundings = [c for c in WORLD if c not in targets and c not in anchors]
        started = time.perf_counter()
        fused = fuse_patches(view, patches[:size])
        fuse_seconds = time.perf_counter() - started
        for merge, patch in (("weighted sum", merge_weighted(patches[:size])), ("fusion", fused)):
            after = shown.after(patch, WORLD)
            preservation = shown.preservation(patch, [c for c in WORLD if c not in targets], targets)
            gaps = [after[t] - own[t] for t in targets]
            rows.append({
                "method": method, "patches": size, "merge": merge, "per_set": per_set,
                "target_shown_mean": sum(after[t] for t in targets) / size,
                "target_shown_max": max(after[t] for t in targets),
                "own_patch_target_shown_mean": sum(own[t] for t in targets) / size,
                "gap_mean": sum(gaps) / size, "gap_max": max(gaps),
                "anchors_kept": kept(shown, after, anchors), "surroundings_kept": kept(shown, after, surroundings),
                "surroundings": surroundings, "fuse_seconds": round(fuse_seconds, 2) if merge == "fusion" else None,
                "shown_before": {c: shown.before[c] for c in WORLD}, "shown_after": after,
                "own_shown": {t: own[t] for t in targets}, "preservation": preservation})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| patches | merge | target shown (mean / worst) | own patches (mean) | worst gap to own | anchors kept "
             "| surroundings kept | neighbour change mean / worst (concept) | neighbour FID (floor) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        change, fid = r["preservation"]["neighbour_change"], r["preservation"]["neighbour_fid"]
        lines.append(f"| {r['patches']} {r['method']} | {r['merge']} | {r['target_shown_mean']:.0%} / "
                     f"{r['target_shown_max']:.0%} | {r['own_patch_target_shown_mean']:.0%} | "
                     f"{100 * r['gap_max']:+.0f} pts | {r['anchors_kept']:.0%} | {r['surroundings_kept']:.0%} | "
                     f"{change['mean']:.2f} / **{change['worst']:.2f}** ({change['worst_set']}) | "
                     f"{fid['value']:.4f} ({fid['floor']:.4f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fusion_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=("closed-form", "trained"), default="closed-form")
    parser.add_argument("--sizes", nargs="+", type=int, default=[2, 5, 10])
    parser.add_argument("--per-set", type=int, default=16)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if max(args.sizes) > len(PAIRS) or min(args.sizes) < 2:
        parser.error(f"sizes between 2 and {len(PAIRS)}")
    assert all(c in CONCEPTS_BY_NAME or c in ("photo", "painting") for c in WORLD)
    torch.set_num_threads(1)
    rows = run(args.method, args.sizes, args.per_set)
    table = markdown(rows)
    print(table)
    if args.out:
        write_text_atomic(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
        write_text_atomic(Path(args.out).with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
