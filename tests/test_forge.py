"""The tab in Stable Diffusion WebUI Forge, against fakes shaped like Forge's model objects (CI has no Forge).

The fakes (``tests/forge_fakes.py``) keep what makes Forge different from A1111: a lazily loaded engine with no
``.model``, inference-tensor weights, ``Linear`` layers that are not ``nn.Linear``, in-place residual adds,
conditioning made under inference mode, LoRAs merged into the weights by its own loader, and gradio 4.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from ablation_core import load_patch
from ablation_core.backends.a1111 import A1111Host, TabRequest, list_patches, run_request
from ablation_core.backends.forge import ForgeModelView, copied_inference_weights, out_of_place_residuals
from ablation_core.errors import AblationError, UnsupportedModelError
from ablation_core.models.checkpointing import checkpointed
from ablation_core.models.view import Conditioning
from ablation_core.patches.patch import META
from tests import a1111_fakes
from tests import forge_fakes as fakes
from tests.test_a1111 import build_tab, form, load_script, press

PATCH_NAME = "ablate_Van_Gogh_to_painting"


@pytest.fixture
def forge(tmp_path, monkeypatch):
    """A fake Forge with a tiny SD1 checkpoint chosen but not loaded yet, and our script loaded."""
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    env = fakes.install(monkeypatch, lora_dir)
    env.lora_dir = lora_dir
    env.script = load_script(monkeypatch)
    return env


def loaded_engine(env) -> fakes.ForgeDiffusionEngine:
    env.script.make_host()
    return env.model_data.sd_model


def assert_unchanged(engine: fakes.ForgeDiffusionEngine, before: dict[str, torch.Tensor]) -> None:
    """The same parameter objects, still inference tensors, with the same values, and no hook left behind."""
    after = fakes.unet_weights(engine)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] and after[k].is_inference() for k in before)
    unet = engine.forge_objects.unet.model.diffusion_model
    assert a1111_fakes.hooks_left(unet) == 0


def test_the_fake_refuses_backward_as_forge_does():
    """Without the backend's hooks, a pass with gradients through Forge's UNet fails twice over."""
    engine = fakes.build_engine(fakes.MemoryManagement())
    unet = engine.forge_objects.unet.model.diffusion_model
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 64)
    delta = torch.zeros(1, requires_grad=True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensors"):
        (unet(x + delta, t, context=context) ** 2).mean().backward()
    with copied_inference_weights(unet), pytest.raises(RuntimeError, match="inplace operation"):
        (unet(x + delta, t, context=context) ** 2).mean().backward()
    with copied_inference_weights(unet), out_of_place_residuals(ForgeModelView(engine).transformer_blocks()):
        (unet(x + delta, t, context=context) ** 2).mean().backward()
    assert delta.grad is not None and torch.isfinite(delta.grad).all()
    assert a1111_fakes.hooks_left(unet) == 0 and all(p.is_inference() for p in unet.parameters())
    # gradient checkpointing recomputes the in-place blocks from their unchanged input: the same gradient
    plain = delta.grad.clone()
    delta.grad = None
    blocks = ForgeModelView(engine).transformer_blocks()
    with copied_inference_weights(unet), out_of_place_residuals(blocks), checkpointed(blocks) as count:
        (unet(x + delta, t, context=context) ** 2).mean().backward()
    assert count == len(blocks) > 0 and torch.allclose(delta.grad, plain, rtol=1e-5, atol=1e-7)
    assert a1111_fakes.hooks_left(unet) == 0 and all("forward" not in vars(b) for b in blocks)


@pytest.mark.parametrize("method", ["trained", "closed form"])
def test_ablate_button_in_forge_writes_a_patch_and_leaves_the_model_as_it_was(forge, method):
    _, buttons = build_tab(forge)
    assert forge.shared.sd_model is None, "Forge loads the checkpoint lazily"
    assert buttons["Ablate"].events["click"]["js"] == "concept_ablation_start"  # gradio 4: js=, not _js=
    engine = loaded_engine(forge)
    assert "forge_model_reload" in forge.main_thread.calls
    before = fakes.unet_weights(engine)
    image, table, chosen, message = press(buttons["Ablate"], form(method))
    path = forge.lora_dir / f"{PATCH_NAME}.safetensors"
    assert path.exists(), message
    patch = load_patch(path)
    unet = engine.forge_objects.unet.model.diffusion_model
    names = {name.replace(".", "_") for name, _ in unet.named_modules()}
    assert patch.deltas and all(k.startswith("lora_unet_") and "attn2_to_" in k for k in patch.deltas)
    assert all(k.removeprefix("lora_unet_") in names for k in patch.deltas)  # Forge's kohya key map finds them
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    # the LoRA browser's rule (sd_forge_lora/network.py) reads these to tell SD1 from SDXL
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert patch.metadata[META + "base_model_name"] == "forge_sd1" and patch.metadata[META + "made_in"] == "Forge tab"
    assert metadata["ss_output_name"] == PATCH_NAME
    assert image and table["value"][0][0] == PATCH_NAME and chosen["value"] == PATCH_NAME
    texts = " | ".join(forge.state.texts)
    assert "loss" in texts if method == "trained" else "Solving" in texts
    assert_unchanged(engine, before)


def test_an_existing_name_names_the_tabs_replace_box(forge):
    _, buttons = build_tab(forge)
    press(buttons["Ablate"], form("closed form", **{"Draw a before/after preview": False}))
    *_, message = press(buttons["Ablate"], form("closed form", **{"Draw a before/after preview": False}))
    assert "tick &#x27;Replace an existing file&#x27;" in message and "--overwrite" not in message
    *_, message = press(buttons["Ablate"], form("closed form", **{"Draw a before/after preview": False,
                                                                  "Replace an existing file": True}))
    assert "Saved" in message


def test_interrupt_during_training_in_forge_writes_nothing_and_changes_nothing(forge):
    forge.state.interrupt_on = "Training"
    _, buttons = build_tab(forge)
    engine = loaded_engine(forge)
    before = fakes.unet_weights(engine)
    *_, message = press(buttons["Ablate"], form("trained"))
    assert "Interrupted" in message and not list(forge.lora_dir.iterdir())
    assert_unchanged(engine, before)


def test_a_forge_lora_of_the_last_generation_is_not_trained_on(tmp_path, monkeypatch):
    """Forge merges the last generation's LoRA into the weights; the run loads the LoRA-free patcher first, which
    puts the checkpoint's own weights back, and the patch fits the checkpoint."""
    memory = fakes.install_memory(monkeypatch)
    engine = fakes.build_engine(memory)
    clean = {k: v.clone() for k, v in fakes.unet_weights(engine).items()}
    fakes.merge_lora(engine)
    key = next(k for k in clean if k.endswith("attn2.to_k.weight"))
    assert not torch.equal(fakes.unet_weights(engine)[key], clean[key])
    view = ForgeModelView(engine)
    layer = next(layer for layer in view.unet_layers("kv") if layer.key.endswith("attn2_to_k"))
    assert torch.equal(layer.weight, clean[key]), "layers report the checkpoint's weights while a LoRA is merged"
    host = A1111Host(engine, a1111_fakes.FakeState(), tmp_path)
    outcome = run_request(host, TabRequest("Van Gogh", "painting", "style", "closed form", preview=False))
    weights = fakes.unet_weights(engine)
    assert all(torch.equal(weights[k], clean[k]) for k in clean)
    assert list_patches(tmp_path, ForgeModelView(engine))[0].fits == "yes"
    assert outcome.path.exists()


def test_forge_sdxl_conditioning_and_a_unet_moved_away_by_the_text_encoder(monkeypatch):
    memory = fakes.install_memory(monkeypatch)
    memory.low_vram = True  # loading the text encoder unloads the UNet
    engine = fakes.build_engine(memory, "sdxl")
    view = ForgeModelView(engine)
    assert view.family.name == "sdxl" and len(view.token_ids("a cat")) == 2
    cond = view.encode(["a cat", "a dog"])
    assert not cond.context.is_inference() and not cond.extra["y"].is_inference()
    assert engine.conditioning_sizes[-1] == (1024, 1024)
    out = view.predict(torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), cond)
    assert out.shape == (2, 4, 8, 8) and memory.current_loaded_models[0].model is view.patcher
    assert isinstance(cond, Conditioning)


@pytest.mark.parametrize("storage", ["nf4", "gguf"])
def test_a_quantized_forge_unet_is_refused_by_name(storage):
    engine = fakes.build_engine(fakes.MemoryManagement(), storage_dtype=storage)
    with pytest.raises(UnsupportedModelError, match=f"quantized \\({storage}\\)"):
        ForgeModelView(engine)


def test_a_flux_model_in_forge_is_told_where_flux_patches_are_made():
    engine = fakes.build_engine(fakes.MemoryManagement())
    engine.forge_objects.unet.model.diffusion_model.double_blocks = torch.nn.ModuleList()  # Forge's Flux has these
    with pytest.raises(UnsupportedModelError, match="is Flux.*command line.*ComfyUI"):
        ForgeModelView(engine)


def test_robust_rounds_in_forge_get_a_clear_message(tmp_path, monkeypatch):
    engine = fakes.build_engine(fakes.install_memory(monkeypatch))
    before = fakes.unet_weights(engine)
    host = A1111Host(engine, a1111_fakes.FakeState(), tmp_path)
    with pytest.raises(AblationError, match="Robust rounds to 0"):
        run_request(host, TabRequest("Van Gogh", "painting", "style", "closed form", robust_rounds=1))
    assert_unchanged(engine, before)


def test_gradient_checkpointing_in_forge_trains_through_its_in_place_blocks(forge, monkeypatch):
    """Forge disables gradient checkpointing in its UNet; the tab's box checkpoints the blocks itself, around the
    out-of-place residuals that make Forge's blocks trainable at all."""
    from ablation_core.models import checkpointing, memory

    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    _, buttons = build_tab(forge)
    engine = loaded_engine(forge)
    before = fakes.unet_weights(engine)
    *_, message = press(buttons["Ablate"], form("trained", **{"Gradient checkpointing": True}))
    assert (forge.lora_dir / f"{PATCH_NAME}.safetensors").exists(), message
    assert calls, "no block was checkpointed"
    assert_unchanged(engine, before)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    *_, message = press(buttons["Ablate"], form("trained", **{"Replace an existing file": True}))
    assert "nothing was started" in message and "--unet-in-fp16" in message and "--dtype" not in message
