"""Model loading: single-file checkpoints of SD1/SD2/SDXL, diffusers folders, and clear errors for the rest."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ablation_core.backends.diffusers import DiffusersModelView
from ablation_core.backends.loading import load_model
from ablation_core.errors import UnsupportedModelError
from ablation_core.methods.prompts import anchor_prompt_bank, misspellings, target_prompts
from ablation_core.models.tokenizer import sd_clip_tokenizer


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_checkpoint_loads_the_same_model(tiny_components, checkpoint_files, family):
    original = DiffusersModelView(tiny_components[family])
    loaded = load_model(checkpoint_files[family])
    assert loaded.family.name == family
    prompts = ["a photo of a cat", "a painting in the style of Van Gogh"]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    with torch.no_grad():
        cond = original.encode(prompts)
        cond_loaded = loaded.encode(prompts)
        torch.testing.assert_close(cond_loaded.context, cond.context)
        if family == "sdxl":
            torch.testing.assert_close(cond_loaded.extra["text_embeds"], cond.extra["text_embeds"])
        torch.testing.assert_close(loaded.predict(x, t, cond), original.predict(x, t, cond))
        torch.testing.assert_close(loaded.decode(x), original.decode(x))
    assert {layer.key for layer in loaded.layers("kv")} == {layer.key for layer in original.layers("kv")}


def test_diffusers_folder_loads(tiny_components, tmp_path):
    components = tiny_components["sd1"]
    components.unet.save_pretrained(tmp_path / "unet")
    components.text_encoders[0].save_pretrained(tmp_path / "text_encoder")
    view = load_model(tmp_path)
    assert view.family.name == "sd1" and view.vae is None
    assert len(view.layers("kv")) == len(DiffusersModelView(components).layers("kv"))


def test_real_sd_tokenization():
    tokenizer = sd_clip_tokenizer()
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408


@pytest.mark.parametrize("keys,message", [
    ({"model.diffusion_model.joint_blocks.0.x.weight": torch.zeros(1)}, "MM-DiT"),
    ({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, "MM-DiT"),
    ({"some.random.weight": torch.zeros(1)}, "not a Stable Diffusion checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "no text encoder"),
])
def test_unsupported_checkpoints_get_clear_errors(tmp_path, keys, message):
    path = tmp_path / "model.safetensors"
    save_file(keys, str(path))
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(path)


def test_pickles_corrupt_files_and_missing_paths_are_refused(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(UnsupportedModelError, match="only .safetensors"):
        load_model(tmp_path / "model.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(UnsupportedModelError, match="not a readable"):
        load_model(tmp_path / "broken.safetensors")
    with pytest.raises(UnsupportedModelError, match="not found"):
        load_model(tmp_path / "nowhere.safetensors")
    (tmp_path / "transformer").mkdir()
    with pytest.raises(UnsupportedModelError, match="MM-DiT"):
        load_model(tmp_path)


def test_prompt_bank_has_hundreds_of_distinct_prompts():
    for anchor, kind in (("cat", "object"), ("painting", "style")):
        bank = anchor_prompt_bank(anchor, kind)
        assert len(set(bank)) >= 200 and all(anchor in p for p in bank)


def test_target_prompts_are_twins_of_anchor_prompts():
    anchors = ["a photo of a cat on a table", "Cat at night"]
    assert target_prompts(anchors, "cat", "Grumpy Cat", "object") == ["a photo of a Grumpy Cat on a table",
                                                                       "Grumpy Cat at night"]
    assert target_prompts(["a painting of a river"], "painting", "Van Gogh", "style") == [
        "a painting of a river, in the style of Van Gogh"]
    typos = misspellings("Van Gogh", 5, seed=0)
    assert len(typos) == 5 and all(t.lower() != "van gogh" for t in typos)


def test_an_sd3_diffusers_folder_is_refused_naming_what_is_supported(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text('{"_class_name": "SD3Transformer2DModel"}')
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(UnsupportedModelError, match="SD3/SD3.5.*Flux.1"):
        load_model(tmp_path)
