"""A1111 / Forge entry point: the "Ablate Concept" tab.

A1111 runs every ``scripts/*.py`` of an extension and ComfyUI imports the package's ``__init__.py``, so this one
repository is both a ComfyUI node pack and an A1111 extension; neither program reads the other's entry point.

``ablation_core`` is imported here, while A1111 has put this extension's folder first on ``sys.path`` (it takes it
away again after loading the script); the package loads its parts lazily, so this costs nothing at startup. torch
work, gradio and the core's methods are imported when the tab is built or used. The core needs torch and
safetensors, which A1111 ships, and not diffusers, so the extension installs nothing (no ``install.py``).
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path

from modules import script_callbacks

import ablation_core  # noqa: F401  (see the module docstring)

TAB_ID = "concept_ablation"
TAB_TITLE = "Ablate Concept"
# A1111 and Forge keep every control's first default in ui-config.json, keyed by tab and label, and give it back on
# the next start over the code's default. The controls whose default changed carry a new label, so that a tab opened
# before (saved "object", 512 px, 20 steps) starts at the new defaults; any default saved under these labels is kept.
LABELS = {"concept_type": "Concept type (auto: guessed)", "preview_size": "Preview size, px (0: by device)",
          "preview_steps": "Preview steps (0: by device)"}


# What the tab's events call ------------------------------------------------------------------------------------

def lora_dir() -> Path:
    """A1111's Lora folder: ``--lora-dir`` (added by the built-in Lora extension) or ``models/Lora``."""
    from modules import paths, shared

    folder = getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora")
    return Path(folder)


def is_forge() -> bool:
    """Forge main (and its forks that follow it) load ``shared.sd_model`` lazily through ``modules_forge``."""
    try:
        from modules import sd_models
    except ImportError:
        return False
    return hasattr(sd_models, "forge_model_reload")


def forge_model():
    """The checkpoint chosen at the top of the page, loaded the way Forge's own generations load it (on its main
    thread; a no-op when it is loaded already)."""
    from modules import sd_models
    from modules_forge import main_thread

    main_thread.run_and_wait_result(sd_models.forge_model_reload)
    return sd_models.model_data.get_sd_model()


def make_host():
    """The running program as the core's flows see it."""
    from modules import devices, shared

    from ablation_core.backends.a1111 import A1111Host
    from ablation_core.errors import AblationError

    sd_model = forge_model() if is_forge() else shared.sd_model
    if sd_model is None:
        raise AblationError("no checkpoint is loaded: choose one in the checkpoint list at the top of the page")
    info = getattr(sd_model, "sd_checkpoint_info", None)
    name = getattr(info, "name_for_extra", "") or getattr(info, "title", "") or ""
    return A1111Host(sd_model, shared.state, lora_dir(), devices.autocast, sys.modules.get("networks"), name)


def model_text() -> str:
    try:
        host = make_host()
        view = host.view()
    except Exception as err:  # shown in the tab instead of the model's name
        return f"<p>Loaded model: none usable ({html.escape(str(err))})</p>"
    from ablation_core.backends.a1111.flows import preview_cost_text, preview_defaults

    size, steps = preview_defaults(view)
    return (f"<p>Loaded model: <b>{html.escape(host.model_name or 'unnamed')}</b> ({view.family.title}). "
            f"Patches are saved into <code>{html.escape(str(host.lora_dir))}</code>. By default "
            f"{html.escape(preview_cost_text(view, size, steps))}; the progress bar counts it in the run.</p>")


def run(id_task: str, target: str, anchor: str, concept_type: str, method: str, preset: str, steps: float,
        seed: float, resolution: float, anchor_images: float, batch_size: float, storage: str, name: str,
        overwrite: bool, preview: bool, preview_size: float, preview_steps: float, robust_rounds: float = 0,
        gradient_checkpointing: bool = False):
    """The Ablate button (through A1111's ``wrap_gradio_gpu_call``: queue lock, ``shared.state``, progress)."""
    from ablation_core.backends.a1111 import TabRequest, run_request
    from ablation_core.errors import AblationCancelled, AblationError

    request = TabRequest(target or "", anchor or "", concept_type, method, preset, int(steps or 0), int(seed or 0),
                         int(resolution or 0), int(anchor_images or 0), int(batch_size or 0), storage, name or "",
                         bool(overwrite), bool(preview), int(preview_size or 0), int(preview_steps or 0),
                         int(robust_rounds or 0), bool(gradient_checkpointing))
    try:
        outcome = run_request(make_host(), request)
    except AblationCancelled as err:
        print(f"Concept Ablation: {err}")
        return None, *browser_updates(), f"<p>Interrupted: {html.escape(str(err))}.</p>"
    except AblationError as err:
        print(f"Concept Ablation: {err}")
        return None, *browser_updates(), f"<p class='error'>{html.escape(str(err))}</p>"
    stem = outcome.path.stem
    print(f"Concept Ablation: wrote {outcome.path} ({len(outcome.patch.deltas)} layers) in {outcome.seconds:.1f}s; "
          f"{outcome.summary}")
    image = str(outcome.preview) if outcome.preview else None
    message = (f"<p>Saved <code>{html.escape(str(outcome.path))}</code> in {outcome.seconds:.1f}s. "
               f"Use it in any prompt with <code>&lt;lora:{html.escape(stem)}:1&gt;</code>; the Lora tab lists it."
               f"</p><p>{html.escape(outcome.summary)}</p>")
    return image, *browser_updates(stem), message


def browser_rows(check_fit: bool = True) -> tuple[list[list[str]], list[str]]:
    from ablation_core.backends.a1111 import list_patches

    view = None
    if check_fit:
        try:
            view = make_host().view()
        except Exception as err:  # no model, or one this tool cannot edit: the list still shows the files
            print(f"Concept Ablation: cannot check patches against the loaded model: {err}")
    entries = list_patches(lora_dir(), view)
    return [entry.row() for entry in entries], [entry.name for entry in entries]


def browser_updates(selected: str | None = None) -> tuple[object, object]:
    import gradio as gr

    rows, names = browser_rows()
    return gr.update(value=rows or None), gr.update(choices=names, value=selected if selected in names else None)


def show_patch(name: str | None):
    """The browser's selection: its metadata as text and its before/after preview."""
    from ablation_core.backends.a1111 import describe, list_patches
    from ablation_core.backends.a1111.library import fit_text

    entry = next((e for e in list_patches(lora_dir(), None) if e.name == name), None)
    if entry is None:
        return "", None
    try:
        entry.fits = fit_text(entry, make_host().view())
    except Exception as err:  # shown in place of the fit
        entry.fits = f"? ({err})"
    return describe(entry), str(entry.preview) if entry.preview else None


def make_preview(id_task: str, name: str | None, size: float, steps: float, seed: float):
    """Draw a before/after preview for a patch made elsewhere (CLI, ComfyUI) on the loaded model."""
    from ablation_core.backends.a1111 import list_patches
    from ablation_core.backends.a1111.flows import preview_prompts, render_preview
    from ablation_core.errors import AblationError
    from ablation_core.patches.storage import load_patch

    entry = next((e for e in list_patches(lora_dir(), None) if e.name == name), None)
    if entry is None:
        return None, "<p>Choose a patch first.</p>"
    patch = load_patch(entry.path)
    targets, anchors = patch.listed("targets"), patch.listed("anchors")
    if not targets or not anchors:
        return None, "<p>This patch names no target and anchor to draw.</p>"
    kind = patch.metadata.get("ablation.kind", "object")
    concept_type = {"style": "style", "memorization": "memorized"}.get(kind, "object")
    try:
        path = render_preview(make_host(), patch, preview_prompts(targets[0], anchors[0], concept_type),
                              int(seed or 0), int(steps or 0), int(size or 0), entry.path)
    except AblationError as err:
        return None, f"<p class='error'>{html.escape(str(err))}</p>"
    return str(path), f"<p>Preview saved as <code>{html.escape(str(path))}</code>.</p>"


def measure_clip(id_task: str, name: str | None, clip_path: str, per_set: float, size: float, steps: float,
                 seed: float) -> tuple[str]:
    """CLIP figures for a patch on the loaded model: clip_accuracy, clip_score, neighbour KID (a CLIP folder needed);
    one HTML output, as A1111's call wrapper expects a sequence whose last item is HTML."""
    from ablation_core.backends.a1111 import list_patches
    from ablation_core.backends.a1111.clip_figures import measure_with_clip
    from ablation_core.errors import AblationError
    from ablation_core.patches.storage import load_patch

    entry = next((e for e in list_patches(lora_dir(), None) if e.name == name), None)
    if entry is None:
        return ("<p>Choose a patch first.</p>",)
    try:
        text = measure_with_clip(make_host(), load_patch(entry.path), clip_path or "", int(per_set or 8),
                                 int(seed or 0), int(steps or 20), int(size or 512))
    except AblationError as err:
        return (f"<p class='error'>{html.escape(str(err))}</p>",)
    return (f"<pre>{html.escape(text)}</pre>",)


def interrupt() -> None:
    from modules import shared

    shared.state.interrupt()


# The tab -------------------------------------------------------------------------------------------------------

def js_argument(gr) -> str:
    """The keyword for an event's JavaScript: ``_js`` in gradio 3 (A1111, reForge), ``js`` in gradio 4 (Forge)."""
    major = str(getattr(gr, "__version__", "3")).split(".")[0]
    return "js" if major.isdigit() and int(major) >= 4 else "_js"


def on_ui_tabs():
    import gradio as gr
    from modules.call_queue import wrap_gradio_gpu_call

    from ablation_core.backends.a1111 import COLUMNS, METHODS, ROBUST_HELP, STORAGE
    from ablation_core.methods.ablation.recipes import AUTO, CONCEPT_TYPE_HELP, CONCEPT_TYPES
    from ablation_core.methods.ablation.settings import PRESET_HELP, PRESET_NAMES

    rows, names = browser_rows(check_fit=False)
    start_js = {js_argument(gr): "concept_ablation_start"}
    with gr.Blocks(analytics_enabled=False) as tab:
        model_info = gr.HTML(value="<p>Loaded model: press Refresh to check.</p>")
        with gr.Row():
            with gr.Column(variant="panel"):
                target = gr.Textbox(label="Target: the concept to remove", placeholder="Van Gogh, Grumpy Cat, ...",
                                    elem_id=f"{TAB_ID}_target")
                anchor = gr.Textbox(label="Anchor: what it should become", placeholder="painting, cat, ...",
                                    elem_id=f"{TAB_ID}_anchor")
                with gr.Row():
                    concept_type = gr.Dropdown([AUTO, *CONCEPT_TYPES], value=AUTO, label=LABELS["concept_type"],
                                               info="'Van Gogh' -> 'painting' is a style; the result says which "
                                                    "type was picked; " + "; ".join(
                                                   f"{k}: {v}" for k, v in CONCEPT_TYPE_HELP.items()
                                                   if k in ("object", "instance", "style")))
                    method = gr.Radio(list(METHODS), value=METHODS[0], label="Method",
                                      info="trained: the paper's fine-tuning (minutes); closed form: seconds")
                with gr.Row():
                    preset = gr.Radio(list(PRESET_NAMES), value="default", label="Preset", info=PRESET_HELP)
                    steps = gr.Number(value=0, precision=0, label="Steps (0: the preset's)")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    robust_rounds = gr.Number(value=0, precision=0, label="Robust rounds (0: off)",
                                              info=ROBUST_HELP)
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        resolution = gr.Number(value=0, precision=0, label="Training resolution, px (0: the model's)")
                        anchor_images = gr.Number(value=0, precision=0, label="Anchor images (0: the preset's)")
                        batch_size = gr.Number(value=0, precision=0, label="Batch size (0: the preset's)")
                        checkpointing = gr.Checkbox(value=False, label="Gradient checkpointing",
                                                    info="trained method: less training memory for one more "
                                                         "forward pass of each block; the run says when it is needed")
                    storage = gr.Radio(list(STORAGE), value=STORAGE[0], label="File")
                    with gr.Row():
                        preview = gr.Checkbox(value=True, label="Draw a before/after preview",
                                              info="the Refresh button's line says what it costs on this device")
                        preview_size = gr.Number(value=0, precision=0, label=LABELS["preview_size"],
                                                 info="64 px on a CPU, 512 px on a GPU")
                        preview_steps = gr.Number(value=0, precision=0, label=LABELS["preview_steps"],
                                                  info="8 on a CPU, 20 on a GPU")
                with gr.Row():
                    name = gr.Textbox(label="Save as models/Lora/NAME.safetensors",
                                      placeholder="empty: ablate_<target>_to_<anchor>")
                    overwrite = gr.Checkbox(value=False, label="Replace an existing file")
                with gr.Row():
                    start = gr.Button("Ablate", variant="primary", elem_id=f"{TAB_ID}_start")
                    stop = gr.Button("Interrupt", elem_id=f"{TAB_ID}_interrupt")
            with gr.Column():
                dummy = gr.Textbox(visible=False)
                gr.HTML(elem_id=f"{TAB_ID}_status")  # A1111's progress bar goes above it
                gr.HTML(elem_id=f"{TAB_ID}_progress")  # the run's phase, loss and time left
                result_image = gr.Image(label="Before / after", type="filepath", interactive=False)
                result = gr.HTML(elem_id=f"{TAB_ID}_result")
        gr.HTML("<h3>Patches in the Lora folder made by this tool</h3>")
        with gr.Row():
            refresh = gr.Button("Refresh", elem_id=f"{TAB_ID}_refresh")
            chosen = gr.Dropdown(names, label="Patch", elem_id=f"{TAB_ID}_patch")
        table = gr.Dataframe(value=rows or None, headers=COLUMNS, interactive=False, wrap=True)
        with gr.Row():
            details = gr.Textbox(label="Metadata", lines=12, interactive=False)
            with gr.Column():
                chosen_preview = gr.Image(label="Before / after", type="filepath", interactive=False)
                draw = gr.Button("Draw a preview on the loaded model", elem_id=f"{TAB_ID}_draw")
                drawn = gr.HTML()
        with gr.Accordion("CLIP figures (clip_accuracy, clip_score, neighbour KID)", open=False):
            with gr.Row():
                clip_path = gr.Textbox(label="CLIP model folder", placeholder="a full CLIP model (transformers), "
                                       "e.g. models/clip-vit-large-patch14; clip_vision files are image towers only")
                clip_per_set = gr.Number(value=8, precision=0, label="Images per prompt set")
                measure = gr.Button("Measure with CLIP on the loaded model", elem_id=f"{TAB_ID}_measure")
            measured = gr.HTML()

        inputs = [dummy, target, anchor, concept_type, method, preset, steps, seed, resolution, anchor_images,
                  batch_size, storage, name, overwrite, preview, preview_size, preview_steps, robust_rounds,
                  checkpointing]
        start.click(fn=wrap_gradio_gpu_call(run, extra_outputs=[None, gr.update(), gr.update()]), **start_js,
                    inputs=inputs, outputs=[result_image, table, chosen, result])
        stop.click(fn=interrupt, inputs=[], outputs=[])
        refresh.click(fn=lambda: (model_text(), *browser_updates()), inputs=[], outputs=[model_info, table, chosen])
        chosen.change(fn=show_patch, inputs=[chosen], outputs=[details, chosen_preview])
        draw.click(fn=wrap_gradio_gpu_call(make_preview, extra_outputs=[None]), **start_js,
                   inputs=[dummy, chosen, preview_size, preview_steps, seed], outputs=[chosen_preview, drawn])
        measure.click(fn=wrap_gradio_gpu_call(measure_clip, extra_outputs=[]), **start_js,
                      inputs=[dummy, chosen, clip_path, clip_per_set, preview_size, preview_steps, seed],
                      outputs=[measured])
    print(f"Concept Ablation: '{TAB_TITLE}' tab added ({len(names)} patch(es) of this tool in {lora_dir()})")
    return [(tab, TAB_TITLE, TAB_ID)]


script_callbacks.on_ui_tabs(on_ui_tabs)
