"""Flux in the ComfyUI backend and nodes, on fakes shaped like ComfyUI's Flux MODEL and flux CLIP (the real
ComfyUI run is in the README's closing notes): the view sees the same layers and predictions as our own Flux view,
both methods run through the nodes' flows, training goes through blocks that add residuals in place, Cancel stops
the run, and the input model is never changed."""

from __future__ import annotations

import json
from dataclasses import replace

import comfy_fakes as fakes
import comfy_flux_fakes as flux_fakes
import pytest
import torch

from ablation_core import make_config
from ablation_core.backends import comfy as backend
from ablation_core.backends.comfy.closed_form import erase_concepts
from ablation_core.backends.flux import FluxModelView
from ablation_core.errors import AblationError
from ablation_core.methods.closed_form.settings import make_closed_form_config
from ablation_core.models.families import TOY_FLUX
from ablation_core.toy import flux as toy_flux

TINY = dict(steps=3, batch_size=2, anchor_images=2, sampler_steps=2, sample_batch_size=2, anchor_prompt_count=2,
            latent_size=16)


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    return fakes.install(tmp_path, monkeypatch)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def test_the_view_sees_flux_layers_and_predicts_as_our_own_flux_view(comfy):
    model, clip, transformer = flux_fakes.make_flux()
    view = backend.comfy_view(model, clip, latent_size=16)
    assert isinstance(view, backend.ComfyFluxView) and view.family.name == "flux" and view.guidance_input
    ours = FluxModelView(transformer, clip.encoders, TOY_FLUX, toy_flux.schedule(), default_latent_size=16)
    for group in ("kv", "attn", "embedding", "full"):
        mine, theirs = view.unet_layers(group), ours.unet_layers(group)
        assert [(layer.key, layer.rows) for layer in mine] == [(layer.key, layer.rows) for layer in theirs]
    prompts = ["a photo of a cat", "a painting of a dog in the style of van gogh"]
    cond, reference = view.encode(prompts).with_guidance(4.0), ours.encode(prompts).with_guidance(4.0)
    torch.testing.assert_close(cond.context, reference.context)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([900, 300])
    with torch.no_grad():
        torch.testing.assert_close(view.predict(x, t, cond), ours.predict(x, t, reference))
    assert view.token_ids("grumpy cat") == ours.token_ids("grumpy cat")
    with pytest.raises(AblationError, match="share no vocabulary"):
        view.encoder_ids(torch.zeros(1, 77, dtype=torch.long))


def test_the_schedule_is_comfyuis_model_sampling_flux_curve(comfy):
    model, clip, _ = flux_fakes.make_flux(shift=1.15)
    view = backend.comfy_view(model, clip)
    sampling = model.model.model_sampling
    t = torch.tensor([0, 499, 999])
    torch.testing.assert_close(view.schedule.sigmas(t).float(), sampling.sigmas[(t + 1) * 10 - 1])


def test_ablate_trains_through_in_place_residual_blocks_and_leaves_the_model_alone(comfy):
    model, clip, _ = flux_fakes.make_flux()
    before = _weights(model)
    config = make_config("grumpy cat", "cat", group="kv", **TINY)
    with torch.inference_mode():  # as ComfyUI runs nodes
        out_model, out_clip, patch, summary = backend.ablate_concept(model, clip, config)
    assert model.patches == {} and all(torch.equal(v, before[k]) for k, v in _weights(model).items())
    assert sorted(patch.deltas) == [f"lora_unet_double_blocks_{i}_txt_attn_qkv" for i in range(2)]
    width = toy_flux.TOY_FLUX_CONFIG.hidden_size
    for delta in patch.deltas.values():
        full = delta.full()
        assert full[:width].abs().max() == 0 and full[width:].abs().max() > 0  # K and V rows only
    assert set(out_model.patches) == {f"diffusion_model.double_blocks.{i}.txt_attn.qkv.weight" for i in range(2)}
    assert patch.metadata["modelspec.architecture"].startswith("flux") and "moved" in summary


def test_the_default_on_flux_trains_the_prompt_maps_keeps_neighbours_and_draws_at_the_models_guidance(comfy):
    """Flux's default: txt_in and vector_in with one preserved row a step (the neighbours' prompts held at the frozen
    prediction), trained at the guidance the distilled model draws with (not the SD presets' guidance 1)."""
    model, clip, _ = flux_fakes.make_flux()
    with torch.inference_mode():
        _, _, patch, _ = backend.ablate_concept(model, clip, make_config("grumpy cat", "cat", **TINY))
    assert sorted(patch.deltas) == ["lora_unet_txt_in", "lora_unet_vector_in_in_layer"]
    settings = json.loads(patch.metadata["ablation.settings"])
    assert settings["group"] == "embedding" and settings["preserved_rows"] == 1
    assert settings["guidance"] == backend.comfy_view(model, clip).default_guidance > 1


def test_the_closed_form_solves_txt_in_and_vector_in_in_comfyui(comfy):
    model, clip, _ = flux_fakes.make_flux()
    before = _weights(model)
    config = make_closed_form_config(["grumpy cat", "snoopy"], "cat", preserved_prompts=("a photo of a dog",))
    out_model, _, patch, summary = erase_concepts(model, clip, config)
    assert sorted(patch.deltas) == ["lora_unet_txt_in", "lora_unet_vector_in_in_layer"]
    assert set(out_model.patches) == {"diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"}
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())
    assert "erased 2 concept(s)" in summary


def test_cancel_stops_a_flux_run_and_leaves_no_hooks(comfy):
    model, clip, _ = flux_fakes.make_flux()
    comfy.interrupt_after = 5
    with pytest.raises(fakes.InterruptProcessingException):
        backend.ablate_concept(model, clip, make_config("grumpy cat", "cat", **TINY))
    assert model.patches == {}
    for module in model.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_a_flux_patch_applies_to_a_flux_model_and_not_to_an_sd_one(comfy):
    model, clip, _ = flux_fakes.make_flux()
    config = make_closed_form_config(["grumpy cat"], "cat")
    _, _, patch, _ = erase_concepts(model, clip, config)
    applied, _ = backend.apply_patches(model, clip, [(patch, 0.5)])
    assert set(applied.patches) == {"diffusion_model.txt_in.weight", "diffusion_model.vector_in.in_layer.weight"}
    with pytest.raises(Exception, match="(?i)flux|family|match"):
        backend.apply_patches(fakes.make_model(), fakes.make_clip(), [(patch, 1.0)])


def test_robust_rounds_on_comfyui_flux_say_what_is_not_available(comfy):
    model, clip, _ = flux_fakes.make_flux()
    config = replace(make_config("grumpy cat", "cat", **TINY), robust_rounds=1)
    with pytest.raises(AblationError, match="toy-flux"):
        backend.ablate_concept(model, clip, config)


def test_gradient_checkpointing_of_in_place_blocks_gives_the_same_patch(comfy):
    patches = []
    for checkpointing in (False, True):
        model, clip, _ = flux_fakes.make_flux()
        config = make_config("grumpy cat", "cat", gradient_checkpointing=checkpointing, **TINY)
        patches.append(backend.ablate_concept(model, clip, config)[2])
    for key, delta in patches[0].deltas.items():
        torch.testing.assert_close(patches[1].deltas[key].full(), delta.full(), rtol=1e-4, atol=1e-6)


def test_the_report_draws_flux_before_and_after_with_its_guidance(comfy):
    model, clip, _ = flux_fakes.make_flux()
    _, _, patch, _ = erase_concepts(model, clip, make_closed_form_config(["grumpy cat"], "cat"))
    grid = backend.render_report(model, clip, fakes.VAE(), patch, 1.0, ["grumpy cat", "a photo of a dog"], seed=0,
                                 steps=2, guidance=3.5, samples=1, image_size=16)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and torch.isfinite(grid).all()
    assert model.patches == {}


def test_the_toy_flux_world_held_by_comfyui_reads_the_toy_settings_and_fits(comfy):
    from ablation_core.methods.ablation.fits import run_estimate
    from ablation_core.methods.ablation.settings import resolve_for_view

    model, clip = flux_fakes.make_toy_flux_model_and_clip()
    view = backend.comfy_view(model, clip)
    assert view.family.name == "toy-flux" and view.default_latent_size == 16
    config = resolve_for_view(make_config("grumpy cat", "cat"), view)
    layers = view.layers(config.group)
    # the Flux activation formula, scaled to the toy's width and depth: well under a GiB (the SD formula said 23)
    assert run_estimate(view, config, layers).activations < 2**30


def _encodes_between_prompt_reports(comfy, clip) -> list[int]:
    """Prompts encoded by the CLIP between two of the node's "prompts" progress messages (the websocket events)."""
    encode = clip.encode_from_tokens

    def counted(*args, **kwargs):
        comfy.messages.append(("encode", None))
        return encode(*args, **kwargs)

    clip.encode_from_tokens = counted
    return comfy.messages


def _gaps(messages: list) -> list[int]:
    gaps, since = [], 0
    for event, data in messages:
        if event == "encode":
            since += 1
        elif event.endswith(".progress") and data.get("phase") == "prompts":
            gaps.append(since)
            since = 0
    return gaps


@pytest.mark.parametrize("method", ["closed form", "trained"])
def test_the_bar_moves_after_every_flux_prompt(comfy, method):
    """One T5-XXL prompt takes 20 to 50 s on a CPU in ComfyUI (it computes T5 in float32 whatever the file's
    dtype): reports every 8 prompts left the bar at 0 with no time left shown for minutes. Flux reports each prompt
    (a probe of the moment cache may come before a chunk's first)."""
    from ablation_core.methods.closed_form.embeddings import MOMENT_CACHE

    MOMENT_CACHE.clear()
    model, clip, _ = flux_fakes.make_flux()
    messages = _encodes_between_prompt_reports(comfy, clip)
    if method == "closed form":
        erase_concepts(model, clip, make_closed_form_config(["grumpy cat"], "cat", preserved_prompts=tuple(
            f"a photo of a {word}" for word in ("dog", "house", "tree", "car", "bird", "boat", "chair", "lamp",
                                                "horse", "river"))))
    else:
        backend.ablate_concept(model, clip, make_config("grumpy cat", "cat", **{**TINY, "anchor_prompt_count": 10}))
    gaps = _gaps(messages)
    assert sum(1 for event, _ in messages if event == "encode") >= 10
    assert max(gaps) <= 2, gaps


def test_training_a_model_loaded_in_inference_mode_copies_its_plain_parameters(comfy):
    """ComfyUI loads models under ``torch.inference_mode()``: on a CPU the QK norms' ``scale`` (a plain parameter,
    which ComfyUI's ops do not cast) stayed an inference tensor and the first backward failed ("Inference tensors
    cannot be saved for backward") in the real ComfyUI 0.3.64. The values are kept, the run trains."""
    with torch.inference_mode():  # as ComfyUI's loaders run
        model, clip, _ = flux_fakes.make_flux()
    before = _weights(model)
    assert model.model.diffusion_model.double_blocks[0].img_attn.norm.key_norm.scale.is_inference()
    with torch.inference_mode():
        _, _, patch, _ = backend.ablate_concept(model, clip, make_config("grumpy cat", "cat", **TINY))
    assert patch.deltas and model.patches == {}
    with torch.inference_mode():
        assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())


def test_a_trained_flux_run_encodes_each_prompt_once(comfy):
    """The held-out check encoded its prompts afresh for every batch, before and after (``uncached_text``): in the
    real ComfyUI on a CPU (20 s a T5 prompt) the check of a 2-step run took minutes with the bar still. Nothing a run
    trains reaches Flux's text encoders, so the Flux view keeps its cache there."""
    model, clip, _ = flux_fakes.make_flux()
    encode, seen = clip.encode_from_tokens, []

    def counted(tokens, *args, **kwargs):
        seen.append(tuple(t for t, *_ in tokens["t5xxl"][0]))
        return encode(tokens, *args, **kwargs)

    clip.encode_from_tokens = counted
    backend.ablate_concept(model, clip, make_config("grumpy cat", "cat", **TINY))
    assert seen and len(seen) == len(set(seen))


@pytest.mark.parametrize("method", ["closed form", "trained"])
def test_t5_tokenizer_options_do_not_change_what_the_nodes_encode(comfy, method):
    """ComfyUI's T5TokenizerOptions (min_length below the prompts' lengths) made each prompt's T5 sequence its own
    length: the trained node failed in the real ComfyUI ("Sizes of tensors must match"), and prompts encoded
    together were cut to the shortest. The view encodes at the tokenizer's own minimum length: the same patch."""
    from ablation_core.methods.closed_form.embeddings import MOMENT_CACHE

    patches = []
    for option in (None, 1):
        MOMENT_CACHE.clear()
        model, clip, _ = flux_fakes.make_flux()
        if option is not None:
            clip.set_tokenizer_option("t5xxl_min_length", option)
            clip.set_tokenizer_option("t5xxl_min_padding", 0)
        if method == "closed form":
            patches.append(erase_concepts(model, clip, make_closed_form_config(
                ["grumpy cat"], "cat", preserved_prompts=("a photo of a dog", "a tree")))[2])
        else:
            patches.append(backend.ablate_concept(model, clip, make_config("grumpy cat", "cat", **TINY))[2])
    assert sorted(patches[0].deltas) == sorted(patches[1].deltas)
    for key, delta in patches[0].deltas.items():
        torch.testing.assert_close(patches[1].deltas[key].full(), delta.full())


def test_the_erase_node_can_leave_out_the_builtin_bank(comfy):
    """On Flux each prompt is a T5-XXL pass (20-50 s on a CPU): with the bank off the node encodes only the pairs,
    the anchors and the user's own list, about 200 prompts fewer, and still erases."""
    from ablation_core.methods.closed_form.embeddings import MOMENT_CACHE
    from tests.test_nodes import _import_nodes

    erase = _import_nodes().NODE_CLASS_MAPPINGS["EraseConceptsClosedForm"]()
    counts = {}
    for bank in (True, False):
        MOMENT_CACHE.clear()
        model, clip, _ = flux_fakes.make_flux()
        messages = _encodes_between_prompt_reports(comfy, clip)
        start = len(messages)
        output = erase.erase(model, clip, "grumpy cat -> cat", "", "object", "least-squares", 0.5,
                             preserve="dog", builtin_bank=bank)
        counts[bank] = sum(1 for event, _ in messages[start:] if event == "encode")
        patch = output["result"][1]
        assert sorted(patch.deltas) == ["lora_unet_txt_in", "lora_unet_vector_in_in_layer"]
    assert counts[True] - counts[False] >= 190 and counts[False] <= 60, counts
