"""How many UNet evaluations a trained ablation makes, from its settings: the cost model behind the presets.

One evaluation = the UNet applied to one latent. Anchor sampling with classifier-free guidance costs two per image
and solver step (one at guidance 1, which has no unconditional pass); training costs, per batch row, one pass with
gradients plus one frozen pass for the model-based target (none when the target comes from the sampler's states,
``reuse``) plus one per regularized row, and two per preserved row (``preserve``); the held-out check five per
sample of its gap (unconditional, anchor and target before, anchor and target after), and three guided images per
drawn prompt (``check.drawn_effect``) at two passes per solver step (one on a distilled model). The benchmark checks
this against counted evaluations on every run.
"""

from __future__ import annotations

from ...models.sampling import unguided
from .check import CHECK_PROMPTS, drawn_evaluations, gap_evaluations
from .objectives import model_rows
from .reuse import uses_sampler_states
from .settings import AblationConfig


def gradient_passes_per_step(config: AblationConfig) -> int:
    """A step's passes with gradients: one per row, two when regularized (the anchor prompt's own pass), and one per
    preserved row."""
    return int(config.batch_size) * (2 if config.regularization else 1) + preserved_rows(config)


def preserved_rows(config: AblationConfig) -> int:
    """Rows of each step that hold a preserved prompt at its frozen prediction (one frozen pass and one with
    gradients each); at most the batch."""
    return min(int(config.preserved_rows or 0), int(config.batch_size))


def training_passes_per_step(config: AblationConfig) -> int:
    """A step's passes: those with gradients, and the frozen passes of the rows whose target is the frozen
    prediction (none when the sampler's states give it)."""
    frozen = 0 if uses_sampler_states(config) else model_rows(str(config.objective), int(config.batch_size),
                                                              bool(config.regularization))
    return gradient_passes_per_step(config) + frozen + preserved_rows(config)


def sampling_passes(config: AblationConfig, guidance_input: bool = False) -> int:
    """UNet evaluations per anchor image and solver step: two with classifier-free guidance, one without, and one
    on a guidance-distilled model (Flux dev, toy-flux: ``guidance_input``), which takes the scale as an input."""
    return 1 if guidance_input or unguided(float(config.guidance)) else 2


def unet_evaluations(config: AblationConfig, held_out_prompts: int | None = None,
                     guidance_input: bool = False) -> dict[str, int]:
    """Evaluations per phase of a resolved config (no preserved prompts, no memorized-image filter).

    ``held_out_prompts``: prompts of the check over all targets (default: ``CHECK_PROMPTS`` per target);
    ``guidance_input``: the model is guidance-distilled (``ModelView.guidance_input``)."""
    held_out = held_out_prompts if held_out_prompts is not None else CHECK_PROMPTS * len(config.pairs())
    sampling = sampling_passes(config, guidance_input)
    targets = len(config.pairs())
    drawn = targets * drawn_evaluations(config, -(-held_out // targets), guidance_input)  # each its share of prompts
    return {"anchor_sampling": sampling * int(config.anchor_images) * int(config.sampler_steps),
            "training": int(config.steps) * training_passes_per_step(config),
            "check": gap_evaluations(held_out) + drawn}
