"""The image-level figures, on CLIP features: accuracy of target against anchor, CLIP score, and KID.

- ``clip_accuracy``: each image of a target prompt is classified by which text it is closer to in CLIP space, its
  own target prompt or the anchor twin of that prompt (the same words with the anchor in place of the target); the
  figure is the share classified as the target (Concept Ablation's CLIP accuracy). Spread: the binomial standard
  error, ``sqrt(p (1 - p) / n)``.
- ``clip_score``: 100 x the cosine similarity of an image to its own prompt, averaged over a set: torchmetrics'
  CLIPScore without its floor at 0 (real CLIP models hardly go below it; random test weights do, and a floor would
  show them as 0). Spread: the standard error of that mean.
- ``kid``: the kernel inception distance of two feature sets, the unbiased estimator of the squared MMD with the
  polynomial kernel ``k(x, y) = (x.y / d + 1) ** 3`` (Binkowski et al. 2018), here in CLIP image features instead of
  Inception's. Spread: the standard deviation of the same estimate over random half-size subsets (fixed seed), which
  says how much the figure moves with the sample; the full-set estimate is the figure.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def normalised(features: Tensor) -> Tensor:
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def classified_as_target(image_features: Tensor, target_text: Tensor, anchor_text: Tensor) -> Tensor:
    """Per image (row), whether it is closer to its target text than to its anchor text (rows paired)."""
    images = normalised(image_features)
    to_target = (images * normalised(target_text)).sum(-1)
    to_anchor = (images * normalised(anchor_text)).sum(-1)
    return to_target > to_anchor


def clip_scores(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Per image, 100 x cos(image, its text) (rows paired)."""
    return 100 * (normalised(image_features) * normalised(text_features)).sum(-1)


def share_and_spread(hits: Tensor) -> tuple[float, float]:
    """A share of booleans and its binomial standard error."""
    n = hits.numel()
    share = float(hits.float().mean())
    return share, math.sqrt(share * (1 - share) / n)


def mean_and_spread(values: Tensor) -> tuple[float, float]:
    """A mean and its standard error (0 for one value)."""
    n = values.numel()
    spread = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0
    return float(values.mean()), spread


def _kernel(x: Tensor, y: Tensor) -> Tensor:
    return (x @ y.T / x.shape[1] + 1) ** 3


def kid(x: Tensor, y: Tensor) -> float:
    """Unbiased squared MMD of two feature sets ([m, d], [n, d], m, n >= 2) under the polynomial kernel."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError("KID needs at least two images in each set")
    x, y = x.double(), y.double()
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _kernel(x, x), _kernel(y, y), _kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kid_with_spread(x: Tensor, y: Tensor, subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """KID on the full sets, and its standard deviation over ``subsets`` random half-size subsets (seeded)."""
    value = kid(x, y)
    half = min(len(x), len(y)) // 2
    if half < 2:
        return value, float("nan")
    generator = torch.Generator().manual_seed(seed)
    found = [kid(x[torch.randperm(len(x), generator=generator)[:half]],
                 y[torch.randperm(len(y), generator=generator)[:half]]) for _ in range(subsets)]
    return value, float(torch.tensor(found).std(unbiased=True))
