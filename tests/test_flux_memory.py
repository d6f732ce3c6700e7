"""Flux on a 24 GB card: fp8 base weights (training and patches through them), the cost and memory of Flux.1 dev
counted on the meta device (``bench --arch flux``), and the pre-run estimate that uses those counts."""

from __future__ import annotations

import json

import pytest
import torch

from ablation_core import ablate, make_config
from ablation_core.backends.flux import FluxModelView
from ablation_core.cli.bench_flux import _call, _meta_flux, kv_parameter_names
from ablation_core.methods.ablation.budget import unet_evaluations
from ablation_core.methods.ablation.settings import resolve_config
from ablation_core.models.families import TOY_FLUX
from ablation_core.models.fp8 import FP8, store_fp8
from ablation_core.models.memory import activation_bytes
from ablation_core.patches.apply import apply_patch
from ablation_core.toy import flux as toy_flux

TINY = dict(steps=3, batch_size=2, anchor_images=2, sampler_steps=2, sample_batch_size=2, anchor_prompt_count=2)


def _view(fp8: bool) -> FluxModelView:
    transformer, encoders = toy_flux.build_toy_flux(seed=5)
    if fp8:
        store_fp8(transformer, ("double_blocks.", "single_blocks."))
    return FluxModelView(transformer, encoders, TOY_FLUX, toy_flux.schedule(), default_latent_size=16, guidance=4.0)


def _prediction(view: FluxModelView) -> torch.Tensor:
    cond = view.encode(["a photo of a cat"])
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return view.predict(x, torch.tensor([600]), cond.with_guidance(4.0))


def test_fp8_storage_halves_the_block_weights_and_keeps_the_prediction():
    plain, fp8 = _view(False), _view(True)
    qkv = fp8.transformer.double_blocks[0].txt_attn.qkv
    assert qkv.weight.dtype == FP8 and fp8.transformer.txt_in.weight.dtype == torch.float32
    reference, rounded = _prediction(plain), _prediction(fp8)
    assert not torch.equal(reference, rounded)  # the weights really were rounded ...
    assert (rounded - reference).norm() / reference.norm() < 0.1  # ... by fp8's precision, not more


def test_training_and_patches_go_through_fp8_weights_without_touching_them():
    view = _view(True)
    before = {k: v.clone() for k, v in view.transformer.state_dict().items()}
    result = ablate(view, make_config("grumpy cat", "cat", **TINY))
    assert all(torch.equal(before[k], v) for k, v in view.transformer.state_dict().items())
    assert result.patch.deltas and all(torch.isfinite(d.full()).all() and d.full().abs().max() > 0
                                       for d in result.patch.deltas.values())
    base = _prediction(view)
    with apply_patch(view, result.patch, strength=50.0):  # a hook on top of the fp8 weight, not rounded into it
        patched = _prediction(view)
    assert not torch.allclose(base, patched)
    assert all(torch.equal(before[k], v) for k, v in view.transformer.state_dict().items())
    torch.testing.assert_close(_prediction(view), base)


def test_the_memory_estimate_uses_the_counted_flux_activations():
    model = _meta_flux()
    counted = _call(model, 512, kv_parameter_names(model), grad=True)
    for checkpointing, key in ((False, "saved_bytes"), (True, "saved_bytes_checkpointed")):
        estimated = activation_bytes("flux", 64, 1, torch.bfloat16, checkpointing)
        assert abs(estimated - counted[key]) / counted[key] < 0.05, (checkpointing, estimated, counted[key])


def test_flux_bench_counts_one_pass_per_sampling_step_and_a_plan_that_fits_24_gb(capsys):
    from ablation_core.cli import main

    assert main(["bench", "--arch", "flux", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformer_parameters_b"] == pytest.approx(11.9, abs=0.05)
    assert report["default_preset_unet_evaluations"] <= report["sd_default_preset_unet_evaluations"]
    config = resolve_config(make_config("Grumpy Cat", "cat", guidance=3.5), "flux")
    assert report["default_preset_unet_evaluations_by_phase"]["anchor_sampling"] == \
        int(config.anchor_images) * int(config.sampler_steps)  # distilled: the guidance is an input, one pass
    assert unet_evaluations(config)["anchor_sampling"] == 2 * int(config.anchor_images) * int(config.sampler_steps)
    plans = list(next(v for k, v in report.items() if k.startswith("memory_plan")).values())
    assert [plan["fits_24gb"] for plan in plans] == [False, True]
    assert report["1024px"]["tflops_per_frozen_evaluation"] > 2 * report["512px"]["tflops_per_frozen_evaluation"]


def test_counted_evaluations_on_a_distilled_flux_match_the_cost_model():
    """One pass per sampling step and per check sample on a guidance-distilled model: the count ``bench --arch
    flux`` uses for Flux.1 dev, checked against the transformer's calls on a real run."""
    from ablation_core.evaluation.cost import RunMeter

    view = _view(False)
    meter = RunMeter(view.transformer, [], view.device)
    with meter.measuring():
        result = ablate(view, make_config("grumpy cat", "cat", held_out_prompts=("a photo of a cat",),
                                          **{**TINY, "objective": "model"}))
    counted = {name: phase.unet_evaluations for name, phase in meter.phases.items() if phase.unet_evaluations}
    assert result.config.guidance > 1  # drawn at the distilled model's own guidance ...
    expected = unet_evaluations(result.config, held_out_prompts=1, guidance_input=True)
    assert counted["anchor_sampling"] == expected["anchor_sampling"] == 2 * 2  # ... in one pass per step
    assert counted == expected


def test_the_run_plan_prices_flux_prompts_at_t5_xxls_cost_and_plans_the_checks_prompts():
    """A Flux prompt goes through T5-XXL (about a fifth of a Flux pass), an SD prompt through CLIP (a fortieth of a
    UNet pass): the node's bar gives each phase its share by these, including the held-out check's own prompts,
    which the real ComfyUI showed sitting at one fraction for minutes when they were left out."""
    from ablation_core.methods.ablation.check import check_prompts_encoded
    from ablation_core.methods.run_plan import plan_trained, prompt_cost, unet_pass

    class Plan:
        def __init__(self):
            self.units: dict[str, float] = {}

        def plan(self, phase: str, units: float) -> None:
            self.units[phase] = self.units.get(phase, 0.0) + units

    assert prompt_cost("flux") > 5 * prompt_cost("sd1") and prompt_cost("toy-flux") == prompt_cost("sd1")
    config = resolve_config(make_config("Grumpy Cat", "cat", guidance=3.5), "flux")
    flux, sd = Plan(), Plan()
    plan_trained(flux, config, 64, "flux")
    plan_trained(sd, config, 64, "sd1")
    assert flux.units["prompts"] == pytest.approx(sd.units["prompts"] * prompt_cost("flux") / prompt_cost("sd1"))
    assert flux.units["preserved"] > 0  # the default's kept concepts are encoded too, and planned
    check_passes = unet_evaluations(config)["check"] * unet_pass(64)
    assert flux.units["check"] == pytest.approx(check_passes + check_prompts_encoded(1) * prompt_cost("flux"))
