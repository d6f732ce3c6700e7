"""The commands behind ``python -m ablation_core``. Each checks its arguments first, then does the work.

Output paths, input files and prompts are checked before a model is loaded, so a typo costs a second, not a run.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .. import files
from ..backends.loading import TOY_MODELS
from ..errors import AblationError
from . import checks
from .common import device_and_dtype, load_view, patch_out, save_patch, size_text
from .erase import cmd_ablate

log = logging.getLogger("ablation_core")


# Commands ------------------------------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> int:
    from ..patches.patch import describe_patch
    from ..patches.storage import load_patch

    files.check_input_file(args.file, "patch file")
    info = describe_patch(load_patch(args.file))
    info["file_size_bytes"] = Path(args.file).stat().st_size
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    meta = info["metadata"]
    print(f"{args.file}: {info['layers']} layers, {info['storage']}"
          f"{' rank <= ' + str(info['max_rank']) if info['storage'] == 'lora' else ''}, "
          f"{info['parameters']:,} parameters, {size_text(Path(args.file))}")
    for key in sorted(meta):
        print(f"  {key}: {meta[key]}")
    if args.keys:
        print("\n".join("  " + k for k in info["keys"]))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from ..evaluation.images import grid, save_image
    from ..models.sampling import sample_latents
    from ..patches.apply import apply_patch
    from ..patches.storage import load_patch

    prompts = [checks.check_text(p, "prompt") for p in args.prompt]
    checks.check_model_spec(args.model)
    files.check_input_file(args.patch, "patch file")
    files.check_output_file(args.out, (".png", ".jpg", ".jpeg"), args.overwrite, "image")
    patch = load_patch(args.patch)
    view = load_view(args)
    index = torch.arange(len(prompts)).repeat_interleave(args.images)

    def images():
        latents = sample_latents(view, prompts, index, args.sampler_steps, args.guidance, 8, args.seed,
                                 args.latent_size)
        return view.decode(latents.to(view.device))

    before = images()
    with apply_patch(view, patch, args.strength):
        after = images()
    rows, labels = [], []
    for i, prompt in enumerate(prompts):
        chunk = slice(i * args.images, (i + 1) * args.images)
        rows += [list(before[chunk]), list(after[chunk])]
        labels += [f"before\n{prompt}", f"after\n{prompt}"]
    path = save_image(grid(rows, labels, [f"seed {args.seed}+{i}" for i in range(args.images)]), args.out)
    print(f"before/after image written to {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from ..patches.merge import merge_weighted
    from ..patches.storage import load_patch

    if args.weights is not None and len(args.weights) != len(args.files):
        raise AblationError(f"{len(args.files)} patches but {len(args.weights)} weights; give one weight per patch")
    if args.method == "fusion" and not args.model:
        raise AblationError("fusion needs the base model the patches were made for: add --model")
    for name in args.files:
        files.check_input_file(name, "patch file")
    if args.model:
        checks.check_model_spec(args.model)
    patch_out(args)
    patches = [load_patch(f) for f in args.files]
    if args.method == "fusion":
        from ..methods.closed_form.fusion import fuse_patches

        merged = fuse_patches(load_view(args), patches, args.weights)
    else:
        merged = merge_weighted(patches, args.weights)
    path = save_patch(merged, args)
    print(f"merged {len(args.files)} patches into {path} ({size_text(path)}, {args.method})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..models.layers import select_unet_modules
    from ..models.single_file import read_checkpoint
    from ..patches.importers import patch_from_finetuned, read_delta_bin

    checks.check_model_spec(args.model)
    from_delta_bin = args.delta_bin is not None
    files.check_input_file(args.delta_bin if from_delta_bin else args.finetuned,
                           "delta.bin" if from_delta_bin else "checkpoint")
    patch_out(args)
    if from_delta_bin:
        weights, source = read_delta_bin(args.delta_bin), Path(args.delta_bin).name
    else:
        state = read_checkpoint(args.finetuned)
        prefix = "model.diffusion_model."
        chosen = {n for n, _ in select_unet_modules(_fake_modules(state, prefix), args.group)}
        weights = {k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and k.endswith(".weight") and k[len(prefix):-len(".weight")] in chosen}
        source = Path(args.finetuned).name
    view = load_view(args)
    patch = patch_from_finetuned(view, weights, source)
    path = save_patch(patch, args)
    print(f"patch with {len(patch.deltas)} layers written to {path} ({size_text(path)})")
    return 0


def _fake_modules(state: dict, prefix: str):
    """(name, Linear-like) pairs for the weights in a state dict, so group patterns can select from a file."""
    for key, value in state.items():
        if key.startswith(prefix) and key.endswith(".weight") and value.ndim == 2:
            yield key[len(prefix):-len(".weight")], torch.nn.Linear(1, 1)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..patches.storage import load_patch
    from .console import progress_bars

    args.target, args.anchor = checks.check_concepts(args.target, args.anchor)
    checks.check_model_spec(args.model)
    files.check_input_file(args.patch, "patch file")
    if args.grid is not None:
        files.check_output_file(args.grid, (".png",), args.overwrite, "grid image")
    for option, value in (("--neighbours", args.neighbours), ("--clip-arch", args.clip_arch)):
        if value and not args.clip:
            raise AblationError(f"{option} belongs to the CLIP figures: add --clip PATH")
    if args.clip and args.grid is not None:
        raise AblationError("--grid draws the toy world's classifier evaluation; leave it out with --clip (the "
                            "apply command draws before/after images on any model)")
    if args.model in TOY_MODELS and not args.clip:
        checks.check_toy_concepts(args.target, args.anchor)
    patch = load_patch(args.patch)
    if args.clip:
        from .clip_eval import load_scorer, run_clip_eval

        scorer = load_scorer(args)
        return run_clip_eval(args, load_view(args), patch, scorer)
    view = load_view(args)
    if view.family.toy:
        from ..evaluation.toy_eval import evaluate_toy, to_json

        with progress_bars() as on_progress:
            evaluation = evaluate_toy(view, patch, args.target, args.anchor, args.per_set or 48, args.seed,
                                      args.strength, args.grid, on_progress)
            attacks = _attacks(args, view, patch, on_progress)
        if args.json:
            print(json.dumps({**evaluation.as_json(), "attacks": attacks[0]}, indent=2) if attacks
                  else to_json(evaluation))
        else:
            print(evaluation.table() + (f"\n\n{attacks[1]}" if attacks else ""))
        return 0
    if args.attack:
        raise AblationError("attacks are judged by the toy world's classifier or by a CLIP model: use --model toy, "
                            "or add --clip PATH")
    from ..evaluation.model_metrics import prediction_gaps
    from ..methods.prompts import choose_anchor_prompts, target_prompts

    anchors = choose_anchor_prompts(args.anchor, args.kind, 8, args.seed)
    targets = target_prompts(anchors, args.anchor, args.target, args.kind)
    gaps = prediction_gaps(view, patch, targets, anchors, args.seed, latent_size=args.latent_size,
                           strength=args.strength, unrelated_prompts=_neighbour_prompts(args, anchors))
    print(json.dumps(gaps, indent=2) if args.json else "\n".join(
        f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in gaps.items()))
    return 0


def _neighbour_prompts(args: argparse.Namespace, anchors: list[str]) -> list[str] | None:
    """The anchor prompts with a built-in neighbour in the target's place (other artists for a style, other members
    of the anchor's class for an object), for the prediction drift; None for a memorized prompt."""
    from ..evaluation.clip.prompts import builtin_neighbours
    from ..methods.prompts import target_prompts

    names = builtin_neighbours(args.target, args.anchor, args.kind)[0]
    return [p for name in names for p in target_prompts(anchors[:2], args.anchor, name, args.kind)] or None


def _attacks(args: argparse.Namespace, view, patch, on_progress) -> tuple[dict, str] | None:
    """The attacks asked for with --attack, as JSON and as a table (None when none was asked for)."""
    if not args.attack:
        return None
    from ..evaluation.attacks import as_json, attacks_table, run_attacks

    results = run_attacks(view, patch, args.target, args.anchor, args.attack, args.seed, args.attack_budget,
                          args.strength, on_progress)
    return as_json(results), attacks_table(results)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    target, anchor = checks.check_concepts(args.target, args.anchor)
    checks.check_toy_concepts(target, anchor)
    files.check_output_folder(args.out, "demo output folder")
    run_demo(Path(args.out), target, anchor, args.group, args.objective, args.seed, args.model)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench, run_closed_form_bench

    if args.arch == "flux":
        from .bench_flux import run_flux_bench

        report = run_flux_bench()
        print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
        return 0
    dtype_name = args.dtype
    if dtype_name == "auto" and args.arch != "toy":
        dtype_name = "bf16"  # full-size weights in bf16 on a CPU too: half the memory (SDXL's fp32 weights are 14 GB)
    device, dtype = device_and_dtype(args.device, dtype_name)
    if args.method == "closed-form":
        if args.arch == "toy":
            raise AblationError("the closed-form bench builds real shapes: choose --arch sd15, sd2 or sdxl")
        report = run_closed_form_bench(args.arch, device, dtype, tuple(args.concepts))
    else:
        report = run_bench(args.arch, device, dtype, steps=args.steps, anchor_images=args.anchor_images,
                           sampler_steps=args.sampler_steps, batch_size=args.batch_size, quick=args.quick,
                           compare_default=args.compare_default, latent_size=args.latent_size,
                           gradient_checkpointing=args.gradient_checkpointing,
                           offload_text_encoder=args.offload_text_encoder)
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


COMMANDS = {"ablate": cmd_ablate, "inspect": cmd_inspect, "apply": cmd_apply, "merge": cmd_merge,
            "convert": cmd_convert, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench}
