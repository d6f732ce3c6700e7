"""Sensitive preservation figures for the toy world: how far a patch moved what it should have left alone.

The classifier's yes/no ("still a bird") stays at 100 % until a neighbour is lost outright. These figures see the
smaller moves first, in the classifier's penultimate features (the 128-d vector its heads read):

- ``neighbour_change``: for each neighbour and unrelated concept, the mean distance between a sample drawn before
  the patch and the sample drawn after it from the same noise and prompt, over ``scale``: the typical distance between
  two samples of different concepts, measured on the before samples. 0 = untouched; 1 = the sample moved as far as
  from one concept to another. Mean over the concepts, and the worst concept (with its most-moved prompt).
- ``neighbour_fid``: the Frechet distance between the before and after sample sets of those concepts (pooled), in the
  same features, over ``scale`` squared. Its ``floor`` is the same distance between the before samples and before
  samples from a second noise seed: what two draws of the unchanged model already differ by at these sample counts.
- ``prediction_drift`` (model side, ``model_metrics.prediction_gaps``): the squared change of the noise prediction
  for those prompts over the squared target-anchor gap, on the same noisy images; mean and worst prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MIN_SCALE = 1e-8


@dataclass
class PreservedSamples:
    """One preserved prompt set: its prompts and the features of its samples before and after (row i: prompt i)."""

    name: str
    concept: str
    prompts: list[str]
    before: Tensor
    after: Tensor


@dataclass
class Preservation:
    scale: float
    change: dict[str, float]
    change_mean: float
    change_worst: float
    worst_set: str
    worst_prompt: str
    fid: float
    fid_floor: float | None
    samples: int
    anchor_change: float | None = None
    drift: dict | None = None

    def as_json(self) -> dict:
        return {
            "neighbour_change": {"mean": round(self.change_mean, 4), "worst": round(self.change_worst, 4),
                                 "worst_set": self.worst_set, "worst_prompt": self.worst_prompt,
                                 "per_set": {k: round(v, 4) for k, v in self.change.items()}},
            "neighbour_fid": {"value": round(self.fid, 4),
                              "floor": None if self.fid_floor is None else round(self.fid_floor, 4)},
            "anchor_change": None if self.anchor_change is None else round(self.anchor_change, 4),
            "prediction_drift": None if self.drift is None else {
                "mean": round(self.drift["prediction_drift"], 4),
                "worst": round(self.drift["prediction_drift_worst"], 4),
                "worst_prompt": self.drift["prediction_drift_worst_prompt"]},
            "scale": round(self.scale, 4), "samples": self.samples,
        }

    def summary_line(self) -> str:
        floor = "" if self.fid_floor is None else f" (noise floor {self.fid_floor:.2g})"
        return (f"preservation: neighbour change mean {self.change_mean:.3f}, worst {self.change_worst:.3f} "
                f"({self.worst_set}, '{self.worst_prompt}'); neighbour FID {self.fid:.2g}{floor}; 1.0 = the typical "
                f"distance between two concepts' samples, {self.samples} samples" + self._drift_text())

    def _drift_text(self) -> str:
        if self.drift is None:
            return ""
        return (f"; prediction drift mean {self.drift['prediction_drift']:.3f}, worst "
                f"{self.drift['prediction_drift_worst']:.3f} ('{self.drift['prediction_drift_worst_prompt']}'; 1.0 = "
                "the target-anchor gap)")


@torch.no_grad()
def classifier_features(classifier, images: Tensor) -> Tensor:
    """The toy classifier's penultimate features (what its heads read) of [n, 3, 16, 16] images in [-1, 1]."""
    return classifier.features(images.float().clamp(-1, 1)).double()


def concept_scale(features: dict[str, Tensor]) -> float:
    """The typical distance between samples of two different concepts: the mean distance over all cross-concept
    sample pairs of each pair of concepts, averaged over the pairs of concepts (so no concept weighs more for having
    more samples)."""
    names = [n for n, f in features.items() if len(f)]
    if len(names) < 2:
        raise ValueError("the scale needs samples of at least two concepts")
    distances = [torch.cdist(features[a], features[b]).mean() for i, a in enumerate(names) for b in names[i + 1:]]
    return float(torch.stack(distances).mean())


def _sqrt_psd(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sample sets [n, d]: |mu_a - mu_b|^2 +
    tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2). Symmetric PSD square roots only, so it is exact for rank-deficient
    covariances (fewer samples than dimensions)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Frechet distance needs at least two samples per set")
    a, b = a.double(), b.double()
    mean = (a.mean(0) - b.mean(0)).square().sum()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    return max(float(mean + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross)), 0.0)


def measure_preservation(preserved: list[PreservedSamples], scale: float, floor: Tensor | None = None,
                         anchor: tuple[Tensor, Tensor] | None = None) -> Preservation:
    """The figures for ``preserved`` sets; ``floor``: features of the same prompts from a second noise seed, in the
    order of the pooled before samples; ``anchor``: the anchor set's before and after features."""
    if not preserved:
        raise ValueError("no preserved prompt sets to measure")
    scale = max(scale, MIN_SCALE)
    change, worst_prompt_of = {}, {}
    for s in preserved:
        moved = (s.after - s.before).norm(dim=1) / scale
        change[s.name] = float(moved.mean())
        worst_prompt_of[s.name] = s.prompts[int(moved.argmax())]
    worst_set = max(change, key=lambda name: change[name])
    before = torch.cat([s.before for s in preserved])
    after = torch.cat([s.after for s in preserved])
    fid = frechet_distance(before, after) / scale ** 2
    fid_floor = frechet_distance(before, floor) / scale ** 2 if floor is not None else None
    anchor_change = float((anchor[1] - anchor[0]).norm(dim=1).mean() / scale) if anchor is not None else None
    return Preservation(scale, change, sum(change.values()) / len(change), change[worst_set], worst_set,
                        worst_prompt_of[worst_set], fid, fid_floor, len(before), anchor_change)
