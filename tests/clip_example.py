"""The README's ``eval --clip`` example, on random weights:
``python -m tests.clip_example [--out FOLDER] [--attacks]``.

Builds a tiny random SD1 checkpoint and a tiny random CLIP folder (as ``tests/clip_models.py`` builds them), makes a
closed-form "Van Gogh" -> "painting" patch with the command line, and runs ``eval --clip`` on them (with
``--attacks``, also ``--attack all --attack-budget small``, judged by the same CLIP), printing what it prints. Random
weights draw nothing and CLIP reads nothing: the figures show the layout, not a result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ablation_core.cli import main  # noqa: E402
from ablation_core.models.random_models import build_components  # noqa: E402
from ablation_core.models.single_file import save_single_file  # noqa: E402
from tests.clip_models import random_clip  # noqa: E402


def run(folder: Path, attacks: bool = False) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, clip, patch = folder / "sd15-random.safetensors", folder / "clip-random", folder / "vangogh.safetensors"
    save_single_file(build_components("sd1", seed=1, with_vae=True), checkpoint)
    random_clip(clip)
    code = main(["ablate", "--model", str(checkpoint), "--method", "closed-form", "--target", "Van Gogh", "--anchor",
                 "painting", "--kind", "style", "--out", str(patch), "--overwrite"])
    if code:
        return code
    return main(["eval", "--model", str(checkpoint), "--patch", str(patch), "--target", "Van Gogh", "--anchor",
                 "painting", "--kind", "style", "--clip", str(clip), "--latent-size", "8",
                 *(["--attack", "all", "--attack-budget", "small"] if attacks else [])])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="clip_example", help="folder for the files (default: clip_example)")
    parser.add_argument("--attacks", action="store_true",
                        help="also run every attack at its small budget, judged by the same CLIP (default: off)")
    args = parser.parse_args()
    raise SystemExit(run(Path(args.out), args.attacks))
