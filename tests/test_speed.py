"""Cost accounting and the cheaper training path: counted evaluations, bench's JSON, the memory check, reuse."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from ablation_core import ablate
from ablation_core.cli import main
from ablation_core.errors import OutOfMemoryError
from ablation_core.evaluation.cost import RunMeter
from ablation_core.methods.ablation import loop
from ablation_core.methods.ablation.budget import unet_evaluations
from ablation_core.models import memory
from ablation_core.models.sampling import sample_latents

SMALL = dict(steps=3, batch_size=2, anchor_images=2, sampler_steps=2, sample_batch_size=2, anchor_prompt_count=2,
             held_out_prompts=("a photo of a cat",))


def _counted(view, config) -> tuple[dict[str, int], object]:
    meter = RunMeter(view.unet, view.text_encoders, view.device)
    with meter.measuring():
        result = ablate(view, config)
    return {name: phase.unet_evaluations for name, phase in meter.phases.items() if phase.unet_evaluations}, result


@pytest.mark.parametrize("objective, reuse, guidance", [("model", False, 6.0), ("model", True, 6.0),
                                                       ("noise", False, 1.0), ("mixed", False, 1.0)])
def test_counted_evaluations_match_the_settings(sd1_view, objective, reuse, guidance):
    counted, result = _counted(sd1_view, tiny_config(**SMALL, objective=objective, reuse_sampler_states=reuse,
                                                     guidance=guidance))
    # 2 images x 2 solver steps x 2 (guidance; 1 without); 3 steps x 2 rows x (grad pass [+ frozen pass of the
    # model-based loss, unless the sampler's states give it]); the check: 1 prompt x 2 samples x 5, and 3 guided
    # images of that prompt x 2 solver steps (the run's own) x 2 (mixed: 1 of the 2 rows of each step has the
    # frozen target)
    frozen = {"model": 0 if reuse else 2, "noise": 0, "mixed": 1}[objective]
    expected = {"anchor_sampling": 8 if guidance != 1.0 else 4, "training": 3 * (2 + frozen), "check": 10 + 12}
    assert counted == expected
    assert unet_evaluations(result.config, held_out_prompts=1) == expected


def test_bench_quick_json_has_every_field(capsys):
    assert main(["bench", "--arch", "toy", "--quick", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    for phase in ("prompt_encoding", "anchor_sampling", "training", "check", "patch_extraction", "patch_compression"):
        figures = report["phases"][phase]
        assert {"seconds", "unet_evaluations", "flops", "peak_memory_bytes"} <= figures.keys(), phase
        assert figures["peak_memory_bytes"] > 0
    assert report["phases"]["anchor_sampling"]["unet_evaluations"] > 0
    assert report["phases"]["training"]["flops"] > report["phases"]["training"]["unet_evaluations"] > 0
    assert report["unet_evaluations"] == report["unet_evaluations_expected"]
    assert report["end_to_end_s"] > 0 and report["device"].startswith("cpu")
    assert report["settings"]["steps"] == 2
    assert report["default_preset"]["settings"]["steps"] == 100
    assert report["default_preset_unet_evaluations"] == sum(report["default_preset"]["unet_evaluations_by_phase"]
                                                            .values())
    assert report["default_preset_flops"] > report["default_preset_unet_evaluations"]


def test_a_run_that_cannot_fit_is_refused_before_it_starts(sd1_view, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    calls = []
    handle = sd1_view.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(OutOfMemoryError, match="nothing was started") as caught:
            ablate(sd1_view, tiny_config(**SMALL))
    finally:
        handle.remove()
    assert not calls
    assert "--batch-size" in str(caught.value) and "GiB" in str(caught.value)
    monkeypatch.setenv("ABLATION_SKIP_MEMORY_CHECK", "1")
    ablate(sd1_view, tiny_config(**{**SMALL, "steps": 1}))


def test_bench_refuses_a_model_too_large_for_the_memory(monkeypatch, capsys):
    import ablation_core.cli.bench as bench

    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 << 30)
    built = []
    real_build = bench.build_components

    def build(*args, **kwargs):
        built.append(kwargs.get("dtype"))
        if kwargs.get("dtype") is not None:
            raise AssertionError("the model was built although it does not fit")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(bench, "build_components", build)
    assert main(["bench", "--arch", "sdxl", "--quick", "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "GiB" in err and "weights 6." in err and "Traceback" not in err
    assert built == [None]  # only the weightless (meta) copy used for the estimate


def test_estimate_counts_weights_and_activations():
    small = memory.estimate("sd1", 16, 1, torch.bfloat16, trained_parameters=10**6, weight_parameters=10**9)
    large = memory.estimate("sd1", 64, 8, torch.bfloat16, trained_parameters=10**6, weight_parameters=10**9)
    assert small.weights == 2 * 10**9 and large.activations == 16 * 8 * small.activations
    assert memory.estimate("sd1", 16, 1, torch.float32, 0, 10**9).weights == 4 * 10**9


def test_sampler_states_hold_the_frozen_anchor_prediction(sd1_view):
    cond = sd1_view.encode(["a photo of a cat", "a cat"])
    states: list = []
    sample_latents(sd1_view, ["a photo of a cat", "a cat"], torch.tensor([1, 0, 1]), 3, 5.0, 2, 0,
                   encoded=cond, states=states)
    assert len(states) == 2 * 3  # two batches, three solver steps each
    x_t, t, frozen, images = states[-1]
    assert images.tolist() == [2]
    with torch.no_grad():
        again = sd1_view.predict(x_t, t, cond.select([1]))
    torch.testing.assert_close(frozen, again, rtol=1e-4, atol=1e-5)


def test_reused_states_feed_the_loss(sd1_view, monkeypatch):
    drawn = []
    real_batch = loop.training_batch

    def spy(states, *args, **kwargs):
        batch = real_batch(states, *args, **kwargs)
        drawn.append((states, batch))
        return batch

    monkeypatch.setattr(loop, "training_batch", spy)
    losses = []
    real_loss = loop._step_loss

    def loss_spy(view, adapters, config, x_t, t, noise, anchor_index, target_index, anchor_cond, target_cond,
                 target_prompts, frozen=None):
        assert frozen is not None, "the loss computed its own frozen pass"
        losses.append((x_t, frozen))
        return real_loss(view, adapters, config, x_t, t, noise, anchor_index, target_index, anchor_cond,
                         target_cond, target_prompts, frozen)

    monkeypatch.setattr(loop, "_step_loss", loss_spy)
    counted, _ = _counted(sd1_view, tiny_config(**SMALL, objective="model", guidance=6.0, reuse_sampler_states=True))
    assert len(drawn) == 3 and counted["training"] == 3 * 2
    for (states, batch), (x_t, frozen) in zip(drawn, losses):
        assert len(states) == 2 * 2  # 2 images x 2 solver steps
        assert torch.equal(batch[0], x_t) and torch.equal(batch[5], frozen)  # the drawn batch is what the loss gets
        for row in range(len(x_t)):
            match = [i for i in range(len(states)) if torch.equal(states.x_t[i], x_t[row])]
            assert match, "a training input is not a state the sampler visited"
            assert torch.equal(states.frozen[match[0]], frozen[row])


def test_guidance_one_samples_the_same_images_from_one_pass(sd1_view):
    calls = []
    handle = sd1_view.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        one_pass = sample_latents(sd1_view, ["a photo of a cat"], torch.tensor([0, 0]), 3, 1.0, 2, 0)
        rows_one_pass = sum(calls)
        calls.clear()
        guided = sample_latents(sd1_view, ["a photo of a cat"], torch.tensor([0, 0]), 3, 1.0 + 1e-6, 2, 0)
    finally:
        handle.remove()
    assert rows_one_pass * 2 == sum(calls)  # no unconditional half
    torch.testing.assert_close(one_pass, guided, atol=1e-3, rtol=1e-3)


def test_the_mixed_objective_gives_its_low_noise_rows_the_frozen_target(sd1_view, monkeypatch):
    seen = []
    real_loss = loop.ablation_loss

    def spy(objective, target_pred, noise, frozen):
        seen.append((noise.clone(), frozen.clone()))
        return real_loss(objective, target_pred, noise, frozen)

    steps = []
    real_batch = loop.training_batch

    def batch_spy(*args):
        out = real_batch(*args)
        steps.append(out[1].clone())
        return out

    monkeypatch.setattr(loop, "ablation_loss", spy)
    monkeypatch.setattr(loop, "training_batch", batch_spy)
    ablate(sd1_view, tiny_config(**{**SMALL, "batch_size": 5}, objective="mixed"))
    assert len(steps) == 3
    for t, (noise, target) in zip(steps, seen):  # 2 of 5 rows (40 %) from the 40 % least noisy timesteps
        assert (t[:2] < 400).all() and (t[2:] >= 400).all()
        assert not torch.equal(target[:2], noise[:2]) and torch.equal(target[2:], noise[2:])


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_small_mixed_batches_still_cover_the_timesteps(batch):
    from ablation_core.methods.ablation.objectives import model_rows
    from ablation_core.methods.ablation.reuse import training_batch
    from ablation_core.models.schedules import EpsSchedule

    schedule = EpsSchedule(torch.linspace(0.99, 0.01, 1000))
    rows = model_rows("mixed", batch)
    _, t, *_ = training_batch(None, torch.zeros(4, 4, 8, 8), torch.zeros(4, dtype=torch.long), 1, batch, schedule,
                              torch.Generator().manual_seed(0), torch.device("cpu"), torch.float32, rows)
    assert len(t) == batch and ((0 <= t) & (t < 1000)).all()


def test_a_regularized_mixed_run_counts_a_frozen_pass_for_every_row(sd1_view):
    counted, result = _counted(sd1_view, tiny_config(**SMALL, objective="mixed", regularization=True))
    assert counted["training"] == 3 * (2 * 2 + 2)  # 2 rows x (target and anchor passes) + 2 frozen passes
    assert unet_evaluations(result.config, held_out_prompts=1)["training"] == counted["training"]
