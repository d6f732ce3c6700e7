"""Token embeddings under the attacker's control: a learned vector at a placeholder token, or whole id sequences.

Textual inversion and token search both need the text encoder to read something no prompt string says: a vector
that is no row of the vocabulary, or token ids chosen one by one (which a decode/encode round trip through BPE would
not keep). A forward hook on each text encoder's token-embedding module (``view.token_embedding_modules()``) rewrites
its output for the duration of a ``with`` block; the model's weights are never touched, and removing the hook gives
the model back exactly. The placeholder is a word the prompt can carry ("sks", one token in the CLIP vocabulary).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import AblationError
from ...models.view import Conditioning, ModelView

PLACEHOLDER = "sks"
START_TOKEN, END_TOKEN = 49406, 49407


def embedding_modules(view: ModelView) -> list[nn.Module]:
    """Each text encoder's token-embedding module (one for SD1/SD2, two for SDXL)."""
    modules = view.token_embedding_modules()
    if not modules:
        raise AblationError("this model view exposes no token embedding, so adversarial embeddings cannot be injected")
    return modules


def embedding_tables(view: ModelView) -> list[Tensor]:
    """The vocabulary's embedding rows of each text encoder (read only)."""
    return [module.weight.detach() for module in embedding_modules(view)]


def placeholder_id(view: ModelView, word: str = PLACEHOLDER) -> list[int]:
    """The placeholder's token id in each text encoder's vocabulary (it must be one token)."""
    ids = view.token_ids(word)
    if any(len(found) != 1 for found in ids):
        raise AblationError(f"the placeholder '{word}' is not a single token for this model")
    return [found[0] for found in ids]


def initial_vector(view: ModelView, words: str) -> list[Tensor]:
    """The mean embedding of ``words``' tokens in each text encoder: where an inversion starts."""
    return [table[torch.tensor(ids, device=table.device)].float().mean(0).clone()
            for table, ids in zip(embedding_tables(view), view.token_ids(words))]


@contextlib.contextmanager
def injected(view: ModelView, vectors: list[Tensor] | None = None, ids: Tensor | None = None,
             one_hot: Tensor | None = None, positions: list[int] | None = None) -> Iterator[None]:
    """Inside the block, encoding reads ``vectors[i]`` wherever encoder ``i`` sees the placeholder token.

    ``ids`` ([batch, length], CLIP's layout) replaces the token ids every encoder reads, each in its own layout
    (``view.encoder_ids``; encode as many empty prompts as it has rows); ``one_hot`` ([batch, len(positions),
    vocabulary], may require grad) then replaces the rows at ``positions`` by ``one_hot @ table``, so a token search
    can take the gradient of a loss with respect to each choice of token."""
    modules = embedding_modules(view)
    marks = placeholder_id(view) if vectors is not None else [None] * len(modules)
    encoder_ids = view.encoder_ids(ids) if ids is not None else None
    encoder_positions = view.encoder_positions(positions) if positions is not None else None
    consumed = [0] * len(modules)  # rows of ``ids`` each encoder has read so far
    tables: dict[int, Tensor] = {}

    def table_of(index: int, module: nn.Module) -> Tensor:
        if index not in tables:
            table = module.weight
            # ComfyUI's weights are inference tensors; autograd cannot save them for the one-hot's backward pass
            tables[index] = table.clone() if table.is_inference() else table
        return tables[index]

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            input_ids = args[0]
            if encoder_ids is not None:
                # the next rows: one call may carry every row (diffusers) or one row each (ComfyUI embeds row by row)
                own = encoder_ids[index]
                count = input_ids.shape[0]
                rows = torch.arange(consumed[index], consumed[index] + count) % own.shape[0]
                consumed[index] += count
                input_ids = own[rows].to(input_ids.device)
                table = table_of(index, module)
                output = F.embedding(input_ids, table).to(output.dtype)
                if one_hot is not None and encoder_positions is not None:
                    read = [(i, p) for i, p in enumerate(encoder_positions[index]) if p is not None]
                    chosen = one_hot[:, [i for i, _ in read]].to(table.dtype) @ table
                    chosen = chosen[rows.to(chosen.device)] if chosen.shape[0] > 1 else chosen
                    output = output.clone()
                    output[:, [p for _, p in read]] = chosen.to(output.dtype).expand(output.shape[0], -1, -1)
            if vectors is not None:
                mask = (input_ids == marks[index]).unsqueeze(-1)
                output = torch.where(mask, vectors[index].to(output.dtype), output)
            return output
        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        with view.uncached_text():
            yield
    finally:
        for handle in handles:
            handle.remove()


def encode_with(view: ModelView, prompts: list[str], vectors: list[Tensor]) -> Conditioning:
    """``prompts`` encoded with the placeholder read as ``vectors`` (gradients flow to them if enabled)."""
    with injected(view, vectors):
        return view.encode(prompts)


def encode_ids(view: ModelView, ids: Tensor, one_hot: Tensor | None = None,
               positions: list[int] | None = None) -> Conditioning:
    """Token id sequences ([batch, length], start and end tokens included) encoded as they are."""
    with injected(view, ids=ids, one_hot=one_hot, positions=positions):
        return view.encode([_same_length_prompt(row) for row in ids.tolist()])


def _same_length_prompt(row: list[int]) -> str:
    """A prompt of as many one-token words as ``row`` has between its start and end tokens. The hook rewrites every
    embedding, but an encoder also reads its own ids outside the embedding (CLIP's pooled output is taken at the end
    token), so the prompt encoded must put the end token where ``row`` does."""
    body = row[1:]
    length = body.index(END_TOKEN) if END_TOKEN in body else len(body)
    return " ".join([PLACEHOLDER] * length)


def prompt_ids(view: ModelView, prompt: str, length: int = 77) -> list[int]:
    """The full id sequence the first text encoder reads for ``prompt``: start, tokens, end, end-token padding."""
    tokens = view.token_ids(prompt)[0][: length - 2]
    return [START_TOKEN, *tokens, END_TOKEN] + [END_TOKEN] * (length - len(tokens) - 2)
