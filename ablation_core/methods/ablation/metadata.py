"""The metadata a trained ablation writes into its patch: everything needed to trust and reproduce it.

Our own fields start with ``ablation.``; the kohya ``ss_*`` and ``modelspec.*`` fields are the ones A1111, ComfyUI
and model sites display.
"""

from __future__ import annotations

import json
import time

from ...models.view import ModelView
from ...patches.patch import META, MODELSPEC_ARCH, SS_BASE_MODEL, AblationPatch
from .settings import AblationConfig

LOSS_CURVE_POINTS = 200


def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> list[float]:
    """At most ``points`` losses, evenly spaced over the run, first and last included (for redrawing the chart)."""
    if len(losses) <= points:
        return [float(f"{loss:.6g}") for loss in losses]
    picks = [round(i * (len(losses) - 1) / (points - 1)) for i in range(points)]
    return [float(f"{losses[i]:.6g}") for i in picks]


def build_metadata(view: ModelView, config: AblationConfig, losses: list[float], seconds_anchors: float,
                   seconds_training: float, check: dict[str, float] | None = None,
                   base_patch: AblationPatch | None = None) -> dict[str, str]:
    family = view.family.name
    pairs = config.pairs()
    title = ", ".join(f"{t} -> {a}" for t, a in pairs)
    described = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.describe().items()}
    metrics = {"loss_first": losses[0], "loss_last": losses[-1],
               "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:])}
    metadata = {
        META + "method": "concept-ablation",
        META + "objective": str(config.objective),
        META + "group": str(config.group),
        META + "targets": json.dumps((base_patch.listed("targets") if base_patch else []) + [t for t, _ in pairs]),
        META + "anchors": json.dumps((base_patch.listed("anchors") if base_patch else []) + [a for _, a in pairs]),
        META + "concept_type": str(config.concept_type or ""),
        META + "kind": str(config.kind),
        META + "base_family": family,
        META + "steps": str(config.steps),
        META + "learning_rate": f"{config.learning_rate:g}",
        META + "seed": str(config.seed),
        META + "preset": config.preset,
        META + "settings": json.dumps(described),
        META + "timings": json.dumps({"anchors_s": round(seconds_anchors, 3),
                                      "training_s": round(seconds_training, 3)}),
        META + "metrics": json.dumps(metrics),
        META + "loss_curve": json.dumps(loss_curve(losses)),
        META + "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ss_network_module": "networks.lora",
        "ss_base_model_version": SS_BASE_MODEL.get(family, family),
        "ss_output_name": ("ablate_" + "_".join(t for t, _ in pairs[:3])).replace(" ", "_"),
        "ss_training_comment": f"Concept ablation: {title} ({config.group}, {config.objective} loss)",
        "ss_steps": str(config.steps),
        "ss_seed": str(config.seed),
        "ss_learning_rate": f"{config.learning_rate:g}",
        "modelspec.architecture": f"{MODELSPEC_ARCH.get(family, family)}/lora",
        "modelspec.title": f"Ablate {title}",
    }
    if check is not None:
        metadata[META + "check"] = json.dumps(check)
    if base_patch is not None:
        metadata[META + "base_patch"] = json.dumps({
            "method": base_patch.metadata.get(META + "method", "unknown"),
            "title": base_patch.metadata.get("modelspec.title", ""), "layers": len(base_patch.deltas)})
    metadata.update(config.extra_metadata)
    return metadata
