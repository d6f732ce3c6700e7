"""Embedding pairs for the closed-form solve: each target prompt's tokens from the concept on, with their anchor twins.

A target prompt and its anchor twin share a prefix and usually a suffix ("a photo of a | grumpy cat | in the snow"
vs "a photo of a | cat | in the snow"). Positions in the prefix are the same in both and are left alone. From the
first differing token on, every position of the target prompt is paired with the anchor prompt's: the differing
middle proportionally (the anchor's EOS when the anchor has no middle, as in "..., in the style of X"), the common
suffix, the end token and the padding one to one. These are the tokens whose keys and values carry the target, in
SD the padding after the end token too (MACE's "the target and the words that follow it").

Only second moments are kept (``C^T C``, ``A^T C`` and the preserved set's ``P^T P``, each d x d), so thousands of
prompts cost no memory. Encoding the prompts is nearly all of a solve's time (the built-in preserved bank alone is
about 200 prompts), so the moments of each chunk of prompts are kept for the rest of the process (``MomentCache``):
a re-run with other settings, another target or another anchor encodes only the prompts it has not seen.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...models.view import ModelView
from ..progress import Canceller, Progress, ProgressFn

CHUNK = 32
CACHE_BYTES = 512 * 2**20
PROBE_TOKENS = 60


@dataclass
class Moments:
    """Sums over embedding pairs ``(c, a)``: ``cc = sum c c^T``, ``ac = sum a c^T``, ``aa = sum a a^T``, count."""

    cc: Tensor
    ac: Tensor
    aa: Tensor
    count: int = 0

    @classmethod
    def zeros(cls, dim: int) -> Moments:
        return cls(*(torch.zeros(dim, dim, dtype=torch.float64) for _ in range(3)))

    def plus(self, other: Moments) -> Moments:
        return Moments(self.cc + other.cc, self.ac + other.ac, self.aa + other.aa, self.count + other.count)

    def add(self, targets: Tensor, anchors: Tensor) -> None:
        c, a = targets.double().cpu(), anchors.double().cpu()
        self.cc += c.T @ c
        self.ac += a.T @ c
        self.aa += a.T @ a
        self.count += len(c)


class MomentCache:
    """Moments of chunks of prompts this process has encoded, for as long as the text encoder is unchanged.

    A chunk's entry is found by its prompts and a probe: the encoding of one short text made of every word of the
    chunk. Any change to the text encoder that would change the chunk's encodings (another model, a LoRA on the text
    encoder, an edited token embedding of one of its words) changes the probe, so a stale entry is never used; the
    probe costs one prompt per chunk of ``CHUNK``. Least recently used entries go beyond ``CACHE_BYTES``
    (half of it for each kind).
    """

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, tuple[Tensor, ...]] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, view: ModelView, kind: str, *prompt_lists: list[str]) -> tuple:
        words = list(dict.fromkeys(w for prompts in prompt_lists for p in prompts for w in p.split()))
        probes, current = [], []
        for word in words:
            if current and len(_ids(view, " ".join([*current, word]))) > PROBE_TOKENS:
                probes.append(" ".join(current))
                current = []
            current.append(word)
        probes.append(" ".join(current))
        digest = hashlib.sha256()
        with torch.no_grad():
            for probe in probes:
                digest.update(view.encode([probe]).context.float().cpu().contiguous().numpy().tobytes())
        return (kind, tuple(tuple(p) for p in prompt_lists), view.device.type, str(view.dtype), digest.hexdigest())

    def get_or_compute(self, key: tuple, compute: Callable[..., tuple[Tensor, ...]], *args: object
                       ) -> tuple[Tensor, ...]:
        """The entry for ``key``, ``compute(*args)`` kept when missing. Callers must not change the tensors."""
        value = self.get(key)
        if value is None:
            value = compute(*args)
            self.put(key, value)
        return value

    def get(self, key: tuple) -> tuple[Tensor, ...] | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: tuple[Tensor, ...]) -> None:
        """Keep ``value``; each kind ("pairs", "preserved") gets half the budget, so a mass erasure's many target
        chunks never push out the preserved bank every erasure reuses."""
        self.entries[key] = value
        kind = key[0]
        while self._bytes(kind) > self.max_bytes // 2:
            oldest = next(k for k in self.entries if k[0] == kind)
            if oldest == key:
                break
            del self.entries[oldest]

    def _bytes(self, kind: str) -> int:
        return sum(t.numel() * t.element_size() for k, value in self.entries.items() if k[0] == kind for t in value)

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0


MOMENT_CACHE = MomentCache()


def _ids(view: ModelView, prompt: str) -> list[int]:
    return view.token_ids(prompt)[0]


def aligned_positions(target_ids: list[int], anchor_ids: list[int], length: int) -> list[tuple[int, int]]:
    """(target position, anchor position) pairs in the encoded sequences (start token at 0, end token after the
    prompt, padding to ``length``), from the first token where the prompts differ to the end."""
    t_ids, a_ids = target_ids[: length - 2], anchor_ids[: length - 2]
    prefix = 0
    while prefix < min(len(t_ids), len(a_ids)) and t_ids[prefix] == a_ids[prefix]:
        prefix += 1
    if prefix == len(t_ids) == len(a_ids):
        return []
    # the common suffix leaves each prompt at least one token of its own middle when it has any ("grumpy cat" vs
    # "cat" pairs "cat" with "cat", not "grumpy" with the end token)
    room = min(len(t_ids) - prefix - (len(t_ids) > prefix), len(a_ids) - prefix - (len(a_ids) > prefix))
    suffix = 0
    while suffix < room and t_ids[len(t_ids) - 1 - suffix] == a_ids[len(a_ids) - 1 - suffix]:
        suffix += 1
    t_middle, a_middle = len(t_ids) - prefix - suffix, len(a_ids) - prefix - suffix
    t_end, a_end = len(t_ids) + 1, len(a_ids) + 1  # end-token positions (after the start token)
    pairs = []
    for k in range(t_middle):
        if a_middle == 0:
            pairs.append((1 + prefix + k, a_end))
        else:
            pairs.append((1 + prefix + k, 1 + prefix + round(k * (a_middle - 1) / max(t_middle - 1, 1))))
    for k in range(suffix):
        pairs.append((1 + prefix + t_middle + k, 1 + prefix + a_middle + k))
    for k in range(length - t_end):
        if a_end + k >= length:
            break
        pairs.append((t_end + k, a_end + k))
    return pairs


def pair_moments(view: ModelView, target_prompts: list[str], anchor_prompts: list[str], report: ProgressFn,
                 canceller: Canceller, done: int = 0, total: int = 0) -> Moments:
    """Moments of the aligned (target, anchor) embedding pairs of every prompt pair."""
    moments: Moments | None = None
    for start in range(0, len(target_prompts), CHUNK):
        canceller.check()
        targets, anchors = target_prompts[start:start + CHUNK], anchor_prompts[start:start + CHUNK]
        cc, ac, aa, count = MOMENT_CACHE.get_or_compute(MOMENT_CACHE.key(view, "pairs", targets, anchors),
                                                        _chunk_pair_moments, view, targets, anchors)
        chunk = Moments(cc, ac, aa, int(count))
        moments = (moments or Moments.zeros(cc.shape[0])).plus(chunk)  # never the cached tensors
        report(Progress("prompts", done + start + len(targets), total or len(target_prompts)))
    assert moments is not None
    return moments


def _chunk_pair_moments(view: ModelView, targets: list[str], anchors: list[str]) -> tuple[Tensor, ...]:
    with torch.no_grad():
        target_context = view.encode(targets).context
        anchor_context = view.encode(anchors).context
    length = target_context.shape[1]
    moments = Moments.zeros(target_context.shape[-1])
    for row, (target, anchor) in enumerate(zip(targets, anchors)):
        pairs = aligned_positions(_ids(view, target), _ids(view, anchor), length)
        if pairs:
            t_pos, a_pos = zip(*pairs)
            moments.add(target_context[row, list(t_pos)], anchor_context[row, list(a_pos)])
    return moments.cc, moments.ac, moments.aa, torch.tensor(moments.count)


def preserved_moments(view: ModelView, prompts: list[str], report: ProgressFn, canceller: Canceller,
                      done: int = 0, total: int = 0) -> tuple[Tensor, int]:
    """``sum p p^T`` over every position of the preserved prompts (padding included: its keys are read too)."""
    covariance: Tensor | None = None
    count = 0
    for start in range(0, len(prompts), CHUNK):
        canceller.check()
        chunk = prompts[start:start + CHUNK]
        chunk_covariance, chunk_count = MOMENT_CACHE.get_or_compute(MOMENT_CACHE.key(view, "preserved", chunk),
                                                                    _chunk_covariance, view, chunk)
        covariance = chunk_covariance.clone() if covariance is None else covariance + chunk_covariance
        count += int(chunk_count)
        report(Progress("prompts", done + start + len(chunk), total or len(prompts)))
    if covariance is None:
        raise ValueError("no preserved prompts")
    return covariance, count


def _chunk_covariance(view: ModelView, prompts: list[str]) -> tuple[Tensor, ...]:
    with torch.no_grad():
        context = view.encode(prompts).context
    vectors = context.double().cpu().reshape(-1, context.shape[-1])
    return vectors.T @ vectors, torch.tensor(len(vectors))
