"""Procedurally drawn, captioned images of the toy concepts.

Every image is one subject (an object class or an instance of one) drawn on a style's background, rendered at twice
the size and averaged down so edges are smooth. Variation (position, size, colour, texture phase) is kept small on
purpose: a model trained in minutes on two CPU cores must be able to follow every prompt, and the classifier must
read every axis, or no ablation figure means anything. All randomness comes from the caller's numpy Generator, so a
seed fixes the data exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .concepts import (
    ARTISTS,
    INSTANCE_CLASS,
    INSTANCE_COLOURS,
    INSTANCES,
    NO_INSTANCE,
    OBJECT_COLOURS,
    OBJECTS,
    STYLES,
)

IMAGE_SIZE = 16
SUPERSAMPLE = 2
SUBJECTS: tuple[str, ...] = OBJECTS + INSTANCES

PHOTO_TEMPLATES = ("a photo of {s}", "a picture of {s}", "{s}", "an image of {s}", "a photograph of {s}")
PAINTING_TEMPLATES = ("a painting of {s}", "painting of {s}", "an oil painting of {s}", "a painted picture of {s}")
ARTIST_TEMPLATES = ("a painting of {s} in the style of {a}", "{s} in the style of {a}", "{s}, painted by {a}",
                    "a {a} painting of {s}", "an artwork of {s} by {a}")


@dataclass(frozen=True)
class ToyLabel:
    """What an image shows: a subject (object class or instance) and a style."""

    subject: str
    style: str

    @property
    def object(self) -> str:
        return INSTANCE_CLASS.get(self.subject, self.subject)

    @property
    def instance(self) -> str:
        return self.subject if self.subject in INSTANCES else NO_INSTANCE


def subject_phrase(subject: str) -> str:
    """Instances are names ("snoopy"); classes take an article ("a cat")."""
    if subject in INSTANCES:
        return subject
    return ("an " if subject[0] in "aeiou" else "a ") + subject


def caption(label: ToyLabel, template: int = 0) -> str:
    """The ``template``-th natural caption for ``label`` (wraps around), e.g. "a cat in the style of monet"."""
    s = subject_phrase(label.subject)
    if label.style == "photo":
        return PHOTO_TEMPLATES[template % len(PHOTO_TEMPLATES)].format(s=s)
    if label.style == "painting":
        return PAINTING_TEMPLATES[template % len(PAINTING_TEMPLATES)].format(s=s)
    return ARTIST_TEMPLATES[template % len(ARTIST_TEMPLATES)].format(s=s, a=label.style)


def random_labels(rng: np.random.Generator, n: int) -> list[ToyLabel]:
    """Subjects and styles drawn uniformly and independently, so every combination is seen."""
    subjects = rng.integers(0, len(SUBJECTS), n)
    styles = rng.integers(0, len(STYLES), n)
    return [ToyLabel(SUBJECTS[i], STYLES[j]) for i, j in zip(subjects, styles, strict=True)]


def random_captions(rng: np.random.Generator, labels: list[ToyLabel]) -> list[str]:
    templates = rng.integers(0, 1000, len(labels))
    return [caption(label, int(t)) for label, t in zip(labels, templates, strict=True)]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(coords, coords, indexing="xy")


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1


def _rect(x: np.ndarray, y: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def _triangle(x: np.ndarray, y: np.ndarray, *pts: tuple[float, float]) -> np.ndarray:
    (ax, ay), (bx, by), (cx, cy) = pts
    d1 = (x - bx) * (ay - by) - (ax - bx) * (y - by)
    d2 = (x - cx) * (by - cy) - (bx - cx) * (y - cy)
    d3 = (x - ax) * (cy - ay) - (cx - ax) * (y - ay)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def _subject_layers(subject: str, x: np.ndarray, y: np.ndarray) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
    """Masks with their colours, painted in order, in subject coordinates (about [-1, 1], y pointing down)."""
    obj = INSTANCE_CLASS.get(subject, subject)
    body = INSTANCE_COLOURS.get(subject, OBJECT_COLOURS[obj])
    dark = (0.05, 0.05, 0.05)
    if obj == "cat":
        ears = _triangle(x, y, (-0.55, -0.05), (-0.1, -0.3), (-0.5, -0.75)) | _triangle(
            x, y, (0.55, -0.05), (0.1, -0.3), (0.5, -0.75))
        layers = [(ears | _ellipse(x, y, 0, 0.15, 0.6, 0.55), body)]
        if subject == "grumpy cat":
            mask = _ellipse(x, y, 0, 0.35, 0.35, 0.25) | _triangle(x, y, (-0.5, -0.3), (-0.3, -0.35), (-0.5, -0.7))
            mask |= _triangle(x, y, (0.5, -0.3), (0.3, -0.35), (0.5, -0.7))
            layers.append((mask, (0.35, 0.22, 0.15)))
        return layers
    if obj == "dog":
        ear_colour = dark if subject == "snoopy" else (0.33, 0.17, 0.05)
        ears = _ellipse(x, y, -0.6, 0.15, 0.2, 0.5) | _ellipse(x, y, 0.6, 0.15, 0.2, 0.5)
        nose = _ellipse(x, y, 0, 0.3, 0.15, 0.12)
        return [(_ellipse(x, y, 0, 0.05, 0.5, 0.6), body), (ears, ear_colour), (nose, dark)]
    if obj == "fish":
        layers = [(_ellipse(x, y, -0.15, 0, 0.65, 0.42) | _triangle(x, y, (0.35, 0), (0.9, -0.45), (0.9, 0.45)), body)]
        if subject == "nemo":
            stripes = (_rect(x, y, -0.45, -0.28, -1, 1) | _rect(x, y, 0.08, 0.25, -1, 1)) & _ellipse(
                x, y, -0.15, 0, 0.65, 0.42)
            layers.append((stripes, (1.0, 1.0, 1.0)))
        return layers
    if obj == "bird":
        return [(_ellipse(x, y, 0.1, 0.2, 0.6, 0.4) | _ellipse(x, y, -0.4, -0.25, 0.3, 0.3), body),
                (_triangle(x, y, (-0.6, -0.35), (-0.95, -0.2), (-0.6, -0.1)), (0.95, 0.45, 0.05)),
                (_triangle(x, y, (0.1, 0.1), (0.75, -0.2), (0.55, 0.3)), (0.7, 0.6, 0.05))]
    if obj == "car":
        return [(_rect(x, y, -0.85, 0.85, -0.1, 0.4) | _rect(x, y, -0.45, 0.4, -0.5, -0.1), body),
                (_rect(x, y, -0.3, 0.25, -0.4, -0.15), (0.6, 0.8, 0.95)),
                (_ellipse(x, y, -0.5, 0.45, 0.22, 0.22) | _ellipse(x, y, 0.5, 0.45, 0.22, 0.22), dark)]
    if obj == "house":
        return [(_rect(x, y, -0.6, 0.6, -0.1, 0.8), body),
                (_triangle(x, y, (-0.85, -0.05), (0.85, -0.05), (0, -0.8)), (0.25, 0.25, 0.3)),
                (_rect(x, y, -0.15, 0.15, 0.35, 0.8), (0.2, 0.12, 0.05))]
    if obj == "tree":
        return [(_rect(x, y, -0.15, 0.15, 0.2, 0.9), (0.45, 0.25, 0.08)), (_ellipse(x, y, 0, -0.2, 0.65, 0.6), body)]
    raise KeyError(subject)


def _background(style: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A style is a background: a photo is a plain sky, a painting a plain canvas, each artist a texture."""
    h, w = x.shape
    if style == "photo":
        top, bottom = np.array([0.62, 0.72, 0.85]), np.array([0.48, 0.55, 0.62])
        t = ((y + 1) / 2)[..., None]
        return top * (1 - t) + bottom * t
    if style == "painting":
        return np.broadcast_to(np.array([0.10, 0.35, 0.35]), (h, w, 3)).copy()
    phase = rng.uniform(0, 2 * np.pi)
    if style == "van gogh":
        wave = np.sin(2.2 * np.pi * (x + y) + 1.2 * np.sin(2 * np.pi * (x - y) / 2) + phase)
        return np.where((wave > 0.3)[..., None], np.array([0.95, 0.85, 0.30]), np.array([0.08, 0.12, 0.45]))
    if style == "monet":
        px, py = (x * 3 + phase) % 2 - 1, (y * 3 + phase * 0.7) % 2 - 1
        dots = px**2 + py**2 < 0.35
        return np.where(dots[..., None], np.array([0.55, 0.85, 0.55]), np.array([0.97, 0.72, 0.80]))
    if style == "picasso":
        shift = rng.integers(0, 2, 2)
        cells = (np.floor((x + 1) * 2 + shift[0] * 0.5) + np.floor((y + 1) * 2 + shift[1] * 0.5)) % 2
        return np.where((cells > 0)[..., None], np.array([0.75, 0.75, 0.78]), np.array([0.22, 0.22, 0.28]))
    raise KeyError(style)


def render(label: ToyLabel, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image, float32 [3, size, size] in [-1, 1]."""
    big = size * SUPERSAMPLE
    x, y = _grid(big)
    canvas = _background(label.style, x, y, rng)
    scale = rng.uniform(0.68, 0.78)
    cx, cy = rng.uniform(-0.08, 0.08, 2)
    sx, sy = (x - cx) / scale, (y - cy) / scale
    layers = _subject_layers(label.subject, sx, sy)
    silhouette = np.zeros_like(x, dtype=bool)
    for mask, _ in layers:
        silhouette |= mask
    outline = np.zeros_like(silhouette)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (1, 1), (-1, 1), (1, -1)):
        outline |= np.roll(np.roll(silhouette, dy, 0), dx, 1)
    canvas[outline & ~silhouette] = 0.05
    jitter = rng.uniform(-0.05, 0.05, 3)
    for mask, colour in layers:
        canvas[mask] = np.clip(np.array(colour) + jitter, 0, 1)
    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return (small.transpose(2, 0, 1) * 2 - 1).astype(np.float32)


def render_batch(labels: list[ToyLabel], rng: np.random.Generator, size: int = IMAGE_SIZE) -> Tensor:
    return torch.from_numpy(np.stack([render(label, rng, size) for label in labels]))


def make_batch(rng: np.random.Generator, n: int, size: int = IMAGE_SIZE) -> tuple[Tensor, list[str], list[ToyLabel]]:
    """``n`` random images with captions and labels, fully determined by the state of ``rng``."""
    labels = random_labels(rng, n)
    captions = random_captions(rng, labels)
    return render_batch(labels, rng, size), captions, labels


def all_labels() -> list[ToyLabel]:
    """Every subject in every style, for grids and per-concept evaluation."""
    return [ToyLabel(s, st) for s in SUBJECTS for st in STYLES]


__all__ = ["ARTISTS", "IMAGE_SIZE", "SUBJECTS", "ToyLabel", "all_labels", "caption", "make_batch", "random_captions",
           "random_labels", "render", "render_batch", "subject_phrase"]
