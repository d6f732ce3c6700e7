"""The ComfyUI nodes and the comfy backend, run against small fakes of ComfyUI (CI has no ComfyUI)."""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ablation_core import AblationPatch, Conditioning, LayerDelta, load_patch, make_config
from ablation_core.backends import comfy as backend
from ablation_core.errors import AblationError, UnsupportedModelError
from ablation_core.methods.run_plan import SCALE
from ablation_core.patches.patch import META, fingerprint
from tests import comfy_fakes as fakes

REPO = Path(__file__).resolve().parents[1]
NODES_INIT = REPO / "nodes" / "__init__.py"
TINY = {"steps": 3, "batch_size": 2, "anchor_images": 2, "sampler_steps": 2, "sample_batch_size": 2,
        "anchor_prompt_count": 3, "latent_size": 4}


def _import_nodes():
    import nodes

    return nodes


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    state = fakes.install(tmp_path, monkeypatch)
    nodes = _import_nodes()
    nodes.setup()
    return state


@pytest.fixture(scope="module")
def trained():
    """One tiny ablation through the comfy backend, shared by the tests that only need a patch."""
    mp = pytest.MonkeyPatch()
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        fakes.install(Path(folder), mp)
        model, clip = fakes.make_model(), fakes.make_clip()
        config = make_config("Van Gogh", "painting", "fast", kind="style", **TINY)
        out_model, out_clip, patch, _ = backend.ablate_concept(model, clip, config)
    mp.undo()
    return model, clip, out_model, out_clip, patch


def _nodes():
    return _import_nodes().NODE_CLASS_MAPPINGS


def _patch_for(model: fakes.ModelPatcher, value: float, target: str = "x") -> AblationPatch:
    view = backend.ComfyModelView(model)
    layers = view.unet_layers("kv")
    deltas = {layer.key: LayerDelta(diff=torch.full(tuple(layer.weight.shape), value)) for layer in layers}
    metadata = {META + "targets": json.dumps([target]), META + "anchors": json.dumps(["y"]),
                META + "base_family": "sd1",
                META + "base_fingerprint": fingerprint({layer.key: layer.weight for layer in layers})}
    return AblationPatch(deltas, metadata)


# Declarations --------------------------------------------------------------------------------------------------

def test_every_node_declares_valid_inputs_and_outputs():
    nodes = _import_nodes()
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    known_types = {"MODEL", "CLIP", "VAE", "IMAGE", "STRING", "INT", "FLOAT", "BOOLEAN", "ABLATION_PATCH"}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if name == "LoadAblationPatch":
            continue  # lists files through folder_paths; checked with the fakes below
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"}, name
        for section in ("required", "optional"):
            for spec in inputs.get(section, {}).values():
                kind = spec[0]
                assert isinstance(kind, list) or kind in known_types, (name, spec)
                if len(spec) > 1 and "default" in spec[1] and isinstance(kind, list):
                    assert spec[1]["default"] in kind, (name, spec)
        assert all(t in known_types for t in cls.RETURN_TYPES), name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert cls.CATEGORY.startswith("conditioning/ablation")
        if hasattr(cls, "RETURN_NAMES"):
            assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)


def test_load_node_lists_patch_and_lora_folders(comfy, tmp_path):
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "a.safetensors").write_bytes(b"")
    (tmp_path / "models" / "ablation_patches").mkdir(parents=True)
    (tmp_path / "models" / "ablation_patches" / "b.safetensors").write_bytes(b"")
    choices = _nodes()["LoadAblationPatch"].INPUT_TYPES()["required"]["patch_name"][0]
    assert choices == ["b.safetensors", "a.safetensors"]


def test_package_entry_point_imports_without_comfyui(monkeypatch):
    """The folder loaded the way ComfyUI loads custom nodes: a package from its ``__init__.py``."""
    spec = importlib.util.spec_from_file_location("concept_ablation_entry", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    assert module.WEB_DIRECTORY == "./web"
    assert "AblateConcept" in module.NODE_CLASS_MAPPINGS
    assert (REPO / "web" / "concept_ablation.js").exists()


# The backend's view of a ComfyUI model ------------------------------------------------------------------------

def test_view_keys_and_fingerprint_match_the_diffusers_backend(tmp_path):
    """Same checkpoint, both backends: the same patch keys and the same base-model fingerprint."""
    from safetensors.torch import load_file

    from ablation_core.backends.diffusers import load_sd_model
    from ablation_core.models.random_models import build_components
    from ablation_core.models.single_file import save_single_file

    path = tmp_path / "tiny.safetensors"
    save_single_file(build_components("sd1", seed=3), path)
    state = load_file(path)
    unet_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.diffusion_model.")}
    base = fakes.BaseModel(fakes.module_tree_from_state_dict(unet_state).diffusion_model)
    comfy_layers = backend.ComfyModelView(fakes.ModelPatcher(base)).unet_layers("kv")
    diffusers_layers = load_sd_model(path).unet_layers("kv")
    assert sorted(layer.key for layer in comfy_layers) == sorted(layer.key for layer in diffusers_layers)
    assert fingerprint({layer.key: layer.weight for layer in comfy_layers}) == \
        fingerprint({layer.key: layer.weight for layer in diffusers_layers})


def test_view_names_layers_and_encodes_like_comfyui(comfy):
    view = backend.ComfyModelView(fakes.make_model(), fakes.make_clip())
    keys = {layer.key for layer in view.unet_layers("kv")}
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k" in keys
    assert view.state_key("lora_unet_middle_block_0_transformer_blocks_0_attn2_to_v") == \
        ("model", "diffusion_model.middle_block.0.transformer_blocks.0.attn2.to_v.weight")
    assert [layer.key for layer in view.text_layers("embedding")] == ["lora_te_text_model_embeddings_token_embedding"]
    with torch.no_grad():
        both = view.encode(["a cat", "a dog"])
        single = view.encode(["a dog"])
    assert both.context.shape == (2, 77, fakes.CONTEXT_DIM)
    torch.testing.assert_close(both.context[1:], single.context)
    assert view.token_ids("grumpy cat") == [view.clip.tokenizer("grumpy cat", add_special_tokens=False).input_ids]


def test_eps_matches_the_models_noise_prediction_for_v_models(comfy):
    eps_view = backend.ComfyModelView(fakes.make_model())
    v_view = backend.ComfyModelView(fakes.make_model(model_type=fakes.ModelType.V_PREDICTION))
    x_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    cond = Conditioning(torch.randn(2, 77, fakes.CONTEXT_DIM))
    with torch.no_grad():
        v = eps_view.predict(x_t, t, cond)  # same weights: this is the raw output
        eps = v_view.predict(x_t, t, cond)
    acp = v_view.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, acp.sqrt() * v + (1 - acp).sqrt() * x_t)


def test_sdxl_conditioning_carries_y(comfy):
    view = backend.ComfyModelView(fakes.make_model("sdxl"), fakes.make_clip())
    assert view.family.name == "sdxl"
    with torch.no_grad():
        cond = view.encode(["a cat", "a dog"])
        out = view.predict(torch.randn(2, 4, 4, 4), torch.tensor([5, 500]), cond)
    assert cond.extra["y"].shape == (2, fakes.CONTEXT_DIM + 16) and out.shape == (2, 4, 4, 4)


def test_models_without_cross_attention_get_a_clear_error():
    model = fakes.make_model()
    model.model.diffusion_model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError, match="MM-DiT"):
        backend.ComfyModelView(model)
    flow = fakes.make_model(model_type=fakes.ModelType.FLOW)
    with pytest.raises(UnsupportedModelError, match="FLOW"):
        backend.ComfyModelView(flow)


# Nodes against the fakes --------------------------------------------------------------------------------------

def test_ablate_node_trains_under_inference_mode_and_leaves_the_input_model_alone(comfy, monkeypatch):
    model, clip = fakes.make_model(), fakes.make_clip()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    node = _nodes()["AblateConcept"]()
    with torch.inference_mode():  # as ComfyUI runs nodes
        out_model, out_clip, patch = _run_ablate(node, model, clip, monkeypatch, unique_id="7")
    assert model.patches == {} and out_clip is clip
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert len(patch.deltas) == 6 and all(k.endswith(("to_k", "to_v")) for k in patch.deltas)
    patched_keys = set(out_model.patches)
    assert patched_keys == {backend.ComfyModelView(model).state_key(k)[1] for k in patch.deltas}
    assert comfy.loaded and all(force for _, force in comfy.loaded)
    assert comfy.progress[-1] == (comfy.progress[-1][1], comfy.progress[-1][1])
    events = [data for event, data in comfy.messages if event == backend.PROGRESS_EVENT]
    train = [e["step"] for e in events if e["phase"] == "train" and not e["within"]]  # not those while a step runs
    assert train == list(range(TINY["steps"] + 1))  # 0: it began
    assert events[-1]["phase"] == "done" and events[-1]["node"] == "7"


def _tiny_inputs(model, clip, monkeypatch) -> tuple:
    """The node's own inputs; the backend call it makes shrinks the run further (anchor images, batch)."""
    original = backend.ablate_concept

    def tiny(model, clip, config, **kwargs):
        return original(model, clip, replace(config, **{k: v for k, v in TINY.items() if k != "steps"}), **kwargs)

    monkeypatch.setattr(backend, "ablate_concept", tiny)
    return model, clip, "Van Gogh", "painting", "style", "kv", "fast", TINY["steps"], 0


def _run_ablate(node, model, clip, monkeypatch, unique_id=None, use_cache=True):
    output = node.ablate(*_tiny_inputs(model, clip, monkeypatch), image_size=TINY["latent_size"] * 8,
                         use_cache=use_cache, unique_id=unique_id)
    assert output["ui"]["text"][0]
    return output["result"]


def test_second_run_reuses_the_disk_cache(comfy, monkeypatch):
    model, clip = fakes.make_model(), fakes.make_clip()
    node = _nodes()["AblateConcept"]()
    _, _, first = _run_ablate(node, model, clip, monkeypatch)
    live = [d for _, d in comfy.messages if d["phase"] == "done"][-1]
    comfy.messages.clear()
    _, _, second = _run_ablate(node, model, clip, monkeypatch)
    assert [d["phase"] for _, d in comfy.messages] == ["done"] and comfy.messages[0][1]["cached"]
    for key, delta in first.deltas.items():
        torch.testing.assert_close(second.deltas[key].full(), delta.full())
    # The chart redraws the whole curve the cached patch stored, not only its first and last loss.
    cached = comfy.messages[0][1]
    assert len(live["losses"]) == TINY["steps"]
    assert cached["losses"] == pytest.approx(live["losses"], rel=1e-4)
    assert cached["summary"].startswith("reused cached result; ")


def test_the_disk_cache_is_rebuilt_when_missing_damaged_or_made_by_other_code(comfy, monkeypatch, tmp_path):
    """The cache lives outside the repository (ComfyUI's user folder): nothing may depend on it being there."""
    from ablation_core.patches import cache as patch_cache

    cache_dir = tmp_path / "user" / "concept_ablation" / "cache"
    model, clip = fakes.make_model(), fakes.make_clip()
    node = _nodes()["AblateConcept"]()

    def run_is_cached() -> bool:
        comfy.messages.clear()
        _run_ablate(node, model, clip, monkeypatch)
        return [d for _, d in comfy.messages if d["phase"] == "done"][-1]["cached"]

    assert not cache_dir.exists()
    assert not run_is_cached() and len(list(cache_dir.glob("*.safetensors"))) == 1
    assert run_is_cached()
    import shutil

    shutil.rmtree(cache_dir)  # a new machine, or a user who cleared the folder
    assert not run_is_cached() and len(list(cache_dir.glob("*.safetensors"))) == 1
    entry = next(cache_dir.glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])  # a half-written or damaged entry
    assert not run_is_cached()
    assert run_is_cached()
    monkeypatch.setattr(patch_cache, "code_digest", lambda: "another version of the package")
    assert not run_is_cached() and len(list(cache_dir.glob("*.safetensors"))) == 2


def test_ablate_node_shows_the_held_out_check_summary(comfy, monkeypatch):
    node = _nodes()["AblateConcept"]()
    output = node.ablate(*_tiny_inputs(fakes.make_model(), fakes.make_clip(), monkeypatch), unique_id="3")
    done = [d for _, d in comfy.messages if d["phase"] == "done"][-1]
    assert output["ui"]["text"] == [done["summary"]]
    assert "held-out prompts" in done["summary"]
    phases = [d["phase"] for _, d in comfy.messages]
    assert phases.index("check") > max(i for i, phase in enumerate(phases) if phase == "train")


def test_cancel_is_checked_inside_the_text_encoder(comfy, monkeypatch):
    """Encoding a chunk of prompts with CLIP takes seconds on a CPU: Cancel is noticed inside its forward."""
    from ablation_core.methods import progress

    monkeypatch.setattr(progress, "CHECK_INTERVAL_S", 0.0)
    view = backend.ComfyModelView(fakes.make_model(), fakes.make_clip())
    text_modules = set(map(id, view.clip.cond_stage_model.modules()))
    assert any(id(module) in text_modules for module in view.cancel_check_modules())
    comfy.interrupt_after = 1  # the check before the chunk passes; the next one is inside the encoder
    with pytest.raises(fakes.InterruptProcessingException) as raised:
        with torch.no_grad(), progress.cancel_checks(view.cancel_check_modules(),
                                                     progress.Canceller(backend.view.cancel_requested)):
            view.encode(["a photo of a cat"])
    assert any("transformers" in frame.filename for frame in traceback.extract_tb(raised.value.__traceback__))


def test_cancel_stops_training_and_leaves_the_model_untouched(comfy, monkeypatch):
    model, clip = fakes.make_model(), fakes.make_clip()
    comfy.interrupt_after = 3
    with pytest.raises(fakes.InterruptProcessingException):
        _run_ablate(_nodes()["AblateConcept"](), model, clip, monkeypatch, use_cache=False)
    assert model.patches == {}
    for module in model.model.diffusion_model.modules():
        assert not module._forward_hooks


def test_cancel_is_checked_inside_the_backward_pass(comfy, monkeypatch):
    """A training step's backward through an SD1.5 UNet takes most of its 30 s on a CPU: Cancel is noticed there."""
    from ablation_core.methods import progress

    monkeypatch.setattr(progress, "CHECK_INTERVAL_S", 0.0)
    view = backend.ComfyModelView(fakes.make_model(), fakes.make_clip())
    x_t = torch.randn(2, 4, 4, 4, requires_grad=True)
    cond = Conditioning(torch.randn(2, 77, fakes.CONTEXT_DIM))
    with torch.enable_grad(), progress.cancel_checks(view.cancel_check_modules(),
                                                     progress.Canceller(backend.view.cancel_requested)):
        loss = view.predict(x_t, torch.tensor([10, 500]), cond).square().mean()
        comfy.interrupt_after = comfy.interrupt_checks  # Cancel pressed between the forward and the backward
        with pytest.raises(fakes.InterruptProcessingException):
            loss.backward()


def test_eps_runs_cpu_batches_in_sub_batches_with_the_same_result(comfy, monkeypatch):
    view = backend.ComfyModelView(fakes.make_model())
    x_t, t = torch.randn(5, 4, 4, 4), torch.tensor([10, 200, 400, 600, 900])
    cond = Conditioning(torch.randn(5, 77, fakes.CONTEXT_DIM))
    with torch.no_grad():
        whole = view.predict(x_t, t, cond)
        monkeypatch.setattr(backend.view, "CPU_CHUNK_POSITIONS", 2 * 4 * 4)
        batches = []
        handle = view.diffusion_model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
        chunked = view.predict(x_t, t, cond)
        handle.remove()
    assert batches == [2, 2, 1]
    torch.testing.assert_close(chunked, whole)


def test_embedding_group_patches_the_clip(comfy):
    model, clip = fakes.make_model(), fakes.make_clip()
    config = make_config("Van Gogh", "painting", "fast", kind="style", group="embedding", **TINY)
    out_model, out_clip, patch, _ = backend.ablate_concept(model, clip, config)
    assert list(patch.deltas) == ["lora_te_text_model_embeddings_token_embedding"]
    assert set(out_clip.patcher.patches) == {"clip_l.transformer.text_model.embeddings.token_embedding.weight"}
    assert out_model.patches == {} and clip.patcher.patches == {}
    # Trained through ComfyUI's in-place CLIPLayer residuals; the layer's own forward is back afterwards.
    assert "forward" not in vars(clip.cond_stage_model.clip_l.transformer.comfy_layer)


def test_apply_node_adds_diff_patches_with_strength_and_checks_the_fingerprint(comfy, trained):
    model, clip, _, _, patch = trained
    out_model, out_clip = _nodes()["ApplyAblationPatch"]().apply(model, patch, 0.5, clip)["result"]
    view = backend.ComfyModelView(model)
    for key, delta in patch.deltas.items():
        state_key = view.state_key(key)[1]
        expected = model.model.state_dict()[state_key].float() + 0.5 * delta.full()
        torch.testing.assert_close(out_model.patched_weight(state_key), expected)
    assert model.patches == {}
    other = fakes.make_model(seed=5)
    status = _nodes()["ApplyAblationPatch"]().apply(other, patch, 1.0, clip)["ui"]["text"][0]
    assert status.startswith("WARNING")


def test_save_then_load_round_trips_through_the_loras_folder(comfy, tmp_path, trained):
    patch = trained[4]
    save = _nodes()["SaveAblationPatch"]()
    preview = torch.rand(1, 16, 16, 3)
    ui = save.save(patch, "ablation/vangogh", "loras", "full rank (exact)", 0.999, preview=preview)["ui"]
    assert ui["text"] == ["saved vangogh_00001.safetensors (loras)"]
    save.save(patch, "ablation/vangogh", "loras", "low rank (small)", 0.999)
    folder = tmp_path / "models" / "loras" / "ablation"
    assert sorted(p.name for p in folder.iterdir()) == ["vangogh_00001.preview.png", "vangogh_00001.safetensors",
                                                        "vangogh_00002.safetensors"]
    assert "ablation/vangogh_00001.safetensors" in _nodes()["LoadAblationPatch"].INPUT_TYPES()["required"][
        "patch_name"][0]
    loaded, text = _nodes()["LoadAblationPatch"]().load("ablation/vangogh_00001.safetensors")["result"]
    assert "Van Gogh" in text
    for key, delta in patch.deltas.items():
        torch.testing.assert_close(loaded.deltas[key].full(), delta.full(), atol=1e-3, rtol=1e-2)
    assert load_patch(folder / "vangogh_00002.safetensors").is_low_rank
    with pytest.raises(AblationError, match="leaves"):
        save.save(patch, "../../outside", "loras", "full rank (exact)", 0.999)


def test_stack_applies_each_patch_and_merge_sums_them(comfy):
    model = fakes.make_model()
    first, second = _patch_for(model, 1.0, "a"), _patch_for(model, 2.0, "b")
    (stack,) = _nodes()["StackAblationPatches"]().stack(first, 1.0, second, 0.5)
    stacked, _ = _nodes()["ApplyAblationPatch"]().apply(model, stack, 2.0)["result"]
    output = _nodes()["MergeAblationPatches"]().merge(first, 1.0, second, 0.5, "weighted sum")
    (merged,) = output["result"]
    assert output["ui"]["text"][0].startswith("weighted sum of 2 patches")
    applied, _ = _nodes()["ApplyAblationPatch"]().apply(model, merged, 2.0)["result"]
    key = next(iter(stacked.patches))
    assert len(stacked.patches[key]) == 2 and len(applied.patches[key]) == 1
    torch.testing.assert_close(stacked.patched_weight(key), applied.patched_weight(key))
    torch.testing.assert_close(applied.patched_weight(key) - model.model.state_dict()[key], torch.full_like(
        applied.patched_weight(key), 2.0 * (1.0 + 0.5 * 2.0)))
    assert json.loads(merged.metadata[META + "targets"]) == ["a", "b"]


def test_report_renders_before_and_after_rows(comfy, trained):
    model, clip, _, _, patch = trained
    image, text = _nodes()["AblationReport"]().report(model, clip, fakes.VAE(), patch, 1.0, "a dog", 0, 2, 3.0, 1,
                                                       64)
    rows = backend.report_prompts(patch, "a dog")
    assert rows == ["Van Gogh", "painting", "a dog"]
    assert image.shape[0] == 1 and image.shape[-1] == 3 and image.shape[1] > 3 * 64
    assert "targets" in text and model.patches == {}


# Closed form and fusion ----------------------------------------------------------------------------------------

def test_closed_form_node_erases_a_list_of_concepts_on_the_toy_model(comfy):
    from ablation_core import evaluate_toy, load_model

    model, clip = fakes.make_toy_model_and_clip()
    node = _nodes()["EraseConceptsClosedForm"]()
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    output = node.erase(model, clip, "snoopy -> dog\n\nnemo, fish", "", "object", "least-squares", 0.5)
    out_model, patch = output["result"]
    assert "erased 2 concept(s)" in output["ui"]["text"][0]
    assert patch.listed("targets") == ["snoopy", "nemo"] and model.patches == {}
    assert all(torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert set(out_model.patches) == {backend.ComfyModelView(model).state_key(k)[1] for k in patch.deltas}
    evaluation = evaluate_toy(load_model("toy"), patch, "snoopy", "dog", per_set=8, preservation=False)
    assert evaluation.summary["target_recognised"] <= 0.2 and evaluation.summary["anchor_retained"] >= 0.9


def test_merge_node_fuses_with_the_base_model_and_asks_for_it(comfy):
    model, clip = fakes.make_toy_model_and_clip()
    erase = _nodes()["EraseConceptsClosedForm"]()
    first = erase.erase(model, clip, "snoopy -> dog", "", "object", "least-squares", 0.5)["result"][1]
    second = erase.erase(model, clip, "grumpy cat -> cat", "", "object", "least-squares", 0.5)["result"][1]
    merge = _nodes()["MergeAblationPatches"]()
    with pytest.raises(AblationError, match="connect both"):
        merge.merge(first, 1.0, second, 1.0, "fusion")
    output = merge.merge(first, 1.0, second, 1.0, "fusion", model=model, clip=clip, unique_id="4")
    (fused,) = output["result"]
    assert fused.metadata["ablation.method"] == "merge-fusion"
    assert output["ui"]["text"][0].startswith("fused 2 patches: ") and "snoopy, grumpy cat" in output["ui"]["text"][0]
    events = [data for event, data in comfy.messages if event == backend.PROGRESS_EVENT and data["node"] == "4"]
    assert events[0]["phase"] == "prompts" and events[-1] == {**events[-1], "phase": "done",
                                                              "summary": output["ui"]["text"][0]}
    assert fused.listed("targets") == ["snoopy", "grumpy cat"]


def test_closed_form_node_shows_progress_then_its_summary(comfy):
    """Encoding the prompts is the whole cost (minutes for a long list on a CPU): the bar and the node's status line
    follow it, and the last event carries the summary the node shows."""
    model, clip = fakes.make_toy_model_and_clip()
    output = _nodes()["EraseConceptsClosedForm"]().erase(model, clip, "snoopy -> dog", "", "object", "least-squares",
                                                         0.5, unique_id="12")
    events = [data for event, data in comfy.messages if event == backend.PROGRESS_EVENT]
    assert events and all(e["node"] == "12" for e in events)
    prompts = [e for e in events if e["phase"] == "prompts"]
    assert len(prompts) > 1 and len({e["total"] for e in prompts}) == 1
    steps = [e["step"] for e in prompts]
    assert steps == sorted(steps) and steps[-1] == prompts[0]["total"]
    assert prompts[-1]["eta"] is not None and prompts[-1]["eta"] >= 0
    assert [e["phase"] for e in events][-2:] == ["solve", "done"]
    assert events[-1]["summary"] == output["ui"]["text"][0]
    assert comfy.progress[-1] == (SCALE, SCALE)  # one bar over the whole node (test_comfy_progress)


def test_closed_form_node_is_cancelled_inside_the_text_encoder(comfy, monkeypatch):
    from ablation_core.methods import progress

    monkeypatch.setattr(progress, "CHECK_INTERVAL_S", 0.0)
    model, clip = fakes.make_model(), fakes.make_clip()
    comfy.interrupt_after = 2  # the checks before the chunk and before its first batch pass; the next is in CLIP
    with pytest.raises(fakes.InterruptProcessingException) as raised:
        _nodes()["EraseConceptsClosedForm"]().erase(model, clip, "Van Gogh", "painting", "style", "least-squares", 0.5)
    assert any("transformers" in frame.filename for frame in traceback.extract_tb(raised.value.__traceback__))
    assert model.patches == {}
    assert not any(module._forward_pre_hooks for module in clip.cond_stage_model.modules())


def test_merge_node_fuses_patches_that_share_a_target(comfy):
    """Two erasures of the same concept (here one patch at two strengths) fuse like any others."""
    model, clip = fakes.make_toy_model_and_clip()
    erase = _nodes()["EraseConceptsClosedForm"]()
    first = erase.erase(model, clip, "snoopy -> dog", "", "object", "least-squares", 0.5)["result"][1]
    both = erase.erase(model, clip, "Snoopy -> dog\nnemo -> fish", "", "object", "least-squares", 0.5)["result"][1]
    (fused,) = _nodes()["MergeAblationPatches"]().merge(first, 1.0, both, 0.5, "fusion", model=model,
                                                         clip=clip)["result"]
    assert fused.metadata["ablation.method"] == "merge-fusion" and set(fused.deltas) == set(first.deltas)


# New widgets of Ablate Concept and chained erasures ---------------------------------------------------------------

def _captured_config(monkeypatch, **widgets):
    """The config and base patch the Ablate Concept node hands the backend for these widgets (nothing trains)."""
    seen = {}

    def capture(model, clip, config, **kwargs):
        seen.update(config=config, **kwargs)
        return model, clip, None, "done"

    monkeypatch.setattr(backend, "ablate_concept", capture)
    inputs = {"target": "Van Gogh", "anchor": "painting", "kind": "style", "group": "kv", "preset": "fast",
              "steps": 0, "seed": 0, **widgets}
    _nodes()["AblateConcept"]().ablate(fakes.make_model(), fakes.make_clip(), **inputs)
    return seen


def test_ablate_node_takes_several_targets_a_concept_type_and_a_negative_prompt(comfy, monkeypatch):
    from ablation_core import resolve_config

    seen = _captured_config(monkeypatch, target="Van Gogh\n\nnudity -> a person, fully clothed",
                            concept_type="inappropriate", negative_prompt=" ")
    config = resolve_config(seen["config"], "sd1")
    assert config.pairs() == [("Van Gogh", "painting"), ("nudity", "a person, fully clothed")]
    assert (config.group, config.kind) == ("attn", "object")  # the recipe's, not the kind/group widgets'
    assert config.negative_prompt == "Van Gogh, nudity"  # empty widget: the recipe's negative prompt
    auto = resolve_config(_captured_config(monkeypatch, group="full", negative_prompt="blurry")["config"], "sd1")
    assert (auto.concept_type, auto.group, auto.kind, auto.negative_prompt) == (None, "full", "style", "blurry")
    with pytest.raises(AblationError, match="names no anchor"):
        _captured_config(monkeypatch, target="Van Gogh", anchor=" ")


def test_chained_erase_nodes_give_one_patch_on_the_original_model(comfy):
    """Erase Concepts on the output of another: the second patch holds both erasures (as the core's base patch
    gives), carries the original fingerprint, and replaces the first on the MODEL instead of stacking on it."""
    from ablation_core.methods.closed_form.settings import make_closed_form_config
    from ablation_core.methods.closed_form.solve import erase_closed_form

    model, clip = fakes.make_toy_model_and_clip()
    erase = _nodes()["EraseConceptsClosedForm"]()
    first_model, first = erase.erase(model, clip, "snoopy -> dog", "", "object", "least-squares", 0.5)["result"]
    foreign_key = "diffusion_model.out.2.weight"  # a LoRA loaded in between stays on the MODEL
    lora_model = first_model.clone()
    lora_model.add_patches({foreign_key: (torch.ones(1),)})
    output = erase.erase(lora_model, clip, "grumpy cat -> cat", "", "object", "least-squares", 0.5)
    chained_model, chained = output["result"]
    assert output["ui"]["text"][0].startswith("built on the MODEL's earlier patch (snoopy)")
    assert chained.listed("targets") == ["snoopy", "grumpy cat"]
    assert chained.base_fingerprint == first.base_fingerprint
    assert backend.fingerprint_matches(model, clip, chained)
    direct = erase_closed_form(backend.ComfyModelView(model, clip, original_weights=True),
                               make_closed_form_config("grumpy cat", "cat"), base_patch=first).patch
    alone = erase.erase(model, clip, "grumpy cat -> cat", "", "object", "least-squares", 0.5)["result"][1]
    key = next(iter(chained.deltas))
    torch.testing.assert_close(chained.deltas[key].full(), direct.deltas[key].full())
    assert not torch.allclose(chained.deltas[key].full(), alone.deltas[key].full(), atol=1e-4)
    applied, _ = _nodes()["ApplyAblationPatch"]().apply(model, chained, 1.0, clip)["result"]
    view = backend.ComfyModelView(model)
    for patch_key in chained.deltas:
        state_key = view.state_key(patch_key)[1]
        assert len(chained_model.patches[state_key]) == 1  # the first patch was taken off, not stacked under
        torch.testing.assert_close(chained_model.patched_weight(state_key), applied.patched_weight(state_key))
    assert len(chained_model.patches[foreign_key]) == 1 and first_model.patches != chained_model.patches
    assert [e.patch for e in backend.chain.carried(chained_model)] == [chained]


def test_chained_ablate_nodes_train_on_the_original_weights_with_the_first_patch(comfy, monkeypatch):
    model, clip = fakes.make_model(), fakes.make_clip()
    node = _nodes()["AblateConcept"]()
    first_model, _, first = _run_ablate(node, model, clip, monkeypatch, use_cache=False)
    seen = {}
    original = backend.flows.robust_ablate

    def spy(view, config, **kwargs):
        seen["patches"] = {k: list(v) for k, v in view.patcher.patches.items()}  # what ComfyUI loads to train on
        seen["base"] = kwargs.get("base_patch")
        return original(view, config, **kwargs)

    monkeypatch.setattr(backend.flows, "robust_ablate", spy)
    applied, _ = _nodes()["ApplyAblationPatch"]().apply(first_model, first, 0.5)["result"]  # stacked: 1.5 x first
    output = node.ablate(applied, clip, "Monet", "painting", "style", "kv", "fast", TINY["steps"], 0,
                         image_size=TINY["latent_size"] * 8, use_cache=True)
    chained_model, _, chained = output["result"]
    assert "earlier patches" in output["ui"]["text"][0]
    assert seen["patches"] == {}  # trained on the original weights, the earlier patches through hooks
    view = backend.ComfyModelView(model)
    for key, delta in first.deltas.items():
        torch.testing.assert_close(seen["base"].deltas[key].full(), 1.5 * delta.full())
    assert chained.listed("targets") == ["Van Gogh", "Van Gogh", "Monet"]
    assert chained.base_fingerprint == first.base_fingerprint
    reapplied, _ = _nodes()["ApplyAblationPatch"]().apply(model, chained, 1.0)["result"]
    for key in chained.deltas:
        state_key = view.state_key(key)[1]
        assert len(chained_model.patches[state_key]) == 1
        torch.testing.assert_close(chained_model.patched_weight(state_key), reapplied.patched_weight(state_key))
        assert not torch.allclose(chained.deltas[key].full(), 1.5 * first.deltas[key].full())
    # The same node on the original MODEL with the first patch as its base_patch input builds on it once.
    seen.clear()
    node.ablate(first_model, clip, "Monet", "painting", "style", "kv", "fast", TINY["steps"], 0, base_patch=first,
                image_size=TINY["latent_size"] * 8, use_cache=False)
    assert seen["base"] is first


def test_a_record_whose_patches_were_removed_is_ignored(comfy, trained):
    model, clip, out_model, _, patch = trained
    assert [e.patch for e in backend.chain.carried(out_model)] == [patch]
    rebuilt = out_model.clone()
    rebuilt.patches = {}  # a node that rebuilt the MODEL's patches: the record stays, the weights are original
    assert backend.chain.carried(rebuilt) == []
    base = backend.chain.base_patch(backend.chain.carried(rebuilt), [])
    assert base is None


def test_the_group_widget_defaults_to_the_presets_choice_for_the_model(comfy, monkeypatch):
    """"auto" leaves the group to the preset of the connected model (kv on SD, the prompt maps with kept neighbours on
    Flux); a group picked in the widget is passed on as it is. Saved workflows that say "kv" keep it."""
    node = _nodes()["AblateConcept"]
    group_widget = node.INPUT_TYPES()["required"]["group"]
    assert group_widget[0][0] == "auto" and group_widget[1]["default"] == "auto" and "kv" in group_widget[0]
    seen = []
    monkeypatch.setattr(backend, "ablate_concept",
                        lambda model, clip, config, **kwargs: seen.append(config) or (model, clip, None, ""))
    for group in ("auto", "kv"):
        node().ablate(None, None, "Van Gogh", "painting", "style", group, "default", 0, 0, use_cache=False)
    assert [config.group for config in seen] == [None, "kv"]


def test_a_run_that_cannot_fit_names_the_nodes_own_settings(comfy, monkeypatch):
    """In the real ComfyUI a run that did not fit said "Try gradient checkpointing (--gradient-checkpointing ...),
    a smaller training batch (--batch-size, now 5), smaller latents (--latent-size, now 32), bf16 weights (--dtype
    bf16)": command-line flags a node user cannot give."""
    from ablation_core.models import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    model, clip = fakes.make_model(), fakes.make_clip()
    with pytest.raises(AblationError) as raised:
        _nodes()["AblateConcept"]().ablate(*_tiny_inputs(model, clip, monkeypatch), image_size=256)
    message = str(raised.value)
    assert "nothing was started" in message and "--" not in message.replace("--bf16-unet", ""), message
    assert "weight_dtype" in message and model.patches == {}
    with pytest.raises(AblationError, match=r"image_size, now 256 px.*weight_dtype"):
        memory.check_fits(memory.estimate("sd1", 32, 5, torch.float32, 0), "cpu", 5, 32, torch.float32, False,
                          backend.ComfyModelView.setting_names)


def test_the_gradient_checkpointing_switch_recomputes_the_blocks_and_gives_the_same_patch(comfy, monkeypatch):
    """The fake's blocks carry ComfyUI's class name, so the switch really checkpoints them (it used to find none)."""
    from ablation_core.models import checkpointing

    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    patches = []
    for switch in (False, True):
        model, clip = fakes.make_model(), fakes.make_clip()
        output = _nodes()["AblateConcept"]().ablate(*_tiny_inputs(model, clip, monkeypatch),
                                                    image_size=TINY["latent_size"] * 8, use_cache=False,
                                                    gradient_checkpointing=switch)
        patches.append(output["result"][2])
        assert bool(calls) == switch and model.patches == {}
    for key, delta in patches[0].deltas.items():
        torch.testing.assert_close(patches[1].deltas[key].full(), delta.full(), rtol=1e-4, atol=1e-6)
