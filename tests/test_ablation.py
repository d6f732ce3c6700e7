"""The ablation loop: the loss falls, only the chosen group trains, the model is never modified, runs repeat."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, unet_weights

from ablation_core import Progress, ablate
from ablation_core.errors import (
    AblationCancelled,
    OutOfMemoryError,
    PromptError,
    TrainingDivergedError,
)
from ablation_core.methods import phases
from ablation_core.methods.ablation.adapters import AdapterSet
from ablation_core.models.layers import GROUPS


def test_model_based_loss_falls(sd1_result):
    losses = sd1_result.losses
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_noise_based_loss_falls_with_regularization(sd1_view):
    result = ablate(sd1_view, tiny_config(objective="noise", regularization=True, steps=30, learning_rate=3e-3))
    assert sum(result.losses[-8:]) / 8 < sum(result.losses[:8]) / 8


def token_embedding(view) -> torch.Tensor:
    return next(v for k, v in view.text_encoders[0].state_dict().items() if k.endswith("token_embedding.weight"))


@pytest.mark.parametrize("group", GROUPS)
def test_only_the_chosen_group_changes(sd1_view, group):
    before = unet_weights(sd1_view)
    text_before = token_embedding(sd1_view).clone()
    result = ablate(sd1_view, tiny_config(group=group, steps=3))
    expected = {layer.key for layer in sd1_view.layers(group)}
    assert set(result.patch.deltas) == expected
    changed = {k for k, d in result.patch.deltas.items() if torch.any(d.full() != 0)}
    assert changed, "training changed nothing"
    if group == "kv":
        assert all(k.endswith(("attn2_to_k", "attn2_to_v")) for k in changed)
    if group == "embedding":
        (key,) = changed
        rows = torch.nonzero(result.patch.deltas[key].full().abs().sum(1)).flatten().tolist()
        target_only = set(sd1_view.token_ids("Grumpy Cat")[0]) - set(sd1_view.token_ids("cat")[0])
        assert set(rows) <= target_only and rows
    after = unet_weights(sd1_view)
    assert all(torch.equal(before[k], after[k]) for k in before), "ablate() modified the model in place"
    assert torch.equal(token_embedding(sd1_view), text_before)
    assert not any(m._forward_hooks for m in sd1_view.unet.modules()), "adapter hooks were left behind"


def test_lora_training_gives_low_rank_deltas(sd1_view):
    result = ablate(sd1_view, tiny_config(lora_rank=2, steps=5))
    for delta in result.patch.deltas.values():
        assert torch.linalg.matrix_rank(delta.full().flatten(1)) <= 2


def test_sdxl_ablation_trains_both_text_sides_of_kv(sdxl_view):
    result = ablate(sdxl_view, tiny_config(steps=4))
    assert result.patch.metadata["ablation.base_family"] == "sdxl"
    assert all(k.startswith("lora_unet_") for k in result.patch.deltas)


def test_runs_are_deterministic_on_cpu(sd1_view):
    first = ablate(sd1_view, tiny_config(steps=4, seed=7))
    second = ablate(sd1_view, tiny_config(steps=4, seed=7))
    assert first.losses == second.losses
    assert all(torch.equal(first.patch.deltas[k].full(), second.patch.deltas[k].full()) for k in first.patch.deltas)


def test_progress_reports_loss_and_eta(sd1_view):
    seen: list[Progress] = []
    ablate(sd1_view, tiny_config(steps=3), on_progress=seen.append)
    train = [p for p in seen if p.phase == "train" and not p.within]  # not the reports while a step runs
    assert [p.step for p in train] == [0, 1, 2, 3] and all(p.loss is not None for p in train[1:])  # 0: it began
    assert train[-1].eta_seconds == 0 and any(p.phase == "anchors" for p in seen)
    phases = list(dict.fromkeys(p.phase for p in seen))
    assert phases == ["prompts", "anchors", "train", "check"]
    prompts = [p for p in seen if p.phase == "prompts"]
    assert prompts[-1].step == prompts[-1].total > 0


def test_anchor_sampling_reports_and_cancels_within_a_batch(sd1_view):
    # One batch of 4 images over 4 solver steps: progress must arrive per step, not only once the batch is done.
    seen: list[Progress] = []
    config = tiny_config(steps=1, anchor_images=4, sample_batch_size=4, sampler_steps=4)
    ablate(sd1_view, config, on_progress=seen.append)
    anchors = [p.step for p in seen if p.phase == "anchors" and not p.within]
    assert anchors == [0, 1, 2, 3, 4] and all(p.total == 4 for p in seen if p.phase == "anchors")
    checks, entered = iter(range(100)), []  # the second check once sampling began: inside the batch
    with phases.listening(entered.append), pytest.raises(AblationCancelled, match="sampling anchor images"):
        ablate(sd1_view, config, should_cancel=lambda: "sampling anchor images" in entered and next(checks) >= 1)


def test_cancel_stops_and_leaves_model_untouched(sd1_view):
    before = unet_weights(sd1_view)
    calls = iter(range(100))
    with pytest.raises(AblationCancelled):
        ablate(sd1_view, tiny_config(steps=50), should_cancel=lambda: next(calls) >= 4)
    assert all(torch.equal(before[k], v) for k, v in unet_weights(sd1_view).items())
    assert not any(m._forward_hooks for m in sd1_view.unet.modules())


def test_nan_loss_stops_with_clear_error(sd1_view, monkeypatch):
    original = type(sd1_view).predict

    def broken(self, x_t, t, cond):
        return original(self, x_t, t, cond) * float("nan")

    monkeypatch.setattr(type(sd1_view), "predict", broken)
    with pytest.raises(TrainingDivergedError, match="learning rate"):
        ablate(sd1_view, tiny_config(steps=2, sampler_steps=1))


def test_out_of_memory_becomes_clear_error(sd1_view, monkeypatch):
    def out_of_memory(self, x_t, t, cond):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(type(sd1_view), "predict", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="smaller batch"):
        ablate(sd1_view, tiny_config(steps=2))


@pytest.mark.parametrize("target,anchor,message", [
    ("", "cat", "target is empty"), ("Grumpy Cat", "  ", "anchor is empty"), ("cat", "Cat", "both"),
])
def test_bad_prompts_are_refused(sd1_view, target, anchor, message):
    with pytest.raises(PromptError, match=message):
        ablate(sd1_view, tiny_config(target, anchor))


def test_embedding_group_needs_words_of_its_own(sd1_view):
    with pytest.raises(PromptError, match="no words of its own"):
        ablate(sd1_view, tiny_config("cat cat", "cat", group="embedding"))


def test_adapters_switch_off_to_give_the_frozen_model(sd1_view):
    layers = sd1_view.layers("kv")
    adapters = AdapterSet(layers)
    with torch.no_grad():
        for adapter in adapters.adapters:
            adapter.delta.normal_()
    cond = sd1_view.encode(["a cat"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        frozen = sd1_view.predict(x, t, cond)
        with adapters.attached():
            changed = sd1_view.predict(x, t, cond)
            with adapters.disabled():
                off = sd1_view.predict(x, t, cond)
    assert torch.equal(frozen, off) and not torch.allclose(frozen, changed)


def test_ablation_moves_the_target_onto_the_anchor(sd1_view, sd1_result):
    """The point of it all: after the patch, target prompts predict much closer to what their anchor twins did."""
    from ablation_core.evaluation.model_metrics import prediction_gaps
    from ablation_core.methods.prompts import choose_anchor_prompts, target_prompts

    anchors = choose_anchor_prompts("cat", "object", 16, seed=0)[:6]
    gaps = prediction_gaps(sd1_view, sd1_result.patch, target_prompts(anchors, "cat", "Grumpy Cat", "object"), anchors)
    assert gaps["target_anchor_gap_before"] > 0.01
    assert gaps["target_anchor_gap_after"] < 0.7 * gaps["target_anchor_gap_before"]


def test_the_held_out_check_draws_its_images_at_the_runs_latent_size(sd1_view, monkeypatch):
    """A run at a lower training resolution (the memory hint's advice) checks its effect at that size too: the check
    drew at the model's own size, 4 times the work and memory of a run at half of SD1's 64 latents."""
    from ablation_core.methods.ablation import check

    drawn_sizes: list[int] = []
    draw = check.sample_latents

    def recorded(*args, **kwargs):
        latents = draw(*args, **kwargs)
        drawn_sizes.append(latents.shape[-1])
        return latents

    monkeypatch.setattr(check, "sample_latents", recorded)
    size = sd1_view.default_latent_size // 2
    result = ablate(sd1_view, tiny_config(steps=2, latent_size=size))
    assert drawn_sizes and set(drawn_sizes) == {size}
    assert result.check["images"] > 0
