"""Patch files: exact and low-rank storage, the round trip, kohya keys, merging, imports and bad files."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest
import torch
from conftest import unet_weights

from ablation_core import AblationPatch, LayerDelta, apply_patch, load_patch
from ablation_core.backends.diffusers import DiffusersModelView
from ablation_core.errors import PatchError, PatchMismatchError
from ablation_core.methods.ablation.adapters import AdapterSet
from ablation_core.models.configs import unet_config
from ablation_core.models.ldm_keys import UNetLayout, unet_module_to_ldm
from ablation_core.models.random_models import build_components
from ablation_core.patches.importers import patch_from_finetuned, read_delta_bin
from ablation_core.patches.merge import merge_weighted
from ablation_core.patches.patch import low_rank


def test_full_rank_patch_reproduces_the_finetuned_model(sd1_view, sd1_result, tmp_path):
    """Outputs with the trained adapters attached equal outputs with the saved full-rank patch applied."""
    path = sd1_result.patch.save(tmp_path / "exact.safetensors", dtype=torch.float32)
    loaded = load_patch(path)
    layers = {layer.key: layer for layer in sd1_view.layers("kv")}
    adapters = AdapterSet(list(layers.values()))
    with torch.no_grad():
        for adapter in adapters.adapters:
            adapter.delta.copy_(sd1_result.patch.deltas[adapter.layer.key].full())
    cond, x, t = sd1_view.encode(["a photo of Grumpy Cat"]), torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    before = unet_weights(sd1_view)
    with torch.no_grad():
        with adapters.attached():
            finetuned = sd1_view.predict(x, t, cond.select([0, 0]))
        applied = apply_patch(sd1_view, loaded)
        for key, layer in layers.items():
            expected = before[_param_name(sd1_view, layer.module)] + sd1_result.patch.deltas[key].full()
            assert torch.equal(layer.module.weight, expected)
        patched = sd1_view.predict(x, t, cond.select([0, 0]))
        applied.remove()
    torch.testing.assert_close(patched, finetuned, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in unet_weights(sd1_view).items()), "remove() is not exact"


def _param_name(view, module) -> str:
    return next(name for name, m in view.unet.named_modules() if m is module) + ".weight"


def test_low_rank_patch_stays_within_its_stated_error(sd1_result, tmp_path):
    compressed = sd1_result.patch.compressed(energy=0.9)
    stated = float(compressed.metadata["ablation.low_rank_max_relative_error"])
    assert 0 < stated <= (1 - 0.9) ** 0.5 + 1e-6
    loaded = load_patch(compressed.save(tmp_path / "low.safetensors", dtype=torch.float32))
    assert loaded.is_low_rank
    for key, exact in sd1_result.patch.deltas.items():
        full = exact.full()
        error = (loaded.deltas[key].full(full.shape) - full).norm() / full.norm()
        assert error <= stated + 1e-5


def test_low_rank_of_a_low_rank_matrix_is_exact():
    matrix = torch.randn(64, 3) @ torch.randn(3, 48)
    delta, error = low_rank(matrix, energy=0.999999)
    assert delta.rank == 3 and error < 1e-3
    torch.testing.assert_close(delta.full(), matrix, rtol=1e-4, atol=1e-4)


def test_conv_deltas_compress_to_conv_shaped_lora():
    conv = torch.randn(32, 1, 1, 1) * torch.randn(1, 16, 3, 3)
    delta, _ = low_rank(conv)
    assert delta.up.shape == (32, 1, 1, 1) and delta.down.shape == (1, 16, 3, 3)
    torch.testing.assert_close(delta.full(conv.shape), conv, rtol=1e-4, atol=1e-4)


def test_round_trip_keeps_metadata_and_kohya_layout(sd1_view, sd1_result, tmp_path):
    path = sd1_result.patch.compressed(rank=2).save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") and k.split(".", 1)[1] in ("lora_up.weight", "lora_down.weight", "alpha")
               for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ablation.format_version"] == "1"
    assert json.loads(meta["ablation.targets"]) == ["Grumpy Cat"] and json.loads(meta["ablation.anchors"]) == ["cat"]
    loaded = load_patch(path)
    assert loaded.base_fingerprint == sd1_result.patch.base_fingerprint
    before = unet_weights(sd1_view)
    applied = apply_patch(sd1_view, loaded, strength=1.0, strict=True)
    changed = [k for k, v in unet_weights(sd1_view).items() if not torch.equal(v, before[k])]
    applied.remove()
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)


def test_kv_keys_match_the_real_sd15_layout():
    """On the real SD1.5 shape, K/V keys are exactly the 32 that ComfyUI and A1111 know (LDM names)."""
    with torch.device("meta"):
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel(**unet_config("sd1"))
    layout = UNetLayout.from_config(unet_config("sd1"))
    names = {unet_module_to_ldm(n, layout) for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    blocks = [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
    blocks += [f"output_blocks.{i}.1" for i in range(3, 12)]
    expected = {f"{b}.transformer_blocks.0.attn2.to_{kv}" for b in blocks for kv in "kv"}
    assert names == expected


def test_fingerprint_mismatch_warns_or_refuses(sd1_result, tiny_components, caplog):
    other = DiffusersModelView(build_components("sd1", seed=99))
    with caplog.at_level("WARNING"):
        applied = apply_patch(other, sd1_result.patch)
    applied.remove()
    assert "another base model" in caplog.text
    with pytest.raises(PatchMismatchError, match="another base model"):
        apply_patch(other, sd1_result.patch, strict=True)


def test_patch_for_another_architecture_is_refused(sd1_result, sdxl_view):
    with pytest.raises(PatchError, match="another (architecture|model size)"):
        apply_patch(sdxl_view, sd1_result.patch)


def test_patch_with_wrong_shape_is_refused(sd1_view, sd1_result):
    key = next(iter(sd1_result.patch.deltas))
    bad = AblationPatch({key: LayerDelta(diff=torch.zeros(3, 3))}, {})
    with pytest.raises(PatchError, match="shape"):
        apply_patch(sd1_view, bad)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "nan", "half_lora", "missing", "pickle"])
def test_bad_patch_files_get_clear_errors(sd1_result, tmp_path, damage):
    path = sd1_result.patch.compressed().save(tmp_path / "p.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "nan":
        from safetensors.torch import save_file

        save_file({"lora_unet_x.diff": torch.tensor([float("nan")])}, str(path))
    elif damage == "half_lora":
        from safetensors.torch import save_file

        save_file({"lora_unet_x.lora_up.weight": torch.ones(2, 1)}, str(path))
    elif damage == "missing":
        path = tmp_path / "nothing.safetensors"
    else:
        path = tmp_path / "p.pt"
        path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PatchError):
        load_patch(path)


def test_weighted_merge_is_the_weighted_sum(sd1_result):
    patch = sd1_result.patch
    merged = merge_weighted([patch, patch.scaled(2.0)], [0.5, 0.25])
    for key, delta in patch.deltas.items():
        torch.testing.assert_close(merged.deltas[key].full(), delta.full())
    assert json.loads(merged.metadata["ablation.targets"]) == ["Grumpy Cat", "Grumpy Cat"]
    with pytest.raises(PatchError, match="one weight per patch"):
        merge_weighted([patch], [1.0, 2.0])


def test_delta_bin_imports_as_the_weight_difference(sd1_view, tmp_path):
    layers = sd1_view.layers("kv")
    names = {id(m): n for n, m in sd1_view.unet.named_modules()}
    change = {layer.key: torch.randn_like(layer.weight) * 0.01 for layer in layers}
    finetuned = {f"{names[id(layer.module)]}.weight": layer.weight.detach() + change[layer.key] for layer in layers}
    path = tmp_path / "delta.bin"
    torch.save({"unet": finetuned}, path)
    patch = patch_from_finetuned(sd1_view, read_delta_bin(path), "delta.bin")
    assert set(patch.deltas) == set(change)
    for key, delta in change.items():
        torch.testing.assert_close(patch.deltas[key].full(), delta)


def test_delta_bin_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "code_ran"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "delta.bin"
    with open(path, "wb") as f:
        pickle.dump({"unet": Exploit()}, f)
    with pytest.raises(PatchError, match="refused"):
        read_delta_bin(path)
    assert not marker.exists(), "unpickling ran the file's code"


def test_delta_bin_that_is_not_a_torch_file_gets_plain_advice(tmp_path):
    text = tmp_path / "delta.bin"
    text.write_text("hello")
    with pytest.raises(PatchError, match="not a PyTorch file") as raised:
        read_delta_bin(text)
    assert "weights_only=False" not in str(raised.value) and "file an issue" not in str(raised.value)
    with pytest.raises(PatchError, match="does not exist"):
        read_delta_bin(tmp_path / "missing.bin")


def test_interrupted_save_leaves_no_file(sd1_result, tmp_path, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        sd1_result.patch.save(tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_saved_patch_gets_the_usual_file_permissions(sd1_result, tmp_path):
    # The atomic temp file is private (0600); the finished patch must be readable like any file the user saves.
    old = os.umask(0o022)
    try:
        path = sd1_result.patch.save(tmp_path / "p.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_every_save_keeps_the_smaller_of_low_rank_and_exact(tmp_path):
    """A low-rank delta whose factors hold more numbers than its exact change (the closed form's rank-586 layers of
    #22) is written exact; a truly low-rank one stays factors; either loads back as the change (fp16 precision)."""
    torch.manual_seed(0)
    high = LayerDelta(up=torch.randn(64, 40), down=torch.randn(40, 48), alpha=40.0)  # 40 * 112 > 64 * 48 numbers
    low = LayerDelta(up=torch.randn(64, 2), down=torch.randn(2, 48), alpha=2.0)
    patch = AblationPatch({"lora_unet_high": high, "lora_unet_low": low}, {"ss_network_dim": "40"})
    path = patch.save(tmp_path / "mixed.safetensors")
    loaded = load_patch(path)
    assert not loaded.deltas["lora_unet_high"].is_low_rank
    assert loaded.deltas["lora_unet_low"].is_low_rank and loaded.deltas["lora_unet_low"].rank == 2
    assert loaded.numel() == 64 * 48 + 2 * (64 + 48)
    assert loaded.metadata["ss_network_dim"] == "2" and loaded.metadata["ablation.storage"] == "lora"
    for key, delta in patch.deltas.items():
        change = delta.full()
        assert torch.allclose(loaded.deltas[key].full(), change, rtol=2e-3, atol=2e-3 * change.abs().max().item())
    # a conv LoRA whose factors are larger than its kernel is also written exact, in the kernel's shape
    conv = LayerDelta(up=torch.randn(8, 8, 1, 1), down=torch.randn(8, 4, 3, 3), alpha=8.0)  # 64 + 288 > 288
    kernel = load_patch(AblationPatch({"lora_unet_conv": conv}).save(tmp_path / "conv.safetensors"))
    assert kernel.deltas["lora_unet_conv"].diff.shape == (8, 4, 3, 3)
    assert kernel.metadata["ablation.storage"] == "diff"
