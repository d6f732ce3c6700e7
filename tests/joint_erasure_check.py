"""Ten toy concepts erased together: one closed-form solve over the list, and the fusion of ten separate patches.

``python -m tests.joint_erasure_check [--per-concept 16]``

For every concept of the toy world, samples ``--per-concept`` evaluation captions on the patched model (noise from
the attacks' success seeds, apart from every erasure's) and prints the fraction the classifier reads as the concept:
the ten erased ones should be gone, the other three (cat, dog, fish) kept. A quick look at what a joint erasure does
to each concept; ``tests.fusion_table`` is the full comparison with the weighted sum.
"""

from __future__ import annotations

import argparse

import torch

from ablation_core import apply_patch, load_model
from ablation_core.evaluation.attacks.common import SUCCESS_SEED_OFFSET, success_rate
from ablation_core.methods.closed_form.fusion import fuse_patches
from ablation_core.methods.closed_form.settings import make_closed_form_config
from ablation_core.methods.closed_form.solve import erase_closed_form
from ablation_core.toy.concepts import CONCEPTS
from ablation_core.toy.prompts import captions_of

PAIRS = (("snoopy", "dog"), ("grumpy cat", "cat"), ("nemo", "fish"), ("van gogh", "painting"), ("monet", "painting"),
         ("picasso", "painting"), ("bird", "fish"), ("car", "dog"), ("house", "cat"), ("tree", "dog"))


def shown_after(view, patch, per_concept: int) -> dict[str, float]:
    shown = {}
    for concept in CONCEPTS:
        captions = captions_of(concept.name, "eval")
        captions = [captions[i % len(captions)] for i in range(per_concept)]
        with apply_patch(view, patch), torch.no_grad():
            shown[concept.name], _ = success_rate(view, view.encode(captions), concept.name, SUCCESS_SEED_OFFSET)
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.joint_erasure_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-concept", type=int, default=16)
    args = parser.parse_args(argv)
    view = load_model("toy")
    targets, anchors = [t for t, _ in PAIRS], [a for _, a in PAIRS]
    joint = erase_closed_form(view, make_closed_form_config(targets, anchors)).patch
    separate = [erase_closed_form(view, make_closed_form_config(t, a)).patch for t, a in PAIRS]
    fused = fuse_patches(view, separate, [1.0] * len(separate))
    results = {"one solve": shown_after(view, joint, args.per_concept),
               "fusion of 10": shown_after(view, fused, args.per_concept)}
    print("| concept | erased? | " + " | ".join(f"shown after {name}" for name in results) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in results) + " |")
    for concept in CONCEPTS:
        cells = " | ".join(f"{shown[concept.name]:.0%}" for shown in results.values())
        print(f"| {concept.name} | {'yes' if concept.name in targets else 'no (kept)'} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
