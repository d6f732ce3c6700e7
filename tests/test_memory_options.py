"""Memory options for small cards: gradient checkpointing and the text encoders set aside while training."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from ablation_core import ablate
from ablation_core.errors import AblationError, OutOfMemoryError
from ablation_core.models import memory
from ablation_core.models.checkpointing import checkpointed, set_aside, transformer_blocks
from ablation_core.models.meta import call_cost, meta_copy, parameter_names, to_meta

SMALL = dict(steps=2, batch_size=2, anchor_images=2, sampler_steps=2, sample_batch_size=2, anchor_prompt_count=2,
             held_out_prompts=("a photo of a cat",))


def _grads(view, checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    layers = view.layers("kv")
    weights = [layer.module.weight for layer in layers]
    cond = view.encode(["a photo of a grumpy cat"] * 2)
    x_t = torch.randn(2, view.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([100, 700])
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    try:
        with checkpointed(view.transformer_blocks()) if checkpointing else torch.enable_grad():
            out = view.predict(x_t, t, cond)
            out.float().square().mean().backward()
        return out.detach(), [w.grad.clone() for w in weights]
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None


def test_checkpointing_gives_the_same_gradients_and_restores_the_blocks(sd1_view):
    blocks = sd1_view.transformer_blocks()
    assert blocks and all("forward" not in vars(b) for b in blocks)
    plain_out, plain = _grads(sd1_view, False)
    calls = []
    handles = [b.attn2.register_forward_pre_hook(lambda module, args: calls.append(1)) for b in blocks]
    try:
        out, grads = _grads(sd1_view, True)
    finally:
        for handle in handles:
            handle.remove()
    assert len(calls) == 2 * len(blocks)  # each block's inside ran again in the backward pass
    torch.testing.assert_close(out, plain_out)
    for got, expected in zip(grads, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert all("forward" not in vars(b) for b in blocks)


def test_an_ablation_with_both_memory_options_makes_the_same_patch(sd1_view):
    plain = ablate(sd1_view, tiny_config(**SMALL)).patch
    light = ablate(sd1_view, tiny_config(**SMALL, gradient_checkpointing=True, offload_text_encoder=True))
    assert light.config.gradient_checkpointing and light.config.offload_text_encoder
    for key, delta in plain.deltas.items():
        torch.testing.assert_close(light.patch.deltas[key].full(), delta.full(), atol=1e-5, rtol=1e-3)
    assert all("forward" not in vars(b) for b in sd1_view.transformer_blocks())


class _Encoder(nn.Module):
    """Stands for a text encoder on an accelerator: records where it is sent."""

    def __init__(self):
        super().__init__()
        self.places: list[str] = []

    def to(self, device):
        self.places.append(str(device))
        return self


def test_text_encoders_wait_on_the_cpu_and_come_back():
    encoder = _Encoder()
    with set_aside([encoder], "mps"):
        assert encoder.places == ["cpu"]
    assert encoder.places == ["cpu", "mps"]
    with pytest.raises(RuntimeError), set_aside([encoder], "mps"):
        raise RuntimeError("training failed")
    assert encoder.places[-1] == "mps"
    with set_aside([encoder], "cpu"):
        pass
    assert len(encoder.places) == 4  # a CPU run moves nothing


def test_the_embedding_group_cannot_set_its_text_encoder_aside(sd1_view):
    with pytest.raises(AblationError, match="embedding group trains the text encoder"):
        ablate(sd1_view, tiny_config(**SMALL, group="embedding", offload_text_encoder=True))


def test_checkpointing_is_counted_in_the_memory_estimate(sd1_view, monkeypatch):
    twin = meta_copy(sd1_view.unet)
    x = to_meta(torch.zeros(1, sd1_view.latent_channels, 16, 16, dtype=twin.dtype))
    cond = to_meta(torch.zeros(1, 77, sd1_view.unet.config.cross_attention_dim, dtype=twin.dtype))
    trained = parameter_names(twin, [m for _, m in transformer_blocks_kv(twin)])
    cost = call_cost(twin, (x, torch.zeros(1, dtype=torch.long, device="meta")), {"encoder_hidden_states": cond},
                     trained, grad=True)
    assert 0 < cost["saved_bytes_checkpointed"] < cost["saved_bytes"]
    for family in ("sd1", "sd2", "sdxl"):
        plain = memory.estimate(family, 128, 1, torch.bfloat16, 0)
        light = memory.estimate(family, 128, 1, torch.bfloat16, 0, checkpointing=True)
        assert light.activations < plain.activations / 3
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    with pytest.raises(OutOfMemoryError, match="--gradient-checkpointing"):
        memory.check_fits(memory.estimate("sdxl", 128, 2, torch.bfloat16, 0), "cpu", 2, 128, torch.bfloat16,
                          checkpointing=False)


def transformer_blocks_kv(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The K/V projections of the cross-attention inside the transformer blocks (what the kv group trains)."""
    return [(name, module) for block in transformer_blocks(unet) for name, module in block.named_modules()
            if name.endswith(("attn2.to_k", "attn2.to_v"))]
