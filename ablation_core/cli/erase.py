"""``ablate``: erase concepts with the trained method (one target) or in closed form (any number), optionally on top of
an earlier patch. Arguments are checked before the model is loaded."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import files
from ..backends.loading import TOY_MODELS
from ..errors import AblationError, PromptError
from . import checks
from .common import load_view, patch_out, save_patch, size_text


def _concepts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Targets and anchors from --target/--anchor and --concepts, checked."""
    from ..methods.closed_form.settings import parse_concept_lines

    targets, anchors = list(args.target or []), list(args.anchor or [])
    if args.concepts is not None:
        path = files.check_input_file(args.concepts, "concepts file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise PromptError(f"the concepts file {path} is not UTF-8 text") from None
        shared = anchors[0] if len(anchors) == 1 and not targets else None
        listed_targets, listed_anchors = parse_concept_lines(text, shared)
        if shared:
            anchors = []
        targets, anchors = targets + listed_targets, anchors + listed_anchors
    if not targets:
        raise PromptError("no target: give --target (repeat it for several) or --concepts FILE")
    if not anchors:
        raise PromptError("no anchor: give --anchor, once for all targets or once per target")
    if len(anchors) not in (1, len(targets)):
        raise PromptError(f"{len(targets)} target(s) but {len(anchors)} anchors: give one --anchor for all targets or "
                          "one per target")
    anchors = anchors * len(targets) if len(anchors) == 1 else anchors
    pairs = [checks.check_concepts(t, a) for t, a in zip(targets, anchors)]
    return [t for t, _ in pairs], [a for _, a in pairs]


def cmd_ablate(args: argparse.Namespace) -> int:
    from ..methods.prompts import read_prompt_file
    from ..patches.storage import load_patch

    targets, anchors = _concepts(args)
    if args.concept_type == "memorized" and len(targets) > 1:
        raise AblationError("a memorized image is erased one prompt at a time; give one --target")
    checks.check_model_spec(args.model)
    if args.model in TOY_MODELS:
        checks.check_toy_concepts(*targets, *anchors)
    patch_out(args)
    anchor_prompts = None
    if args.anchor_prompts is not None:
        anchor_prompts = tuple(read_prompt_file(files.check_input_file(args.anchor_prompts, "anchor prompt file")))
    base = load_patch(files.check_input_file(args.base_patch, "base patch")) if args.base_patch else None
    view = load_view(args)
    if args.method == "closed-form":
        patch, summary = _closed_form(args, view, targets, anchors, base)
    else:
        patch, summary = _trained(args, view, targets, anchors, anchor_prompts, base)
    path = save_patch(patch, args)
    print(f"patch written to {path} ({size_text(Path(path))}); {summary}")
    return 0


def _trained(args: argparse.Namespace, view, targets: list[str], anchors: list[str], anchor_prompts, base):
    from ..methods.ablation.check import check_summary
    from ..methods.ablation.settings import make_config
    from ..methods.robust.rounds import robust_ablate
    from .console import progress_bars

    config = make_config(
        targets, anchors, args.preset, concept_type=args.concept_type, kind=args.kind, group=args.group,
        objective=args.objective, negative_prompt=args.negative_prompt,
        regularization=args.regularize or None, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, lora_rank=args.lora_rank, anchor_images=args.anchor_images,
        sampler_steps=args.sampler_steps, guidance=args.guidance, misspelled_targets=args.misspellings,
        preserved_rows=args.preserved_rows, anchor_prompts=anchor_prompts, latent_size=args.latent_size, seed=args.seed,
        robust_rounds=getattr(args, "robust", 0) or None,
        gradient_checkpointing=getattr(args, "gradient_checkpointing", False) or None,
        offload_text_encoder=getattr(args, "offload_text_encoder", False) or None)
    with progress_bars() as on_progress:
        result = robust_ablate(view, config, on_progress, base_patch=base)
    return result.patch, (f"loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}; anchors "
                          f"{result.seconds_anchors:.1f}s, training {result.seconds_training:.1f}s; held-out check: "
                          f"{check_summary(result.check)}")


def _closed_form(args: argparse.Namespace, view, targets: list[str], anchors: list[str], base):
    from ..methods.closed_form.settings import make_closed_form_config
    from ..methods.robust.rounds import robust_erase_closed_form
    from .console import progress_bars

    kind = args.kind or ("style" if args.concept_type == "style" else None)
    config = make_closed_form_config(targets, anchors, kind=kind, mode=args.mode, preserve=args.preserve,
                                     preserve_weight=args.preserve_weight, seed=args.seed,
                                     preserve_focus=getattr(args, "preserve_focus", None),
                                     robust_rounds=getattr(args, "robust", 0),
                                     builtin_preserve=getattr(args, "builtin_bank", True))
    with progress_bars() as on_progress:
        result = robust_erase_closed_form(view, config, on_progress, base_patch=base)
    stats = result.stats
    return result.patch, (f"{len(result.config.targets)} concept(s) in {result.seconds:.2f}s ({result.config.mode}); "
                          f"targets moved {stats['target_moved_fraction']:.0%} onto their anchors, preserved outputs "
                          f"changed {stats['preserved_relative_change']:.1%}")
