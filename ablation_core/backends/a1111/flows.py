"""What the A1111 tab calls: run a method on the loaded checkpoint, save the patch where the Lora extension finds it.

The host program is handed in as an ``A1111Host`` (its ``shared.sd_model``, ``shared.state``, the Lora folder, its
autocast and its Lora extension's ``networks`` module), so this module never imports A1111 and the tests drive it
with fakes. Progress goes to ``shared.state`` (A1111's progress bar and ETA, the phase, loss and time left in its
text), and its Interrupt (``state.interrupted``) is checked between steps and inside every UNet and text-encoder layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ...errors import AblationCancelled, AblationError
from ...evaluation.images import grid, save_image
from ...files import check_output_file, write_text_atomic
from ...methods import run_plan
from ...methods.ablation.adapters import AdapterSet
from ...methods.ablation.check import check_summary
from ...methods.ablation.recipes import AUTO, guess_concept_type
from ...methods.ablation.settings import AblationConfig, make_config, resolve_config
from ...methods.closed_form.settings import ClosedFormConfig, make_closed_form_config, resolve_closed_form
from ...methods.progress import Canceller, Progress, cancel_checks
from ...methods.prompts import check_pair, target_prompts
from ...methods.robust.rounds import robust_ablate, robust_erase_closed_form
from ...models.sampling import sample_latents
from ...patches.patch import META, AblationPatch
from ..forge.view import ForgeModelView, is_forge_model
from .progress import RunProgress, preview_cost, preview_passes
from .view import A1111ModelView

WebUIView = A1111ModelView | ForgeModelView

log = logging.getLogger(__name__)

METHODS = ("trained", "closed form")
STORAGE = ("low rank", "exact (.diff)")
ROBUST_HELP = ("rounds of attack-and-erase against soft-prompt and token-search attacks (AdvUnlearn/RECE style); "
               "each round costs about one more run, and holds the erasure against recovery attacks")
SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # the Lora tab's names (its network.SdVersion)
KIND_OF_CONCEPT_TYPE = {"style": "style", "memorized": "memorization"}  # the rest are objects
CPU_PREVIEW, GPU_PREVIEW = (64, 8), (512, 20)  # the default preview's size (px) and steps, by device


@dataclass
class A1111Host:
    """What the flows take from the running program."""

    sd_model: Any
    state: Any
    lora_dir: Path
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    networks: Any = None  # the built-in Lora extension's ``networks`` module, when it is loaded
    model_name: str = ""

    def cancelled(self) -> bool:
        return bool(getattr(self.state, "interrupted", False) or getattr(self.state, "stopping_generation", False))

    def view(self) -> WebUIView:
        """The loaded model as the core sees it: Forge's own model objects, or A1111's."""
        if is_forge_model(self.sd_model):
            return ForgeModelView(self.sd_model)
        return A1111ModelView(self.sd_model, autocast=self.autocast, networks=self.networks)

    def refresh_loras(self) -> None:
        """Make the Lora extension list the new file now (``<lora:NAME:1>`` would find it anyway)."""
        refresh = getattr(self.networks, "list_available_networks", None)
        if callable(refresh):
            refresh()


@dataclass
class TabRequest:
    """One press of the tab's button. Zero means "what the preset and the model suggest"."""

    target: str
    anchor: str
    concept_type: str = AUTO
    method: str = "trained"
    preset: str = "default"
    steps: int = 0
    seed: int = 0
    resolution: int = 0
    anchor_images: int = 0
    batch_size: int = 0
    storage: str = "low rank"
    name: str = ""
    overwrite: bool = False
    preview: bool = True
    preview_size: int = 0  # 0: sized to the device (``preview_defaults``)
    preview_steps: int = 0
    robust_rounds: int = 0
    gradient_checkpointing: bool = False


@dataclass
class RunOutcome:
    path: Path
    patch: AblationPatch
    summary: str
    seconds: float
    preview: Path | None = None
    log_lines: list[str] = field(default_factory=list)


# Requests -> configs -----------------------------------------------------------------------------------------

def patch_name(request: TabRequest) -> str:
    """The file name (no suffix): the user's, or ``ablate_<target>_to_<anchor>``; only characters every file system
    and A1111's ``<lora:NAME:1>`` syntax take."""
    raw = request.name.strip() or f"ablate_{request.target.strip()}_to_{request.anchor.strip()}"
    name = re.sub(r"[^\w\-.]+", "_", raw).strip("._")
    if not name:
        raise AblationError("give the patch a file name (letters, digits, '-', '_')")
    return name


def trained_config(request: TabRequest, view: WebUIView) -> AblationConfig:
    chosen = {"steps": request.steps, "anchor_images": request.anchor_images, "batch_size": request.batch_size,
              "latent_size": _latent_size(request.resolution, view),
              "robust_rounds": max(int(request.robust_rounds), 0)}
    config = make_config(request.target, request.anchor, request.preset, concept_type=request.concept_type,
                         seed=int(request.seed), gradient_checkpointing=bool(request.gradient_checkpointing),
                         **{k: int(v) for k, v in chosen.items() if v})
    config = resolve_config(config, view.family.name)
    if config.group == "embedding":
        raise AblationError("A1111's Lora extension cannot apply token-embedding changes; this tab trains UNet "
                            "weights only")
    return replace(config, extra_metadata={**config.extra_metadata, META + "made_in": f"{view.program} tab"})


def _latent_size(resolution: int, view: WebUIView) -> int | None:
    if not resolution:
        return None
    multiple = view.latent_multiple
    return max(multiple, int(round(resolution / 8 / multiple)) * multiple)


def _kind(concept_type: str) -> str:
    return KIND_OF_CONCEPT_TYPE.get(concept_type, "object")


def preview_prompts(target: str, anchor: str, concept_type: str) -> list[str]:
    """One prompt with the target and its anchor twin, as the training pairs them."""
    kind = _kind(concept_type)
    anchor_prompt = {"style": "a mountain landscape", "memorization": anchor}.get(kind, f"a photo of a {anchor}")
    return [target_prompts([anchor_prompt], anchor, target, kind)[0], anchor_prompt]  # type: ignore[arg-type]


# The run -----------------------------------------------------------------------------------------------------

def chosen_concept_type(request: TabRequest) -> str:
    """The request's concept type; ``auto`` guesses it from the words ("Van Gogh" -> "painting": style)."""
    if request.concept_type == AUTO:
        return guess_concept_type(request.target, request.anchor)
    return request.concept_type


def preview_defaults(view: WebUIView) -> tuple[int, int]:
    """The default preview's size (px) and steps: small on a CPU, where a 512 px preview takes minutes."""
    return CPU_PREVIEW if torch.device(view.device).type == "cpu" else GPU_PREVIEW


def preview_settings(request: TabRequest, view: WebUIView) -> tuple[int, int]:
    size, steps = preview_defaults(view)
    return int(request.preview_size) or size, int(request.preview_steps) or steps


def preview_cost_text(view: WebUIView, size: int, steps: int) -> str:
    """What a preview costs, said before it runs."""
    device = "the CPU" if torch.device(view.device).type == "cpu" else f"the {torch.device(view.device).type.upper()}"
    return (f"the before/after preview ({size} px, {steps} steps) costs {preview_passes(steps)} UNet passes and 4 "
            f"image decodes on {device}")


def run_request(host: A1111Host, request: TabRequest) -> RunOutcome:
    """Ablate (or erase in closed form) on the loaded model, save into the Lora folder, draw the preview; one
    progress plan covers all of it."""
    started = time.perf_counter()
    check_pair(request.target, request.anchor)
    if request.method not in METHODS:
        raise AblationError(f"unknown method {request.method!r}; choose one of {', '.join(METHODS)}")
    if request.storage not in STORAGE:
        raise AblationError(f"unknown storage {request.storage!r}; choose one of {', '.join(STORAGE)}")
    name = patch_name(request)
    if (Path(host.lora_dir) / f"{name}.safetensors").exists() and not request.overwrite:
        raise AblationError(f"{name}.safetensors already exists in the Lora folder; tick 'Replace an existing file' "
                            "or choose another name")
    path = check_output_file(Path(host.lora_dir) / f"{name}.safetensors", (".safetensors",), request.overwrite,
                             "patch file")
    view = host.view()
    if request.robust_rounds > 0 and not view.token_embedding_modules():
        raise AblationError("robust rounds need gradients through the text encoder, which this program's model does "
                            "not give (Forge encodes prompts under inference mode); set Robust rounds to 0")
    asked, picked = request.concept_type, chosen_concept_type(request)
    request = replace(request, concept_type=picked)
    preview_size, preview_steps = preview_settings(request, view)
    preview_units = preview_cost(preview_steps, _latent_size(preview_size, view) or view.default_latent_size) \
        if request.preview else 0.0
    progress = RunProgress(host.state)
    canceller = Canceller(host.cancelled)
    with view.prepared(), torch.inference_mode(False):
        if request.method == "trained":
            patch, summary = _trained(host, request, view, progress, preview_units)
        else:
            patch, summary = _closed_form(host, request, view, progress, preview_units)
        summary = f"Concept type: {picked}" + (" (auto)" if asked == AUTO else "") + f". {summary}"
        if request.storage == "low rank" and not patch.is_low_rank:
            patch = patch.compressed(on_layer=lambda done, total: progress(Progress("compress", done, total)))
        patch = patch.scaled(1.0) if request.storage != "low rank" else patch
        patch.metadata.setdefault(META + "base_model_name", host.model_name)
        patch.metadata["ss_output_name"] = name  # what <lora:NAME:1> and model sites call it
        canceller.check()  # an Interrupt that came during the last step still writes nothing
        progress(Progress("write", 0, 1))
        patch.save(path)
        progress(Progress("write", 1, 1))
        write_card(path, patch, view.family.name)
        host.refresh_loras()
        preview = None
        if request.preview:
            prompts = preview_prompts(request.target, request.anchor, picked)
            drawing = time.perf_counter()
            try:
                preview = render_preview(host, patch, prompts, request.seed, preview_steps, preview_size, path,
                                         progress)
                summary += (f". The preview ({preview_size} px, {preview_steps} steps) took "
                            f"{time.perf_counter() - drawing:.1f}s")
            except AblationCancelled:
                summary += ". The preview was interrupted (the patch is saved)"
    seconds = time.perf_counter() - started
    log.info("concept ablation: wrote %s (%d layers) in %.1fs", path, len(patch.deltas), seconds)
    return RunOutcome(path, patch, summary, seconds, preview)


def _trained(host: A1111Host, request: TabRequest, view: WebUIView, progress: RunProgress,
             preview_units: float) -> tuple[AblationPatch, str]:
    config = trained_config(request, view)
    view.default_latent_size = config.latent_size or view.default_latent_size
    plan_trained(progress, config, view.default_latent_size, preview_units, view.family.name,
                 len(view.layers(config.group)) if request.storage == "low rank" else 0)
    result = robust_ablate(view, config, on_progress=progress, should_cancel=host.cancelled)
    check = (f"; held-out check: {check_summary(result.check)}" if "erased_fraction" in result.check else "")
    summary = (f"'{config.target}' -> '{config.anchor}': {config.steps} steps, loss {result.losses[0]:.4g} -> "
               f"{result.losses[-1]:.4g}{check}")
    if result.warning:
        summary += f". WARNING: {result.warning}"
    return result.patch, summary


def plan_trained(progress: RunProgress, config: AblationConfig, latent_size: int, preview_units: float,
                 family: str = "sd1", compress_layers: int = 0) -> None:
    """Every phase of a trained run (``run_plan.plan_trained``), saving the patch and its preview, by cost."""
    run_plan.plan_trained(progress, config, latent_size, family)
    _plan_saving(progress, compress_layers, preview_units)


def _closed_form(host: A1111Host, request: TabRequest, view: WebUIView, progress: RunProgress,
                 preview_units: float) -> tuple[AblationPatch, str]:
    config = make_closed_form_config([request.target], [request.anchor], kind=_kind(request.concept_type),
                                     seed=int(request.seed), robust_rounds=max(int(request.robust_rounds), 0),
                                     extra_metadata={META + "made_in": f"{view.program} tab"})
    view.default_latent_size = _latent_size(request.resolution, view) or view.default_latent_size  # robust rounds
    plan_closed_form(progress, resolve_closed_form(config, view.family.name), view, preview_units)
    result = robust_erase_closed_form(view, config, on_progress=progress, should_cancel=host.cancelled)
    stats = result.stats
    summary = (f"'{request.target}' -> '{request.anchor}' in closed form ({result.config.mode}) in "
               f"{result.seconds:.2f}s: the target moved {stats['target_moved_fraction']:.0%} onto the anchor, "
               f"preserved concepts changed {stats['preserved_relative_change']:.1%}")
    return result.patch, summary


def plan_closed_form(progress: RunProgress, config: ClosedFormConfig, view: WebUIView, preview_units: float) -> None:
    """``run_plan.plan_closed_form``: the prompts' share counts only those whose moments the process has not kept
    from an earlier run (a second run on the same model encodes only its probes, and its preview is then most of its
    time); then writing the patch and the preview."""
    run_plan.plan_closed_form(progress, config, len(view.layers("kv")), view.default_latent_size, view)
    _plan_saving(progress, 0, preview_units)  # the solve is low rank already


def _plan_saving(progress: RunProgress, compress_layers: int, preview_units: float) -> None:
    """The low-rank compression (when the patch is dense and low rank was asked), writing the file, the preview."""
    if compress_layers:
        run_plan.plan_compress(progress, compress_layers)
    run_plan.plan_write(progress, 1.0)
    if preview_units:
        progress.plan("preview", preview_units)


# Files beside the patch --------------------------------------------------------------------------------------

def card_description(patch: AblationPatch) -> str:
    """What the Lora tab shows on the card: what was removed, how, and for which model."""
    pairs = ", ".join(f"'{t}' -> '{a}'" for t, a in zip(patch.listed("targets"), patch.listed("anchors")))
    method = patch.metadata.get(META + "method", "concept ablation")
    family = patch.metadata.get(META + "base_family", "")
    model = patch.metadata.get(META + "base_model_name", "")
    text = f"Concept Ablation patch ({method}, {patch.metadata.get(META + 'group', 'kv')}): {pairs}."
    if family:
        text += f" Made on {SD_VERSION.get(family, family)}" + (f" ({model})" if model else "") + "."
    return text


def write_card(path: Path, patch: AblationPatch, family: str) -> Path:
    """``NAME.json`` beside the patch: A1111's user metadata for the card (description, model version, weight)."""
    card = {"description": card_description(patch), "sd version": SD_VERSION.get(family, "Unknown"),
            "preferred weight": 1.0, "activation text": "", "notes": "Made with the Concept Ablation extension."}
    return write_text_atomic(path.with_suffix(".json"), json.dumps(card, indent=2))


def render_preview(host: A1111Host, patch: AblationPatch, prompts: list[str], seed: int, steps: int,
                   image_size: int, path: Path, progress: RunProgress | None = None) -> Path:
    """Before/after images from the same noise, the patch applied through forward hooks (the weights stay as they
    are); saved as ``NAME.preview.png``, which the Lora tab shows as the card's picture. ``progress``: the run's
    plan, with the preview in it (else the preview is a run of its own)."""
    view = host.view()
    size, default_steps = preview_defaults(view)
    latent_size = _latent_size(int(image_size) or size, view) or view.default_latent_size
    view.default_latent_size = latent_size
    steps = max(int(steps) or default_steps, 1)
    if progress is None:
        progress = RunProgress(host.state)
        progress.plan("preview", preview_cost(steps, latent_size))
    adapters = AdapterSet.of_patch(view, patch)
    index = torch.arange(len(prompts))
    images = {}
    canceller = Canceller(host.cancelled)
    with view.prepared(), torch.no_grad(), cancel_checks(view.cancel_check_modules(), canceller):
        for offset, name in enumerate(("before", "after")):
            hooks = adapters.attached() if name == "after" else contextlib.nullcontext()
            with hooks, view.uncached_text():
                def on_step(done: float, total: int, offset: int = offset) -> None:
                    progress(Progress("preview", offset * steps + int(round(done / total * steps)), 2 * steps))
                latents = sample_latents(view, prompts, index, steps, 6.0, len(prompts), int(seed), latent_size,
                                         on_step)
            canceller.check()  # the checks inside the UNet are throttled: a short sampling may end between them
            images[name] = view.decode(latents).cpu()
    rows = [[images["before"][i], images["after"][i]] for i in range(len(prompts))]
    picture = grid(rows, prompts, ["before", "after"], cell=max(64, min(latent_size * 8, 256)))
    return save_image(picture, path.with_suffix(".preview.png"))


def load_preview(path: Path) -> Image.Image | None:
    preview = path.with_suffix(".preview.png")
    return Image.open(preview) if preview.exists() else None
