"""The closed-form node: erase a list of concepts in one solve (declarations only; the work is in ablation_core)."""

from __future__ import annotations

from ablation_core.backends.comfy import closed_form as backend
from ablation_core.methods.closed_form.settings import (
    MODE_HELP,
    MODES,
    make_closed_form_config,
    parse_concept_lines,
)

from .ablation_nodes import CATEGORY, PATCH_TYPE, ROBUST_TOOLTIP


class EraseConceptsClosedForm:
    DESCRIPTION = ("Erases many concepts at once without training: each target's cross-attention keys and values "
                   "are mapped onto its anchor's in closed form (UCE/MACE; SPEED's null-space mode keeps the "
                   "preserved concepts exactly). The cost is encoding prompts with CLIP: 48 per concept, and the "
                   "first time in a session a bank of 204 everyday ones. On a CPU that takes minutes: measured with "
                   "SD1.5's shapes in float32 on one shared CPU core, 1 concept in 82 s and 10 in 186 s (ten took "
                   "232 s in ComfyUI 0.3.64 on a CPU); not measured on a GPU. On Flux the prompts go through T5-XXL: "
                   "22-54 s each on a CPU in ComfyUI 0.3.64 (one concept with the bank is about 250 prompts, hours; "
                   "use a GPU, or turn builtin_bank off: about 55 prompts). The progress bar says the time left. "
                   "The input model is left untouched.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", PATCH_TYPE)
    RETURN_NAMES = ("model", "patch")
    OUTPUT_TOOLTIPS = ("the model with the concepts erased", "the weight change, to save, share, stack or merge")
    FUNCTION = "erase"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "concepts": ("STRING", {"multiline": True, "default": "Van Gogh -> painting\nClaude Monet -> painting",
                                        "tooltip": "one concept per line: 'target -> anchor', or just 'target' to "
                                                   "use the anchor below"}),
                "anchor": ("STRING", {"default": "", "tooltip": "anchor for lines that name none"}),
                "kind": (["object", "style"], {"default": "style",
                                               "tooltip": "object: 'a photo of a X'; style: '..., in the style of X'"}),
                "mode": (list(MODES), {"default": MODES[0],
                                       "tooltip": "; ".join(f"{k}: {v}" for k, v in MODE_HELP.items())}),
                "preserve_weight": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.05,
                                              "tooltip": "least squares: how much keeping the preserved concepts "
                                                         "counts against erasing the targets"}),
            },
            "optional": {
                "preserve": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "extra concepts to keep, one per line (a built-in bank of "
                                                   "everyday objects and styles is always kept)"}),
                "base_patch": (PATCH_TYPE, {"tooltip": "an earlier K/V patch to build on: the solve starts from "
                                                       "the weights with it applied and the output patch holds both "
                                                       "changes. A MODEL from our nodes already brings its patches."}),
                "robust_rounds": ("INT", {"default": 0, "min": 0, "max": 20, "tooltip": ROBUST_TOOLTIP}),
                "builtin_bank": ("BOOLEAN", {"default": True,
                                             "tooltip": "keep the built-in bank of 50 everyday concepts (200 prompts) "
                                                        "as well as the anchors and the list above; off encodes only "
                                                        "your own prompts, which on Flux on a CPU saves hours"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def erase(self, model, clip, concepts, anchor, kind, mode, preserve_weight, preserve="", base_patch=None,
              robust_rounds=0, builtin_bank=True, unique_id=None):
        targets, anchors = parse_concept_lines(concepts, anchor)
        config = make_closed_form_config(targets, anchors, kind=kind, mode=mode, preserve_weight=preserve_weight,
                                         preserve=[line for line in preserve.splitlines() if line.strip()],
                                         robust_rounds=robust_rounds, builtin_preserve=bool(builtin_bank))
        model_out, _, patch, summary = backend.erase_concepts(model, clip, config, node_id=unique_id,
                                                              base_patch=base_patch)
        return {"ui": {"text": [summary]}, "result": (model_out, patch)}


NODE_CLASS_MAPPINGS = {"EraseConceptsClosedForm": EraseConceptsClosedForm}
NODE_DISPLAY_NAME_MAPPINGS = {"EraseConceptsClosedForm": "Erase Concepts (Closed Form)"}
