"""The tab's patch browser: the files in A1111's Lora folder made by this tool, and whether each fits the loaded model.

Only safetensors headers are read (metadata and tensor names), so listing a folder of large LoRAs stays fast. "Fits"
is the patch's base-model fingerprint compared with the loaded checkpoint's weights of the layers it changes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ...patches.patch import META, fingerprint
from .view import A1111ModelView

log = logging.getLogger(__name__)

TENSOR_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff")
COLUMNS = ["name", "targets", "anchors", "method", "group", "made on", "fits the loaded model", "created"]


@dataclass
class PatchEntry:
    name: str
    path: Path
    metadata: dict[str, str]
    keys: list[str]
    fits: str = "?"

    def listed(self, field_name: str) -> list[str]:
        try:
            values = json.loads(self.metadata.get(META + field_name, "[]"))
        except ValueError:
            return []
        return [str(v) for v in values] if isinstance(values, list) else []

    def row(self) -> list[str]:
        meta = self.metadata
        return [self.name, ", ".join(self.listed("targets")), ", ".join(self.listed("anchors")),
                meta.get(META + "method", "?"), meta.get(META + "group", "?"), meta.get(META + "base_family", "?"),
                self.fits, meta.get(META + "created", "")]

    @property
    def preview(self) -> Path | None:
        path = self.path.with_suffix(".preview.png")
        return path if path.exists() else None


def read_header(path: Path) -> tuple[dict[str, str], list[str]] | None:
    """(metadata, tensor names) of a safetensors file, or None when it cannot be read as one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {}), list(handle.keys())
    except Exception as err:  # a damaged or foreign file is skipped, whatever the reader says about it
        log.debug("concept ablation: skipping %s (%s)", path, err)
        return None


def patch_keys(tensor_names: list[str]) -> list[str]:
    """Layer keys from tensor names (``<key>.lora_up.weight`` -> ``<key>``)."""
    keys = []
    for name in tensor_names:
        for suffix in TENSOR_SUFFIXES:
            if name.endswith(suffix):
                keys.append(name[: -len(suffix)])
                break
    return sorted(set(keys))


def find_patches(lora_dir: Path) -> list[PatchEntry]:
    """Every ``.safetensors`` under the Lora folder (sub-folders too, as A1111 lists them) made by this tool."""
    entries = []
    for path in sorted(Path(lora_dir).rglob("*.safetensors")):
        header = read_header(path)
        if header is None or META + "method" not in header[0]:
            continue
        metadata, names = header
        entries.append(PatchEntry(path.stem, path, metadata, patch_keys(names)))
    return entries


def fit_text(entry: PatchEntry, view: A1111ModelView | None, layers: dict | None = None) -> str:
    """"yes" when the fingerprint matches, else why not (another family, other layers, other weights)."""
    if view is None:
        return "?"
    family = entry.metadata.get(META + "base_family")
    if family and family != view.family.name:
        return f"no: made for {family}, loaded is {view.family.name}"
    if any(k.startswith("lora_te") for k in entry.keys):
        return "no: changes the text encoder, which A1111's Lora cannot apply"
    layers = layers if layers is not None else view.all_layers()
    missing = [k for k in entry.keys if k not in layers]
    if missing:
        return f"no: {len(missing)} layer(s) not in this model"
    expected = entry.metadata.get(META + "base_fingerprint")
    if not expected:
        return "unknown (no fingerprint)"
    return "yes" if fingerprint({k: layers[k].weight for k in entry.keys}) == expected else "no: other base weights"


def list_patches(lora_dir: Path, view: A1111ModelView | None) -> list[PatchEntry]:
    entries = find_patches(lora_dir)
    layers = view.all_layers() if view is not None else None
    for entry in entries:
        entry.fits = fit_text(entry, view, layers)
    return entries


def describe(entry: PatchEntry) -> str:
    """The metadata as readable lines, our fields first."""
    meta = entry.metadata
    lines = [f"{entry.path}", f"{len(entry.keys)} layers, stored as {meta.get(META + 'storage', '?')}",
             f"fits the loaded model: {entry.fits}", f"use it in a prompt: <lora:{entry.name}:1>", ""]
    for key in sorted(meta):
        if key.startswith(META) and key not in (META + "loss_curve", META + "settings"):
            lines.append(f"{key.removeprefix(META)}: {meta[key]}")
    for key in ("ss_base_model_version", "modelspec.title", "ss_training_comment"):
        if key in meta:
            lines.append(f"{key}: {meta[key]}")
    return "\n".join(lines)
