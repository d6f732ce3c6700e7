"""The README's ``eval --clip`` example, on random weights: ``python -m tests.clip_example [--out FOLDER]``.

Builds a tiny random SD1 checkpoint and a tiny random CLIP folder (as ``tests/test_clip_eval.py`` builds them),
makes a closed-form "Van Gogh" -> "painting" patch with the command line, and runs ``eval --clip`` on them, printing
what it prints. Random weights draw nothing and CLIP reads nothing: the figures show the layout, not a result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import CLIPModel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ablation_core.cli import main  # noqa: E402
from ablation_core.models.random_models import build_components  # noqa: E402
from ablation_core.models.single_file import save_single_file  # noqa: E402
from tests.test_clip_eval import save_clip, tiny_clip_config  # noqa: E402


def run(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, clip, patch = folder / "sd15-random.safetensors", folder / "clip-random", folder / "vangogh.safetensors"
    save_single_file(build_components("sd1", seed=1, with_vae=True), checkpoint)
    torch.manual_seed(0)
    save_clip(CLIPModel(tiny_clip_config()), clip)
    code = main(["ablate", "--model", str(checkpoint), "--method", "closed-form", "--target", "Van Gogh", "--anchor",
                 "painting", "--kind", "style", "--out", str(patch), "--overwrite"])
    if code:
        return code
    return main(["eval", "--model", str(checkpoint), "--patch", str(patch), "--target", "Van Gogh", "--anchor",
                 "painting", "--kind", "style", "--clip", str(clip), "--latent-size", "8"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="clip_example", help="folder for the files (default: clip_example)")
    raise SystemExit(run(Path(parser.parse_args().out)))
