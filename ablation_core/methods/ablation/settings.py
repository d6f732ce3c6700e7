"""Settings of the trained ablation: defaults, presets, and the settings each model family needs. The one place.

A config holds what the user chose; ``None`` means "what suits this model". ``resolve_config`` fills those fields
from the preset of the model's family, so every entry point (CLI, Python API, nodes) gets the same settings for the
same model: the embedded toy model gets its own learning rate and its own phrasing wherever it is named.

Real models: the reference implementation trains with lr 2e-6 scaled by the total batch (4 per GPU x 2 GPUs = 8),
100 steps, on 1000 anchor images from 200 prompts sampled with DPM-Solver (25 steps, CFG 6). ``paper`` reproduces
that on one GPU (batch 4, 200 steps, lr 2e-6 x 4). ``thorough`` keeps the batch of 8 and the steps of the
reference but draws fewer anchor images with fewer solver steps, which is most of the time of the reference recipe
(4,160 UNet evaluations, and the held-out check's 464 that every preset adds). ``default`` takes under a third of
that (1,156: 32 anchor images x 8 unguided solver
steps, then 100 steps of 5 rows, 2 of them with the model-based loss and 3 with the noise-based loss, which needs no
frozen pass, and one preserved row that holds another concept at the frozen model's prediction); ``fast`` (no
preserved row) halves the rest again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from ...errors import AblationError, PromptError
from ...models.families import FAMILIES
from ...models.sampling import unguided
from ..prompts import Kind, check_kinds, check_pair
from .recipes import CONCEPT_TYPES, memorized_variations, recipe_values

BASE_LR = 2e-6
PRESET_NAMES = ("fast", "default", "thorough", "paper")

# The default (1,156 UNet evaluations, 28 % of ``thorough``'s 4,160, each before the held-out check's 464): 32 anchor
# images drawn without guidance (one pass per solver step: the model's own conditional distribution of the anchor),
# and the "mixed" loss on them: the noise-based loss (Eq. 6, no frozen pass) on the 3 noisier rows of each batch of
# 5, the model-based loss (Eq. 5) on the 2 least noisy ones, where the noise target varies most. On unguided samples
# of the anchor the two aim at the same prediction in expectation. Plus one preserved row a step (``preserve.py``: a
# prompt of another concept held at the frozen model's prediction, two passes) and the learning rate x1.5 to erase as
# far with it: without the row, tree -> car took bird from 100 % to 62 % (an anchor a user could pick; the suggested
# tree -> house kept it). Measured on every toy concept with two anchors each, on erasure and preservation
# (docs/speed.md).
DEFAULTS: dict[str, object] = {
    "kind": "object", "group": "kv", "objective": "mixed", "regularization": False, "steps": 100, "batch_size": 5,
    "learning_rate": BASE_LR * 5, "lora_rank": 0, "anchor_prompt_count": 200, "anchor_images": 32,
    "sampler_steps": 8, "guidance": 1.0, "sample_batch_size": 16, "misspelled_targets": 0,
    "reuse_sampler_states": False, "robust_rounds": 0, "gradient_checkpointing": False,
    "offload_text_encoder": False, "preserved_rows": 0,
}
# The earlier default: model-based loss, the reference's batch of 8 at its step, guided anchor images.
_THOROUGH = {"objective": "model", "batch_size": 8, "learning_rate": BASE_LR * 8, "anchor_images": 128,
             "sampler_steps": 10, "guidance": 6.0}
PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "real": {
        "fast": {"steps": 50, "anchor_images": 16},
        "default": {"learning_rate": 1.5e-5, "preserved_rows": 1},  # the reference's 2e-6 a row x 5 rows, x1.5
        "thorough": _THOROUGH,
        "paper": {"objective": "model", "steps": 200, "batch_size": 4, "learning_rate": BASE_LR * 4,
                  "anchor_images": 1000, "sampler_steps": 25, "guidance": 6.0},
    },
    # The toy model learns from 16x16 pixels in minutes: a larger step, its own guidance and sampling batch.
    "toy": {
        "fast": {"steps": 50, "learning_rate": 1e-3, "anchor_images": 16, "sample_batch_size": 64},
        "default": {"learning_rate": 1.5e-3, "sample_batch_size": 64, "preserved_rows": 1},
        "thorough": {**_THOROUGH, "learning_rate": 1e-3, "anchor_images": 64, "sampler_steps": 20, "guidance": 4.0,
                     "sample_batch_size": 64},
        "paper": {"objective": "model", "steps": 200, "batch_size": 4, "learning_rate": 1e-3, "anchor_images": 200,
                  "sampler_steps": 25, "guidance": 4.0, "sample_batch_size": 64},
    },
}
# Flux: the same recipes, on the maps that read the prompt embeddings (``embedding``: txt_in and vector_in, UCE's
# Flux layers) with one preserved row a step (``preserve``: T5 is bidirectional, so an edit trained on the target's
# prompts also moves the words its neighbours share), and the default at 75 steps so that its cost stays under SD's
# default (1,011 transformer evaluations against 1,036). Measured on toy-flux, every concept (README, Results on
# toy-flux): K/V at 3e-4 missed on 4 of 13 concepts (fish left in 12 %; snoopy -> dog took grumpy cat to 6 %,
# monet -> painting the photo style to 12 %); one preserved row fixed the neighbours but left monet in 31 % with K/V
# and 81 % with every text-stream projection (attn); the embedding group with the preserved row erased every concept.
# A guidance-distilled model (dev) draws its anchors and is trained at its own guidance (one pass per step either
# way), which ``resolve_for_view`` fills in where these leave guidance at 1. Real Flux keeps SD's learning rate
# (not measured on a real Flux here); toy-flux has the toy's.
FLUX_CHOICES = {"group": "embedding", "preserved_rows": 1}
FLUX_DEFAULT = {"steps": 75}  # and the learning rate the Flux default was measured with (SD's default had no x1.5)
for _flux, _base, _rate in (("flux", "real", BASE_LR * 5), ("toy-flux", "toy", 1e-3)):
    PRESETS[_flux] = {name: {**values, **FLUX_CHOICES,
                             **({**FLUX_DEFAULT, "learning_rate": _rate} if name == "default" else {})}
                      for name, values in PRESETS[_base].items()}
MEMORY_OPTIONS = ("gradient_checkpointing", "offload_text_encoder")  # how a run fits; never what it makes
# toy "full": every UNet weight moves, a tenth of the step keeps the neighbours; toy-flux K/V and attention: 3e-4,
# measured on bird -> fish, fish -> bird and cat -> dog (1e-3 and 5e-4 cost a neighbour, 1e-4 left fish in 12 %;
# robust rounds train ``attn`` at it)
GROUP_LEARNING_RATE = {("toy", "full"): 1e-4, ("toy-flux", "kv"): 3e-4, ("toy-flux", "attn"): 3e-4}
PRESET_HELP = ("fast: a preview at under half the default's cost (may leave some of the target); default: 32 "
               "unguided anchor images, 100 steps of 5 with the mixed loss and one row keeping another concept "
               "(about 1,200 UNet evaluations); thorough: an earlier default (model-based loss, 3.4x the "
               "evaluations); paper: the paper's recipe (slowest)")


@dataclass(frozen=True)
class AblationConfig:
    """One ablation run. Fields left ``None`` are filled by ``resolve_config`` for the model at hand."""

    target: str
    anchor: str
    extra_pairs: tuple[tuple[str, str], ...] = ()
    concept_type: str | None = None
    kind: Kind | None = None
    pair_kinds: tuple[Kind, ...] | None = None
    group: str | None = None
    objective: str | None = None
    regularization: bool | None = None
    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    lora_rank: int | None = None
    anchor_prompt_count: int | None = None
    anchor_images: int | None = None
    sampler_steps: int | None = None
    guidance: float | None = None
    sample_batch_size: int | None = None
    latent_size: int | None = None
    misspelled_targets: int | None = None
    reuse_sampler_states: bool | None = None
    anchor_prompts: tuple[str, ...] | None = None
    held_out_prompts: tuple[str, ...] | None = None
    negative_prompt: str | None = None
    robust_rounds: int | None = None
    preserved_rows: int | None = None
    gradient_checkpointing: bool | None = None
    offload_text_encoder: bool | None = None
    seed: int = 0
    preset: str = "default"
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str]]:
        """Every (target, anchor) of the run: the first pair, then any further ones trained jointly."""
        return [(self.target, self.anchor), *self.extra_pairs]

    def kinds(self) -> list[Kind]:
        """The kind of each pair: ``pair_kinds`` where they differ (a style and an object in one run), else
        ``kind`` for all."""
        return list(self.pair_kinds) if self.pair_kinds else [self.kind] * len(self.pairs())  # type: ignore[list-item]

    def describe(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra_metadata"}


def make_config(target: str | list[str], anchor: str | list[str], preset: str = "default",
                **overrides: object) -> AblationConfig:
    """A config with the user's choices; ``None`` values mean "the preset's value for this model".

    Several targets (trained jointly) take one shared anchor or one anchor each."""
    if preset not in PRESET_NAMES:
        raise AblationError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    unknown = set(overrides) - {f.name for f in fields(AblationConfig)}
    if unknown:
        raise AblationError(f"unknown setting(s) {', '.join(sorted(unknown))}")
    concept_type = overrides.get("concept_type")
    if concept_type is not None and concept_type not in CONCEPT_TYPES:
        raise AblationError(f"unknown concept type {concept_type!r}; choose one of {', '.join(CONCEPT_TYPES)}")
    targets = [target] if isinstance(target, str) else list(target)
    anchors = [anchor] if isinstance(anchor, str) else list(anchor)
    if not targets or len(anchors) not in (1, len(targets)):
        raise PromptError(f"{len(targets)} target(s) and {len(anchors)} anchor(s): give one anchor for all targets "
                          "or one per target")
    pairs = [check_pair(t, a) for t, a in zip(targets, anchors * len(targets) if len(anchors) == 1 else anchors)]
    if len({t.lower() for t, _ in pairs}) != len(pairs):
        raise PromptError("a target is listed twice")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    config = AblationConfig(pairs[0][0], pairs[0][1], tuple(pairs[1:]), preset=preset)
    return replace(config, **chosen)


def preset_values(family: str, preset: str = "default") -> dict[str, object]:
    """The settings a preset gives on a family (its settings profile: real, flux, toy or toy-flux), before the
    user's choices."""
    table = PRESETS[FAMILIES[family].settings_profile]
    if preset not in table:
        raise AblationError(f"unknown preset {preset!r}; choose one of {', '.join(table)}")
    return {**DEFAULTS, **table[preset]}


def resolve_config(config: AblationConfig, family: str) -> AblationConfig:
    """Every ``None`` field filled for ``family``; explicit choices are kept. Resolving twice changes nothing.

    Precedence: the user's choices, then the concept type's recipe, then the family's preset."""
    if FAMILIES[family].toy:
        config = _toy_choices(config)
    if config.concept_type is not None:
        recipe = recipe_values(config.concept_type, config.pairs())
        config = replace(config, **{k: v for k, v in recipe.items() if getattr(config, k) is None})
        if config.concept_type == "memorized" and config.anchor_prompts is None:
            if config.extra_pairs:
                raise PromptError("a memorized image is erased one prompt at a time; give one target")
            prompts = tuple(memorized_variations(config.target, config.anchor, seed=config.seed))
            config = replace(config, anchor_prompts=prompts, anchor_prompt_count=len(prompts))
    values = preset_values(family, config.preset)
    # the preset's steps and anchor images are per target: several targets share the run, not the steps or images
    for name in ("steps", "anchor_images"):
        if getattr(config, name) is None:
            values[name] = int(values[name]) * len(config.pairs())
    group = config.group or str(values["group"])
    if config.learning_rate is None and (family, group) in GROUP_LEARNING_RATE:
        values["learning_rate"] = GROUP_LEARNING_RATE[(family, group)]
    if config.negative_prompt and config.guidance is None and unguided(float(values["guidance"])):
        # a negative prompt steers anchor sampling only through guidance: draw guided images, as thorough does
        values["guidance"] = preset_values(family, "thorough")["guidance"]
    filled = {name: value for name, value in values.items() if getattr(config, name) is None}
    return replace(config, **filled)


def resolve_for_view(config: AblationConfig, view) -> AblationConfig:
    """``resolve_config`` for the view's family; a guidance-distilled model (Flux dev, toy-flux) draws its anchors
    and trains at its own guidance unless the user chose one (one pass per step whatever the scale)."""
    if config.guidance is None and view.guidance_input:
        config = replace(config, guidance=view.default_guidance)
    return resolve_config(config, view.family.name)


def _toy_choices(config: AblationConfig) -> AblationConfig:
    """The toy model only knows its own words: its concepts, and prompts in its caption templates."""
    from ...toy import prompts as toy_prompts

    pairs = [(t.lower().strip(), a.lower().strip()) for t, a in config.pairs()]
    for target, anchor in pairs:
        for role, name in (("target", target), ("anchor", anchor)):
            if not toy_prompts.is_toy_concept(name):
                raise PromptError(f"the toy model does not know the {role} '{name}'; it knows "
                                  f"{', '.join(toy_prompts.KNOWN)}")
    pair_kinds = tuple(toy_prompts.kind_of(t) for t, _ in pairs)
    kind = config.kind or pair_kinds[0]
    mixed = config.kind is None and config.pair_kinds is None and len(set(pair_kinds)) > 1
    anchors = list(dict.fromkeys(a for _, a in pairs))
    prompts = config.anchor_prompts or tuple(p for a in anchors for p in toy_prompts.anchor_prompts(a, "train"))
    held_out = config.held_out_prompts or tuple(p for a in anchors for p in toy_prompts.anchor_prompts(a, "eval"))
    count = config.anchor_prompt_count or max(len(toy_prompts.anchor_prompts(a, "train")) for a in anchors)
    return replace(config, target=pairs[0][0], anchor=pairs[0][1], extra_pairs=tuple(pairs[1:]), kind=kind,
                   pair_kinds=pair_kinds if mixed else config.pair_kinds, anchor_prompts=prompts,
                   anchor_prompt_count=count, held_out_prompts=held_out)


def check_config(config: AblationConfig) -> None:
    """Values a resolved config must have; raises ``AblationError`` naming the setting."""
    from ...models.layers import GROUPS
    from .objectives import OBJECTIVES

    if config.group not in GROUPS:
        raise AblationError(f"unknown parameter group {config.group!r}; choose one of {', '.join(GROUPS)}")
    if config.objective not in OBJECTIVES:
        raise AblationError(f"unknown objective {config.objective!r}; choose one of {', '.join(OBJECTIVES)}")
    check_kinds(config.kind, config.pair_kinds, len(config.pairs()))
    for name in ("steps", "batch_size", "anchor_images", "sampler_steps", "sample_batch_size", "anchor_prompt_count"):
        if int(getattr(config, name)) < 1:
            raise AblationError(f"{name.replace('_', ' ')} must be at least 1 (got {getattr(config, name)})")
    for name in ("lora_rank", "misspelled_targets", "robust_rounds", "preserved_rows"):
        if int(getattr(config, name)) < 0:
            raise AblationError(f"{name.replace('_', ' ')} cannot be negative (got {getattr(config, name)})")
    if not 0 < float(config.learning_rate) < 1:
        raise AblationError(f"the learning rate must be between 0 and 1 (got {config.learning_rate:g})")
    if not 0 <= float(config.guidance) <= 50:
        raise AblationError(f"guidance must be between 0 and 50 (got {config.guidance:g})")
    if config.latent_size is not None and config.latent_size < 1:
        raise AblationError(f"the latent size must be at least 1 (got {config.latent_size})")
