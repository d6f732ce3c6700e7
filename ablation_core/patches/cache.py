"""A disk cache of finished ablations, keyed by the base model's fingerprint and the settings.

Re-running a graph after a restart (or with the same model loaded from another file) reuses the patch instead of
training again. Entries are exact (float32) patch files; a missing folder or entry is trained again, a damaged entry
is ignored and trained again, and the key holds a digest of the package's own code, so an entry made by another
version of this package is never reused (a hand-bumped version number forgot changes before).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch

from ..errors import PatchError
from ..models.view import ModelView
from ..resources import PACKAGE_DIR
from .patch import AblationPatch, fingerprint
from .storage import load_patch

log = logging.getLogger(__name__)

CACHE_VERSION = "3"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """A digest of every Python file of the package: another version of the code makes other keys."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(view: ModelView, group: str, settings: dict[str, object]) -> str:
    """Same code, same model weights in the trained group, same settings -> same key (whatever the file was called)."""
    weights = {layer.key: layer.weight for layer in view.layers(group)}
    described = json.dumps(settings, sort_keys=True, default=str)
    payload = "\n".join([CACHE_VERSION, code_digest(), view.family.name, fingerprint(weights), described])
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
