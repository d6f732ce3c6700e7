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
from ..errors import AblationError
from . import checks

log = logging.getLogger("ablation_core")


def _device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AblationError(f"--device {device} was asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    index = torch.device(device).index
    if device.startswith("cuda") and index is not None and index >= torch.cuda.device_count():
        raise AblationError(f"--device {device} was asked for, but this machine has {torch.cuda.device_count()} "
                            "CUDA GPU(s), numbered from 0")
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise AblationError(f"--device {device} was asked for, but this PyTorch has no Apple GPU (MPS); use cpu")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _load(args: argparse.Namespace):
    from ..backends.diffusers import load_model

    device, dtype = _device_and_dtype(args.device, args.dtype)
    return load_model(args.model, device, dtype, getattr(args, "prediction_type", None))


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _save_patch(patch, args: argparse.Namespace) -> Path:
    if not args.full_rank:
        patch = patch.compressed(args.energy, args.rank)
    return patch.save(args.out)


def _patch_out(args: argparse.Namespace) -> None:
    files.check_output_file(args.out, (".safetensors",), args.overwrite, "patch file")


# Commands ------------------------------------------------------------------------------------------------------

def cmd_ablate(args: argparse.Namespace) -> int:
    from ..methods.ablation.loop import ablate
    from ..methods.ablation.settings import make_config
    from ..methods.prompts import read_prompt_file
    from .console import progress_bars

    args.target, args.anchor = checks.check_concepts(args.target, args.anchor)
    checks.check_model_spec(args.model)
    if args.model == "toy":
        checks.check_toy_concepts(args.target, args.anchor)
    _patch_out(args)
    anchor_prompts = None
    if args.anchor_prompts is not None:
        anchor_prompts = tuple(read_prompt_file(files.check_input_file(args.anchor_prompts, "anchor prompt file")))
    view = _load(args)
    config = make_config(
        args.target, args.anchor, args.preset, kind=args.kind, group=args.group, objective=args.objective,
        regularization=args.regularize or None, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, lora_rank=args.lora_rank, anchor_images=args.anchor_images,
        sampler_steps=args.sampler_steps, guidance=args.guidance, misspelled_targets=args.misspellings,
        anchor_prompts=anchor_prompts, latent_size=args.latent_size, seed=args.seed)
    with progress_bars() as on_progress:
        result = ablate(view, config, on_progress)
    path = _save_patch(result.patch, args)
    check = result.check
    print(f"patch written to {path} ({_size(path)}); loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}; "
          f"anchors {result.seconds_anchors:.1f}s, training {result.seconds_training:.1f}s; held-out check: the "
          f"target moved {check['erased_fraction']:.0%} of the way to the anchor")
    return 0


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
          f"{info['parameters']:,} parameters, {_size(Path(args.file))}")
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
    view = _load(args)
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
    for name in args.files:
        files.check_input_file(name, "patch file")
    _patch_out(args)
    merged = merge_weighted([load_patch(f) for f in args.files], args.weights)
    path = _save_patch(merged, args)
    print(f"merged {len(args.files)} patches into {path} ({_size(path)})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..models.layers import select_unet_modules
    from ..models.single_file import read_checkpoint
    from ..patches.importers import patch_from_finetuned, read_delta_bin

    checks.check_model_spec(args.model)
    from_delta_bin = args.delta_bin is not None
    files.check_input_file(args.delta_bin if from_delta_bin else args.finetuned,
                           "delta.bin" if from_delta_bin else "checkpoint")
    _patch_out(args)
    if from_delta_bin:
        weights, source = read_delta_bin(args.delta_bin), Path(args.delta_bin).name
    else:
        state = read_checkpoint(args.finetuned)
        prefix = "model.diffusion_model."
        chosen = {n for n, _ in select_unet_modules(_fake_modules(state, prefix), args.group)}
        weights = {k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and k.endswith(".weight") and k[len(prefix):-len(".weight")] in chosen}
        source = Path(args.finetuned).name
    view = _load(args)
    patch = patch_from_finetuned(view, weights, source)
    path = _save_patch(patch, args)
    print(f"patch with {len(patch.deltas)} layers written to {path} ({_size(path)})")
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
    if args.model == "toy":
        checks.check_toy_concepts(args.target, args.anchor)
    patch = load_patch(args.patch)
    view = _load(args)
    if view.family.name == "toy":
        from ..evaluation.toy_eval import evaluate_toy, to_json

        with progress_bars() as on_progress:
            evaluation = evaluate_toy(view, patch, args.target, args.anchor, args.per_set, args.seed,
                                      args.strength, args.grid, on_progress)
        print(to_json(evaluation) if args.json else evaluation.table())
        return 0
    from ..evaluation.model_metrics import prediction_gaps
    from ..methods.prompts import choose_anchor_prompts, target_prompts

    anchors = choose_anchor_prompts(args.anchor, args.kind, 8, args.seed)
    targets = target_prompts(anchors, args.anchor, args.target, args.kind)
    gaps = prediction_gaps(view, patch, targets, anchors, args.seed, strength=args.strength)
    print(json.dumps(gaps, indent=2) if args.json else "\n".join(f"{k}: {v:.4f}" for k, v in gaps.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    target, anchor = checks.check_concepts(args.target, args.anchor)
    checks.check_toy_concepts(target, anchor)
    files.check_output_folder(args.out, "demo output folder")
    run_demo(Path(args.out), target, anchor, args.group, args.objective, args.seed)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    device, dtype = _device_and_dtype(args.device, args.dtype)
    report = run_bench(args.arch, device, dtype, steps=args.steps, anchor_images=args.anchor_images,
                       sampler_steps=args.sampler_steps, batch_size=args.batch_size)
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


COMMANDS = {"ablate": cmd_ablate, "inspect": cmd_inspect, "apply": cmd_apply, "merge": cmd_merge,
            "convert": cmd_convert, "eval": cmd_eval, "demo": cmd_demo, "bench": cmd_bench}
