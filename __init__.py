"""Concept Ablation for ComfyUI: the custom-node entry point (V1 mappings).

ComfyUI imports this folder as a package; ``ablation_core`` is imported by absolute name, so the folder goes on
``sys.path`` (appended, so ComfyUI's own modules keep precedence). Importing this file needs no ComfyUI.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, setup
else:  # imported as a plain module (a test or a tool), not as ComfyUI's package
    from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, setup

if "folder_paths" in sys.modules:
    setup()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
