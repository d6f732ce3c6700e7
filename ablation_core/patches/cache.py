"""A disk cache of finished ablations, keyed by the base model's fingerprint and the settings.

Re-running a graph after a restart (or with the same model loaded from another file) reuses the patch instead of
training again. Entries are exact (float32) patch files; a damaged entry is ignored and trained again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..errors import PatchError
from ..models.view import ModelView
from .patch import AblationPatch, fingerprint
from .storage import load_patch

log = logging.getLogger(__name__)

CACHE_VERSION = "2"


def cache_key(view: ModelView, group: str, settings: dict[str, object]) -> str:
    """Same model weights in the trained group + same settings -> same key (whatever the file was called)."""
    weights = {layer.key: layer.weight for layer in view.layers(group)}
    described = json.dumps(settings, sort_keys=True, default=str)
    payload = "\n".join([CACHE_VERSION, view.family.name, fingerprint(weights), described])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class PatchCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> AblationPatch | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return load_patch(path)
        except PatchError as err:
            log.warning("ignoring a damaged cache entry %s: %s", path, err)
            return None

    def put(self, key: str, patch: AblationPatch) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return patch.save(self.path(key), dtype=torch.float32)
