"""Adapters that give the core one view of a model (``models.view.ModelView``), whichever program loaded it.

``diffusers``: diffusers folders, single-file checkpoints and the toy model (CLI, tests, scripts).
``comfy``: ComfyUI's ``ModelPatcher`` and ``CLIP`` (imported by the nodes only; ComfyUI is imported lazily).
``a1111``: the web UI tab's flows and A1111's model objects; ``forge``: Forge's own model objects (same tab).
"""
