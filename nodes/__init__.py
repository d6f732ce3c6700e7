"""ComfyUI node registrations. Importing this needs no ComfyUI; inside ComfyUI it also registers the patch folder
and the small HTTP route the web extension reads patch metadata from."""

from . import ablation_nodes, closed_form_nodes
from .ablation_nodes import register_patch_folder
from .routes import register_routes

NODE_CLASS_MAPPINGS = {**ablation_nodes.NODE_CLASS_MAPPINGS, **closed_form_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**ablation_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                              **closed_form_nodes.NODE_DISPLAY_NAME_MAPPINGS}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "setup"]


def setup() -> None:
    """Called by the package entry point when ComfyUI is present."""
    register_patch_folder()
    register_routes()
