"""The A1111 entry point (``scripts/concept_ablation.py``) and the a1111 backend, against fakes of A1111 (CI has none).

The script is loaded the way A1111 loads an extension's scripts (by file, with the extension's folder first on
``sys.path``), builds its tab with a recording fake gradio, and its events are called as gradio would call them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ablation_core import AblationPatch, LayerDelta, load_patch
from ablation_core.backends.a1111 import A1111Host, A1111ModelView, TabRequest, list_patches, run_request
from ablation_core.errors import AblationCancelled, AblationError
from ablation_core.models.configs import unet_config
from ablation_core.models.layers import kohya_key, select_unet_modules
from ablation_core.models.ldm_keys import UNetLayout, unet_module_to_ldm
from ablation_core.patches.patch import META
from tests import a1111_fakes as fakes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "concept_ablation.py"
# Tiny settings: two training steps on two anchor images of 32 px (the fake UNet never downsamples).
# the labels of the controls whose default changed (the script's LABELS; see there why they are new)
CONCEPT_TYPE, PREVIEW_SIZE, PREVIEW_STEPS = ("Concept type (auto: guessed)", "Preview size, px (0: by device)",
                                            "Preview steps (0: by device)")
TINY = {"steps": 2, "anchor_images": 2, "batch_size": 1, "resolution": 32, "preview_size": 32, "preview_steps": 2}


def load_script(monkeypatch) -> types.ModuleType:
    """``scripts/concept_ablation.py`` as A1111's ``script_loading.load_module`` runs it."""
    monkeypatch.syspath_prepend(str(REPO))
    spec = importlib.util.spec_from_file_location("concept_ablation.py", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def a1111(tmp_path, monkeypatch):
    """A fake A1111 with a tiny SD1 model loaded, the Lora extension present, and our script loaded."""
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    env = fakes.install(monkeypatch, lora_dir, fakes.FakeSDModel("sd1"), networks=fakes.FakeNetworks())
    env.lora_dir = lora_dir
    env.script = load_script(monkeypatch)
    return env


def build_tab(env) -> tuple[object, dict[str, fakes.Component]]:
    """Call the registered ``on_ui_tabs`` callback; return the tab and its buttons by label."""
    assert len(env.callbacks) == 1, "the script registers exactly one tab callback"
    [(tab, title, tab_id)] = env.callbacks[0]()
    assert (title, tab_id) == ("Ablate Concept", "concept_ablation")
    buttons = {c.args[0]: c for c in fakes.Component.created if c.kind == "Button"}
    return tab, buttons


def press(button: fakes.Component, values: dict[str, object]) -> tuple:
    """Call a button's event with values for its inputs, by label (the hidden task-id box gets a task id)."""
    event = button.events["click"]
    args = []
    for component in event["inputs"]:
        label = component.kwargs.get("label")
        if label in values:
            args.append(values[label])
        elif component.kind == "Textbox" and component.kwargs.get("visible") is False:
            args.append("task(test)")
        else:  # what gradio sends for an untouched control
            args.append(component.kwargs.get("value", "" if component.kind == "Textbox" else None))
    return event["fn"](*args)


def form(method: str = "trained", **overrides) -> dict[str, object]:
    values = {"Target: the concept to remove": "Van Gogh", "Anchor: what it should become": "painting",
              CONCEPT_TYPE: "style", "Method": method, "Preset": "fast", "Steps (0: the preset's)": TINY["steps"],
              "Training resolution, px (0: the model's)": TINY["resolution"],
              "Anchor images (0: the preset's)": TINY["anchor_images"],
              "Batch size (0: the preset's)": TINY["batch_size"], PREVIEW_SIZE: TINY["preview_size"],
              PREVIEW_STEPS: TINY["preview_steps"]}
    values.update(overrides)
    return values


# The entry point ---------------------------------------------------------------------------------------------

def test_tab_builds_with_every_control(a1111):
    tab, buttons = build_tab(a1111)
    labels = {c.kwargs.get("label") for c in fakes.Component.created}
    for label in ("Target: the concept to remove", "Anchor: what it should become", CONCEPT_TYPE, "Method",
                  "Preset", "Steps (0: the preset's)", "Seed"):
        assert label in labels
    methods = next(c for c in fakes.Component.created if c.kwargs.get("label") == "Method").args[0]
    assert methods == ["trained", "closed form"]
    assert {"Ablate", "Interrupt", "Refresh"} <= set(buttons)
    # the Ablate button runs through A1111's queue with its progress script
    assert buttons["Ablate"].events["click"]["_js"] == "concept_ablation_start"
    js = (REPO / "javascript" / "concept_ablation.js").read_text()
    assert "function concept_ablation_start" in js and "requestProgress" in js


@pytest.mark.parametrize("method", ["trained", "closed form"])
def test_ablate_button_writes_a_patch_the_lora_extension_lists(a1111, method):
    model = a1111.shared.sd_model
    before = fakes.model_weights(model)
    _, buttons = build_tab(a1111)
    image, table, chosen, message = press(buttons["Ablate"], form(method))
    path = a1111.lora_dir / "ablate_Van_Gogh_to_painting.safetensors"
    assert path.exists(), message
    assert "&lt;lora:ablate_Van_Gogh_to_painting:1&gt;" in message
    patch = load_patch(path)
    assert patch.deltas and all(k.startswith("lora_unet_") and "attn2_to_" in k for k in patch.deltas)
    assert patch.metadata[META + "made_in"] == "A1111 tab"
    assert patch.metadata[META + "base_model_name"] == "tiny_sd1"
    card = json.loads(path.with_suffix(".json").read_text())
    assert "Van Gogh" in card["description"] and card["sd version"] == "SD1"
    assert image == str(path.with_suffix(".preview.png")) and Path(image).exists()
    assert table["value"][0][0] == path.stem and chosen["value"] == path.stem
    assert a1111.networks.refreshed == 1
    texts = " | ".join(a1111.state.texts)
    assert "loss" in texts if method == "trained" else "Solving" in texts
    assert " left" in texts or method == "closed form"
    after = fakes.model_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and fakes.hooks_left(model) == 0


@pytest.mark.parametrize(("method", "phase"), [("trained", "Sampling anchor images"), ("trained", "Training"),
                                               ("closed form", "Drawing the before/after preview")])
def test_interrupt_leaves_the_model_bit_identical(a1111, method, phase):
    a1111.state.interrupt_on = phase
    model = a1111.shared.sd_model
    before = fakes.model_weights(model)
    _, buttons = build_tab(a1111)
    *_, message = press(buttons["Ablate"], form(method))
    after = fakes.model_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and fakes.hooks_left(model) == 0
    assert any(phase in text for text in a1111.state.texts)
    patch_file = a1111.lora_dir / "ablate_Van_Gogh_to_painting.safetensors"
    if phase.startswith("Drawing"):  # the patch was saved before the preview began
        assert patch_file.exists() and "preview was interrupted" in message
    else:
        assert not patch_file.exists() and "Interrupted" in message
        assert not list(a1111.lora_dir.iterdir())


def test_interrupt_button_sets_the_state(a1111):
    _, buttons = build_tab(a1111)
    buttons["Interrupt"].events["click"]["fn"]()
    assert a1111.state.interrupted


def test_bad_input_and_no_model_give_a_message_not_a_traceback(a1111):
    _, buttons = build_tab(a1111)
    *_, message = press(buttons["Ablate"], form(**{"Anchor: what it should become": "Van Gogh"}))
    assert "class='error'" in message and "Traceback" not in message
    a1111.shared.sd_model = None
    *_, message = press(buttons["Ablate"], form())
    assert "no checkpoint is loaded" in message


def test_a_lora_of_the_last_generation_is_set_aside_and_kept(a1111):
    """A1111 leaves the last generation's LoRA added into the weights; the run sees the checkpoint's own weights,
    and the Lora extension's list of active LoRAs is the same afterwards."""
    model = a1111.shared.sd_model
    clean = fakes.model_weights(model)
    kv = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    fakes.merge_lora(a1111.networks, kv)
    active = list(a1111.networks.loaded_networks)
    host = A1111Host(model, a1111.state, a1111.lora_dir, networks=a1111.networks)
    request = TabRequest("Van Gogh", "painting", "style", "closed form", preview_size=32, preview_steps=2)
    outcome = run_request(host, request)  # the preview runs the UNet, where A1111 would restore the weights
    assert a1111.networks.loaded_networks == active
    rows = list_patches(a1111.lora_dir, A1111ModelView(model))
    assert rows[0].fits == "yes"  # the fingerprint is the checkpoint's own weights
    weights = fakes.model_weights(model)
    assert all(torch.equal(clean[k], weights[k]) for k in clean), "the run trained on the unmerged weights"
    assert outcome.path.exists()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_backend_reads_sd1_and_sdxl_objects(tmp_path, family):
    """SDXL's conditioning is a dict (context and pooled ``vector``); its two embedders both tokenize."""
    model = fakes.FakeSDModel(family)
    view = A1111ModelView(model)
    assert view.family.name == family
    cond = view.encode(["a cat", "a dog"])
    assert cond.context.shape[0] == 2 and (("y" in cond.extra) == (family == "sdxl"))
    assert len(view.token_ids("Van Gogh")) == (2 if family == "sdxl" else 1)
    host = A1111Host(model, fakes.FakeState(), tmp_path)
    outcome = run_request(host, TabRequest("Van Gogh", "painting", "style", "closed form", storage="exact (.diff)",
                                           preview=False))
    with safe_open(str(outcome.path), framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.endswith(".diff") for k in keys)
    assert all(fakes.a1111_lora_target(model, k.partition(".")[0]) is not None for k in keys)


# Built-in Lora compatibility ---------------------------------------------------------------------------------

@functools.cache
def ldm_model(family: str) -> tuple[nn.Module, list[tuple[str, tuple[int, ...]]]]:
    """An object shaped like A1111's ``sd_model`` whose ``model.diffusion_model`` has the module names of the real
    LDM UNet of ``family`` (mapped from the real diffusers layout, on the meta device), and those modules' weight
    shapes by LDM name. These names were compared once with A1111's own ``ldm``/``sgm`` UNetModel built from its
    configs (v1-inference, v2-inference, sd_xl_base): the linear and conv modules are the same sets (282, 282, 794)."""
    from diffusers import UNet2DConditionModel

    config = unet_config(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    layout = UNetLayout.from_config(config)
    layers = [(unet_module_to_ldm(name, layout), tuple(module.weight.shape))
              for name, module in select_unet_modules(unet.named_modules(), "full")]
    root = nn.Module()
    for name, _ in layers:
        parent = root
        for part in ("model.diffusion_model." + name).split("."):
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
    root.is_sdxl = family == "sdxl"
    root.cond_stage_model = nn.Module()
    root.conditioner = types.SimpleNamespace(embedders=[])
    return root, layers


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("group", ["kv", "attn", "full"])
@pytest.mark.parametrize("storage", ["lora", "diff"])
def test_lora_extension_finds_a_module_for_every_key(tmp_path, family, group, storage):
    """Every tensor key of our patch files, for every layer a group can change in the real SD1/SD2/SDXL UNets,
    finds its module by A1111's rule (no "didn't match keys"). Tensors are 1x1 stand-ins: the rule reads names."""
    model, layers = ldm_model(family)
    names = {name for name, _ in select_unet_modules(((n, nn.Linear(1, 1)) for n, _ in layers), group)}
    if group == "full":
        names = {name for name, _ in layers}
    assert names
    one = torch.ones(1, 1)
    delta = LayerDelta(diff=one) if storage == "diff" else LayerDelta(up=one, down=one, alpha=1.0)
    patch = AblationPatch({kohya_key("lora_unet_", n): delta for n in names}, {META + "method": "test"})
    path = patch.save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    assert len({k.partition(".")[0] for k in keys}) == len(names)
    unmatched = [k for k in keys if fakes.a1111_lora_target(model, k.partition(".")[0]) is None]
    assert not unmatched


def test_kv_layers_of_the_real_unets_are_the_known_counts():
    """The K/V layers the rule was checked on are the real ones: 32 (SD1/SD2) and 140 (SDXL) projections."""
    counts = {}
    for family in ("sd1", "sd2", "sdxl"):
        _, layers = ldm_model(family)
        counts[family] = sum(1 for name, _ in layers if name.endswith(("attn2.to_k", "attn2.to_v")))
    assert counts == {"sd1": 32, "sd2": 32, "sdxl": 140}


# The patch browser -------------------------------------------------------------------------------------------

def test_browser_lists_our_patches_with_fit_and_preview(a1111):
    _, buttons = build_tab(a1111)
    press(buttons["Ablate"], form("closed form"))
    foreign = a1111.lora_dir / "sub" / "someone_elses_lora.safetensors"
    foreign.parent.mkdir()
    AblationPatch({"lora_unet_x": LayerDelta(diff=torch.ones(1, 1))}, {}).save(foreign)
    foreign.write_bytes(foreign.read_bytes())  # still a valid file, just without our metadata
    (a1111.lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
    rows, names = a1111.script.browser_rows()
    assert names == ["ablate_Van_Gogh_to_painting"]
    assert rows[0][1:4] == ["Van Gogh", "painting", "closed-form"] and rows[0][5] == "sd1"
    assert rows[0][6] == "yes"
    details, preview = a1111.script.show_patch("ablate_Van_Gogh_to_painting")
    assert "<lora:ablate_Van_Gogh_to_painting:1>" in details and "fits the loaded model: yes" in details
    assert preview and Path(preview).exists()
    a1111.shared.sd_model = fakes.FakeSDModel("sd1", seed=5)  # another checkpoint of the same family
    rows, _ = a1111.script.browser_rows()
    assert rows[0][6] == "no: other base weights"
    a1111.shared.sd_model = fakes.FakeSDModel("sdxl")
    rows, _ = a1111.script.browser_rows()
    assert rows[0][6].startswith("no: made for sd1")


def test_draw_preview_for_a_patch_made_elsewhere(a1111):
    host = A1111Host(a1111.shared.sd_model, a1111.state, a1111.lora_dir)
    run_request(host, TabRequest("Van Gogh", "painting", "style", "closed form", preview=False))
    _, buttons = build_tab(a1111)
    image, message = press(buttons["Draw a preview on the loaded model"],
                           {"Patch": "ablate_Van_Gogh_to_painting", PREVIEW_SIZE: 32, PREVIEW_STEPS: 2})
    assert image and Path(image).exists() and "Preview saved" in message


def test_cancelled_preview_raises_cancelled(tmp_path):
    model = fakes.FakeSDModel("sd1")
    state = fakes.FakeState(interrupt_on="Drawing")
    host = A1111Host(model, state, tmp_path)
    patch = run_request(A1111Host(model, fakes.FakeState(), tmp_path),
                        TabRequest("Van Gogh", "painting", "style", "closed form", preview=False)).patch
    from ablation_core.backends.a1111.flows import render_preview

    with pytest.raises(AblationCancelled):
        render_preview(host, patch, ["a cat"], 0, 2, 32, tmp_path / "x.safetensors")
    assert fakes.hooks_left(model) == 0


# ComfyUI's entry point is untouched by the A1111 one ---------------------------------------------------------

def test_comfy_entry_and_core_import_without_gradio_or_a1111():
    """ComfyUI imports the package's ``__init__.py`` (and ``nodes``); neither may need gradio or A1111's modules."""
    code = (
        "import importlib.abc, importlib.util, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('gradio', 'modules', 'networks', 'scripts'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"spec = importlib.util.spec_from_file_location('concept_ablation_pack', {str(REPO / '__init__.py')!r},\n"
        f"    submodule_search_locations=[{str(REPO)!r}])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module\n"
        "spec.loader.exec_module(module)\n"
        "assert module.NODE_CLASS_MAPPINGS\n"
        "import ablation_core.backends.a1111\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_robust_rounds_run_through_the_tab_and_leave_the_model_as_it_was(a1111, monkeypatch):
    """The robust option hooks A1111's token embedding (inside its textual-inversion wrapper) to attack the patch,
    erases what the attack found, and records the rounds; the loaded model is untouched afterwards. (The adversary
    gets a tiny budget here; the tab uses the full one.)"""
    from functools import partial

    from ablation_core.backends.a1111 import flows
    from ablation_core.methods.robust import rounds

    tiny = rounds.AdversaryBudget(images=2, inversion_steps=3, inversion_batch=2, search_images=2,
                                  search_iterations=1, search_candidates=4, top_k=8)
    monkeypatch.setattr(flows, "robust_erase_closed_form", partial(rounds.robust_erase_closed_form, budget=tiny))
    model = a1111.shared.sd_model
    before = fakes.model_weights(model)
    _, buttons = build_tab(a1111)
    *_, message = press(buttons["Ablate"], form("closed form", **{"Robust rounds (0: off)": 1}))
    path = a1111.lora_dir / "ablate_Van_Gogh_to_painting.safetensors"
    assert path.exists(), message
    robust = json.loads(load_patch(path).metadata[META + "robust"])
    assert robust["rounds"] == 1 and robust["found"]
    after = fakes.model_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and fakes.hooks_left(model) == 0


def test_a_text_encoder_returning_nan_gets_a_clear_message_and_writes_nothing(a1111, monkeypatch):
    """A1111's emphasis rescaling divides by the mean of the encoding; a text encoder whose outputs average to zero
    (a random-weight checkpoint) gives NaN there. The run stops with a message instead of a NaN loss or solve."""
    model = a1111.shared.sd_model
    encode = model.get_learned_conditioning

    def nan_for_hats(prompts):
        out = encode(prompts)
        rows = torch.tensor(["hat" in p.lower() for p in prompts])
        return torch.where(rows.view(-1, 1, 1), torch.full_like(out, float("nan")), out)

    monkeypatch.setattr(model, "get_learned_conditioning", nan_for_hats)
    _, buttons = build_tab(a1111)
    for method in ("closed form", "trained"):
        *_, message = press(buttons["Ablate"], form(method, **{"Target: the concept to remove": "Hat",
                                                               "Anchor: what it should become": "cap"}))
        assert "NaN or infinite" in message and "Emphasis mode" in message, message
        assert not list(a1111.lora_dir.glob("*.safetensors"))


def test_a_run_that_cannot_fit_names_the_tabs_own_controls(a1111, monkeypatch):
    """A memory hint used to name the command line's flags (--gradient-checkpointing, --batch-size, --latent-size),
    which a tab user cannot give; it names the tab's controls and the web UI's own start flag instead."""
    from ablation_core.models import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    model = a1111.shared.sd_model
    before = fakes.model_weights(model)
    _, buttons = build_tab(a1111)
    *_, message = press(buttons["Ablate"], form(**{"Batch size (0: the preset's)": 2}))
    assert "nothing was started" in message and "Traceback" not in message
    assert "Advanced &gt; Batch size, now 2" in message and "--no-half" in message, message
    assert "--batch-size" not in message and "--dtype" not in message and "--lora-rank" not in message
    assert not list(a1111.lora_dir.iterdir()) and fakes.hooks_left(model) == 0
    after = fakes.model_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # at SD1.5's size every hint applies: each names a control of the tab
    needed = memory.estimate("sd1", 64, 5, torch.float32, 0)
    with pytest.raises(AblationError) as raised:
        memory.check_fits(needed, "cpu", 5, 64, torch.float32, False, A1111ModelView.setting_names)
    message = str(raised.value)
    for named in ("Advanced > Gradient checkpointing box", "Batch size, now 5", "Training resolution (now 512 px)"):
        assert named in message, message
    assert "--" not in message.replace("--no-half", ""), message


def test_the_gradient_checkpointing_box_recomputes_the_blocks_and_writes_the_patch(a1111, monkeypatch):
    from ablation_core.models import checkpointing

    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    model = a1111.shared.sd_model
    before = fakes.model_weights(model)
    _, buttons = build_tab(a1111)
    *_, message = press(buttons["Ablate"], form(**{"Gradient checkpointing": True}))
    assert (a1111.lora_dir / "ablate_Van_Gogh_to_painting.safetensors").exists(), message
    assert calls, "no block was checkpointed"
    after = fakes.model_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and fakes.hooks_left(model) == 0
    assert all("forward" not in vars(block) for block in A1111ModelView(model).transformer_blocks())
