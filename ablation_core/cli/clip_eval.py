"""``eval --clip``: the CLIP figures of a patch on any model that decodes images, with the cost printed first, and
the attacks (``--attack``) judged by the same CLIP model."""

from __future__ import annotations

import argparse
import json
import sys

REAL_PER_SET = 16  # images per prompt set with --clip (the toy world's classifier evaluation takes 48)


def load_scorer(args: argparse.Namespace):
    """The CLIP model of --clip (checked before the diffusion model is loaded: a wrong path costs a second)."""
    from ..evaluation.clip import load_clip
    from .common import device_and_dtype

    device, dtype = device_and_dtype(args.device, args.dtype)
    return load_clip(args.clip, device, dtype, args.clip_arch)


def run_clip_eval(args: argparse.Namespace, view, patch, scorer) -> int:
    from ..evaluation.clip import Sampling, clip_prompt_sets, estimate_cost, evaluate_clip
    from ..evaluation.clip.report import describe_cost
    from .console import progress_bars

    per_set = args.per_set or REAL_PER_SET
    sampling = Sampling(args.sampler_steps, args.guidance, args.batch_size, args.latent_size)
    sets, _, _ = clip_prompt_sets(args.target, args.anchor, args.kind, per_set, args.seed, args.neighbours)
    notes = sys.stderr if args.json else sys.stdout
    print(describe_cost(estimate_cost(view, sets, sampling), sampling), file=notes, flush=True)
    world = _attack_world(args, view, scorer, sampling, notes)
    with progress_bars() as on_progress:
        evaluation = evaluate_clip(view, patch, scorer, args.target, args.anchor, args.kind, per_set, args.seed,
                                   args.strength, args.neighbours, sampling, on_progress)
        attacks = _clip_attacks(args, view, patch, world, on_progress) if world else None
    if args.json:
        print(json.dumps({**evaluation.as_json(), "attacks": attacks[0]}, indent=2) if attacks
              else evaluation.to_json())
    else:
        print(evaluation.table() + (f"\n\n{attacks[1]}" if attacks else ""))
    return 0


def _attack_world(args: argparse.Namespace, view, scorer, sampling, notes):
    """The CLIP attack world of --attack (None without it), its cost printed."""
    if not args.attack:
        return None
    from ..evaluation.attacks import attack_names, budget_of
    from ..evaluation.attacks.cost import attack_costs, describe_attack_cost
    from ..evaluation.clip.attack_world import ClipWorld

    world = ClipWorld(scorer, args.target, args.anchor, args.kind, sampling, args.seed)
    names = attack_names(args.attack)
    budgets = {name: budget_of(name, args.attack_budget) for name in names}
    print(describe_attack_cost(attack_costs(view, names, budgets, args.target, args.seed, world)), file=notes,
          flush=True)
    return world


def _clip_attacks(args: argparse.Namespace, view, patch, world, on_progress) -> tuple[dict, str]:
    from ..evaluation.attacks import as_json, attacks_table, run_attacks

    results = run_attacks(view, patch, args.target, args.anchor, args.attack, args.seed, args.attack_budget,
                          args.strength, on_progress, world=world)
    return as_json(results), attacks_table(results, world)
