"""The ComfyUI nodes: inputs, outputs and calls into ``ablation_core``; no math here.

Node classes import without ComfyUI (``folder_paths`` and ``comfy`` are imported inside methods), so CI can check
their declarations and run them against fakes.
"""

from __future__ import annotations

import os
import re

from ablation_core import (
    GROUP_HELP,
    GROUPS,
    KINDS,
    PRESET_HELP,
    PRESET_NAMES,
    PatchError,
    load_patch,
    make_config,
    merge_weighted,
)
from ablation_core.backends import comfy as backend
from ablation_core.backends.comfy import closed_form as closed_form_backend
from ablation_core.methods.ablation.recipes import CONCEPT_TYPE_HELP, CONCEPT_TYPES
from ablation_core.methods.closed_form.settings import parse_concept_lines
from ablation_core.patches.patch import DEFAULT_ENERGY

CATEGORY = "conditioning/ablation"
PATCH_TYPE = "ABLATION_PATCH"
PATCH_FOLDER = "ablation_patches"
SAVE_FOLDERS = ("loras", PATCH_FOLDER)
MAX_SEED = 0xFFFFFFFFFFFFFFFF
ROBUST_TOOLTIP = ("robust erasure: this many rounds of attacking the result (a learned token embedding and a token "
                  "search) and erasing what the attack found too; each round costs about one more run; 0 = off")
AUTO = "auto"


# ComfyUI folders ---------------------------------------------------------------------------------------------

def register_patch_folder() -> None:
    """``models/ablation_patches`` beside ``models/loras`` (both are listed by Load Ablation Patch)."""
    import folder_paths

    if PATCH_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(PATCH_FOLDER, os.path.join(folder_paths.models_dir, PATCH_FOLDER))
    paths, extensions = folder_paths.folder_names_and_paths[PATCH_FOLDER]
    folder_paths.folder_names_and_paths[PATCH_FOLDER] = (paths, set(extensions) | {".safetensors"})


def patch_file_names() -> list[str]:
    import folder_paths

    register_patch_folder()
    names = []
    for folder in (PATCH_FOLDER, "loras"):
        names += [n for n in folder_paths.get_filename_list(folder) if n.lower().endswith(".safetensors")]
    return list(dict.fromkeys(names))


def patch_file_path(name: str) -> str:
    import folder_paths

    for folder in (PATCH_FOLDER, "loras"):
        path = folder_paths.get_full_path(folder, name)
        if path:
            return path
    raise PatchError(f"no patch named {name!r} in models/{PATCH_FOLDER} or models/loras")


def next_free_path(folder: str, filename_prefix: str) -> str:
    """``<folder>/<prefix>_00001.safetensors``, the first number not taken; the prefix may name subfolders."""
    import folder_paths

    root = os.path.abspath(folder_paths.get_folder_paths(folder)[0])
    base = os.path.abspath(os.path.join(root, filename_prefix.strip() or "ablation"))
    if os.path.commonpath([root, base]) != root:
        raise PatchError(f"the filename prefix {filename_prefix!r} leaves the {folder} folder")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    taken = [int(m[1]) for f in os.listdir(os.path.dirname(base))
             if (m := re.fullmatch(re.escape(os.path.basename(base)) + r"_(\d{5})\.safetensors", f))]
    return f"{base}_{max(taken, default=0) + 1:05}.safetensors"


def _cache_dir() -> str:
    import folder_paths

    return os.path.join(folder_paths.get_user_directory(), "concept_ablation", "cache")


# Nodes -------------------------------------------------------------------------------------------------------

class AblateConcept:
    DESCRIPTION = ("Fine-tunes the model so the target concept (a style, an object, a memorized image) comes out as "
                   "the anchor instead. Trains on ComfyUI's device; the input model is left untouched.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", PATCH_TYPE)
    RETURN_NAMES = ("model", "clip", "patch")
    OUTPUT_TOOLTIPS = ("the model with the concept ablated", "the CLIP (patched only for the embedding group)",
                       "the weight change, to save, share, stack or merge")
    FUNCTION = "ablate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "target": ("STRING", {"default": "Van Gogh", "multiline": True,
                                      "tooltip": "the concept to remove; several, one per line, are trained "
                                                 "jointly ('target -> anchor' gives a line its own anchor)"}),
                "anchor": ("STRING", {"default": "painting",
                                      "tooltip": "what the target should turn into (a broader concept); for "
                                                 "every line that names none"}),
                "kind": (list(KINDS), {"default": "style",
                                       "tooltip": "object/instance: swap the word; style: 'in the style of'; "
                                                  "memorization: the exact prompt"}),
                "group": ([AUTO, *GROUPS], {"default": AUTO, "tooltip": "auto: the preset's (kv on SD, embedding "
                                                                       "with kept neighbours on Flux); "
                                                + "; ".join(f"{k}: {v}" for k, v in GROUP_HELP.items())}),
                "preset": (list(PRESET_NAMES), {"default": "default", "tooltip": PRESET_HELP}),
                "steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": "training steps; 0 = preset"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
            },
            "optional": {
                "anchor_prompts": ("STRING", {"multiline": True, "default": "",
                                              "tooltip": "one anchor prompt per line (each must contain the "
                                                         "anchor); empty = built-in templates"}),
                "image_size": ("INT", {"default": 0, "min": 0, "max": 2048, "step": 8,
                                       "tooltip": "anchor image size in pixels; 0 = the model's own "
                                                  "(512 SD1/SD2, 1024 SDXL)"}),
                "use_cache": ("BOOLEAN", {"default": True,
                                          "tooltip": "reuse a finished run with the same model and settings"}),
                "concept_type": ([AUTO, *CONCEPT_TYPES], {
                    "default": AUTO, "tooltip": "auto: kind and group as set above; otherwise the type's recipe "
                                                "picks them (and its other settings): "
                                                + "; ".join(f"{k}: {v}" for k, v in CONCEPT_TYPE_HELP.items())}),
                "negative_prompt": ("STRING", {"default": "",
                                               "tooltip": "negative prompt while the anchor images are drawn; "
                                                          "empty = none (inappropriate: the targets)"}),
                "base_patch": (PATCH_TYPE, {"tooltip": "an earlier patch to build on: training sees the model with "
                                                       "it applied and the output patch holds both changes. A MODEL "
                                                       "from our nodes already brings its patches."}),
                "robust_rounds": ("INT", {"default": 0, "min": 0, "max": 20, "tooltip": ROBUST_TOOLTIP}),
                "gradient_checkpointing": ("BOOLEAN", {
                    "default": False, "tooltip": "for small GPUs: recompute the UNet's transformer blocks in the "
                                                 "backward pass instead of keeping their activations (about a third "
                                                 "of the training activations, an eighth on SDXL, for one more "
                                                 "forward pass of each block per step)"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def ablate(self, model, clip, target, anchor, kind, group, preset, steps, seed, anchor_prompts="",
               image_size=0, use_cache=True, concept_type=AUTO, negative_prompt="", base_patch=None,
               robust_rounds=0, gradient_checkpointing=False, unique_id=None):
        user_prompts = tuple(line.strip() for line in anchor_prompts.splitlines() if line.strip()) or None
        targets, anchors = parse_concept_lines(target, anchor, separators=("->",))
        typed = concept_type != AUTO  # the type's recipe chooses kind and group
        chosen_group = None if typed or group == AUTO else group
        config = make_config(targets, anchors, preset, kind=None if typed else kind, group=chosen_group,
                             concept_type=concept_type if typed else None, steps=steps or None, seed=seed,
                             anchor_prompts=user_prompts, latent_size=(image_size // 8) or None,
                             negative_prompt=negative_prompt.strip() or None, robust_rounds=robust_rounds or None,
                             gradient_checkpointing=gradient_checkpointing or None)
        model_out, clip_out, patch, summary = backend.ablate_concept(
            model, clip, config, node_id=unique_id, cache_dir=_cache_dir() if use_cache else None,
            base_patch=base_patch)
        return {"ui": {"text": [summary]}, "result": (model_out, clip_out, patch)}


class ApplyAblationPatch:
    DESCRIPTION = "Applies an ablation patch (or a stack) to a model, warning if it was made for another base model."
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "patch": (PATCH_TYPE,),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05}),
            },
            "optional": {"clip": ("CLIP",)},
        }

    def apply(self, model, patch, strength, clip=None):
        entries = backend.stack_entries(patch, strength)
        model_out, clip_out = backend.apply_patches(model, clip, entries)
        matches = [backend.fingerprint_matches(model, clip, p) for p, _ in entries]
        status = "base model matches" if all(matches) else \
            "WARNING: made for another base model (fingerprint differs); it may not remove the concept here"
        return {"ui": {"text": [status]}, "result": (model_out, clip_out)}


class SaveAblationPatch:
    DESCRIPTION = ("Writes the patch as a LoRA-format .safetensors into models/loras (the stock LoraLoader and "
                   "A1111 read it) or models/ablation_patches.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    STORAGE = ("low rank (small)", "full rank (exact)")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "patch": (PATCH_TYPE,),
                "filename_prefix": ("STRING", {"default": "ablation/ablate"}),
                "folder": (list(SAVE_FOLDERS), {"default": "loras"}),
                "storage": (list(cls.STORAGE), {"default": cls.STORAGE[0]}),
                "energy": ("FLOAT", {"default": DEFAULT_ENERGY, "min": 0.5, "max": 1.0, "step": 0.0005,
                                     "tooltip": "low rank: share of the change's energy kept by the SVD"}),
            },
            "optional": {"preview": ("IMAGE", {"tooltip": "saved beside the patch as <name>.preview.png"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def save(self, patch, filename_prefix, folder, storage, energy, preview=None, unique_id=None):
        path = backend.save_patch(patch, next_free_path(folder, filename_prefix),
                                  energy if storage == self.STORAGE[0] else None, node_id=unique_id)
        if preview is not None:
            backend.save_preview(preview, path.with_suffix(".preview.png"))
        return {"ui": {"text": [f"saved {path.name} ({folder})"]}}


class LoadAblationPatch:
    DESCRIPTION = "Loads a patch from models/ablation_patches or models/loras."
    CATEGORY = CATEGORY
    RETURN_TYPES = (PATCH_TYPE, "STRING")
    RETURN_NAMES = ("patch", "metadata")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"patch_name": (patch_file_names(),)}}

    def load(self, patch_name):
        patch = load_patch(patch_file_path(patch_name))
        text = backend.describe_text(patch)
        return {"ui": {"text": [text]}, "result": (patch, text)}


class StackAblationPatches:
    DESCRIPTION = "Keeps several patches separate, each with its strength; Apply Ablation Patch applies them all."
    CATEGORY = CATEGORY
    RETURN_TYPES = (PATCH_TYPE,)
    RETURN_NAMES = ("patches",)
    FUNCTION = "stack"

    @classmethod
    def INPUT_TYPES(cls):
        strength = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05})
        return {
            "required": {"patch_1": (PATCH_TYPE,), "strength_1": strength},
            "optional": {"patch_2": (PATCH_TYPE,), "strength_2": strength,
                         "patch_3": (PATCH_TYPE,), "strength_3": strength},
        }

    def stack(self, patch_1, strength_1, patch_2=None, strength_2=1.0, patch_3=None, strength_3=1.0):
        entries = []
        for value, strength in ((patch_1, strength_1), (patch_2, strength_2), (patch_3, strength_3)):
            entries += backend.stack_entries(value, strength)
        return (backend.PatchStack(entries),)


class MergeAblationPatches:
    DESCRIPTION = ("One patch from several: the weighted sum of their weight changes, or their closed-form fusion "
                   "(MACE), which keeps each erasure working on its own concept where a sum lets them interfere; "
                   "fusion needs the base MODEL and CLIP the patches were made for.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PATCH_TYPE,)
    RETURN_NAMES = ("patch",)
    FUNCTION = "merge"
    METHODS = ("weighted sum", "fusion")

    @classmethod
    def INPUT_TYPES(cls):
        weight = ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05})
        return {
            "required": {"patch_1": (PATCH_TYPE,), "weight_1": weight, "patch_2": (PATCH_TYPE,), "weight_2": weight,
                         "method": (list(cls.METHODS), {"default": cls.METHODS[0]})},
            "optional": {"patch_3": (PATCH_TYPE,), "weight_3": weight,
                         "model": ("MODEL", {"tooltip": "fusion: the base model the patches were made for"}),
                         "clip": ("CLIP", {"tooltip": "fusion: the base model's CLIP"})},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, patch_1, weight_1, patch_2, weight_2, method, patch_3=None, weight_3=1.0, model=None, clip=None,
              unique_id=None):
        entries = []
        for value, weight in ((patch_1, weight_1), (patch_2, weight_2), (patch_3, weight_3)):
            entries += backend.stack_entries(value, weight)
        patches, weights = [p for p, _ in entries], [w for _, w in entries]
        if method == "fusion":
            if model is None or clip is None:
                raise PatchError("fusion needs the base MODEL and CLIP the patches were made for: connect both")
            merged = closed_form_backend.fuse(model, clip, patches, weights, node_id=unique_id)
        else:
            merged = merge_weighted(patches, weights)
        return {"ui": {"text": [closed_form_backend.describe_merge(merged, len(patches))]}, "result": (merged,)}


class AblationReport:
    DESCRIPTION = ("Before/after images of the target, the anchor and surrounding prompts from the same noise, with "
                   "the patch's metadata; with a CLIP model folder, the CLIP figures too (clip_accuracy, clip_score, "
                   "neighbour KID).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("grid", "metadata")
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the model before the patch"}),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "patch": (PATCH_TYPE,),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05}),
                "prompts": ("STRING", {"multiline": True, "default": "a photo of a dog\na landscape painting",
                                       "tooltip": "surrounding prompts, one per line (target and anchor are "
                                                  "added from the patch)"}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 30.0, "step": 0.5}),
                "samples": ("INT", {"default": 2, "min": 1, "max": 8}),
                "image_size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64}),
            },
            "optional": {
                "clip_model": ("STRING", {"default": "", "tooltip": "path of a full CLIP model folder (transformers, "
                                          "e.g. openai/clip-vit-large-patch14) for the CLIP figures; ComfyUI's "
                                          "clip_vision files are image towers only; empty: no figures"}),
                "images_per_set": ("INT", {"default": 8, "min": 2, "max": 64,
                                           "tooltip": "CLIP figures: images per prompt set (more: tighter spreads)"}),
                "neighbours": ("STRING", {"multiline": True, "default": "",
                                          "tooltip": "CLIP figures: concepts that should not change, one per line "
                                                     "(empty: other artists for a style, other members of the "
                                                     "anchor's class otherwise)"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def report(self, model, clip, vae, patch, strength, prompts, seed, steps, cfg, samples, image_size,
               clip_model="", images_per_set=8, neighbours="", unique_id=None):
        from ablation_core.backends.comfy.clip_report import ablation_report

        prompt_list = backend.report_prompts(patch, prompts)
        image, figures = ablation_report(model, clip, vae, patch, strength, prompt_list, seed, steps, cfg, samples,
                                         image_size, clip_model, images_per_set, neighbours, node_id=unique_id)
        return (image, backend.describe_text(patch) + "\n\n" + figures)


NODE_CLASS_MAPPINGS = {
    "AblateConcept": AblateConcept,
    "ApplyAblationPatch": ApplyAblationPatch,
    "SaveAblationPatch": SaveAblationPatch,
    "LoadAblationPatch": LoadAblationPatch,
    "StackAblationPatches": StackAblationPatches,
    "MergeAblationPatches": MergeAblationPatches,
    "AblationReport": AblationReport,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AblateConcept": "Ablate Concept",
    "ApplyAblationPatch": "Apply Ablation Patch",
    "SaveAblationPatch": "Save Ablation Patch",
    "LoadAblationPatch": "Load Ablation Patch",
    "StackAblationPatches": "Stack Ablation Patches",
    "MergeAblationPatches": "Merge Ablation Patches",
    "AblationReport": "Ablation Report",
}
