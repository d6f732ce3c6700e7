"""Preservation focused where the edit does harm: the preserved vectors a solve moves most weigh more in the next.

The least-squares solve keeps the preserved set on average: ``P = mean p p^T`` over every position of hundreds of
prompts, most of it padding and words every prompt shares. A neighbour's own tokens are a sliver of that average, so
an edit that drags them along (a robust round's adversarial embeddings near the neighbour's: house -> car took tree
from 100 % to 0 % on the toy world) costs the objective almost nothing. Raising the preserve weight for all of them
keeps the neighbour, and also what the adversary found (the soft prompt back from 38 % to 62 %).

Here the solve is repeated a few times with the preserved vectors reweighted by multiplicative weights (the usual
way to approach a minimax): after each solve every vector's weight grows with how far the map moved it, relative to
its length, ``w <- w exp(rate * moved / max moved)``, and the weights are scaled back to a mean of 1 so the whole
preserved set weighs what the preserve weight says. The worst-moved vectors end up with tens of times the weight of
an untouched one; the rest of the text space stays free for the erasure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ...models.view import ModelView
from ..progress import EncodeCount, encode_counted
from .embeddings import stream_vectors

FOCUS_RATE = 1.0
VECTOR_BYTES = 128 * 2**20  # preserved vectors kept for the focus, all streams (float32); beyond it, a sample


def preserved_vectors(view: ModelView, prompts: list[str], count: EncodeCount, seed: int = 0) -> dict[str, Tensor]:
    """Every position of every preserved prompt, per input stream the closed form edits, as rows (float32, CPU); where
    they would take more than ``VECTOR_BYTES``, an even sample of each chunk's rows, so no more is ever held."""
    streams = tuple(view.closed_form_layers())
    found: dict[str, list[Tensor]] = {stream: [] for stream in streams}
    generator = torch.Generator().manual_seed(seed)
    keep = 1.0
    step = max(1, view.encode_step)
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        with torch.no_grad():
            cond = encode_counted(view, chunk, count)
        rows = {s: stream_vectors(cond, s).flatten(0, 1).float().cpu() for s in streams}
        if start == 0:  # every prompt has as many positions: the first chunk tells the whole set's size
            size = sum(r.numel() * 4 for r in rows.values()) * len(prompts) / len(chunk)
            keep = min(1.0, VECTOR_BYTES / size)
        for stream, vectors in rows.items():
            if keep < 1.0:
                vectors = vectors[torch.randperm(len(vectors), generator=generator)[:max(1, int(len(vectors) * keep))]]
            found[stream].append(vectors)
    return {stream: torch.cat(parts) for stream, parts in found.items()}


def vector_moments(vectors: dict[str, Tensor]) -> dict[str, tuple[Tensor, int]]:
    """``sum p p^T`` and the number of vectors, per stream (what ``embeddings.preserved_moments`` gives for prompts)."""
    return {stream: ((v.T @ v).double(), len(v)) for stream, v in vectors.items()}


SolveFn = Callable[[Tensor, int], tuple[Tensor, dict[str, float]]]


def focused_solve(vectors: Tensor, iterations: int, solve: SolveFn) -> tuple[Tensor, dict[str, float]]:
    """``solve(preserved_sum, count)`` repeated ``iterations`` more times with the rows of ``vectors`` reweighted
    toward the ones the previous map moved most; returns the last map and its stats, with the worst relative move
    of a preserved vector before and after the focus."""
    x = vectors.float()  # float32 products (a sum of many rows, far above the ridge's precision), float64 solves
    lengths = x.square().sum(1).clamp_min(1e-30)
    weights = torch.ones(len(x))
    worst: list[float] = []
    for iteration in range(iterations + 1):
        g, stats = solve(((x.T * weights) @ x).double(), len(x))
        moved = (x @ g.T.float()).square().sum(1) / lengths
        worst.append(float(moved.max().sqrt()))
        if iteration == iterations or float(moved.max()) == 0:
            break
        weights = weights * torch.exp(FOCUS_RATE * moved / moved.max())
        weights = weights * (len(weights) / weights.sum())
    stats.update({"focus_iterations": iterations, "preserved_worst_move_plain": round(worst[0], 6),
                  "preserved_worst_move": round(worst[-1], 6), "focus_max_weight": round(float(weights.max()), 3)})
    return g, stats

