"""What the commands share: loading the model the arguments name, and writing and describing patch files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import files
from ..errors import AblationError


def device_and_dtype(device: str, dtype: str) -> tuple[str, torch.dtype]:
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


def load_view(args: argparse.Namespace):
    from ..backends.flux_loading import FluxTextSources
    from ..backends.loading import load_model

    device, dtype = device_and_dtype(args.device, args.dtype)
    flux_text = FluxTextSources(getattr(args, "clip_l", None), getattr(args, "t5", None),
                                getattr(args, "t5_tokenizer", None))
    return load_model(args.model, device, dtype, getattr(args, "prediction_type", None), flux_text,
                      bool(getattr(args, "fp8", False)))


def size_text(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"


def save_patch(patch, args: argparse.Namespace) -> Path:
    if not args.full_rank:
        patch = patch.compressed(args.energy, args.rank)
    return patch.save(args.out)


def patch_out(args: argparse.Namespace) -> None:
    files.check_output_file(args.out, (".safetensors",), args.overwrite, "patch file")


def parse_settings(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` items (the harnesses' ``--settings``) as config settings: values read as JSON, else as text."""
    found: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            found[key] = json.loads(value)
        except json.JSONDecodeError:
            found[key] = value
    return found
