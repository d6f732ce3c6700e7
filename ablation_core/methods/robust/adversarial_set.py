"""What the adversary found, as something an erasure can erase: conditionings (trained), embedding pairs (closed form).

A robust round attacks the current patch the way the evaluation's attacks do (``adversary``), but on the erasure's
own prompts (the training half of the toy world's templates; never the evaluation's) and with its own seeds:
  - a soft prompt: one learned token embedding read at the placeholder word, trained on the unpatched model's images
    of the target against the patched model (Circumventing Concept Erasure);
  - a token sequence: the tokens a gradient-ranked search over the vocabulary put in the target's place (P4D's loss:
    make the patched model predict what the unpatched one did for the target prompt).
Each is spliced into every target twin of the anchor prompts, so row ``i`` of an adversarial block is the twin of
anchor prompt ``i``: the trained loop maps it onto the anchor's prediction, the closed form maps its embeddings onto
the anchor prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...models.view import Conditioning, ModelView
from .. import prompts as prompt_lib
from ..closed_form.embeddings import Moments, add_pairs, stream_vectors
from .adversary import span_of
from .token_hook import END_TOKEN, PLACEHOLDER, START_TOKEN, encode_ids, encode_with, prompt_ids


@dataclass
class Adversary:
    """One adversarial input per pair (target, anchor): a soft-prompt vector per text encoder, and/or searched
    tokens that replace the target's tokens (with ``extra`` more before them)."""

    target: str
    vectors: list[Tensor] | None = None
    tokens: list[int] | None = None
    notes: dict = field(default_factory=dict)


def pair_of_rows(twins: list[str], targets: list[str]) -> list[int]:
    """For each target twin, the index of the pair whose target it mentions (the longest one if several)."""
    order = sorted(range(len(targets)), key=lambda i: -len(targets[i]))
    found = []
    for twin in twins:
        match = next((i for i in order if prompt_lib.mentions(twin, targets[i]) or targets[i] in twin), None)
        found.append(order[0] if match is None else match)
    return found


def spliced_ids(view: ModelView, twin: str, target: str, tokens: list[int]) -> list[int]:
    """The id sequence of ``twin`` with the target's tokens replaced by ``tokens`` (77 ids, start and end kept)."""
    ids = prompt_ids(view, twin)
    span = span_of(view, twin, target)
    if not span:  # the twin does not spell the target as a whole: put the tokens before the end token
        end = ids.index(END_TOKEN)
        span = [end, end - 1]
    merged = ids[:span[0]] + list(tokens) + ids[span[-1] + 1:]
    merged = merged[:len(ids)]
    merged += [END_TOKEN] * (len(ids) - len(merged))
    merged[-1] = END_TOKEN
    return merged


def _tokens_of(ids: list[int]) -> list[int]:
    """The prompt's own tokens (no start, end or padding)."""
    body = ids[1:]
    return body[:body.index(END_TOKEN)] if END_TOKEN in body else body


def _soft_rows(view: ModelView, twins: list[str], target: str, vectors: list[Tensor]) -> tuple[Conditioning, list]:
    texts = [t.replace(target, PLACEHOLDER) if target in t else f"{t} {PLACEHOLDER}" for t in twins]
    with torch.no_grad():
        cond = encode_with(view, texts, vectors)
    return cond, [view.token_ids(t)[0] for t in texts]


def _token_rows(view: ModelView, twins: list[str], target: str, tokens: list[int]) -> tuple[Conditioning, list]:
    rows = [spliced_ids(view, t, target, tokens) for t in twins]
    with torch.no_grad():
        cond = encode_ids(view, torch.tensor(rows, device=view.device))
    return cond, [_tokens_of(r) for r in rows]


def adversarial_rows(view: ModelView, twins: list[str], targets: list[str], adversaries: list[Adversary],
                     ) -> list[tuple[Conditioning, list[list[int]]]]:
    """Blocks of conditionings, one row per twin (in order), one block per kind of adversarial input found; each
    with the token ids every row was encoded from (for aligning embeddings)."""
    owner = pair_of_rows(twins, targets)
    blocks = []
    for kind in ("vectors", "tokens"):
        if any(getattr(a, kind) is None for a in adversaries):
            continue
        parts, ids = [], []
        for index, adversary in enumerate(adversaries):
            rows = [i for i, o in enumerate(owner) if o == index]
            if not rows:
                continue
            chosen = [twins[i] for i in rows]
            make = _soft_rows if kind == "vectors" else _token_rows
            cond, found = make(view, chosen, adversary.target, getattr(adversary, kind))
            parts.append((rows, cond, found))
        order = [r for rows, _, _ in parts for r in rows]
        cond = Conditioning.cat([c for _, c, _ in parts])
        ids = [i for _, _, f in parts for i in f]
        back = torch.tensor(order).argsort()
        blocks.append((cond.select(back.to(cond.context.device)), [ids[i] for i in back.tolist()]))
    return blocks


def adversarial_moments(view: ModelView, twins: list[str], anchors: list[str], targets: list[str],
                        adversaries: list[Adversary]) -> dict[str, Moments]:
    """Embedding pairs (adversarial twin, anchor prompt) aligned as the closed form aligns its own prompts, per input
    stream the closed form edits."""
    moments: dict[str, Moments] = {}
    with torch.no_grad():
        anchor_cond = view.encode(anchors)
    anchor_ids = [view.token_ids(anchor)[0] for anchor in anchors]
    for cond, ids in adversarial_rows(view, twins, targets, adversaries):
        for stream in view.closed_form_layers():
            found = moments.setdefault(stream, Moments.zeros(stream_vectors(cond, stream).shape[-1]))
            add_pairs(found, stream, view, cond, anchor_cond, ids, anchor_ids)
    return moments


def describe(view: ModelView, adversary: Adversary) -> dict:
    """What a round found, for the patch's metadata."""
    from .adversary import decode_ids

    found = dict(adversary.notes)
    if adversary.tokens is not None:
        found["tokens"] = decode_ids(view, [START_TOKEN, *adversary.tokens, END_TOKEN])
    if adversary.vectors is not None:
        found["vector_norm"] = round(float(adversary.vectors[0].norm()), 4)
    return found
