"""Flux: the transformer against diffusers' own, the flow schedule and sampler, layer groups over the fused QKV,
both methods on a random toy-flux-shaped model, and loading real Flux files (single file, diffusers folder, text
encoders from their own files), all on small random weights built here."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import prediction_change
from safetensors.torch import save_file

from ablation_core import ablate, make_config
from ablation_core.backends.flux import FluxModelView
from ablation_core.backends.flux_loading import FluxTextSources, flux_schedule, load_flux_view
from ablation_core.backends.loading import is_flux, load_model
from ablation_core.errors import UnsupportedModelError
from ablation_core.methods.closed_form.settings import make_closed_form_config
from ablation_core.methods.closed_form.solve import erase_closed_form
from ablation_core.models.families import TOY_FLUX
from ablation_core.models.flux.files import build_flux_transformer, flux_transformer_state
from ablation_core.models.sampling import sample_dpmpp_2m
from ablation_core.models.schedules import FlowSchedule
from ablation_core.patches.apply import apply_patch
from ablation_core.toy import flux as toy_flux

TINY = dict(steps=4, batch_size=2, anchor_images=4, sampler_steps=2, sample_batch_size=4, anchor_prompt_count=4)


@pytest.fixture(scope="module")
def flux_view() -> FluxModelView:
    """The toy-flux architecture with random weights (wiring, not quality)."""
    transformer, encoders = toy_flux.build_toy_flux(seed=3)
    return FluxModelView(transformer, encoders, TOY_FLUX, toy_flux.schedule(), default_latent_size=16, guidance=4.0)


def _weights(view: FluxModelView) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in view.transformer.state_dict().items()}


def _diffusers_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=128, num_attention_heads=1, joint_attention_dim=48,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.05)
    return model.eval()


def test_the_transformer_matches_diffusers_flux_on_converted_weights():
    reference = _diffusers_flux()
    ours = build_flux_transformer(flux_transformer_state(dict(reference.state_dict())), None, torch.float32).eval()
    x, context, pooled = torch.randn(2, 16, 8, 8), torch.randn(2, 5, 48), torch.randn(2, 32)
    sigma, guidance = torch.tensor([0.3, 0.8]), torch.tensor([3.5, 2.0])
    with torch.no_grad():
        mine = ours(x, sigma, context, pooled, guidance)
        image_ids = ours.position_ids(1, 8, 8, 5, x.device)[0, 5:]
        packed = reference(hidden_states=ours.patchify(x), encoder_hidden_states=context, pooled_projections=pooled,
                           timestep=sigma, img_ids=image_ids, txt_ids=torch.zeros(5, 3), guidance=guidance).sample
        other_guidance = ours(x, sigma, context, pooled, guidance + 2)
    torch.testing.assert_close(mine, ours.unpatchify(packed, 8, 8), rtol=1e-5, atol=1e-5)
    assert (mine - other_guidance).abs().max() > 1e-3  # the guidance input is read


def test_state_dict_uses_the_names_comfyui_and_forge_detect_as_flux(flux_view):
    keys = set(flux_view.transformer.state_dict())
    for key in ("img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale",
                "double_blocks.0.txt_attn.qkv.weight", "guidance_in.in_layer.weight", "vector_in.in_layer.weight",
                "txt_in.weight", "single_blocks.0.linear1.weight", "final_layer.adaLN_modulation.1.weight"):
        assert key in keys, key


def test_flow_schedule_noises_and_inverts_and_the_sampler_recovers_a_known_image():
    flow = FlowSchedule(shift=3.0)
    t = torch.tensor([0, 500, 999])
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    x_t = flow.noisy(x0, noise, t)
    assert torch.allclose(x_t[2], noise[2], atol=1e-6)  # the last timestep is pure noise
    torch.testing.assert_close(flow.x0_from(x_t, t, flow.noise_target(x0, noise)), x0, rtol=1e-5, atol=1e-5)
    target = torch.randn(1, 3, 4, 4)
    oracle = lambda x, t: (x - target) / flow.sigmas(t).float().view(-1, 1, 1, 1)  # exact velocity toward target
    torch.testing.assert_close(sample_dpmpp_2m(oracle, torch.randn(1, 3, 4, 4), flow, 6), target, rtol=1e-4,
                               atol=1e-4)


def test_kv_group_trains_only_the_k_and_v_rows_of_the_text_streams_fused_qkv(flux_view):
    layers = flux_view.unet_layers("kv")
    assert [layer.key for layer in layers] == [f"lora_unet_double_blocks_{i}_txt_attn_qkv" for i in range(2)]
    width = flux_view.transformer.config.hidden_size
    assert all(layer.rows == (width, 3 * width) for layer in layers)
    before = _weights(flux_view)
    result = ablate(flux_view, make_config("grumpy cat", "cat", group="kv", **TINY))
    for name, weight in flux_view.transformer.state_dict().items():
        assert torch.equal(weight, before[name]), name  # hooks only: the model is untouched
    delta = result.patch.deltas[layers[0].key].full()
    assert delta.shape == (3 * width, width)
    assert delta[:width].abs().max() == 0 and delta[width:].abs().max() > 0


def test_groups_select_flux_layers_by_meaning(flux_view):
    assert {layer.key for layer in flux_view.unet_layers("embedding")} == {"lora_unet_txt_in",
                                                                          "lora_unet_vector_in_in_layer"}
    attn = {layer.key for layer in flux_view.unet_layers("attn")}
    assert "lora_unet_double_blocks_1_txt_attn_proj" in attn and "lora_unet_double_blocks_1_txt_attn_qkv" in attn
    assert all(layer.rows is None for layer in flux_view.unet_layers("attn"))
    assert len(flux_view.unet_layers("full")) > len(attn)
    assert flux_view.text_layers("embedding") == []


def test_distilled_models_read_guidance_instead_of_a_second_pass(flux_view, monkeypatch):
    seen = []
    original = FluxModelView.predict

    def spy(self, x_t, t, cond):
        seen.append((len(x_t), cond.extra.get("guidance")))
        return original(self, x_t, t, cond)

    monkeypatch.setattr(FluxModelView, "predict", spy)
    from ablation_core.models.sampling import sample_latents

    sample_latents(flux_view, ["a photo of a cat"], torch.zeros(3, dtype=torch.long), 2, 4.0, 3, seed=0)
    assert [rows for rows, _ in seen] == [3, 3]  # one pass of 3 images per step, no unconditional half
    assert all(g is not None and torch.all(g == 4.0) for _, g in seen)


def test_closed_form_solves_txt_in_and_vector_in_from_their_own_inputs(flux_view):
    result = erase_closed_form(flux_view, make_closed_form_config(["grumpy cat", "van gogh"], ["cat", "painting"]))
    assert set(result.patch.deltas) == {"lora_unet_txt_in", "lora_unet_vector_in_in_layer"}
    assert result.patch.metadata["ablation.group"] == "embedding"
    for stream in ("context", "pooled"):
        assert result.stats[f"{stream}_target_moved_fraction"] > 0.5
        assert result.stats[f"{stream}_preserved_vectors"] > 0
    before = flux_view.encode(["a photo of grumpy cat"])
    with apply_patch(flux_view, result.patch):
        changed = flux_view.transformer.txt_in(before.context)
    assert (changed - flux_view.transformer.txt_in(before.context)).abs().max() > 0


# Real files ------------------------------------------------------------------------------------------------------

def _tiny_t5_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "▁a", "▁photo", "▁of", "▁cat", "▁grumpy", "▁painting", "▁dog"]
    tokenizer = Tokenizer(models.Unigram([(w, -1.0) for w in words], unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """A random Flux.1-layout transformer (one block of each kind, Flux's head size), CLIP-L- and T5-layout text
    encoders in their own files, and a T5 tokenizer folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("flux")
    reference = _diffusers_flux(seed=1)
    state = flux_transformer_state(dict(reference.state_dict()))
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()},
              folder / "flux_tiny.safetensors")
    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=1, max_position_embeddings=77))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, folder / "clip_l.safetensors")
    t5 = T5EncoderModel(T5Config(vocab_size=10, d_model=48, d_ff=64, d_kv=16, num_heads=3, num_layers=1,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              folder / "t5xxl.safetensors")
    _tiny_t5_tokenizer(folder / "t5_tokenizer")
    return folder, reference


def test_a_single_file_flux_transformer_loads_with_its_text_encoders(flux_files):
    folder, reference = flux_files
    path = folder / "flux_tiny.safetensors"
    assert is_flux(path)
    text = FluxTextSources(folder / "clip_l.safetensors", folder / "t5xxl.safetensors", folder / "t5_tokenizer")
    view = load_model(path, dtype=torch.float32, flux_text=text)
    assert view.family.name == "flux" and view.guidance_input and view.latent_channels == 16
    cond = view.encode(["a photo of grumpy cat"])
    assert cond.context.shape == (1, 512, 48) and cond.extra["pooled"].shape == (1, 32)
    assert view.schedule.shift == pytest.approx(flux_schedule(view.transformer).shift)
    out = view.predict(torch.randn(1, 16, 8, 8), torch.tensor([500]), cond)
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
    patch = erase_closed_form(view, make_closed_form_config(["grumpy cat"], ["cat"])).patch
    assert set(patch.deltas) == {"lora_unet_txt_in", "lora_unet_vector_in_in_layer"}


def test_flux_files_without_text_encoders_or_t5_tokenizer_get_a_clear_error(flux_files, tmp_path):
    folder, _ = flux_files
    with pytest.raises(UnsupportedModelError, match="--clip-l"):
        load_flux_view(folder / "flux_tiny.safetensors", FluxTextSources(), dtype=torch.float32)
    with pytest.raises(UnsupportedModelError, match="t5-tokenizer"):
        load_flux_view(folder / "flux_tiny.safetensors",
                       FluxTextSources(folder / "clip_l.safetensors", folder / "t5xxl.safetensors", tmp_path / "none"),
                       dtype=torch.float32)


def test_a_diffusers_flux_folder_loads_as_the_same_network(flux_files, tmp_path):
    folder, reference = flux_files
    (tmp_path / "transformer").mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    assert is_flux(tmp_path)
    text = FluxTextSources(folder / "clip_l.safetensors", folder / "t5xxl.safetensors", folder / "t5_tokenizer")
    from_folder = load_model(tmp_path, dtype=torch.float32, flux_text=text)
    from_file = load_model(folder / "flux_tiny.safetensors", dtype=torch.float32, flux_text=text)
    for (name, a), b in zip(from_folder.transformer.state_dict().items(), from_file.transformer.state_dict().values()):
        assert torch.equal(a, b), name


# Attacks and robust rounds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["soft-prompt", "token-search"])
def test_the_attacks_write_into_both_flux_encoders(flux_view, name):
    from ablation_core.evaluation.attacks import budget_of, run_attack

    before = _weights(flux_view)
    outcome = run_attack(flux_view, name, "grumpy cat", "cat", budget_of(name, "small"), seed=0)
    assert 0.0 <= outcome.success <= 1.0 and outcome.samples > 0
    for key, weight in flux_view.transformer.state_dict().items():
        assert torch.equal(weight, before[key]), key


def test_a_prompts_ids_encode_exactly_as_the_prompt_in_both_encoders(flux_view):
    from ablation_core.methods.robust.adversary import prompt_ids
    from ablation_core.methods.robust.token_hook import encode_ids, encode_with, initial_vector

    prompt = "an image of a grumpy cat"
    plain = flux_view.encode([prompt])
    from_ids = encode_ids(flux_view, torch.tensor([prompt_ids(flux_view, prompt)]))
    assert torch.equal(from_ids.context, plain.context)  # T5's encoder calls its own embedding module
    assert torch.equal(from_ids.extra["pooled"], plain.extra["pooled"])  # CLIP pools at the end token
    vectors = [vector + 1.0 for vector in initial_vector(flux_view, "dog")]
    injected = encode_with(flux_view, ["an image of a sks"], vectors)
    unchanged = flux_view.encode(["an image of a sks"])
    assert not torch.allclose(injected.context, unchanged.context)
    assert not torch.allclose(injected.extra["pooled"], unchanged.extra["pooled"])


def test_ids_in_clip_layout_become_t5_layout_for_the_sequence_encoder(flux_view):
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    t5, clip = flux_view.encoder_ids(ids)
    assert t5.shape == (1, flux_view.encoders.sequence_length) and torch.equal(clip, ids)
    assert t5[0, :5].tolist() == [320, 1125, 539, 49407, 0]
    assert flux_view.encoder_positions([2, 3, 40]) == [[1, 2, None], [2, 3, 40]]


def test_robust_rounds_run_on_flux_for_both_methods(flux_view):
    from ablation_core.methods.robust.rounds import AdversaryBudget, robust_ablate, robust_erase_closed_form

    budget = AdversaryBudget(images=2, inversion_steps=2, inversion_batch=2, search_images=2, search_iterations=1,
                             search_candidates=2)
    trained = robust_ablate(flux_view, make_config("grumpy cat", "cat", robust_rounds=1, **TINY), budget=budget)
    assert json.loads(trained.patch.metadata["ablation.robust"])["rounds"] == 1
    solved = robust_erase_closed_form(flux_view, make_closed_form_config(["grumpy cat"], ["cat"], robust_rounds=1),
                                budget=budget)
    assert set(solved.patch.deltas) == {"lora_unet_txt_in", "lora_unet_vector_in_in_layer"}


def test_the_embedding_group_trains_txt_in_and_vector_in_whole(flux_view):
    result = ablate(flux_view, make_config("grumpy cat", "cat", group="embedding", **TINY))
    assert sorted(result.patch.deltas) == ["lora_unet_txt_in", "lora_unet_vector_in_in_layer"]
    assert all((delta.full().abs().sum(dim=1) > 0).all() for delta in result.patch.deltas.values())


def test_preserved_rows_hold_the_kept_prompts_and_the_cost_model_counts_them():
    """T5 is bidirectional, so K/V trained on the target's prompts move its neighbours' template words too; preserved
    rows hold the kept prompts at the frozen prediction. On the shipped toy-flux world, with them snoopy's prompts move
    much less for each unit the target moves, and every pass they cost is counted."""
    from ablation_core.evaluation.cost import RunMeter
    from ablation_core.methods.ablation.budget import unet_evaluations
    from ablation_core.methods.ablation.preserve import preserved_prompts

    view = load_model("toy-flux")
    settings = {**TINY, "steps": 12, "learning_rate": 3e-3, "group": "kv", "held_out_prompts": ("a photo of a cat",)}
    kept = [p for p in preserved_prompts(make_config("grumpy cat", "cat"), "toy-flux") if "snoopy" in p][:4]
    assert kept, "the toy world keeps its other concepts"

    def moved(result, prompts: list[str]) -> float:
        return prediction_change(view, result.patch, prompts)

    plain = ablate(view, make_config("grumpy cat", "cat", preserved_rows=0, **settings))
    meter = RunMeter(view.transformer, [], view.device)
    with meter.measuring():
        held = ablate(view, make_config("grumpy cat", "cat", preserved_rows=2, **settings))
    target = ["a photo of a grumpy cat"] * 4
    assert moved(held, kept) / moved(held, target) < 0.5 * moved(plain, kept) / moved(plain, target)
    counted = {name: phase.unet_evaluations for name, phase in meter.phases.items() if phase.unet_evaluations}
    expected = unet_evaluations(held.config, held_out_prompts=1, guidance_input=True)
    assert counted == expected
    # a frozen pass and one with gradients per preserved row and step
    assert expected["training"] == unet_evaluations(plain.config, 1, True)["training"] + 2 * 2 * 12
