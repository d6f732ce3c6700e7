"""Erasures chained in ComfyUI: a MODEL that carries our patches says so, and the next erasure builds on them.

Without this, a second Ablate Concept (or Erase Concepts) node fed the first one's MODEL would train on the patched
weights and return a patch that holds only its own change, with the fingerprint of the patched model: the file would
carry one erasure of two and fail the fingerprint check on the user's checkpoint.

So every MODEL our nodes patch carries a record (in ``model_options``, which ComfyUI copies to every clone, so it
survives LoRA loaders and other nodes in between) of the patches it holds and of the very tensors handed to
``add_patches``. The next erasure finds them (only those still present on the patcher: a node that rebuilt the
patches drops them), removes them from a clone (the original weights again), and trains or solves with them as the
base patch; the result holds every change and the original model's fingerprint, and is applied to that clone.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass

import torch
from torch import Tensor

from ...patches.merge import merge_weighted
from ...patches.patch import AblationPatch

log = logging.getLogger(__name__)

OPTION_KEY = "concept_ablation_patches"


@dataclass(frozen=True)
class CarriedPatch:
    """One patch applied to a MODEL (and its CLIP): the patch, its strength, and the tensors given to
    ``add_patches`` by owner ("model" or "clip") and state-dict key, to recognise them on a patcher later."""

    patch: AblationPatch
    strength: float
    added: tuple[tuple[str, str, Tensor], ...]


class CarriedPatches(tuple):
    """The record kept in ``model_options``: immutable, so ComfyUI's deep copy on every clone shares it."""

    def __deepcopy__(self, memo: dict) -> CarriedPatches:
        return self

    def __copy__(self) -> CarriedPatches:
        return self


def _patcher(owner: str, model, clip):
    if owner == "model":
        return model
    return getattr(clip, "patcher", None)


def _present(patcher, state_key: str, tensor: Tensor) -> bool:
    entries = getattr(patcher, "patches", {}).get(state_key, []) if patcher is not None else []
    return any(isinstance(e[1], tuple) and e[1] and e[1][0] is tensor for e in entries)


def carried(model, clip=None) -> list[CarriedPatch]:
    """Our patches this MODEL still holds, in the order they were applied. A patch counts when its UNet part (or,
    for a text-encoder-only patch, its CLIP part) is still on the patcher."""
    record = getattr(model, "model_options", {}).get(OPTION_KEY) or ()
    found = []
    for entry in record:
        unet = [(k, t) for owner, k, t in entry.added if owner == "model"]
        checked = unet or [(k, t) for owner, k, t in entry.added if owner == "clip"]
        owner = "model" if unet else "clip"
        if checked and all(_present(_patcher(owner, model, clip), k, t) for k, t in checked):
            found.append(entry)
        else:
            log.info("a patch recorded on this MODEL (%s) is no longer applied to it; not building on it",
                     entry.patch.metadata.get("modelspec.title", "untitled"))
    return found


def record(model_out, entries: list[CarriedPatch]) -> None:
    """Write the record on a MODEL our flow just patched (its own clone)."""
    if entries:
        model_out.model_options[OPTION_KEY] = CarriedPatches(entries)
    else:
        model_out.model_options.pop(OPTION_KEY, None)


def without(model, clip, entries: list[CarriedPatch]):
    """Clones of MODEL and CLIP with these patches taken off again (other patches, a LoRA say, stay)."""
    model_out, clip_out = model.clone(), clip
    if any(owner == "clip" and _present(_patcher("clip", model, clip), k, t) for e in entries
           for owner, k, t in e.added):
        clip_out = clip.clone()
    for owner, patcher in (("model", model_out), ("clip", _patcher("clip", model_out, clip_out))):
        if patcher is None or (owner == "clip" and clip_out is clip):
            continue
        ours = {id(t) for e in entries for o, _, t in e.added if o == owner}
        for key in list(patcher.patches):
            kept = [e for e in patcher.patches[key] if not (isinstance(e[1], tuple) and e[1] and id(e[1][0]) in ours)]
            if kept:
                patcher.patches[key] = kept
            else:
                del patcher.patches[key]
        patcher.patches_uuid = uuid.uuid4()  # the weights differ from the patched MODEL's: ComfyUI must re-patch
    record(model_out, [])
    return model_out, clip_out


def base_patch(entries: list[CarriedPatch], extra: list[tuple[AblationPatch, float]]) -> AblationPatch | None:
    """One patch for everything already applied (the MODEL's patches, then an explicit base patch unless the MODEL
    carries that very patch), or ``None``."""
    pairs = [(e.patch, e.strength) for e in entries]
    pairs += [(p, s) for p, s in extra if not any(p is q for q, _ in pairs)]
    if not pairs:
        return None
    if len(pairs) == 1 and pairs[0][1] == 1.0:
        return pairs[0][0]
    return merge_weighted([p for p, _ in pairs], [s for _, s in pairs])


def describe(entries: list[CarriedPatch], base: AblationPatch | None) -> str:
    """The prefix of a node's summary line when it built on earlier patches."""
    if base is None:
        return ""
    targets = base.listed("targets")
    where = "the MODEL's earlier patch" if entries else "the base patch"
    if len(entries) > 1:
        where = f"the MODEL's {len(entries)} earlier patches"
    shown = ", ".join(targets[:4]) + (" ..." if len(targets) > 4 else "")
    return f"built on {where} ({shown or 'no targets listed'}); the patch holds every change. "


def digest(patch: AblationPatch | None) -> str:
    """A short hash of a patch's tensors (for cache keys: a run on top of another patch is another run)."""
    if patch is None:
        return ""
    h = hashlib.sha256()
    for key in sorted(patch.deltas):
        h.update(key.encode())
        for name, tensor in sorted(patch.deltas[key].tensors(key, torch.float32).items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
