"""The ComfyUI backend: ``view`` sees a ``ModelPatcher`` + ``CLIP`` as a ``ModelView``; ``flows`` are what the nodes
call (ablate, apply, stack, report). ComfyUI itself is imported only inside functions."""

from .flows import (
    PROGRESS_EVENT,
    PatchStack,
    ablate_concept,
    apply_patches,
    as_single_patch,
    describe_text,
    fingerprint_matches,
    render_report,
    report_prompts,
    save_patch,
    save_preview,
    stack_entries,
)
from .flux_view import ComfyFluxView, comfy_view
from .view import ComfyModelView, model_family

__all__ = ["PROGRESS_EVENT", "ComfyFluxView", "ComfyModelView", "PatchStack", "ablate_concept", "apply_patches",
           "as_single_patch", "comfy_view", "describe_text", "fingerprint_matches", "model_family", "render_report",
           "report_prompts", "save_patch", "save_preview", "stack_entries"]
