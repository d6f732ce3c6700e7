"""Prompt sets of a CLIP evaluation on a real model: target, anchor, and the neighbours that should not change.

The anchor prompts come from the same template bank as an ablation's (``methods.prompts``), drawn with another seed
(``EVAL_SEED_OFFSET`` past the run's), and every other set is their twin: the same words with the target or a
neighbour in the anchor's place (objects), or ", in the style of X" added (styles). So an image of a target prompt
can be classified against its own anchor twin, and a neighbour differs from the target only in the name.

Neighbours: the user's list, else a built-in one per kind: other artists for a style, other members of the anchor's
class for an object or instance (other cats for "Grumpy Cat" -> "cat"), everyday concepts where no class list is
known. A memorized image's neighbours are whole prompts and have no built-in list.
"""

from __future__ import annotations

from ...errors import PromptError
from ...methods.prompts import Kind, choose_anchor_prompts, target_prompts
from ..toy_eval import EVAL_SEED_OFFSET, PromptSet

ARTISTS = ("Claude Monet", "Pablo Picasso", "Rembrandt", "Salvador Dali", "Johannes Vermeer", "Katsushika Hokusai",
           "Vincent van Gogh", "Edvard Munch")
PEOPLE = ("Albert Einstein", "Marilyn Monroe", "Abraham Lincoln", "Frida Kahlo", "Barack Obama")
CLASS_MEMBERS: dict[str, tuple[str, ...]] = {
    "cat": ("tabby cat", "siamese cat", "black cat", "persian cat", "Garfield"),
    "dog": ("golden retriever", "corgi", "poodle", "husky", "Snoopy"),
    "person": PEOPLE, "man": PEOPLE, "woman": PEOPLE, "celebrity": PEOPLE,
    "bird": ("parrot", "owl", "eagle", "sparrow"),
    "car": ("sports car", "pickup truck", "taxi", "vintage car"),
    "flower": ("rose", "tulip", "sunflower", "daisy"),
    "horse": ("pony", "zebra", "donkey", "racehorse"),
    "building": ("Eiffel Tower", "Empire State Building", "Taj Mahal", "Big Ben"),
    "tower": ("Eiffel Tower", "Leaning Tower of Pisa", "Tokyo Tower", "Big Ben"),
    "cartoon character": ("Mickey Mouse", "Snoopy", "Pikachu", "SpongeBob"),
}
EVERYDAY = ("dog", "car", "house", "tree", "bird")
NEIGHBOURS_PER_CONCEPT = 4


def builtin_neighbours(target: str, anchor: str, kind: Kind) -> tuple[list[str], str]:
    """(neighbours, where they come from) for a concept; at most ``NEIGHBOURS_PER_CONCEPT``."""
    if kind == "memorization":
        return [], "none built in for a memorized prompt: pass --neighbours with other whole prompts"
    if kind == "style":
        found, source = ARTISTS, "other artists (built in)"
    elif anchor.lower().strip() in CLASS_MEMBERS:
        found, source = CLASS_MEMBERS[anchor.lower().strip()], f"other members of '{anchor}' (built in)"
    else:
        found, source = EVERYDAY, f"everyday concepts (built in; no class list for '{anchor}': pass --neighbours)"
    taken = {target.lower().strip(), anchor.lower().strip()}
    chosen = [n for n in found if n.lower() not in taken and not (kind == "style" and _same_artist(n, target))]
    return chosen[:NEIGHBOURS_PER_CONCEPT], source


def _same_artist(name: str, target: str) -> bool:
    """'Vincent van Gogh' is the target 'Van Gogh' under another spelling."""
    return target.lower().strip() in name.lower() or name.lower() in target.lower().strip()


def clip_prompt_sets(target: str, anchor: str, kind: Kind, per_set: int, seed: int = 0,
                     neighbours: list[str] | None = None) -> tuple[list[PromptSet], list[str], str]:
    """(sets, anchor twins of the target prompts, where the neighbours come from): target, anchor, then one
    "surrounding: X" set per neighbour, ``per_set`` prompts each (fewer for a memorized prompt's own sets)."""
    if neighbours:
        chosen, source = [n.strip() for n in neighbours if n.strip()], "given with --neighbours"
        if not chosen:
            raise PromptError("--neighbours holds only empty names")
    else:
        chosen, source = builtin_neighbours(target, anchor, kind)
    anchors = choose_anchor_prompts(anchor, kind, per_set, seed + EVAL_SEED_OFFSET)
    anchors = [anchors[i % len(anchors)] for i in range(per_set)]
    sets = [PromptSet("target", target, target_prompts(anchors, anchor, target, kind)),
            PromptSet("anchor", anchor, anchors)]
    sets += [PromptSet(f"surrounding: {name}", name, target_prompts(anchors, anchor, name, kind)) for name in chosen]
    return sets, anchors, source


def caption_halves(target: str, anchor: str, kind: Kind, per_half: int,
                   seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """Two disjoint halves of the template bank for attacks, ``"train"`` (learnt from) and ``"eval"`` (measured on):
    per half, ``per_half`` target prompts and their anchor twins, as ``clip_prompt_sets`` phrases them. A bank too
    small to split (a memorized prompt's) gives both halves the same prompts."""
    chosen = choose_anchor_prompts(anchor, kind, 2 * per_half, seed)
    middle = len(chosen) // 2
    halves = {"train": chosen[:middle], "eval": chosen[middle:]} if middle else {"train": chosen, "eval": chosen}
    return {split: (target_prompts(anchors, anchor, target, kind), anchors) for split, anchors in halves.items()}
