"""Anchor and target prompts: a built-in template bank (no network), user lists, and misspelled targets.

Target prompts are the anchor prompts with the anchor swapped for the target (objects and instances), or with
", in the style of <target>" added (styles), so each target prompt has an anchor twin that differs only in the
concept: the model-based loss moves the target's prediction onto exactly that twin.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Literal

from ..errors import AblationError, PromptError

Kind = Literal["object", "style", "memorization"]
KINDS = ("object", "style", "memorization")

OBJECT_TEMPLATES = [
    "a photo of a {}", "a close-up photo of a {}", "a blurry photo of a {}", "a bright photo of a {}",
    "a dark photo of a {}", "a photo of the {}", "a good photo of a {}", "a photo of a small {}",
    "a photo of a large {}", "a cropped photo of a {}", "a rendering of a {}", "a drawing of a {}",
    "a painting of a {}", "a sketch of a {}", "a picture of a {}", "an image of a {}", "a snapshot of a {}",
    "a portrait of a {}", "a watercolor of a {}", "a cartoon of a {}", "a digital illustration of a {}",
    "a {}", "a cute {}", "the {}",
]
SETTINGS = [
    "", " in a garden", " on a table", " at night", " in the snow", " on the beach", " in a city street",
    " in a forest", " indoors", " under a blue sky", " next to a window", " on the grass", " in soft light",
    " at sunset", " in the rain",
]
STYLE_SUBJECTS = [
    "a mountain landscape", "a river at dusk", "a city street", "a bowl of fruit", "a sailing boat", "a farmhouse",
    "a starry night sky", "a field of flowers", "a portrait of a woman", "a portrait of an old man", "a cafe terrace",
    "a bridge over a canal", "a forest path", "a vase of sunflowers", "a lighthouse by the sea", "a village church",
    "a wheat field", "a harbour with boats", "a busy market", "a snowy valley", "a garden with a fountain",
    "a cat sleeping on a chair", "a horse in a meadow", "a quiet lake", "a cottage in the woods", "an old castle",
]
STYLE_TEMPLATES = [
    "a {anchor} of {subject}", "{subject}, {anchor}", "a beautiful {anchor} of {subject}",
    "a detailed {anchor} of {subject}", "an old {anchor} of {subject}", "a famous {anchor} of {subject}",
    "a colorful {anchor} of {subject}", "a small {anchor} of {subject}", "a large {anchor} of {subject}",
    "a museum {anchor} of {subject}",
]


def check_kinds(kind: object, pair_kinds: tuple | None, targets: int) -> None:
    """The run's kind and the per-target kinds (when given) are known kinds, one per target."""
    for found in [kind, *(pair_kinds or ())]:
        if found not in KINDS:
            raise AblationError(f"unknown concept kind {found!r}; choose one of {', '.join(KINDS)}")
    if pair_kinds and len(pair_kinds) != targets:
        raise AblationError(f"{len(pair_kinds)} kinds for {targets} targets: give one per target")


def check_pair(target: str, anchor: str) -> tuple[str, str]:
    target, anchor = target.strip(), anchor.strip()
    if not target:
        raise PromptError("the target is empty: say which concept to remove, e.g. 'Grumpy Cat' or 'Van Gogh'")
    if not anchor:
        raise PromptError("the anchor is empty: say what the target should turn into, e.g. 'cat' or 'painting'")
    if target.lower() == anchor.lower():
        raise PromptError(f"target and anchor are both '{target}': the anchor must be a different, more general "
                          "concept (e.g. target 'Grumpy Cat', anchor 'cat')")
    return target, anchor


def anchor_prompt_bank(anchor: str, kind: Kind = "object") -> list[str]:
    """Every distinct prompt the templates make for ``anchor`` (hundreds; no network)."""
    if kind == "style":
        return [t.format(anchor=anchor, subject=s) for s in STYLE_SUBJECTS for t in STYLE_TEMPLATES]
    if kind == "memorization":
        return [anchor]
    return list(dict.fromkeys(t.format(anchor) + s for t in OBJECT_TEMPLATES for s in SETTINGS))


def read_prompt_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise PromptError(f"anchor prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"anchor prompt file {path} is not UTF-8 text (one prompt per line)") from err
    except OSError as err:
        raise PromptError(f"anchor prompt file {path} cannot be read: {err.strerror or 'input/output error'}") from err
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"anchor prompt file {path} has no prompts (one prompt per line)")
    return prompts


def choose_anchor_prompts(anchor: str, kind: Kind, count: int, seed: int,
                          user_prompts: list[str] | None = None) -> list[str]:
    bank = user_prompts if user_prompts else anchor_prompt_bank(anchor, kind)
    if len(bank) <= count:
        return list(bank)
    return random.Random(seed).sample(bank, count)


def mentions(prompt: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, re.IGNORECASE) is not None


def without_targets(prompts: list[str], targets: list[str]) -> list[str]:
    """Anchor prompts that mention none of a run's targets. In a joint erasure an anchor prompt naming another target
    ("a painting of a cat in the style of van gogh" for monet -> painting, with van gogh erased too) would teach the
    model to keep that target; the prompts are left as they are when every one names a target."""
    kept = [p for p in prompts if not any(mentions(p, t) for t in targets)]
    return kept or list(prompts)


def prompts_for(anchor: str, listed: tuple[str, ...] | list[str], kind: Kind,
                others: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The prompts of a list that belong to ``anchor``: for objects, those that mention it (the target is swapped in
    for it); styles and memorized images take every prompt, except, in a joint run whose list holds the other pairs'
    prompts too, those that name another pair's anchor (``others``): "a photo of a dog" belongs to snoopy -> dog, not
    to van gogh -> painting (every prompt is kept when all of them name one)."""
    if kind != "object":
        own = [p for p in listed if not any(mentions(p, o) for o in others if o.lower() != anchor.lower())]
        return own or list(listed)
    chosen = [p for p in listed if mentions(p, anchor)]
    if not chosen:
        raise PromptError(f"none of the anchor prompts mention the anchor '{anchor}' (e.g. '{listed[0]}'); every "
                          "prompt must contain its anchor so the target can be swapped in")
    return chosen


def _swap(prompt: str, anchor: str, target: str) -> str | None:
    pattern = re.compile(rf"(?<!\w){re.escape(anchor)}(?!\w)", re.IGNORECASE)
    return pattern.sub(target, prompt) if pattern.search(prompt) else None


def target_prompts(anchor_prompts: list[str], anchor: str, target: str, kind: Kind) -> list[str]:
    """The target twin of each anchor prompt."""
    if kind == "style":
        return [f"{p}, in the style of {target}" for p in anchor_prompts]
    if kind == "memorization":
        return [target for _ in anchor_prompts]
    swapped = [_swap(p, anchor, target) for p in anchor_prompts]
    missing = [p for p, s in zip(anchor_prompts, swapped) if s is None]
    if missing:
        raise PromptError(f"{len(missing)} anchor prompt(s) do not mention the anchor '{anchor}' (e.g. "
                          f"'{missing[0]}'), so the target cannot be swapped in; every prompt must contain it")
    return [s for s in swapped if s is not None]


def misspellings(text: str, count: int, seed: int) -> list[str]:
    """Plausible typos of ``text`` (dropped, doubled and swapped letters); the K/V edit should cover them too."""
    rng = random.Random(seed)
    letters = [i for i, c in enumerate(text) if c.isalpha()]
    found: list[str] = []
    for _ in range(count * 20):
        if len(found) >= count or len(letters) < 3:
            break
        i = rng.choice(letters[1:-1] or letters)
        edit = rng.choice(("drop", "double", "swap"))
        if edit == "drop":
            typo = text[:i] + text[i + 1:]
        elif edit == "double":
            typo = text[:i] + text[i] + text[i:]
        else:
            typo = text[:i] + text[i + 1:i + 2] + text[i] + text[i + 2:] if i + 1 < len(text) else text
        if typo.lower() != text.lower() and typo not in found:
            found.append(typo)
    return found
