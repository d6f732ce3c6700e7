"""One progress plan for a whole run, whatever front end draws it: every phase declared before the first step with
its estimated cost, so the bar moves once from 0 to 1, never back, and one ETA covers the whole run.

Each phase's share is its estimated cost in UNet passes of a 512 px SD1 image (``unet_pass``): the model's own
passes scale with the latent's area; a prompt's encoding, a closed-form layer's solve, a layer's SVD and a
megabyte written cost a fixed share. The estimate only sets the shares; within a phase the run's own step counts
move the bar. A phase reported again after later phases (a robust round's second training) is its next planned
occurrence (``"train #2"``), or, unplanned, its last one (the bar holds); a phase nobody planned joins the end.

Front ends keep only their drawing: A1111's ``shared.state`` (``backends.a1111.progress``), ComfyUI's bar and
websocket events (``backends.comfy.progress``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .progress import Progress

SCALE = 10000  # the bar's total: it moves in hundredths of a percent
PROMPT_COST = 0.025  # one prompt through the text encoder, in 512 px UNet passes (CLIP-L: ~2 % of the UNet's work)
FLUX_PROMPT_COST = 0.22  # T5-XXL at 512 tokens (4.8 TFLOPs) and CLIP-L, in Flux.1 passes at 512 px (21.5 TFLOPs)
SOLVE_COST = 0.02  # one layer's closed-form solve
# Flux's text map is solved at T5's width, 4096: its eigendecompositions took 38 s in ComfyUI 0.3.64 on a 2-core
# CPU, about 1.2 T5 prompts (a bar planned at SOLVE_COST a layer sat at 99.7 % through them, "6 s left")
FLUX_SOLVE_COST = 0.27
# Saving, timed in the real ComfyUI on a 2-core CPU: a Flux patch's SVDs took 7.2 s and writing it 0.02 s; a fused
# SD1.5 patch (32 K/V layers) 2.2 s and 0.1 s (28.6 MB). At 0.1 a layer and 0.05 a megabyte the bar had given
# writing 90 % of the save, "140 s left" after the SVDs were done.
SVD_COST = 0.02  # one layer's low-rank compression (an SVD of SD1's middle K/V weight)
SVD_UNIT_WORK = 640 * 768 * 640  # that SVD's work (rows x columns x the smaller of the two)
FUSE_COST = 0.04  # one layer's solve in a fusion: 32 SD1.5 layers in 4.8 s, against 0.1-0.2 s a CLIP prompt
WRITE_COST = 0.001  # one megabyte of patch file written
DECODE_COST = 2.0  # one VAE decode, in UNet passes at the same size
PHASE_TITLES = {"prompts": "Encoding prompts", "anchors": "Sampling anchor images", "train": "Training",
                "check": "Checking the effect", "solve": "Solving", "preview": "Drawing the before/after preview",
                "patch": "Building the patch", "cache": "Keeping the result in the cache",
                "adversary images": "Drawing the adversary's images", "fuse": "Fusing the layers",
                "compress": "Compressing to low rank", "write": "Writing the file",
                "preserved": "Encoding the concepts to keep", "before prompts": "Encoding prompts (before)",
                "before": "Drawing the images before", "after prompts": "Encoding prompts (after)",
                "after": "Drawing the images after"}


def _real_flow(family: str) -> bool:
    """A flow transformer of the real size (Flux.1), whose text encoder and text map are T5-XXL's width."""
    from ..models.families import FAMILIES

    chosen = FAMILIES.get(family)
    return chosen is not None and chosen.flow and not chosen.toy


def prompt_cost(family: str) -> float:
    """One prompt through the family's text encoders, in its own transformer or UNet passes at 512 px."""
    return FLUX_PROMPT_COST if _real_flow(family) else PROMPT_COST


def solve_cost(family: str, layers: int) -> float:
    """The closed form's solve of ``layers`` layers: a small cost a layer, and on Flux its 4096-wide text map."""
    return max(layers, 1) * SOLVE_COST + (FLUX_SOLVE_COST if _real_flow(family) else 0.0)


def unet_pass(latent_size: int) -> float:
    """One UNet pass of one image at ``latent_size``, against one at 64 (512 px); small latents keep a floor (the
    deep blocks' weights are read whatever the size)."""
    return (latent_size / 64) ** 2 + 0.02


def preview_passes(steps: int) -> int:
    """UNet passes of a before/after preview: two prompts, before and after, with guidance (two passes a step)."""
    return 2 * 2 * 2 * max(int(steps), 1)


def preview_cost(steps: int, latent_size: int) -> float:
    return preview_passes(steps) * unet_pass(latent_size) + 4 * DECODE_COST * unet_pass(latent_size)


def base_phase(key: str) -> str:
    """``"train #2"`` -> ``"train"``."""
    name, _, number = key.rpartition(" #")
    return name if name and number.isdigit() else key


def title(phase: str) -> str:
    base = base_phase(phase)
    return PHASE_TITLES.get(base, base) + (phase[len(base):] if phase != base else "")


@dataclass
class Phase:
    offset: float
    units: float


class RunPlan:
    """The plan and where the run is in it. ``plan`` every phase first (in order, with its cost); then ``advance``
    with each ``Progress``: the run's fraction done, never smaller than before."""

    def __init__(self, clock: Callable[[], float] = time.time, started: float | None = None):
        self.clock = clock
        self.started = clock() if started is None else started
        self.phases: dict[str, Phase] = {}
        self.total = 0.0
        self.fraction = 0.0
        self.current: str | None = None  # the occurrence last reported

    def plan(self, phase: str, units: float) -> str:
        """Declare a phase (in order) and its cost in 512 px UNet passes; a name planned already gets its next
        occurrence (``"train #2"``). Returns the key."""
        key, number = phase, 1
        while key in self.phases:
            number += 1
            key = f"{phase} #{number}"
        self.phases[key] = Phase(self.total, max(float(units), 1e-6))
        self.total += self.phases[key].units
        return key

    def key(self, progress: Progress) -> str:
        """The occurrence a report belongs to: the current one, else the first planned at or after it, else (an
        earlier phase reported again, unplanned) its last one, which holds the bar; a phase never planned is added
        at the end."""
        if self.current is not None and base_phase(self.current) == progress.phase:
            return self.current
        position = self.phases[self.current].offset if self.current is not None else -1.0
        same = [key for key in self.phases if base_phase(key) == progress.phase]
        ahead = [key for key in same if self.phases[key].offset >= position]
        if ahead or same:
            return (ahead or same)[0 if ahead else -1]
        return self.plan(progress.phase, max(progress.total, 1))

    def advance(self, progress: Progress) -> float:
        key = self.key(progress)
        self.current = key
        phase = self.phases[key]
        share = min(max((progress.step + progress.within) / progress.total, 0.0), 1.0) if progress.total > 0 else 1.0
        self.fraction = min(max(self.fraction, (phase.offset + share * phase.units) / self.total), 1.0)
        return self.fraction

    def step_seconds(self, progress: Progress) -> float | None:
        """One step of the current phase at the run's pace so far: its share of the plan times the seconds each unit
        of the plan has taken (``Pacer``'s guess for a step the phase has not timed); None before the bar moved."""
        if self.current is None or base_phase(self.current) != progress.phase or progress.total <= 0:
            return None
        done_units = self.fraction * self.total
        if done_units <= 0:
            return None
        seconds_per_unit = max(self.clock() - self.started, 0.0) / done_units
        return self.phases[self.current].units / progress.total * seconds_per_unit

    def eta(self, fraction: float | None = None) -> float | None:
        """Seconds left: the time since the run began, stretched to the fraction done (``fraction``: the one shown,
        where the bar rounds it)."""
        fraction = self.fraction if fraction is None else fraction
        if fraction <= 0:
            return None
        elapsed = max(self.clock() - self.started, 0.0)
        return elapsed / fraction - elapsed


# Plans of the methods -------------------------------------------------------------------------------------------

def plan_trained(plan, config, latent_size: int, family: str = "sd1") -> None:
    """Every phase of a trained run (a resolved ``AblationConfig``), by cost: passes that go backward count three
    times; robust rounds add the preserved prompts, the adversary's images and, each round, the adversary's searches
    and one more run."""
    from .ablation.budget import gradient_passes_per_step, training_passes_per_step, unet_evaluations
    from .ablation.check import check_prompts_encoded
    from .ablation.loop import _prompt_pairs
    from .ablation.preserve import preserved_prompts
    from .robust.rounds import adversary_budget

    passes = unet_evaluations(config)
    cost = prompt_cost(family)
    anchors, targets = _prompt_pairs(config)  # a user's own list of anchor prompts may hold just one
    backward = 2 * gradient_passes_per_step(config) * int(config.steps)
    check_prompts = check_prompts_encoded(len(config.pairs()))
    run = {"prompts": (len(anchors) + len(targets)) * cost,
           "anchors": passes["anchor_sampling"] * unet_pass(latent_size),
           "train": (int(config.steps) * training_passes_per_step(config) + backward) * unet_pass(latent_size),
           "check": passes["check"] * unet_pass(latent_size) + check_prompts * cost}
    rounds = int(config.robust_rounds or 0)
    kept = len(preserved_prompts(config, family)) * cost if rounds or config.preserved_rows else 0.0
    if rounds:  # robust rounds encode the kept prompts before their first run
        plan.plan("preserved", kept)
    elif kept:  # a run with preserved rows, after its own prompts (a bar planned the other way round sat still
        # through Flux's 200 kept prompts in ComfyUI, 50 s each on a CPU, with its time left growing)
        run = {"prompts": run.pop("prompts"), "preserved": kept, **run}
    _plan_run(plan, run, rounds, len(config.pairs()), latent_size, adversary_budget(config.preset),
              int(config.sampler_steps))


def plan_closed_form(plan, config, layers: int, latent_size: int = 64, view=None, family: str = "") -> None:
    """Every phase of a closed-form erasure (a resolved ``ClosedFormConfig``) on ``layers`` layers of a ``family``
    model. With the ``view``, the prompts' share counts only those whose moments the process has not kept from an
    earlier run (encoding the probes to find out); without it, every prompt and one probe a chunk."""
    from .closed_form.embeddings import CHUNK
    from .robust.rounds import BUDGET

    if view is not None:
        from .closed_form.embeddings import prompts_to_encode
        from .closed_form.solve import _prompt_pairs

        targets, anchors = _prompt_pairs(config)
        prompts = max(prompts_to_encode(view, targets, anchors, list(config.preserved_prompts or ())), 1)
        family = view.family.name
    else:
        pairs, preserved = int(config.prompts_per_target) * len(config.targets), len(config.preserved_prompts or ())
        prompts = 2 * pairs + preserved + -(-pairs // CHUNK) + -(-preserved // CHUNK)
    run = {"prompts": prompts * prompt_cost(family), "solve": solve_cost(family, layers)}
    _plan_run(plan, run, int(config.robust_rounds or 0), len(config.targets), latent_size, BUDGET, 50)


def _plan_run(plan, run: dict[str, float], rounds: int, pairs: int, latent_size: int, budget,
              sampler_steps: int) -> None:
    for phase, units in run.items():
        plan.plan(phase, units)
    if rounds:  # the adversary's images once (guided), then each round's searches and one more run
        plan.plan("adversary images", pairs * budget.images * 2 * sampler_steps * unet_pass(latent_size))
    for round_index in range(1, rounds + 1):
        searches = pairs * (3 * budget.inversion_steps * budget.inversion_batch
                            + budget.search_iterations * budget.search_candidates * budget.search_images)
        plan.plan(f"adversary {round_index}", searches * unet_pass(latent_size))
        for phase, units in run.items():
            plan.plan(phase, units)


def plan_compress(plan, layers: float) -> None:
    """``layers``: SVDs to run, counted in SD1 K/V weights (``AblationPatch.svd_work() / SVD_UNIT_WORK``): a Flux
    ``txt_in`` (3072 x 4096) is 123 of them, 7 s on a CPU, where its file is written in a fraction of a second."""
    plan.plan("compress", max(layers, 1) * SVD_COST)


def plan_write(plan, megabytes: float) -> None:
    plan.plan("write", max(megabytes, 0.1) * WRITE_COST)


def format_seconds(seconds: float) -> str:
    seconds = max(int(round(seconds)), 0)
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds}s"
