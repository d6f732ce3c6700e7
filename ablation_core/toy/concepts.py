"""The toy world's concepts: one place for names, kinds, colours, anchors and neighbours.

The set mirrors the kinds of concept the Ablating Concepts paper erases: object classes, instances of a class that
differ by a distinctive look (and share a word with it, like "grumpy cat" and "cat"), and artist styles that differ
from a plain painting. The generator, the classifier heads and the evaluation all index these tuples, so their order
is part of the shipped weights' format.
"""

from __future__ import annotations

from dataclasses import dataclass

Colour = tuple[float, float, float]

OBJECTS: tuple[str, ...] = ("cat", "dog", "fish", "bird", "car", "house", "tree")
INSTANCES: tuple[str, ...] = ("grumpy cat", "snoopy", "nemo")
INSTANCE_CLASS: dict[str, str] = {"grumpy cat": "cat", "snoopy": "dog", "nemo": "fish"}
ARTISTS: tuple[str, ...] = ("van gogh", "monet", "picasso")
STYLES: tuple[str, ...] = ("photo", "painting") + ARTISTS
NO_INSTANCE = "none"
INSTANCE_LABELS: tuple[str, ...] = (NO_INSTANCE,) + INSTANCES

OBJECT_COLOURS: dict[str, Colour] = {
    "cat": (0.95, 0.55, 0.15), "dog": (0.55, 0.32, 0.12), "fish": (0.15, 0.40, 0.90), "bird": (0.95, 0.85, 0.10),
    "car": (0.85, 0.10, 0.15), "house": (0.65, 0.30, 0.20), "tree": (0.15, 0.65, 0.20),
}
INSTANCE_COLOURS: dict[str, Colour] = {
    "grumpy cat": (0.92, 0.84, 0.70), "snoopy": (0.97, 0.97, 0.97), "nemo": (1.00, 0.45, 0.00),
}


@dataclass(frozen=True)
class Concept:
    """One erasable concept, with the anchor the paper would map it to and the concepts that must survive it."""

    name: str
    kind: str
    anchor: str
    neighbours: tuple[str, ...]
    other_anchor: str = ""  # a second anchor of the same kind that a user could pick (the any-anchor measurement)

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "anchor": self.anchor, "other_anchor": self.other_anchor,
                "neighbours": list(self.neighbours)}


def _object_concept(name: str) -> Concept:
    others = tuple(o for o in OBJECTS if o != name)
    anchor = {"cat": "dog", "dog": "cat", "fish": "bird", "bird": "fish", "car": "house", "house": "car",
              "tree": "house"}[name]
    other = {"cat": "bird", "dog": "fish", "fish": "cat", "bird": "cat", "car": "tree", "house": "tree",
             "tree": "car"}[name]
    return Concept(name, "object", anchor, others, other)


def _instance_concept(name: str) -> Concept:
    cls = INSTANCE_CLASS[name]
    others = tuple(i for i in INSTANCES if i != name)
    other = {"grumpy cat": "dog", "snoopy": "cat", "nemo": "bird"}[name]  # another animal than its own class
    return Concept(name, "instance", cls, (cls,) + others + tuple(o for o in OBJECTS if o != cls)[:3], other)


def _style_concept(name: str) -> Concept:
    return Concept(name, "style", "painting", tuple(a for a in ARTISTS if a != name) + ("painting", "photo"), "photo")


CONCEPTS: tuple[Concept, ...] = (
    tuple(_object_concept(o) for o in OBJECTS) + tuple(_instance_concept(i) for i in INSTANCES)
    + tuple(_style_concept(a) for a in ARTISTS)
)
CONCEPTS_BY_NAME: dict[str, Concept] = {c.name: c for c in CONCEPTS}

SUGGESTED_PAIRS: dict[str, tuple[str, str]] = {
    "instance": ("snoopy", "dog"),
    "style": ("van gogh", "painting"),
    "overlapping": ("grumpy cat", "cat"),
}


def axis_of(concept: str) -> str:
    """Which classifier head tells whether an image shows ``concept``: "object", "instance" or "style"."""
    if concept in OBJECTS:
        return "object"
    if concept in INSTANCES:
        return "instance"
    if concept in STYLES:
        return "style"
    raise KeyError(f"{concept!r} is not a toy-world concept; known: {', '.join(OBJECTS + INSTANCES + STYLES)}")
