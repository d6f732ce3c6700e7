"""Labelled image grids (before/after comparisons) as PIL images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from ..files import write_atomic


def to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL."""
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def grid(rows: list[list[Tensor]], row_labels: list[str], column_labels: list[str], cell: int = 128) -> Image.Image:
    """A grid of images with a label left of each row (lines split at "\\n") and above each column."""
    label_width, label_height = 260, 18
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (label_width + columns * cell, label_height + len(rows) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(column_labels):
        draw.text((label_width + c * cell + 4, 3), text[:28], fill="black")
    for r, (row, text) in enumerate(zip(rows, row_labels)):
        y = label_height + r * cell
        lines = text.split("\n")
        top = y + cell // 2 - 6 * len(lines)
        for i, line in enumerate(lines):
            draw.text((4, top + 12 * i), line[:42], fill="black")
        for c, image in enumerate(row):
            pil = to_pil(image).resize((cell, cell), Image.NEAREST)
            canvas.paste(pil, (label_width + c * cell, y))
    return canvas


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write atomically, in the format the suffix names (PNG when it names none)."""
    path = Path(path)
    image_format = path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    return write_atomic(path, lambda tmp: image.save(tmp, format=image_format))
