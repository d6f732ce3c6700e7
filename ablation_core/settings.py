"""Default hyperparameters and presets: the one place for them.

The reference implementation trains with lr 2e-6 scaled by the total batch (4 per GPU x 2 GPUs = 8), 100 steps,
on 1000 anchor images from 200 prompts sampled with DPM-Solver (25 steps, CFG 6). ``paper`` reproduces that on one
GPU (batch 4, 200 steps, lr 2e-6 x 4). ``default`` keeps the batch of 8 and the steps of the reference but draws
fewer anchor images with fewer solver steps, which is most of the time of the reference recipe. ``fast`` halves
that again for previews.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from .prompts import Kind

BASE_LR = 2e-6


@dataclass(frozen=True)
class AblationConfig:
    target: str
    anchor: str
    kind: Kind = "object"
    group: str = "kv"
    objective: str = "model"
    regularization: bool = False
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = BASE_LR * 8
    lora_rank: int = 0
    anchor_prompt_count: int = 200
    anchor_images: int = 128
    sampler_steps: int = 10
    guidance: float = 6.0
    sample_batch_size: int = 16
    latent_size: int | None = None
    misspelled_targets: int = 0
    anchor_prompts: tuple[str, ...] | None = None
    seed: int = 0
    preset: str = "default"
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra_metadata",)}


PRESETS: dict[str, dict[str, object]] = {
    "fast": {"steps": 50, "batch_size": 8, "learning_rate": BASE_LR * 8 * 2, "anchor_images": 64,
             "sampler_steps": 8},
    "default": {},
    "paper": {"steps": 200, "batch_size": 4, "learning_rate": BASE_LR * 4, "anchor_prompt_count": 200,
              "anchor_images": 1000, "sampler_steps": 25, "guidance": 6.0},
}


def make_config(target: str, anchor: str, preset: str = "default", **overrides: object) -> AblationConfig:
    """A config from a preset, with explicit overrides (``None`` means "use the preset's value")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    config = replace(AblationConfig(target, anchor, preset=preset), **PRESETS[preset])
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return replace(config, **chosen)


TOY_OVERRIDES: dict[str, object] = {
    "steps": 100, "batch_size": 8, "learning_rate": 1e-3, "anchor_images": 64, "sampler_steps": 20,
    "guidance": 4.0, "sample_batch_size": 64,
}
TOY_FULL_LEARNING_RATE = 1e-4  # every UNet weight moves: a tenth of the step keeps the neighbours


def toy_config(target: str, anchor: str, **overrides: object) -> AblationConfig:
    """Settings for the embedded toy world: its own prompt phrasing (its text encoder knows no other words)."""
    from .evaluate import toy_anchor_prompts
    from .toy.concepts import axis_of

    kind = "style" if axis_of(target.lower().strip()) == "style" else "object"
    prompts = tuple(toy_anchor_prompts(anchor.lower().strip(), kind))
    chosen = {**TOY_OVERRIDES, "kind": kind, "anchor_prompts": prompts, "anchor_prompt_count": len(prompts)}
    if overrides.get("group") == "full":
        chosen["learning_rate"] = TOY_FULL_LEARNING_RATE
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(target.lower().strip(), anchor.lower().strip(), "default", **chosen)
