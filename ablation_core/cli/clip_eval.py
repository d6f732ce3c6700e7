"""``eval --clip``: the CLIP figures of a patch on any model that decodes images, with the cost printed first."""

from __future__ import annotations

import argparse
import sys

from ..errors import AblationError

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

    if args.attack:
        raise AblationError("attacks are scored by the toy world's classifier; leave --attack out with --clip")
    per_set = args.per_set or REAL_PER_SET
    sampling = Sampling(args.sampler_steps, args.guidance, args.batch_size, args.latent_size)
    sets, _, _ = clip_prompt_sets(args.target, args.anchor, args.kind, per_set, args.seed, args.neighbours)
    print(describe_cost(estimate_cost(view, sets, sampling), sampling), file=sys.stderr if args.json else sys.stdout,
          flush=True)
    with progress_bars() as on_progress:
        evaluation = evaluate_clip(view, patch, scorer, args.target, args.anchor, args.kind, per_set, args.seed,
                                   args.strength, args.neighbours, sampling, on_progress)
    print(evaluation.to_json() if args.json else evaluation.table())
    return 0
