"""Ablation patches: weight deltas with metadata, stored as LoRA-format ``.safetensors``.

One abstraction with two delta kinds, used by save, load, apply, merge and the nodes alike (as ComfyUI's weight
adapters do): ``diff`` (exact, full rank) and ``lora`` (``up @ down * alpha / rank``). Keys follow kohya's
``lora_unet_`` / ``lora_te_`` naming, so ComfyUI's LoraLoader and A1111's Lora extension read the files as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import PatchError
from ..files import save_safetensors_atomic

FORMAT_VERSION = "1"
META = "ablation."
DEFAULT_ENERGY = 0.999
SS_BASE_MODEL = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "toy": "toy", "flux": "flux1",
                 "toy-flux": "toy-flux"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                  "toy": "ablation-toy", "flux": "flux-1-dev", "toy-flux": "ablation-toy-flux"}


@dataclass
class LayerDelta:
    """The change of one weight: exact (``diff``) or low rank (``up``, ``down``, ``alpha``)."""

    diff: Tensor | None = None
    up: Tensor | None = None
    down: Tensor | None = None
    alpha: float | None = None

    @property
    def is_low_rank(self) -> bool:
        return self.diff is None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else self.down.shape[0]

    def full(self, shape: torch.Size | tuple[int, ...] | None = None) -> Tensor:
        """The dense delta; ``shape`` restores conv kernels from LoRA's flattened form."""
        if self.diff is not None:
            return self.diff.float()
        assert self.up is not None and self.down is not None
        scale = (self.alpha if self.alpha is not None else self.rank) / self.rank
        dense = (self.up.float().flatten(1) @ self.down.float().flatten(1)) * scale
        target = shape or (self.up.shape[0], *self.down.shape[1:])
        return dense.view(target)

    def tensors(self, key: str, dtype: torch.dtype) -> dict[str, Tensor]:
        if self.diff is not None:
            return {f"{key}.diff": self.diff.to(dtype).contiguous()}
        return {f"{key}.lora_up.weight": self.up.to(dtype).contiguous(),
                f"{key}.lora_down.weight": self.down.to(dtype).contiguous(),
                f"{key}.alpha": torch.tensor(float(self.alpha if self.alpha is not None else self.rank))}

    def numel(self) -> int:
        return sum(t.numel() for t in (self.diff, self.up, self.down) if t is not None)

    def svd_work(self) -> int:
        """The work of an SVD of the dense change: rows x columns x the smaller of the two."""
        rows, columns = (self.diff.shape[0], math.prod(self.diff.shape[1:])) if self.diff is not None else (
            self.up.shape[0], math.prod(self.down.shape[1:]))  # type: ignore[union-attr]
        return rows * columns * min(rows, columns)

    def smallest(self) -> LayerDelta:
        """Itself, or its exact change when the low-rank factors hold as many numbers or more (both are stored in
        the same 16-bit dtype, so the count decides the file size)."""
        if self.diff is not None or self.up is None or self.down is None:
            return self
        exact = self.up.shape[0] * math.prod(self.down.shape[1:])
        return LayerDelta(diff=self.full()) if self.up.numel() + self.down.numel() >= exact else self


def low_rank(delta: Tensor, energy: float = DEFAULT_ENERGY, rank: int | None = None) -> tuple[LayerDelta, float]:
    """SVD of ``delta`` to the smallest rank keeping ``energy`` of its squared singular values (or to ``rank``).

    Returns the low-rank delta and its relative Frobenius error. Keeps the exact diff when low rank saves nothing.
    """
    matrix = delta.float().flatten(1)
    if not torch.any(matrix):
        return LayerDelta(diff=delta.clone()), 0.0
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    squared = s.square()
    if rank is None:
        kept = torch.cumsum(squared, 0) / squared.sum()
        rank = int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype)).item()) + 1
    rank = max(1, min(rank, len(s)))
    error = float((squared[rank:].sum() / squared.sum()).sqrt())
    if rank * sum(matrix.shape) >= matrix.numel():
        return LayerDelta(diff=delta.clone()), 0.0
    down_shape = (rank, *delta.shape[1:])
    up_shape = (delta.shape[0], rank, *([1] * (delta.ndim - 2)))
    up = (u[:, :rank] * s[:rank]).reshape(up_shape)
    down = vh[:rank].reshape(down_shape)
    return LayerDelta(up=up.contiguous(), down=down.contiguous(), alpha=float(rank)), error


def fingerprint(weights: dict[str, Tensor], dtype: torch.dtype = torch.float16) -> str:
    """A hash of the original weights a patch touches (rounded to fp16, so fp16/fp32 copies of a model agree; with
    ``dtype=torch.float32``, of their exact values)."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().to("cpu", dtype).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class AblationPatch:
    """Weight deltas by patch key, with string metadata (written to the safetensors header)."""

    deltas: dict[str, LayerDelta]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_deltas(cls, deltas: dict[str, Tensor], metadata: dict[str, str],
                    original_weights: dict[str, Tensor] | None = None) -> AblationPatch:
        patch = cls({k: LayerDelta(diff=v.detach().float().cpu()) for k, v in deltas.items()}, dict(metadata))
        if original_weights is not None:
            patch.metadata[META + "base_fingerprint"] = fingerprint(original_weights)
        return patch

    # Shape ---------------------------------------------------------------------------------------------------
    @property
    def is_low_rank(self) -> bool:
        return any(d.is_low_rank for d in self.deltas.values())

    @property
    def max_rank(self) -> int:
        return max((d.rank for d in self.deltas.values()), default=0)

    @property
    def base_fingerprint(self) -> str | None:
        return self.metadata.get(META + "base_fingerprint")

    def compressed(self, energy: float = DEFAULT_ENERGY, rank: int | None = None,
                   on_layer: Callable[[int, int], None] | None = None) -> AblationPatch:
        """A low-rank copy (SVD per layer); records the largest relative error in the metadata. ``on_layer(done,
        total)`` after each layer, in SVD work (``svd_work``), so a bar moves with the time spent: one Flux
        ``txt_in`` is most of a Flux patch's (7 s on a CPU), an SD1 K/V patch's SVDs take seconds in all."""
        deltas, errors = {}, []
        total, done = self.svd_work(), 0
        for key, delta in self.deltas.items():
            deltas[key], error = low_rank(delta.full(), energy, rank)
            errors.append(error)
            done += delta.svd_work()
            if on_layer is not None:
                on_layer(done, total)
        metadata = dict(self.metadata)
        metadata[META + "low_rank_max_relative_error"] = f"{max(errors, default=0.0):.6g}"
        metadata[META + "low_rank_energy"] = "" if rank else f"{energy:g}"
        metadata[META + "low_rank_rank"] = str(rank or "")
        patch = AblationPatch(deltas, metadata)
        patch.metadata["ss_network_dim"] = str(patch.max_rank)
        patch.metadata["ss_network_alpha"] = str(patch.max_rank)
        return patch

    def scaled(self, factor: float) -> AblationPatch:
        deltas = {k: LayerDelta(diff=d.full() * factor) for k, d in self.deltas.items()}
        return AblationPatch(deltas, dict(self.metadata))

    def state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for key, delta in self.deltas.items():
            tensors.update(delta.tensors(key, dtype))
        return tensors

    def numel(self) -> int:
        return sum(d.numel() for d in self.deltas.values())

    def svd_work(self) -> int:
        """The work of compressing every layer: rows x columns x the smaller of the two, summed."""
        return sum(d.svd_work() for d in self.deltas.values())

    def listed(self, name: str) -> list[str]:
        """A JSON list from the metadata (``targets``, ``anchors``), empty when missing or unreadable."""
        try:
            values = json.loads(self.metadata.get(META + name, "[]"))
        except ValueError:
            return []
        return [str(v) for v in values] if isinstance(values, list) else []

    # Files ---------------------------------------------------------------------------------------------------
    def smallest(self) -> AblationPatch:
        """Each layer as the smaller of its low-rank factors and its exact change (what every save writes)."""
        patch = AblationPatch({k: d.smallest() for k, d in self.deltas.items()}, dict(self.metadata))
        if "ss_network_dim" in patch.metadata:
            rank = str(patch.max_rank)
            patch.metadata["ss_network_dim"] = patch.metadata["ss_network_alpha"] = rank
        return patch

    def save(self, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write atomically: the file appears complete or not at all (``storage.load_patch`` reads it back). Each
        layer is written as the smaller of low rank and exact."""
        patch = self.smallest()
        metadata = dict(patch.metadata)
        metadata[META + "format_version"] = FORMAT_VERSION
        metadata[META + "storage"] = "lora" if patch.is_low_rank else "diff"
        tensors = patch.state_dict(dtype)
        if not tensors:
            raise PatchError("the patch has no deltas to save")
        return save_safetensors_atomic(tensors, path, metadata)


def describe_patch(patch: AblationPatch) -> dict[str, object]:
    """What ``inspect`` prints: metadata, layers, rank, size."""
    return {
        "metadata": patch.metadata,
        "layers": len(patch.deltas),
        "storage": "lora" if patch.is_low_rank else "diff",
        "max_rank": patch.max_rank,
        "parameters": patch.numel(),
        "keys": sorted(patch.deltas),
    }
