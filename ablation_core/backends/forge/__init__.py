"""The Stable Diffusion WebUI Forge backend: ``view`` sees Forge's own model objects (``ForgeDiffusionEngine``) as a
``ModelView``; ``autograd`` lets training pass through Forge's inference-tensor weights and in-place residuals. The
tab and its flows are the A1111 backend's (``backends.a1111``), which picks this view when Forge's model is loaded.
Forge is never imported at module level."""

from .autograd import copied_inference_weights, out_of_place_residuals
from .view import ForgeModelView, forge_family, is_forge_model

__all__ = ["ForgeModelView", "copied_inference_weights", "forge_family", "is_forge_model", "out_of_place_residuals"]
