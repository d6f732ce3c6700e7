"""Adapters that give the core one view of a model, whichever program loaded it."""

from .base import Conditioning, ModelView

__all__ = ["Conditioning", "ModelView"]
