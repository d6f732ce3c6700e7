"""CLIP figures on a real-architecture model: a tiny CLIP built from a config (no download) and a tiny random SD1.

A random CLIP sees hardly any difference between images (their features point the same way), so the test that
``clip_accuracy`` follows the images first teaches the tiny CLIP, in a few seconds, to tell this model's target
images from its anchor images (contrastive steps on the evaluation's own target prompts and anchor twins, drawn from
the same noise): a CLIP that knows the concept, as a real one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPVisionModelWithProjection

from ablation_core.cli import main
from ablation_core.errors import UnsupportedModelError
from ablation_core.evaluation.clip import builtin_neighbours, clip_prompt_sets, evaluate_clip, load_clip
from ablation_core.evaluation.clip.metrics import kid
from ablation_core.evaluation.toy_eval import EVAL_SEED_OFFSET
from ablation_core.models.single_file import save_single_file
from ablation_core.models.tokenizer import sd_clip_tokenizer
from tests import clip_models
from tests.clip_fixtures import ANCHOR, FAST, TARGET, components, random_clip, swap_patch, view  # noqa: F401
from tests.clip_models import tiny_clip_config

PER_SET = 16


@pytest.fixture(scope="module")
def knowing_clip(view, tmp_path_factory) -> Path:
    sets, twins, _ = clip_prompt_sets(TARGET, ANCHOR, "object", PER_SET)
    return clip_models.taught_clip(view, sets[0].prompts, twins, FAST.steps, FAST.guidance, EVAL_SEED_OFFSET,
                                   tmp_path_factory.mktemp("clip") / "knowing-clip")


def test_figures_are_computed_and_deterministic_by_seed(view, swap_patch, random_clip):
    scorer = load_clip(random_clip)
    rows = []
    hook = view.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        first = evaluate_clip(view, swap_patch, scorer, TARGET, ANCHOR, per_set=4, seed=0, sampling=FAST)
    finally:
        hook.remove()
    passes = (scorer.image_passes, scorer.text_passes)
    again = evaluate_clip(view, swap_patch, load_clip(random_clip), TARGET, ANCHOR, per_set=4, seed=0, sampling=FAST)
    other = evaluate_clip(view, swap_patch, scorer, TARGET, ANCHOR, per_set=4, seed=1, sampling=FAST)
    report = json.loads(first.to_json())
    assert report == json.loads(again.to_json())
    assert report != json.loads(other.to_json())
    assert [s["name"] for s in report["sets"]][:2] == ["target", "anchor"]
    neighbours = [s for s in report["sets"] if s["name"].startswith("surrounding")]
    assert [s["concept"] for s in neighbours] == builtin_neighbours(TARGET, ANCHOR, "object")[0]
    assert all(s["kid"] is not None and s["kid_floor"] is not None for s in neighbours)
    for when in ("before", "after"):
        assert 0 <= report[f"clip_accuracy_{when}"] <= 1 and report[f"clip_accuracy_{when}_spread"] >= 0
        assert -100 <= report[f"clip_score_target_{when}"] <= 100
    assert all(k in report for k in ("neighbour_kid", "neighbour_kid_spread", "neighbour_kid_floor"))
    # the cost printed before the run is what the run did
    assert sum(rows) == report["cost"]["unet_evaluations"] == report["cost"]["images"] * FAST.steps * 2
    assert report["cost"]["clip_image_passes"] == report["cost"]["images"] == (2 * 2 + 3 * len(neighbours)) * 4
    assert passes == (report["cost"]["clip_image_passes"], report["cost"]["clip_text_passes"])
    table = first.table()
    assert "clip_accuracy" in table and "neighbour_kid" in table and "surrounding: tabby cat" in table


def test_clip_accuracy_falls_when_the_patch_turns_the_target_into_the_anchor(view, swap_patch, knowing_clip):
    scorer = load_clip(knowing_clip)
    swapped = evaluate_clip(view, swap_patch, scorer, TARGET, ANCHOR, per_set=PER_SET, sampling=FAST,
                            neighbours=["dog"])
    assert swapped.summary["clip_accuracy_before"] >= 0.75, "the taught CLIP should know the target's images"
    assert swapped.summary["clip_accuracy_after"] <= swapped.summary["clip_accuracy_before"] - 0.3
    unchanged = evaluate_clip(view, swap_patch, scorer, TARGET, ANCHOR, per_set=PER_SET, sampling=FAST,
                              strength=0.0, neighbours=["dog"])
    assert unchanged.summary["clip_accuracy_after"] == unchanged.summary["clip_accuracy_before"]
    assert all(s.clip_score_after == s.clip_score_before for s in unchanged.sets), "strength 0 changes nothing"


def test_kid_is_unbiased_and_sees_a_shift():
    generator = torch.Generator().manual_seed(0)
    same = [kid(torch.randn(20, 8, generator=generator), torch.randn(20, 8, generator=generator))
            for _ in range(200)]
    shifted = kid(torch.randn(20, 8, generator=generator), torch.randn(20, 8, generator=generator) + 1.0)
    spread = torch.tensor(same).std() / len(same) ** 0.5
    assert abs(torch.tensor(same).mean()) < 3 * spread, "the unbiased estimate averages to 0 on equal distributions"
    assert shifted > 10 * torch.tensor(same).std()
    x = torch.randn(6, 8, generator=generator)
    assert kid(x, x.clone()) == pytest.approx(kid(x, x.flip(0)))


def test_prompt_sets_are_twins_and_neighbours_suit_the_kind():
    sets, twins, _ = clip_prompt_sets(TARGET, ANCHOR, "object", 6, seed=3)
    assert len(sets[0].prompts) == 6 and sets[1].prompts == twins
    assert all(t.replace(TARGET, ANCHOR) == a for t, a in zip(sets[0].prompts, twins))
    styles, source = builtin_neighbours("Van Gogh", "painting", "style")
    assert styles and "Vincent van Gogh" not in styles and "artists" in source
    sets, _, _ = clip_prompt_sets("Van Gogh", "painting", "style", 3, neighbours=["Claude Monet"])
    assert [s.name for s in sets] == ["target", "anchor", "surrounding: Claude Monet"]
    assert sets[2].prompts[0].endswith("in the style of Claude Monet")
    assert builtin_neighbours("a famous photo", "photo", "memorization")[0] == []


def _one_line_error(path, match: str, **kwargs) -> str:
    with pytest.raises(UnsupportedModelError, match=match) as caught:
        load_clip(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400
    return message


def test_missing_or_wrong_clip_gives_one_line(tmp_path, random_clip):
    _one_line_error(tmp_path / "nowhere", "does not exist.*huggingface-cli download")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "no config.json")
    # a corrupt weights file in an otherwise good folder
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for found in random_clip.iterdir():
        if found.name != "model.safetensors":
            (corrupt / found.name).write_bytes(found.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    _one_line_error(corrupt, "cannot be read")
    # ComfyUI's clip_vision: an image tower only, as a folder and as a single file
    vision = CLIPVisionModelWithProjection(tiny_clip_config().vision_config)
    vision.save_pretrained(tmp_path / "vision")
    _one_line_error(tmp_path / "vision", "image tower only")
    _one_line_error(tmp_path / "vision" / "model.safetensors", "image tower only.*clip_vision")
    # wrong weights under a good config: an image tower, another model's shapes, tensors missing
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_bytes((random_clip / "config.json").read_bytes())
    (wrong / "model.safetensors").write_bytes((tmp_path / "vision" / "model.safetensors").read_bytes())
    _one_line_error(wrong, "image tower only")
    wider = tiny_clip_config()
    wider.text_config.hidden_size = 48
    CLIPModel(wider).save_pretrained(tmp_path / "wider")
    (wrong / "model.safetensors").write_bytes((tmp_path / "wider" / "model.safetensors").read_bytes())
    _one_line_error(wrong, "do not fit its config.json")
    state = load_file(random_clip / "model.safetensors")
    save_file({k: v for k, v in state.items() if not k.startswith("text_projection")}, wrong / "model.safetensors")
    _one_line_error(wrong, "do not fit its CLIP config: 1 tensors missing")
    (tmp_path / "notes.txt").write_text("hello")
    _one_line_error(tmp_path / "notes.txt", "neither a transformers folder nor a weights file")
    _one_line_error(random_clip / "model.safetensors", "without its folder")


def test_open_clip_files_say_how_to_get_open_clip(tmp_path):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("open_clip is installed here; the message under test is for machines without it")

    path = tmp_path / "open_clip_model.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2), "token_embedding.weight": torch.zeros(2, 2)}, path)
    _one_line_error(path, "open_clip weights file.*--clip-arch")
    _one_line_error(path, "pip install open_clip_torch", arch="ViT-B-32")


def test_eval_command_prints_the_cost_then_the_figures(components, swap_patch, random_clip, tmp_path, capsys):
    checkpoint = tmp_path / "tiny_sd1.safetensors"
    save_single_file(components, checkpoint)
    patch_file = swap_patch.save(tmp_path / "swap.safetensors")
    command = ["eval", "--model", str(checkpoint), "--patch", str(patch_file), "--target", TARGET, "--anchor", ANCHOR,
               "--clip", str(random_clip), "--per-set", "2", "--sampler-steps", "2", "--latent-size", "8",
               "--neighbours", "dog", "--device", "cpu"]
    assert main([*command, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert "cost: 14 images x 2 solver steps x 2 (guidance) = 56 UNet evaluations" in captured.err
    assert report["cost"]["unet_evaluations"] == 56 and report["neighbours_from"] == "given with --neighbours"
    assert {"clip_accuracy_before", "clip_accuracy_after", "neighbour_kid", "neighbour_kid_floor"} <= set(report)
    assert main(command) == 0
    out = capsys.readouterr().out
    assert out.index("cost:") < out.index("clip_accuracy")
    assert main([*command[:-4], "--clip", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CLIP model") and err.count("\n") == 1
    assert main(["eval", "--model", "toy", "--patch", str(patch_file), "--target", "grumpy cat", "--anchor", "cat",
                 "--neighbours", "dog"]) == 2
    assert "--neighbours belongs to the CLIP figures: add --clip PATH" in capsys.readouterr().err


def test_report_node_shows_the_figures_or_how_to_get_them(random_clip, tmp_path, monkeypatch):
    from tests import comfy_fakes as fakes
    from tests.test_nodes import _import_nodes

    fakes.install(tmp_path, monkeypatch)
    nodes = _import_nodes()
    model, clip = fakes.make_model(), fakes.make_clip()
    from ablation_core.backends.comfy import closed_form as closed_form_backend
    from ablation_core.methods.closed_form.settings import make_closed_form_config as config

    patch = closed_form_backend.erase_concepts(model, clip, config("Van Gogh", "painting", kind="style"))[2]
    node = nodes.NODE_CLASS_MAPPINGS["AblationReport"]()
    common = (model, clip, fakes.VAE(), patch, 1.0, "a dog", 0, 2, 3.0, 1, 64)
    _, text = node.report(*common)
    assert "set clip_model to a full CLIP model folder" in text and "huggingface-cli download" in text
    _, text = node.report(*common, clip_model=str(random_clip), images_per_set=2, neighbours="Claude Monet")
    assert text.index("cost: 14 images x 2 solver steps x 2 (guidance)") < text.index("clip_accuracy")
    assert "surrounding: Claude Monet" in text and "neighbour_kid" in text and model.patches == {}
    with pytest.raises(UnsupportedModelError, match="image tower only"):
        CLIPVisionModelWithProjection(tiny_clip_config().vision_config).save_pretrained(tmp_path / "clip_vision")
        node.report(*common, clip_model=str(tmp_path / "clip_vision"))


def test_a1111_tab_measures_a_patch_with_clip(random_clip, tmp_path, monkeypatch):
    from ablation_core.backends.a1111.flows import A1111Host, TabRequest, run_request
    from tests import a1111_fakes as fakes
    from tests.test_a1111 import PREVIEW_SIZE, PREVIEW_STEPS, build_tab, load_script, press

    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    env = fakes.install(monkeypatch, lora_dir, fakes.FakeSDModel("sd1"), networks=fakes.FakeNetworks())
    env.lora_dir, env.script = lora_dir, load_script(monkeypatch)
    host = A1111Host(env.shared.sd_model, env.state, lora_dir)
    run_request(host, TabRequest("Van Gogh", "painting", "style", "closed form", preview=False))
    _, buttons = build_tab(env)
    button = buttons["Measure with CLIP on the loaded model"]
    values = {"Patch": "ablate_Van_Gogh_to_painting", PREVIEW_SIZE: 32, PREVIEW_STEPS: 2,
              "Images per prompt set": 2}
    (message,) = press(button, {**values, "CLIP model folder": ""})
    assert "huggingface-cli download" in message
    (message,) = press(button, {**values, "CLIP model folder": str(random_clip)})
    assert "cost: " in message and "clip_accuracy" in message and "neighbour_kid" in message
    assert fakes.hooks_left(env.shared.sd_model) == 0


def test_forge_tab_measures_a_patch_with_clip(random_clip, tmp_path, monkeypatch):
    """In Forge the figures draw with Forge's own model objects, which are left as they were."""
    from tests import forge_fakes
    from tests.test_a1111 import PREVIEW_SIZE, PREVIEW_STEPS, build_tab, form, load_script, press

    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    env = forge_fakes.install(monkeypatch, lora_dir)
    env.script = load_script(monkeypatch)
    _, buttons = build_tab(env)
    press(buttons["Ablate"], form("closed form", **{"Draw a before/after preview": False}))
    engine = env.model_data.sd_model
    before = forge_fakes.unet_weights(engine)
    values = {"Patch": "ablate_Van_Gogh_to_painting", PREVIEW_SIZE: 32, PREVIEW_STEPS: 2,
              "Images per prompt set": 2, "CLIP model folder": str(random_clip)}
    (message,) = press(buttons["Measure with CLIP on the loaded model"], values)
    assert "cost: " in message and "clip_accuracy" in message
    assert buttons["Measure with CLIP on the loaded model"].events["click"]["js"] == "concept_ablation_start"
    after = forge_fakes.unet_weights(engine)
    assert all(after[k] is before[k] for k in before)


def test_open_clip_files_go_through_open_clip_where_it_is_installed(tmp_path, monkeypatch):
    """The adapter's side of the contract, with a stand-in ``open_clip`` module (the real one is never required)."""
    import sys
    import types

    class Visual(torch.nn.Module):
        image_size = (32, 32)

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual, self.words = Visual(), torch.nn.Embedding(49408, 8)

        def encode_image(self, pixels):
            return self.visual.proj(pixels.mean((2, 3)))

        def encode_text(self, tokens):
            return self.words(tokens).mean(1)

    created = []

    def create_model(name, pretrained=None, device=None):
        if name != "ViT-B-32":
            raise RuntimeError(f"Model config for {name} not found.")
        created.append((name, pretrained))
        return Model()

    def get_tokenizer(name):
        return lambda texts: sd_clip_tokenizer()(texts, padding="max_length", max_length=77,
                                                 return_tensors="pt").input_ids

    monkeypatch.setitem(sys.modules, "open_clip", types.SimpleNamespace(create_model=create_model,
                                                                        get_tokenizer=get_tokenizer))
    path = tmp_path / "open_clip_model.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2), "token_embedding.weight": torch.zeros(2, 2)}, path)
    scorer = load_clip(path, arch="ViT-B-32")
    assert created == [("ViT-B-32", str(path))] and scorer.preprocess.crop == 32
    assert scorer.image_features(torch.rand(3, 3, 16, 24)).shape == (3, 8)
    assert scorer.text_features(["a cat", "a dog"]).shape == (2, 8)
    _one_line_error(path, "open_clip cannot load .* as 'ViT-X-99' \\(Model config for ViT-X-99 not found.\\)",
                    arch="ViT-X-99")
    _one_line_error(tmp_path, "--clip-arch names an open_clip architecture, but .* is a folder", arch="ViT-B-32")
