"""``demo``: the whole product on the embedded toy world in about a minute on a laptop CPU.

Ablates a concept from the toy model, saves the patch, measures it with the toy world's classifier and draws a
before/after grid, all into one folder. It goes through the same ``ablate`` as every other entry point: the toy
model's settings come from ``resolve_config``, not from here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..backends.loading import load_model
from ..evaluation.toy_eval import evaluate_toy
from ..files import write_text_atomic
from ..methods.ablation.check import check_summary
from ..methods.ablation.loop import ablate
from ..methods.ablation.settings import make_config, resolve_for_view
from .console import progress_bars

DEMO_SAMPLES_PER_SET = 24


def run_demo(out: Path, target: str, anchor: str, group: str | None = None, objective: str | None = None,
             seed: int = 0, model: str = "toy") -> dict:
    started = time.perf_counter()
    view = load_model(model)
    config = resolve_for_view(make_config(target, anchor, group=group, objective=objective, seed=seed), view)
    print(f"Ablating '{target}' -> '{anchor}' from the {view.family.title} ({config.group}, "
          f"{config.objective} loss)")
    with progress_bars() as on_progress:
        result = ablate(view, config, on_progress)
    out.mkdir(parents=True, exist_ok=True)
    patch_path = result.patch.compressed().save(out / "patch.safetensors")
    print(f"patch written to {patch_path} ({patch_path.stat().st_size / 1e3:.1f} kB); held-out check: "
          f"{check_summary(result.check)}")
    print("evaluating: sampling target, misspelt, anchor and surrounding prompts before and after the patch")
    with progress_bars() as on_progress:
        # the preservation figures double the sampling; the demo keeps to its minute (``eval`` reports them)
        evaluation = evaluate_toy(view, result.patch, target, anchor, per_set=DEMO_SAMPLES_PER_SET, seed=seed,
                                  grid_path=str(out / "before_after.png"), on_progress=on_progress,
                                  preservation=False)
    table = evaluation.table()
    write_text_atomic(out / "eval.txt", table + "\n")
    write_text_atomic(out / "eval.json", json.dumps(evaluation.as_json(), indent=2) + "\n")
    print(table)
    print(f"\nwrote {out / 'patch.safetensors'}, {out / 'eval.txt'}, {out / 'eval.json'}, {out / 'before_after.png'} "
          f"in {time.perf_counter() - started:.0f} s")
    return evaluation.as_json()
