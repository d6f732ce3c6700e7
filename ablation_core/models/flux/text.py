"""Flux's two text encoders: a T5 sequence encoder (the context ``txt_in`` reads) and CLIP's pooled vector
(what ``vector_in`` reads).

Flux tokenizes for T5 without a start token (``tokens, </s>, <pad> ...`` to a fixed length) and reads every position,
padding included (no attention mask), and for CLIP as SD does, keeping only the pooled output. Any Hugging Face
tokenizer serves for either, so the real encoders (``T5EncoderModel`` + ``T5TokenizerFast``, ``CLIPTextModel`` +
``CLIPTokenizer``) and the toy-flux world's small ones (both on the SD vocabulary) share this code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..tokenizer import MAX_LENGTH


@dataclass
class FluxText:
    """The encodings of a batch of prompts: the T5 sequence [B, L, D] and the pooled CLIP vector [B, P]."""

    context: Tensor
    pooled: Tensor


class FluxTextEncoders(nn.Module):
    """T5 + CLIP as Flux reads them. ``sequence_length``: Flux.1 schnell 256, dev 512; the toy 32."""

    def __init__(self, t5: nn.Module, t5_tokenizer, clip: nn.Module, clip_tokenizer, sequence_length: int):
        super().__init__()
        self.t5, self.clip = t5, clip
        self.t5_tokenizer, self.clip_tokenizer = t5_tokenizer, clip_tokenizer
        self.sequence_length = int(sequence_length)
        self.t5_eos = int(t5_tokenizer.eos_token_id)
        self.t5_pad = int(t5_tokenizer.pad_token_id if t5_tokenizer.pad_token_id is not None else 0)

    @property
    def device(self) -> torch.device:
        return next(self.t5.parameters()).device

    def words(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` without special tokens, for T5 and for CLIP."""
        t5 = self.t5_tokenizer(text, add_special_tokens=False).input_ids
        clip = self.clip_tokenizer(text, add_special_tokens=False).input_ids
        return list(t5), list(clip)

    def t5_ids(self, prompts: list[str]) -> Tensor:
        """``tokens, </s>, <pad> ...`` for each prompt, cut to ``sequence_length`` (the end token kept)."""
        rows = []
        for prompt in prompts:
            ids = list(self.t5_tokenizer(prompt, add_special_tokens=False).input_ids)[: self.sequence_length - 1]
            ids.append(self.t5_eos)
            rows.append(ids + [self.t5_pad] * (self.sequence_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def clip_ids(self, prompts: list[str]) -> Tensor:
        out = self.clip_tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                                  return_tensors="pt")
        return out.input_ids.to(self.device)

    def encode_ids(self, t5_ids: Tensor, clip_ids: Tensor) -> FluxText:
        context = self.t5(input_ids=t5_ids).last_hidden_state
        pooled = self.clip(input_ids=clip_ids).pooler_output
        return FluxText(context, pooled)

    def forward(self, prompts: list[str]) -> FluxText:
        return self.encode_ids(self.t5_ids(prompts), self.clip_ids(prompts))
