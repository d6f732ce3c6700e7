"""Combining patches into one: the weighted sum of their weight deltas."""

from __future__ import annotations

import json

from ..errors import PatchError
from .patch import META, AblationPatch, LayerDelta


def merge_weighted(patches: list[AblationPatch], weights: list[float] | None = None) -> AblationPatch:
    """One patch whose delta on each layer is ``sum(w_i * delta_i)``; layers missing from a patch count as zero.

    Exact (the result is stored full rank; compress it to save space). Erasures that touch the same layers can
    interfere when summed; the closed-form fusion (MACE) is the remedy when it lands.
    """
    if not patches:
        raise PatchError("nothing to merge: give at least one patch")
    weights = list(weights) if weights is not None else [1.0] * len(patches)
    if len(weights) != len(patches):
        raise PatchError(f"{len(patches)} patches but {len(weights)} weights; give one weight per patch")
    families = {p.metadata.get(META + "base_family") for p in patches} - {None}
    if len(families) > 1:
        raise PatchError(f"these patches were made for different model families ({', '.join(sorted(families))}) "
                         "and cannot be merged")
    merged: dict[str, LayerDelta] = {}
    for patch, weight in zip(patches, weights):
        for key, delta in patch.deltas.items():
            dense = delta.full() * weight
            if key in merged:
                if merged[key].diff.shape != dense.shape:
                    raise PatchError(f"layer '{key}' has different shapes in the patches being merged")
                merged[key] = LayerDelta(diff=merged[key].diff + dense)
            else:
                merged[key] = LayerDelta(diff=dense)
    metadata = _merged_metadata(patches, weights)
    return AblationPatch(merged, metadata)


def _merged_metadata(patches: list[AblationPatch], weights: list[float]) -> dict[str, str]:
    def listed(name: str) -> list[str]:
        return [value for patch in patches for value in patch.listed(name)]

    first = patches[0].metadata
    metadata = {k: v for k, v in first.items() if k.startswith("ss_base") or k.startswith("modelspec.architecture")}
    metadata.update({
        META + "method": "merge-weighted-sum",
        META + "targets": json.dumps(listed("targets")),
        META + "anchors": json.dumps(listed("anchors")),
        META + "merge_weights": json.dumps(weights),
        META + "sources": json.dumps([p.metadata.get("modelspec.title", "") for p in patches]),
        "ss_network_module": "networks.lora",
        "modelspec.title": "Merged ablation: " + ", ".join(listed("targets")),
    })
    for key in ("base_family", "base_fingerprint", "group"):
        values = {p.metadata.get(META + key) for p in patches}
        if len(values) == 1 and None not in values:
            metadata[META + key] = values.pop()
    return metadata
