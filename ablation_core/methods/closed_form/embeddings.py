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

from ...models.view import Conditioning, ModelView
from ..progress import EncodeCount, encode_counted

CHUNK = 32  # prompts of one moment-cache entry
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

    def key(self, view: ModelView, kind: str, *prompt_lists: list[str],
            encoded: Callable[[int], None] = lambda count: None) -> tuple:
        """The chunk's entry key; ``encoded(1)`` after each probe prompt encoded."""
        digest = hashlib.sha256()
        with torch.no_grad():
            for probe in probe_texts(view, *prompt_lists):
                found = view.encode([probe])
                encoded(1)
                for value in (found.context, *(found.extra[k] for k in sorted(found.extra))):
                    digest.update(value.float().cpu().contiguous().numpy().tobytes())
        streams = tuple(view.closed_form_layers())
        return (kind, tuple(tuple(p) for p in prompt_lists), streams, view.device.type, str(view.dtype),
                digest.hexdigest())

    def get_or_compute(self, key: tuple, compute: Callable[..., tuple[Tensor, ...]], *args: object
                       ) -> tuple[Tensor, ...]:
        """The entry for ``key``, ``compute(*args)`` kept when missing. Callers must not change the tensors."""
        value = self.get(key)
        if value is None:
            value = compute(*args)
            self.put(key, value)
        return value

    def holds(self, key: tuple) -> bool:
        """Whether ``key`` has an entry (no hit or miss is counted)."""
        return key in self.entries

    def holds_prompts(self, kind: str, *prompt_lists: list[str]) -> bool:
        """Whether some entry has these prompts, whatever text encoder made it (no probe is encoded)."""
        prompts = tuple(tuple(p) for p in prompt_lists)
        return any(k[0] == kind and k[1] == prompts for k in self.entries)

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


def probe_texts(view: ModelView, *prompt_lists: list[str]) -> list[str]:
    """The probe prompts of a chunk (tokenized here, not encoded): its words in order, cut at ``PROBE_TOKENS``."""
    words = list(dict.fromkeys(w for prompts in prompt_lists for p in prompts for w in p.split()))
    probes, current = [], []
    for word in words:
        if current and len(_ids(view, " ".join([*current, word]))) > PROBE_TOKENS:
            probes.append(" ".join(current))
            current = []
        current.append(word)
    probes.append(" ".join(current))
    return probes


def _chunks(prompts: list[str]) -> list[slice]:
    return [slice(start, start + CHUNK) for start in range(0, len(prompts), CHUNK)]


def encode_units(view: ModelView, target_prompts: list[str], anchor_prompts: list[str],
                 preserved_prompts: list[str]) -> int:
    """Prompts a solve encodes when nothing is kept: every chunk's probes, each pair's two prompts, each preserved
    prompt (tokenized only). The "prompts" phase counts in these units."""
    count = sum(len(probe_texts(view, target_prompts[c], anchor_prompts[c])) + 2 * len(target_prompts[c])
                for c in _chunks(target_prompts))
    return count + sum(len(probe_texts(view, preserved_prompts[c])) + len(preserved_prompts[c])
                       for c in _chunks(preserved_prompts))


def prompts_to_encode(view: ModelView, target_prompts: list[str], anchor_prompts: list[str],
                      preserved_prompts: list[str]) -> int:
    """About how many prompts a solve of these prompts will encode (for progress plans; a repeated run encodes little
    more than its probes): every probe, and each prompt of a chunk ``MOMENT_CACHE`` does not hold, chunked as
    ``pair_moments`` and ``preserved_moments`` chunk them. The target chunks and the first preserved chunk are keyed
    in full (their probes are encoded here); the other preserved chunks count as held when the first one is and some
    entry has their prompts."""
    count = 0
    for c in _chunks(target_prompts):
        targets, anchors = target_prompts[c], anchor_prompts[c]
        count += len(probe_texts(view, targets, anchors))
        count += 0 if MOMENT_CACHE.holds(MOMENT_CACHE.key(view, "pairs", targets, anchors)) else 2 * len(targets)
    chunks = [preserved_prompts[c] for c in _chunks(preserved_prompts)]
    count += sum(len(probe_texts(view, chunk)) for chunk in chunks)
    if chunks and MOMENT_CACHE.holds(MOMENT_CACHE.key(view, "preserved", chunks[0])):
        return count + sum(0 if MOMENT_CACHE.holds_prompts("preserved", c) else len(c) for c in chunks[1:])
    return count + sum(len(c) for c in chunks)


def _ids(view: ModelView, prompt: str) -> list[int]:
    return view.token_ids(prompt)[0]


def aligned_positions(target_ids: list[int], anchor_ids: list[int], length: int, start: int = 1,
                      causal: bool = True) -> list[tuple[int, int]]:
    """(target position, anchor position) pairs in the encoded sequences (``start`` start tokens, the tokens, an end
    token, padding to ``length``), from the first token where the prompts differ to the end. A bidirectional encoder
    (T5: ``causal`` False) carries the target in every position, so the common prefix is paired too."""
    t_ids, a_ids = target_ids[: length - 1 - start], anchor_ids[: length - 1 - start]
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
    t_end, a_end = len(t_ids) + start, len(a_ids) + start  # end-token positions
    pairs = [] if causal else [(start + k, start + k) for k in range(prefix)]
    for k in range(t_middle):
        if a_middle == 0:
            pairs.append((start + prefix + k, a_end))
        else:
            pairs.append((start + prefix + k, start + prefix + round(k * (a_middle - 1) / max(t_middle - 1, 1))))
    for k in range(suffix):
        pairs.append((start + prefix + t_middle + k, start + prefix + a_middle + k))
    for k in range(length - t_end):
        if a_end + k >= length:
            break
        pairs.append((t_end + k, a_end + k))
    return pairs


def stream_vectors(cond: Conditioning, stream: str) -> Tensor:
    """The vectors a stream's layers read, [batch, positions, dim]: the token sequence, or a pooled vector."""
    return cond.context if stream == "context" else cond.extra[stream][:, None, :]


def pair_moments(view: ModelView, target_prompts: list[str], anchor_prompts: list[str],
                 count: EncodeCount) -> dict[str, Moments]:
    """Moments of the aligned (target, anchor) embedding pairs of every prompt pair, for each input stream the
    closed form edits (``view.closed_form_layers()``: SD's context; Flux's T5 context and pooled CLIP vector);
    every prompt encoded (probes too) is added to ``count``."""
    streams = tuple(view.closed_form_layers())
    moments: dict[str, Moments] = {}
    for c in _chunks(target_prompts):
        count.canceller.check()
        targets, anchors = target_prompts[c], anchor_prompts[c]
        key = MOMENT_CACHE.key(view, "pairs", targets, anchors, encoded=count.add)
        before = count.done
        found = MOMENT_CACHE.get_or_compute(key, _chunk_pair_moments, view, targets, anchors, streams, count)
        count.add(before + 2 * len(targets) - count.done)  # a kept chunk: its prompts at once
        for index, stream in enumerate(streams):
            cc, ac, aa, pairs = found[4 * index: 4 * index + 4]
            chunk = Moments(cc, ac, aa, int(pairs))
            moments[stream] = (moments.get(stream) or Moments.zeros(cc.shape[0])).plus(chunk)  # never the cached
    return moments


def add_pairs(moments: Moments, stream: str, view: ModelView, target: Conditioning, anchor: Conditioning,
              target_ids: list[list[int]], anchor_ids: list[list[int]]) -> None:
    """Add each row's aligned (target, anchor) vectors of ``stream`` to ``moments`` (pooled vectors: row to row)."""
    target_vectors, anchor_vectors = stream_vectors(target, stream), stream_vectors(anchor, stream)
    if stream != "context":
        moments.add(target_vectors[:, 0], anchor_vectors[:, 0])
        return
    length = target_vectors.shape[1]
    for row, (t_ids, a_ids) in enumerate(zip(target_ids, anchor_ids)):
        pairs = aligned_positions(t_ids, a_ids, length, view.context_start_tokens, view.context_causal)
        if pairs:
            t_pos, a_pos = zip(*pairs)
            moments.add(target_vectors[row, list(t_pos)], anchor_vectors[row, list(a_pos)])


def _chunk_pair_moments(view: ModelView, targets: list[str], anchors: list[str], streams: tuple[str, ...],
                        count: EncodeCount) -> tuple[Tensor, ...]:
    with torch.no_grad():
        target_cond, anchor_cond = encode_counted(view, targets, count), encode_counted(view, anchors, count)
    target_ids, anchor_ids = [_ids(view, t) for t in targets], [_ids(view, a) for a in anchors]
    values: list[Tensor] = []
    for stream in streams:
        moments = Moments.zeros(stream_vectors(target_cond, stream).shape[-1])
        add_pairs(moments, stream, view, target_cond, anchor_cond, target_ids, anchor_ids)
        values += [moments.cc, moments.ac, moments.aa, torch.tensor(moments.count)]
    return tuple(values)


def preserved_moments(view: ModelView, prompts: list[str], count: EncodeCount) -> dict[str, tuple[Tensor, int]]:
    """``sum p p^T`` over every position of the preserved prompts (padding included: its keys are read too), per
    input stream, with the number of vectors; every prompt encoded (probes too) is added to ``count``."""
    streams = tuple(view.closed_form_layers())
    found: dict[str, tuple[Tensor, int]] = {}
    for c in _chunks(prompts):
        count.canceller.check()
        chunk = prompts[c]
        key = MOMENT_CACHE.key(view, "preserved", chunk, encoded=count.add)
        before = count.done
        values = MOMENT_CACHE.get_or_compute(key, _chunk_covariance, view, chunk, streams, count)
        count.add(before + len(chunk) - count.done)
        for index, stream in enumerate(streams):
            covariance, vectors = values[2 * index], int(values[2 * index + 1])
            if stream in found:
                covariance, vectors = found[stream][0] + covariance, found[stream][1] + vectors
            else:
                covariance = covariance.clone()
            found[stream] = (covariance, vectors)
    if not found:
        raise ValueError("no preserved prompts")
    return found


def _chunk_covariance(view: ModelView, prompts: list[str], streams: tuple[str, ...],
                      count: EncodeCount) -> tuple[Tensor, ...]:
    with torch.no_grad():
        cond = encode_counted(view, prompts, count)
    values: list[Tensor] = []
    for stream in streams:
        vectors = stream_vectors(cond, stream)
        vectors = vectors.double().cpu().reshape(-1, vectors.shape[-1])
        values += [vectors.T @ vectors, torch.tensor(len(vectors))]
    return tuple(values)
