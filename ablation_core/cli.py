"""``python -m ablation_core``: ablate, inspect, apply, merge, convert and bench from the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from .errors import AblationError

log = logging.getLogger("ablation_core")


def _device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _load(args: argparse.Namespace):
    from .backends.diffusers import load_model

    device, dtype = _device_and_dtype(args.device, args.dtype)
    return load_model(args.model, device, dtype, getattr(args, "prediction_type", None))


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def _save_patch(patch, args: argparse.Namespace) -> Path:
    if not args.full_rank:
        patch = patch.compressed(args.energy, args.rank)
    return patch.save(args.out)


# Commands ------------------------------------------------------------------------------------------------------

def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import ablate
    from .console import progress_bars
    from .prompts import read_prompt_file
    from .settings import make_config

    view = _load(args)
    anchor_prompts = tuple(read_prompt_file(args.anchor_prompts)) if args.anchor_prompts else None
    config = make_config(
        args.target, args.anchor, args.preset, kind=args.kind, group=args.group, objective=args.objective,
        regularization=args.regularize or None, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, lora_rank=args.lora_rank, anchor_images=args.anchor_images,
        sampler_steps=args.sampler_steps, guidance=args.guidance, misspelled_targets=args.misspellings,
        anchor_prompts=anchor_prompts, latent_size=args.latent_size, seed=args.seed)
    with progress_bars() as on_progress:
        result = ablate(view, config, on_progress)
    path = _save_patch(result.patch, args)
    print(f"patch written to {path} ({_size(path)}); loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}; "
          f"anchors {result.seconds_anchors:.1f}s, training {result.seconds_training:.1f}s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .patch import describe, load_patch

    info = describe(load_patch(args.file))
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
    from .anchors import sample_latents
    from .images import grid, save_image
    from .patch import apply_patch, load_patch

    view = _load(args)
    patch = load_patch(args.patch)
    prompts = args.prompt
    index = torch.arange(len(prompts)).repeat_interleave(args.images)

    def images():
        latents = sample_latents(view, prompts, index, args.sampler_steps, args.guidance, 8, args.seed,
                                 args.latent_size)
        return view.decode(latents.to(view.device))

    before = images()
    applied = apply_patch(view, patch, args.strength)
    try:
        after = images()
    finally:
        applied.remove()
    rows, labels = [], []
    for i, prompt in enumerate(prompts):
        chunk = slice(i * args.images, (i + 1) * args.images)
        rows += [list(before[chunk]), list(after[chunk])]
        labels += [f"before: {prompt}", f"after:  {prompt}"]
    path = save_image(grid(rows, labels, [f"seed {args.seed}+{i}" for i in range(args.images)]), args.out)
    print(f"before/after image written to {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .merge import merge_weighted
    from .patch import load_patch

    merged = merge_weighted([load_patch(f) for f in args.files], args.weights)
    path = _save_patch(merged, args)
    print(f"merged {len(args.files)} patches into {path} ({_size(path)})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .importers import patch_from_finetuned, read_delta_bin
    from .layers import select_unet_modules
    from .single_file import read_checkpoint

    view = _load(args)
    if args.delta_bin:
        weights, source = read_delta_bin(args.delta_bin), Path(args.delta_bin).name
    else:
        state = read_checkpoint(args.finetuned)
        prefix = "model.diffusion_model."
        chosen = {n for n, _ in select_unet_modules(_fake_modules(state, prefix), args.group)}
        weights = {k[len(prefix):]: v for k, v in state.items()
                   if k.startswith(prefix) and k.endswith(".weight") and k[len(prefix):-len(".weight")] in chosen}
        source = Path(args.finetuned).name
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
    from .patch import load_patch

    view = _load(args)
    patch = load_patch(args.patch)
    if view.family.name == "toy":
        from .evaluate import evaluate_toy, to_json

        evaluation = evaluate_toy(view, patch, args.target, args.anchor, args.per_set, args.seed,
                                  args.strength, args.grid)
        print(to_json(evaluation) if args.json else evaluation.table())
        return 0
    from .model_metrics import prediction_gaps
    from .prompts import choose_anchor_prompts, target_prompts

    anchors = choose_anchor_prompts(args.anchor, args.kind, 8, args.seed)
    targets = target_prompts(anchors, args.anchor, args.target, args.kind)
    gaps = prediction_gaps(view, patch, targets, anchors, args.seed, strength=args.strength)
    print(json.dumps(gaps, indent=2) if args.json else "\n".join(f"{k}: {v:.4f}" for k, v in gaps.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), args.target, args.anchor, args.group, args.objective, args.seed)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    device, dtype = _device_and_dtype(args.device, args.dtype)
    report = run_bench(args.arch, device, dtype, steps=args.steps, anchor_images=args.anchor_images,
                       sampler_steps=args.sampler_steps, batch_size=args.batch_size)
    print(json.dumps(report, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


# Parser --------------------------------------------------------------------------------------------------------

def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a .safetensors checkpoint, a diffusers folder, or 'toy'")
    parser.add_argument("--device", default="auto", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="override for v-prediction SD2 checkpoints whose file does not say so")


def _patch_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="patch file to write (.safetensors)")
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument("--rank", type=int, default=None, help="store low rank of exactly this rank")
    storage.add_argument("--full-rank", action="store_true", help="store the exact delta (.diff keys; larger)")
    parser.add_argument("--energy", type=float, default=0.999,
                        help="low-rank storage keeps this fraction of each delta's energy (default 0.999)")


def build_parser() -> argparse.ArgumentParser:
    from .layers import GROUP_HELP
    from .objectives import OBJECTIVE_HELP
    from .prompts import KINDS
    from .settings import PRESETS

    parser = argparse.ArgumentParser(prog="python -m ablation_core", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ablate", help="remove a concept and write a patch")
    _model_args(p)
    p.add_argument("--target", required=True, help="the concept to remove, e.g. 'Grumpy Cat' or 'Van Gogh'")
    p.add_argument("--anchor", required=True, help="what it should become instead, e.g. 'cat' or 'painting'")
    p.add_argument("--kind", choices=KINDS, default=None, help="object (default), style or memorization")
    p.add_argument("--group", choices=list(GROUP_HELP), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in GROUP_HELP.items()))
    p.add_argument("--objective", choices=list(OBJECTIVE_HELP), default=None,
                   help="; ".join(f"{k}: {v}" for k, v in OBJECTIVE_HELP.items()))
    p.add_argument("--regularize", action="store_true", help="also keep anchor prompts unchanged (overlapping pairs)")
    p.add_argument("--preset", choices=list(PRESETS), default="default")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of full-rank deltas")
    p.add_argument("--anchor-images", type=int)
    p.add_argument("--sampler-steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--misspellings", type=int, help="also train on this many misspelled targets")
    p.add_argument("--anchor-prompts", help="file with one anchor prompt per line (instead of the built-in bank)")
    p.add_argument("--latent-size", type=int, help="anchor image size in latent pixels (default: the model's own, "
                   "64 for SD1.5 = 512 px); smaller is faster")
    p.add_argument("--seed", type=int, default=0)
    _patch_output_args(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("inspect", help="show a patch's metadata, keys, rank and size")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keys", action="store_true", help="list every layer key")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("apply", help="render prompts before and after applying a patch")
    _model_args(p)
    p.add_argument("--patch", required=True)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--prompt", required=True, action="append", help="repeat for several prompts")
    p.add_argument("--out", required=True, help="image file (.png)")
    p.add_argument("--images", type=int, default=4, help="images per prompt")
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--latent-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("merge", help="merge patches into one (weighted sum)")
    p.add_argument("files", nargs="+")
    p.add_argument("--weights", type=float, nargs="+", default=None)
    _patch_output_args(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="make a patch from a concept-ablation delta.bin or a fine-tuned checkpoint")
    _model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--delta-bin", help="official concept-ablation delta.bin (read with weights_only=True)")
    source.add_argument("--finetuned", help="an erasure-fine-tuned single-file .safetensors of the same base model")
    p.add_argument("--group", choices=["kv", "attn", "full"], default="kv", help="layers to extract from --finetuned")
    _patch_output_args(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="measure a patch: classifier figures on the toy world, model-side gaps anywhere")
    _model_args(p)
    p.add_argument("--patch", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--anchor", required=True)
    p.add_argument("--kind", choices=KINDS, default="object")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--per-set", type=int, default=48, help="samples per prompt set (toy world)")
    p.add_argument("--grid", default=None, help="also write a before/after grid image here (toy world)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="ablate a concept from the embedded toy model, evaluate it, draw the grid")
    p.add_argument("--out", default="demo_output", help="folder for the patch, the table and the grid")
    p.add_argument("--target", default="grumpy cat")
    p.add_argument("--anchor", default="cat")
    p.add_argument("--group", choices=list(GROUP_HELP), default="kv")
    p.add_argument("--objective", choices=list(OBJECTIVE_HELP), default="model")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time an ablation on a random-weight model of the real shape")
    p.add_argument("--arch", choices=["sd15", "sd2", "sdxl"], required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the default preset's)")
    p.add_argument("--anchor-images", type=int, default=None)
    p.add_argument("--sampler-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
