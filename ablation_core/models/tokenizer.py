"""The Stable Diffusion CLIP tokenizer, built offline from the BPE vocabulary shipped in this package.

Single-file checkpoints carry no tokenizer, and no hub can be reached, so the vocabulary of the real SD
tokenizers (``bpe_simple_vocab_16e6.txt.gz`` from open_clip, MIT licence) ships with the package. The vocabulary
and merges built from it are exactly those of ``openai/clip-vit-large-patch14``, so token ids match real SD. They are
built in memory once per process (the tokenizer reads them from a temporary folder that is removed at once): no
cache outside the package can go stale or hide a missing file.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

from ..resources import BPE_VOCAB

VOCAB_SIZE = 49408
MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(BPE_VOCAB).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    symbols += [s + "</w>" for s in symbols]
    symbols += ["".join(m.split()) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(symbols)}, merges


@functools.lru_cache(maxsize=4)
def sd_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The SD tokenizer. SD1 (CLIP-L) pads with ``<|endoftext|>``; SD2 and SDXL's OpenCLIP encoder pad with ``!``."""
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="ablation_tokenizer_") as folder:
        vocab_path, merges_path = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab_path.write_text(json.dumps(vocab), encoding="utf-8")
        merges_path.write_text("#version: 0.2\n" + "\n".join(merges), encoding="utf-8")
        return CLIPTokenizer(str(vocab_path), str(merges_path), pad_token=pad_token, model_max_length=MAX_LENGTH)
