"""Robust erasure: erase, attack the result, erase what the attack found too; ``rounds`` times.

Plain erasure maps the target's prompts onto the anchor's; an attacker then looks elsewhere (a learned token
embedding, a searched token sequence) and the concept comes back. Each robust round runs both searches of the
``adversary`` against the current patch, on the erasure's own prompts and images of the target that the unpatched
model drew, and erases them as well:
  - trained (AdvUnlearn / STEREO style adversarial training): every adversarial input found so far is one more target
    conditioning trained onto the anchor, on top of the previous round's patch, while the preserved concepts (every
    other concept; on the toy world its whole vocabulary of concepts) are held at the original model's prediction in
    the loss. Held at the previous round's instead, they kept what that round had taken from them: snoopy -> dog
    kept cat in 44 % of its images, 88 % held at the original (toy, 2 rounds, per-set 16). Robust runs train all
    attention projections unless the user chose a group: knowledge that K/V alone keep comes back through any other
    embedding (see README, robustness);
  - closed form (RECE style): the adversarial embeddings join the erased set of the least-squares / null-space solve,
    which is solved again from the original weights with all of them.
Nothing the evaluation measures is seen here: the adversary works on the training half of the toy world's templates
and its seeds start at ``ROBUST_SEED_OFFSET`` (the evaluation's attacks use other offsets).
"""

from __future__ import annotations

import json
import logging
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace

import torch

from ...models.view import Conditioning, ModelView
from ...patches.patch import META, AblationPatch
from ..ablation.adapters import AdapterSet
from ..ablation.preserve import encode_preserved
from ..progress import CancelFn, Canceller, Progress, ProgressFn, cancel_checks, paced
from .adversarial_set import Adversary, adversarial_moments, adversarial_rows, describe, pair_of_rows
from .adversary import denoising_task, draw_images, invert_embedding, reference_task, search_start, search_tokens
from .token_hook import PLACEHOLDER

log = logging.getLogger(__name__)

ROBUST_SEED_OFFSET = 30_000
ROBUST_GROUP = "attn"
ROBUST_PRESET = "thorough"


@dataclass(frozen=True)
class AdversaryBudget:
    """What each round's adversary may spend, per target."""

    images: int = 24
    inversion_steps: int = 150
    inversion_lr: float = 1e-2
    inversion_batch: int = 8
    search_images: int = 6
    search_iterations: int = 6
    search_candidates: int = 16
    top_k: int = 64
    extra_tokens: int = 2


BUDGET = AdversaryBudget()
# the fast preset's rounds: a third of the images, about a quarter of the inversion and a third of the token search,
# so that the adversary does not cost many times the fast run it attacks
QUICK_BUDGET = AdversaryBudget(images=8, inversion_steps=40, search_images=4, search_iterations=2, search_candidates=8)


def adversary_budget(preset: str | None) -> AdversaryBudget:
    """The adversary of a robust trained run with ``preset``: quick for ``fast``, the full one otherwise."""
    return QUICK_BUDGET if preset == "fast" else BUDGET


class _Search:
    """The adversary of one erasure run: images of each target from the unpatched model (drawn once), and the
    searches against each round's patch."""

    def __init__(self, view: ModelView, pairs: list[tuple[str, str]], twins: list[str], sampler_steps: int,
                 guidance: float, seed: int, budget: AdversaryBudget, report: ProgressFn, canceller: Canceller):
        self.view, self.pairs, self.budget, self.report, self.canceller = view, pairs, budget, report, canceller
        self.seed = seed + ROBUST_SEED_OFFSET
        owner = pair_of_rows(twins, [t for t, _ in pairs])
        self.captions = [[tw for tw, o in zip(twins, owner) if o == i] or [twins[0]] for i in range(len(pairs))]
        self.images, self.tasks = [], []
        canceller.phase = "drawing the adversary's images"
        report(Progress("adversary images", 0, len(self.captions)))
        with self.cancel_checks():
            for index, captions in enumerate(self.captions):
                canceller.check()
                latents, which = draw_images(view, captions, budget.images, sampler_steps, guidance, self.seed + index)
                self.images.append((latents, [captions[i] for i in which.tolist()]))
                prompt = captions[0]
                task = denoising_task(view, latents[:budget.search_images], 1, self.seed + 100 + index)
                with torch.no_grad():
                    self.tasks.append((prompt, reference_task(view, task, view.encode([prompt]))))
                report(Progress("adversary images", index + 1, len(self.captions)))

    def cancel_checks(self) -> AbstractContextManager[None]:
        """Cancel checks inside every UNet call of the block: one sampler step at full resolution can take minutes
        on a CPU."""
        return cancel_checks(self.view.cancel_check_modules(), self.canceller)

    def against(self, patch: AblationPatch, round_index: int) -> list[Adversary]:
        """Both searches against the model with ``patch`` applied, for every target."""
        found = []
        b = self.budget
        total = len(self.pairs) * (b.inversion_steps + b.search_iterations)
        done = 0

        def step(count: int) -> None:
            nonlocal done
            self.canceller.check()
            done += count
            self.report(Progress(f"adversary {round_index}", done, total))

        self.canceller.phase = f"attacking the patch (robust round {round_index})"
        # through hooks, not in place: ComfyUI's weights are inference tensors that cannot change outside inference mode
        with AdapterSet.of_patch(self.view, patch).attached(), self.cancel_checks():
            for index, (target, anchor) in enumerate(self.pairs):
                latents, captions = self.images[index]
                texts = [c.replace(target, PLACEHOLDER) if target in c else f"{c} {PLACEHOLDER}" for c in captions]
                seed = self.seed + 1000 * (round_index + 1) + index
                inversion = invert_embedding(self.view, latents, texts, anchor, b.inversion_steps, b.inversion_lr,
                                             b.inversion_batch, seed, lambda *_: step(1))
                prompt, task = self.tasks[index]
                start, positions = search_start(self.view, prompt, target, b.extra_tokens)
                result = search_tokens(self.view, task, start, positions, b.search_iterations, b.search_candidates,
                                       b.top_k, min(4, len(task.x_t)), seed, lambda *_: step(1))
                tail = inversion.losses[-max(1, len(inversion.losses) // 10):]
                notes = {"round": round_index, "inversion_loss_last_tenth": round(sum(tail) / len(tail), 6),
                         "search_loss": [round(result.losses[0], 6), round(result.losses[-1], 6)]}
                found.append(Adversary(target, inversion.vectors, [result.ids[p] for p in positions], notes))
        return found


def _robust_metadata(patch: AblationPatch, rounds: int, budget: AdversaryBudget, found: list[dict],
                     targets: list[str], anchors: list[str]) -> None:
    patch.metadata[META + "robust"] = json.dumps({"rounds": rounds, "adversary": asdict(budget), "found": found})
    patch.metadata[META + "targets"] = json.dumps(targets)
    patch.metadata[META + "anchors"] = json.dumps(anchors)
    patch.metadata["modelspec.title"] = patch.metadata.get("modelspec.title", "") + f" (robust, {rounds} rounds)"


def robust_ablate(view: ModelView, config, on_progress: ProgressFn | None = None,
                  should_cancel: CancelFn | None = None, base_patch: AblationPatch | None = None,
                  budget: AdversaryBudget | None = None):
    """The trained ablation with ``config.robust_rounds`` adversarial rounds (plain ``ablate`` when it is 0); the
    adversary's ``budget`` follows the preset unless given."""
    from ..ablation.loop import _prompt_pairs, ablate
    from ..ablation.settings import resolve_for_view

    rounds = int(config.robust_rounds or 0)
    if rounds == 0:
        return ablate(view, config, on_progress, should_cancel, base_patch)
    report, canceller = paced(on_progress, should_cancel)
    # Robust rounds train with the thorough preset where the default is asked for: the model-based loss on guided
    # anchor images, what the robustness table measured (the adversary also draws its target images with guidance).
    preset = ROBUST_PRESET if config.preset == "default" else config.preset
    budget = budget or adversary_budget(preset)
    config = resolve_for_view(replace(config, group=config.group or ROBUST_GROUP, preset=preset), view)
    config = replace(config, preserved_rows=max(int(config.preserved_rows), int(config.batch_size)))  # every row
    preserved = encode_preserved(view, config, report, canceller)
    result = ablate(view, config, on_progress, should_cancel, base_patch, preserved=preserved)
    anchors, twins = _prompt_pairs(config)
    twins, targets = twins[:len(anchors)], [t for t, _ in config.pairs()]
    search = _Search(view, config.pairs(), twins, int(config.sampler_steps), float(config.guidance), config.seed,
                     budget, report, canceller)
    blocks, found, losses = [], [], list(result.losses)
    seconds = [result.seconds_anchors, result.seconds_training]
    for round_index in range(1, rounds + 1):
        adversaries = search.against(result.patch, round_index)
        found += [describe(view, a) for a in adversaries]
        blocks += [cond for cond, _ in adversarial_rows(view, twins, targets, adversaries)]
        # the kept rows at the original model's prediction, not the last round's: its harm is undone, not kept
        result = ablate(view, config, on_progress, should_cancel, result.patch, extra_targets=Conditioning.cat(blocks),
                        preserved=preserved, kept_at_original=base_patch is None)
        losses += result.losses
        seconds = [seconds[0] + result.seconds_anchors, seconds[1] + result.seconds_training]
        log.info("robust round %d/%d: erased %d adversarial inputs per anchor prompt", round_index, rounds,
                 len(blocks))
    listed = (base_patch.listed("targets") if base_patch else []) + targets
    listed_anchors = (base_patch.listed("anchors") if base_patch else []) + [a for _, a in config.pairs()]
    _robust_metadata(result.patch, rounds, budget, found, listed, listed_anchors)
    return replace(result, losses=losses, seconds_anchors=seconds[0], seconds_training=seconds[1], config=config)


def robust_erase_closed_form(view: ModelView, config, on_progress: ProgressFn | None = None,
                             should_cancel: CancelFn | None = None, base_patch: AblationPatch | None = None,
                             budget: AdversaryBudget = BUDGET):
    """The closed form with ``config.robust_rounds`` RECE-style rounds (plain ``erase_closed_form`` when it is 0)."""
    from ..ablation.settings import preset_values
    from ..closed_form.settings import resolve_closed_form
    from ..closed_form.solve import _prompt_pairs, erase_closed_form

    rounds = int(config.robust_rounds or 0)
    result = erase_closed_form(view, config, on_progress, should_cancel, base_patch)
    if rounds == 0:
        return result
    report, canceller = paced(on_progress, should_cancel)
    config = resolve_closed_form(config, view.family.name)
    twins, anchors = _prompt_pairs(config)
    targets = [t for t, _ in config.pairs()]
    # the adversary draws its target images as the thorough preset's anchors are drawn (guided), as the table measured
    sampling = preset_values(view.family.name, ROBUST_PRESET)
    search = _Search(view, config.pairs(), twins, int(sampling["sampler_steps"]), float(sampling["guidance"]),
                     config.seed, budget, report, canceller)
    extra, found, seconds = None, [], result.seconds
    for round_index in range(1, rounds + 1):
        adversaries = search.against(result.patch, round_index)
        found += [describe(view, a) for a in adversaries]
        moments = adversarial_moments(view, twins, anchors, targets, adversaries)
        extra = moments if extra is None else {s: m.plus(moments[s]) for s, m in extra.items()}
        result = erase_closed_form(view, config, on_progress, should_cancel, base_patch, extra_moments=extra,
                                   focus_vectors=result.focus_vectors)
        seconds += result.seconds
    listed = (base_patch.listed("targets") if base_patch else []) + targets
    listed_anchors = (base_patch.listed("anchors") if base_patch else []) + [a for _, a in config.pairs()]
    _robust_metadata(result.patch, rounds, budget, found, listed, listed_anchors)
    return replace(result, seconds=seconds)
