"""Recipes by concept type: the settings the paper and its peers use for each kind of thing people erase.

- object / instance ("Grumpy Cat" -> "cat"): cross-attention K/V, the preset's loss; the anchor's own prompts are
  kept (regularization, the paper's prior preservation) when the target contains the anchor word;
- style ("Van Gogh" -> "painting"): K/V, style prompts ("..., in the style of X");
- memorized image: the target is a whole prompt; every UNet weight trains (the paper's best for memorization); the
  anchor prompts are variations of that prompt (the user's list, or variations made by dropping words and adding
  the anchor), and anchor images that still look like the target's own samples are dropped before training;
- inappropriate content ("nudity", "violence"): all attention projections, a neutral anchor such as "a person,
  fully clothed", and the target words as the negative prompt while anchor images are drawn (the recipe of the
  ESD, UCE and MACE papers). There is no detector here, so this recipe is not measured.
"""

from __future__ import annotations

import random
import re

import torch
from torch import Tensor

CONCEPT_TYPES = ("object", "instance", "style", "memorized", "inappropriate")
CONCEPT_TYPE_HELP = {
    "object": "an object class, e.g. 'R2D2' -> 'robot' (K/V)",
    "instance": "one instance of a class, e.g. 'Grumpy Cat' -> 'cat' (K/V; keeps the class when the names overlap)",
    "style": "an artist's style, e.g. 'Van Gogh' -> 'painting' (K/V, '..., in the style of X')",
    "memorized": "a memorized training image: the target is its whole prompt (all UNet weights; near-copies are "
                 "dropped from the anchor images)",
    "inappropriate": "e.g. 'nudity' -> 'a person, fully clothed' (all attention; the target is the negative prompt "
                     "of anchor sampling; not measurable here)",
}
# Objects, instances and styles take the preset's loss (the default's noise-based one on unguided anchors);
# memorized images and inappropriate content keep the model-based loss of the papers they follow.
RECIPES: dict[str, dict[str, object]] = {
    "object": {"kind": "object", "group": "kv"},
    "instance": {"kind": "object", "group": "kv"},
    "style": {"kind": "style", "group": "kv"},
    "memorized": {"kind": "memorization", "group": "full", "objective": "model"},
    "inappropriate": {"kind": "object", "group": "attn", "objective": "model"},
}
MEMORIZED_VARIATIONS = 24
NEAR_COPY_SIMILARITY = 0.9  # cosine similarity of centred latents above which an anchor image is a near-copy


def overlapping(target: str, anchor: str) -> bool:
    """True when every word of the anchor appears in the target ("grumpy cat" contains "cat")."""
    words = set(re.findall(r"\w+", target.lower()))
    return bool(words) and all(word in words for word in re.findall(r"\w+", anchor.lower()))


AUTO = "auto"
STYLE_ANCHORS = frozenset(("painting", "paintings", "art", "artwork", "artworks", "style", "drawing", "illustration",
                           "sketch", "artist", "painter", "photograph", "photography", "print", "poster", "comic",
                           "anime", "watercolor", "oil painting", "digital art", "an artwork", "a painting"))
INAPPROPRIATE_TARGETS = frozenset(("nudity", "nude", "naked", "nsfw", "violence", "gore", "blood", "sexual",
                                   "porn", "explicit"))


def guess_concept_type(target: str, anchor: str) -> str:
    """``auto``'s choice from the words: an art anchor ("Van Gogh" -> "painting") is a style; a target that contains
    its anchor ("Grumpy Cat" -> "cat") an instance; nudity, violence and their like inappropriate; else an object."""
    target_words, anchor_text = set(re.findall(r"\w+", target.lower())), " ".join(anchor.lower().split())
    if target_words & INAPPROPRIATE_TARGETS:
        return "inappropriate"
    if anchor_text in STYLE_ANCHORS or anchor_text.split()[-1:] in (["painting"], ["style"], ["art"]) \
            or "style" in target_words:
        return "style"
    return "instance" if overlapping(target, anchor) else "object"


def recipe_values(concept_type: str, pairs: list[tuple[str, str]]) -> dict[str, object]:
    """The settings ``concept_type`` gives for these (target, anchor) pairs."""
    values = dict(RECIPES[concept_type])
    if concept_type in ("object", "instance"):
        values["regularization"] = any(overlapping(t, a) for t, a in pairs)
    if concept_type == "inappropriate":
        values["negative_prompt"] = ", ".join(t for t, _ in pairs)
    return values


def memorized_variations(prompt: str, anchor: str, count: int = MEMORIZED_VARIATIONS, seed: int = 0) -> list[str]:
    """Prompts near the memorized one that should not reproduce it: the anchor itself, the prompt with a word or two
    dropped, and the anchor with words of the prompt (offline stand-ins for the paper's paraphrases)."""
    rng = random.Random(seed)
    words = prompt.split()
    found = [anchor]
    for _ in range(count * 10):
        if len(found) >= count or len(words) < 2:
            break
        kept = [w for w in words if rng.random() > 0.35] or [rng.choice(words)]
        choice = rng.random()
        if choice < 0.5:
            text = " ".join(kept)
        else:
            text = f"{anchor}, {' '.join(kept)}"
        if text.lower() != prompt.lower() and text not in found:
            found.append(text)
    return found


def drop_near_copies(anchor_latents: Tensor, target_latents: Tensor,
                     threshold: float = NEAR_COPY_SIMILARITY) -> Tensor:
    """Indices of the anchor images that are not near-copies of any target sample (cosine similarity of centred,
    flattened latents at most ``threshold``), as the paper drops anchor images SSCD finds too close."""
    def unit(latents: Tensor) -> Tensor:
        flat = latents.flatten(1).float()
        flat = flat - flat.mean(dim=1, keepdim=True)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-8)

    similarity = unit(anchor_latents) @ unit(target_latents).T
    return torch.nonzero(similarity.max(dim=1).values <= threshold).flatten()
