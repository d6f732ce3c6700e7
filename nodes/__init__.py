"""ComfyUI node registrations. Importing this needs no ComfyUI; inside ComfyUI it also registers the patch folder
and the small HTTP route the web extension reads patch metadata from."""

from .ablation_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, register_patch_folder
from .routes import register_routes

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "setup"]


def setup() -> None:
    """Called by the package entry point when ComfyUI is present."""
    register_patch_folder()
    register_routes()
