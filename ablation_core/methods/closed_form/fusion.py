"""Closed-form fusion of patches (MACE, Eq. 7): one patch that does what each source patch does on its own concept.

Summing the deltas of separately made erasures lets each one act on the others' concepts too. Fusion instead asks,
for every cross-attention K/V weight, for the single change ``D`` that reproduces each patch's change on the text
embeddings of that patch's own targets and leaves the preserved concepts alone:

    D = argmin sum_i sum_{c in E_i} |D c - w_i D_i c|^2 + lam sum_p |D p|^2 + mu |D|^2
      = (sum_i w_i D_i X_i) (sum_i X_i + lam P + mu I)^-1,   X_i = sum_{c in E_i} c c^T,

where ``E_i`` are the embeddings of patch ``i``'s target prompts from the concept on (as the closed-form method
uses them). It needs the base model to encode those prompts. Layers that do not read the text context (self-
attention, convolutions) cannot be fused this way and are summed, which the metadata says.
"""

from __future__ import annotations

import json

import torch

from ...errors import PatchError
from ...models.view import ModelView
from ...patches.merge import merge_weighted
from ...patches.patch import META, AblationPatch, LayerDelta
from .. import prompts as prompt_lib
from ..progress import CancelFn, Canceller, EncodeCount, Progress, ProgressFn, no_progress
from .embeddings import encode_units, pair_moments, preserved_moments
from .settings import make_closed_form_config, resolve_closed_form
from .solve import _prompt_pairs, low_rank_map


def _concept_prompts(view: ModelView, patch: AblationPatch, fused_targets: list[str]) -> tuple[list[str], list[str]]:
    """A patch's target prompts and their anchor twins, as the closed form phrases them."""
    targets, anchors = patch.listed("targets"), patch.listed("anchors")
    if not targets or len(anchors) not in (1, len(targets)):
        raise PatchError("fusion needs each patch's targets and anchors in its metadata (ablation.targets, "
                         f"ablation.anchors); '{patch.metadata.get('modelspec.title', 'a patch')}' has none")
    kind = patch.metadata.get(META + "kind") or None
    config = resolve_closed_form(make_closed_form_config(targets, anchors, kind=kind if kind != "None" else None,
                                                         builtin_preserve=False), view.family.name)
    target_prompts, anchor_prompts = _prompt_pairs(config)
    kept = prompt_lib.without_targets(anchor_prompts, fused_targets)  # as one joint solve would phrase them
    if len(kept) < len(anchor_prompts):
        target_prompts, anchor_prompts = map(list, zip(*[(t, a) for t, a in zip(target_prompts, anchor_prompts)
                                                         if a in kept]))
    return target_prompts, anchor_prompts


def fusion_prompts(view: ModelView, patches: list[AblationPatch]) -> tuple[list[tuple[list[str], list[str]]],
                                                                           list[str]]:
    """Each patch's (target prompts, anchor twins), and the preserved prompts: everything fusion encodes."""
    # every patch's targets, once each: patches that share a target (one erasure at two strengths, or a concept
    # erased twice) are fused too
    targets = list({t.lower(): t for p in patches for t in p.listed("targets")}.values())
    pairs = [_concept_prompts(view, patch, targets) for patch in patches]
    preserved_config = resolve_closed_form(make_closed_form_config(
        targets, [a for p in patches for a in p.listed("anchors")][:1]), view.family.name)
    return pairs, list(preserved_config.preserved_prompts or ())


def fuse_patches(view: ModelView, patches: list[AblationPatch], weights: list[float] | None = None,
                 preserve_weight: float = 0.5, ridge: float = 1e-3, on_progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None) -> AblationPatch:
    """One patch from several, fused in closed form on the K/V layers (and summed elsewhere)."""
    report, canceller = on_progress or no_progress, Canceller(should_cancel)
    if len(patches) < 2:
        raise PatchError("fusion needs at least two patches")
    weights = list(weights) if weights is not None else [1.0] * len(patches)
    if len(weights) != len(patches):
        raise PatchError(f"{len(patches)} patches but {len(weights)} weights; give one weight per patch")
    summed = merge_weighted(patches, weights)  # checks families and shapes; the fallback for other layers
    stream_of = {layer.key: stream for stream, layers in view.closed_form_layers().items() for layer in layers}
    canceller.phase = "encoding the patches' concepts"
    pairs, preserved_prompts = fusion_prompts(view, patches)
    total = sum(encode_units(view, t, a, []) for t, a in pairs) + encode_units(view, [], [], preserved_prompts)
    count, concepts = EncodeCount(report, canceller, total), []
    count.add(0)
    for target_prompts, anchor_prompts in pairs:  # one count over every patch's prompts and the preserved ones
        moments = pair_moments(view, target_prompts, anchor_prompts, count)
        concepts.append({stream: m.cc / max(m.count, 1) for stream, m in moments.items()})
    preserved = preserved_moments(view, preserved_prompts, count)
    inverses = {}
    for stream, (covariance, count) in preserved.items():
        dim = covariance.shape[0]
        gram = sum(c[stream] for c in concepts) + preserve_weight * covariance / max(count, 1)
        gram = gram + ridge * float(torch.trace(gram)) / dim * torch.eye(dim, dtype=torch.float64)
        inverses[stream] = torch.linalg.inv(gram)

    canceller.phase = "fusing the layers"
    fused = [key for key in summed.deltas if key in stream_of]
    report(Progress("fuse", 0, len(fused)))
    deltas: dict[str, LayerDelta] = {}
    for key, delta in summed.deltas.items():
        canceller.check()
        if key not in stream_of:
            deltas[key] = delta
            continue
        stream = stream_of[key]
        combined = sum(w * p.deltas[key].full().double() @ x[stream] for p, w, x in zip(patches, weights, concepts)
                       if key in p.deltas)
        left, right, _ = low_rank_map(combined @ inverses[stream])
        deltas[key] = LayerDelta(up=left.float(), down=right.float().clone(), alpha=float(left.shape[1]))
        report(Progress("fuse", fused.index(key) + 1, len(fused)))
    metadata = dict(summed.metadata)
    metadata.update({
        META + "method": "merge-fusion",
        META + "fusion": json.dumps({"fused_layers": sum(k in stream_of for k in deltas),
                                     "summed_layers": sum(k not in stream_of for k in deltas),
                                     "preserve_weight": preserve_weight, "ridge": ridge}),
    })
    return AblationPatch(deltas, metadata)
