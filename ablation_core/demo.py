"""``demo``: the whole product on the embedded toy world in about a minute on a laptop CPU.

Ablates a concept from the toy model, saves the patch, measures it with the toy world's classifier and draws a
before/after grid, all into one folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .ablate import ablate
from .backends.diffusers import load_model
from .console import progress_bars
from .evaluate import evaluate_toy
from .settings import toy_config

DEMO_SAMPLES_PER_SET = 24


def run_demo(out: Path, target: str, anchor: str, group: str = "kv", objective: str = "model", seed: int = 0) -> dict:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    view = load_model("toy")
    config = toy_config(target, anchor, group=group, objective=objective, seed=seed)
    print(f"Ablating '{config.target}' -> '{config.anchor}' from the embedded toy model ({group}, {objective} loss)")
    with progress_bars() as on_progress:
        result = ablate(view, config, on_progress)
    patch_path = result.patch.compressed().save(out / "patch.safetensors")
    print(f"patch written to {patch_path} ({patch_path.stat().st_size / 1e3:.1f} kB)")
    print("evaluating: sampling target, misspelt, anchor and surrounding prompts before and after ...")
    evaluation = evaluate_toy(view, result.patch, target, anchor, per_set=DEMO_SAMPLES_PER_SET, seed=seed,
                              grid_path=str(out / "before_after.png"))
    table = evaluation.table()
    (out / "eval.txt").write_text(table + "\n")
    (out / "eval.json").write_text(json.dumps(evaluation.as_json(), indent=2) + "\n")
    print(table)
    print(f"\nwrote {out / 'patch.safetensors'}, {out / 'eval.txt'}, {out / 'eval.json'}, {out / 'before_after.png'} "
          f"in {time.perf_counter() - started:.0f} s")
    return evaluation.as_json()
