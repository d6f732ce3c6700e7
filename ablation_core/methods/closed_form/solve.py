"""The closed-form solve: one d x d map in text space, shared by every cross-attention K/V layer.

Every K and V projection of the UNet reads the same text context, so the edit of each weight ``W`` is ``W @ G`` for
one matrix ``G``:

- least squares (UCE, MACE): ``W' = argmin sum |W' c - W a|^2 + lam sum |W' p - W p|^2 + mu |W' - W|^2`` over
  target/anchor pairs ``(c, a)`` and preserved embeddings ``p``, i.e. ``G = (A - C) (C + lam P + mu I)^-1`` with the
  second moments ``C = mean c c^T``, ``A = mean a c^T``, ``P = mean p p^T``;
- null space (SPEED, AlphaEdit): the edit is confined to the directions where the preserved embeddings have (almost)
  no energy, ``Q`` = the projector on the smallest eigenvectors of ``P`` that together hold at most ``tolerance`` of
  its energy, so preserved outputs cannot move (beyond about ``sqrt(tolerance)``): ``G = (A - C) Q (C Q + mu I)^-1``.

``G`` is truncated by SVD to the rank that keeps almost all of it, so each layer's patch is stored as LoRA
``up = W U S``, ``down = V^T`` (exact to the stated error) and the edit of a whole SD1.5 costs milliseconds.

Flux has no cross-attention reading the prompt unchanged at every step; what does (UCE's Flux edit) is ``txt_in``,
which reads the T5 sequence, and ``vector_in.in_layer``, which reads the pooled CLIP vector. Each input stream gets
its own map from its own moments (``view.closed_form_layers()``); SD has one stream, the context.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import AblationError
from ...models.layers import Layer
from ...models.view import ModelView
from ...patches.patch import META, MODELSPEC_ARCH, SS_BASE_MODEL, AblationPatch, LayerDelta, fingerprint
from .. import prompts as prompt_lib
from ..progress import CancelFn, Canceller, EncodeCount, Progress, ProgressFn, no_progress
from .embeddings import Moments, encode_units, pair_moments, preserved_moments
from .focus import focused_solve, preserved_vectors, vector_moments
from .settings import ClosedFormConfig, resolve_closed_form

log = logging.getLogger(__name__)

G_ENERGY = 0.99999


@dataclass
class ClosedFormResult:
    patch: AblationPatch
    config: ClosedFormConfig
    stats: dict[str, float]
    seconds: float
    text_maps: dict[str, Tensor] | None = None
    moments: dict[str, Moments] | None = None
    focus_vectors: dict[str, Tensor] | None = None


def solve_text_map(moments: Moments, preserved: Tensor, preserved_count: int, mode: str, preserve_weight: float,
                   ridge: float, tolerance: float) -> tuple[Tensor, dict[str, float]]:
    """The d x d map ``G`` (float64) and what the solve saw (pairs, preserved vectors, null-space size)."""
    dim = moments.cc.shape[0]
    c, a = moments.cc / moments.count, moments.ac / moments.count
    p = preserved / max(preserved_count, 1)
    identity = torch.eye(dim, dtype=torch.float64)
    mu = ridge * float(torch.trace(c)) / dim
    stats: dict[str, float] = {"target_vectors": moments.count, "preserved_vectors": preserved_count}
    if mode == "least-squares":
        lhs = c + preserve_weight * p + mu * identity
        g = torch.linalg.solve(lhs.T, (a - c).T).T
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(p)  # ascending
        energy = torch.cumsum(eigenvalues.clamp_min(0), 0) / eigenvalues.clamp_min(0).sum()
        free = eigenvectors[:, energy <= tolerance]
        stats["null_space_dim"] = free.shape[1]
        if free.shape[1] == 0:
            raise AblationError("the preserved concepts fill the whole text space of this model, so a null-space "
                                "edit has no room; preserve fewer concepts, raise the tolerance, or use the "
                                "least-squares mode")
        q = free @ free.T
        g = torch.linalg.solve((c @ q + mu * identity).T, ((a - c) @ q).T).T
    return g, stats


def low_rank_map(g: Tensor, energy: float = G_ENERGY) -> tuple[Tensor, Tensor, float]:
    """``G ~ left @ right`` (``left = U S``, ``right = V^T``) keeping ``energy`` of it; returns the relative error."""
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    squared = s.square()
    total = float(squared.sum())
    if total == 0:
        return g[:, :1] * 0, g[:1] * 0, 0.0
    kept = torch.cumsum(squared, 0) / total
    rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
    rank = min(rank, len(s))
    error = float((squared[rank:].sum() / total).sqrt())
    return u[:, :rank] * s[:rank], vh[:rank], error


def _prompt_pairs(config: ClosedFormConfig) -> tuple[list[str], list[str]]:
    targets, anchors = [], []
    for index, ((target, anchor), kind) in enumerate(zip(config.pairs(), config.kinds())):
        if config.anchor_prompts is not None:
            chosen = list(config.anchor_prompts[index])
        else:
            chosen = prompt_lib.choose_anchor_prompts(anchor, kind, int(config.prompts_per_target),
                                                      config.seed + index)
        if len(config.targets) > 1:
            chosen = prompt_lib.without_targets(chosen, list(config.targets))
        targets += prompt_lib.target_prompts(chosen, anchor, target, kind)
        anchors += chosen
    return targets, anchors


def erase_closed_form(view: ModelView, config: ClosedFormConfig, on_progress: ProgressFn | None = None,
                      should_cancel: CancelFn | None = None, base_patch: AblationPatch | None = None,
                      extra_moments: dict[str, Moments] | None = None,
                      focus_vectors: dict[str, Tensor] | None = None) -> ClosedFormResult:
    """Erase every target of ``config`` in one solve; the model is not modified (the result is a patch).

    With ``base_patch`` the solve starts from the weights with that earlier patch added, and the result holds both
    changes (with the original model's fingerprint). ``extra_moments`` are more (target, anchor) embedding pairs to
    erase beside the prompts' own, per input stream (adversarial embeddings, say); the result's ``moments`` are the
    prompts' own. Each input stream (``view.closed_form_layers()``) gets its own map; SD has one. With
    ``config.preserve_focus`` the solve is repeated that many times with the preserved vectors it moves most weighing
    more (``focus``); ``focus_vectors`` are those vectors when the caller holds them (robust rounds)."""
    started = time.perf_counter()
    report, canceller = on_progress or no_progress, Canceller(should_cancel)

    # 1. Settings for this model, and the layers the edit touches, by the input they read.
    config = resolve_closed_form(config, view.family.name)
    streams = {stream: layers for stream, layers in view.closed_form_layers().items() if layers}
    if not streams:
        raise AblationError(f"this model has no {view.closed_form_group} layers for the closed form to edit")
    all_layers = [layer for layers in streams.values() for layer in layers]
    base = _base_changes(view, base_patch, {layer.key for layer in all_layers})

    # 2. Embedding moments of the target/anchor pairs and of the preserved set.
    canceller.phase = "encoding prompts"
    target_prompts, anchor_prompts = _prompt_pairs(config)
    preserved_prompts = list(config.preserved_prompts or ())
    # with the focus the preserved set is kept as vectors (its moments come from them), encoded once a run
    focus = int(config.preserve_focus) if preserved_prompts else 0
    units = encode_units(view, target_prompts, anchor_prompts, [] if focus else preserved_prompts)
    count = EncodeCount(report, canceller, units + (len(preserved_prompts) if focus and not focus_vectors else 0))
    count.add(0)
    own_moments = pair_moments(view, target_prompts, anchor_prompts, count)
    if all(m.count == 0 for m in own_moments.values()):
        raise AblationError("the target prompts are identical to their anchor twins; nothing to erase")
    moments = {s: m.plus(extra_moments[s]) if extra_moments and s in extra_moments else m
               for s, m in own_moments.items()}
    if focus:
        focus_vectors = focus_vectors or preserved_vectors(view, preserved_prompts, count, config.seed)
        preserved = vector_moments(focus_vectors)
    elif preserved_prompts:
        preserved = preserved_moments(view, preserved_prompts, count)
    else:
        preserved = {s: (torch.zeros_like(m.cc), 0) for s, m in moments.items()}

    # 3. Each stream's map, kept at low rank; 4. each layer's change ``W @ G`` as LoRA, and what it does.
    canceller.phase = "solving"
    report(Progress("solve", 0, len(all_layers)))  # each stream's map comes first (an eigendecomposition)
    deltas: dict[str, LayerDelta] = {}
    stats: dict[str, float] = {}
    maps: dict[str, Tensor] = {}
    done = 0
    for stream, layers in streams.items():
        def solve(preserved_sum: Tensor, preserved_count: int, stream: str = stream) -> tuple[Tensor, dict]:
            return solve_text_map(moments[stream], preserved_sum, preserved_count, str(config.mode),
                                  float(config.preserve_weight), float(config.ridge),
                                  float(config.null_space_tolerance))

        g, found = focused_solve(focus_vectors[stream], focus, solve) if focus else solve(*preserved[stream])
        left, right, error = low_rank_map(g)
        found.update({"rank": left.shape[1], "map_relative_error": round(error, 8)})
        for layer in layers:
            canceller.check()
            deltas[layer.key] = _layer_change(layer, left, right, base)
            done += 1
            report(Progress("solve", done, len(all_layers)))
        found.update(_effect(layers, g, moments[stream], *preserved[stream], base))
        stats.update(found if len(streams) == 1 else {f"{stream}_{k}": v for k, v in found.items()})
        maps[stream] = g
    if len(streams) > 1:  # the headline figures of a multi-stream edit: the context's
        stats.update({k: stats[f"context_{k}"] for k in ("target_moved_fraction", "preserved_relative_change",
                                                         "rank")})
    seconds = time.perf_counter() - started
    stats["seconds"] = round(seconds, 3)
    patch = AblationPatch(deltas, _metadata(view, config, stats, base_patch))
    patch.metadata[META + "base_fingerprint"] = fingerprint({layer.key: layer.weight for layer in all_layers})
    log.info("closed form: %d target(s) in %.2fs; targets moved %.0f%% onto their anchors", len(config.targets),
             seconds, 100 * stats["target_moved_fraction"])
    return ClosedFormResult(patch, config, stats, seconds, maps, own_moments, focus_vectors)


def _layer_change(layer: Layer, left: Tensor, right: Tensor, base: dict[str, Tensor]) -> LayerDelta:
    """``W @ G`` (``G = left @ right``) as LoRA; on top of an earlier patch's change, both as one exact diff."""
    weight = layer.weight.detach().to("cpu", torch.float64)
    if layer.key in base:
        weight = weight + base[layer.key]
        up = torch.cat([weight @ left, base[layer.key]], dim=1)  # the solve's change, then the base's
        down = torch.cat([right, torch.eye(weight.shape[1], dtype=torch.float64)])
        return LayerDelta(diff=(up @ down).float())
    return LayerDelta(up=(weight @ left).float(), down=right.float().clone(), alpha=float(left.shape[1]))


def _base_changes(view: ModelView, base_patch: AblationPatch | None, edited_keys: set[str]) -> dict[str, Tensor]:
    """The dense changes of an earlier patch to the layers the closed form edits, by layer key; other layers of it
    are refused."""
    if base_patch is None:
        return {}
    from ...patches.apply import resolve

    changes = {view.all_layers()[key].key: dense.double().cpu() for key, (_, dense) in
               resolve(base_patch, view).items()}
    other = sorted(set(changes) - edited_keys)
    if other:
        raise AblationError(f"the base patch changes {len(other)} layer(s) the closed form does not edit (e.g. "
                            f"'{other[0]}'); the closed form can only build on patches of the "
                            f"{view.closed_form_group} layers")
    return changes


def _effect(layers: list, g: Tensor, moments: Moments, preserved: Tensor, preserved_count: int,
            base: dict[str, Tensor]) -> dict[str, float]:
    """On the first and last edited layer: how far the targets' outputs moved onto their anchors' (1 = all the way)
    and how much the preserved outputs moved (relative), from the moments (exact, no sampling)."""
    identity = torch.eye(g.shape[0], dtype=torch.float64)
    moved, drift = [], []
    for layer in {id(x): x for x in (layers[0], layers[-1])}.values():
        w = layer.weight.detach().to("cpu", torch.float64) + base.get(layer.key, 0)
        gram = w.T @ w  # tr(W X W^T) = tr(X W^T W)
        new = identity + g
        after = new @ moments.cc @ new.T - new @ moments.ac.T - moments.ac @ new.T + moments.aa
        before = moments.cc - moments.ac.T - moments.ac + moments.aa
        gap_before = float(torch.trace(before @ gram))
        moved.append(1 - float(torch.trace(after @ gram)) / gap_before if gap_before > 0 else 0.0)
        if preserved_count:
            change = max(float(torch.trace(g @ preserved @ g.T @ gram)), 0.0)  # >= 0 up to rounding
            drift.append((change / max(float(torch.trace(preserved @ gram)), 1e-30)) ** 0.5)
    return {"target_moved_fraction": round(sum(moved) / len(moved), 6),
            "preserved_relative_change": round(sum(drift) / len(drift), 8) if drift else 0.0}


def _metadata(view: ModelView, config: ClosedFormConfig, stats: dict[str, float],
              base_patch: AblationPatch | None) -> dict[str, str]:
    family = view.family.name
    described = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.describe().items()
                 if k not in ("preserved_prompts", "anchor_prompts")}
    pairs = ([(t, a) for t, a in zip(base_patch.listed("targets"), base_patch.listed("anchors"))]
             if base_patch else []) + config.pairs()
    title = ", ".join(f"{t} -> {a}" for t, a in pairs[:5]) + (f" (+{len(pairs) - 5} more)" if len(pairs) > 5 else "")
    metadata = {
        META + "method": "closed-form",
        META + "mode": str(config.mode),
        META + "group": view.closed_form_group,
        META + "targets": json.dumps([t for t, _ in pairs]),
        META + "anchors": json.dumps([a for _, a in pairs]),
        META + "kind": str(config.kind),
        META + "base_family": family,
        META + "preserved_prompts": str(len(config.preserved_prompts or ())),
        META + "settings": json.dumps(described),
        META + "solve": json.dumps(stats),
        META + "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ss_network_module": "networks.lora",
        "ss_base_model_version": SS_BASE_MODEL.get(family, family),
        "ss_output_name": "erase_" + "_".join(t for t, _ in pairs[:3]).replace(" ", "_"),
        "ss_training_comment": f"Closed-form erasure ({config.mode}): {title}",
        "modelspec.architecture": f"{MODELSPEC_ARCH.get(family, family)}/lora",
        "modelspec.title": f"Erase {title}",
    }
    if base_patch is not None:
        metadata[META + "base_patch"] = json.dumps({"method": base_patch.metadata.get(META + "method", "unknown"),
                                                    "title": base_patch.metadata.get("modelspec.title", ""),
                                                    "layers": len(base_patch.deltas)})
    metadata.update(config.extra_metadata)
    return metadata
