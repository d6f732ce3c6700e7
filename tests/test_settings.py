"""Settings suit the model wherever it is named, and a run that changed nothing says so."""

from __future__ import annotations

import json

import pytest
from conftest import prediction_change

from ablation_core import PromptError, evaluate_toy, load_model, load_patch, make_config, resolve_config
from ablation_core.cli import main
from ablation_core.methods.ablation.budget import unet_evaluations
from ablation_core.methods.ablation.settings import preset_values
from ablation_core.toy.prompts import anchor_prompts as toy_anchor_prompts


@pytest.fixture(scope="module")
def toy_view():
    return load_model("toy")


def test_the_toy_model_gets_its_own_settings_and_real_models_the_reference_ones():
    toy = resolve_config(make_config("Snoopy", "dog"), "toy")
    real = resolve_config(make_config("Snoopy", "dog"), "sd1")
    assert toy.learning_rate == preset_values("toy")["learning_rate"] != real.learning_rate
    assert toy.anchor_prompts == tuple(toy_anchor_prompts("dog")) and real.anchor_prompts is None
    assert toy.target == "snoopy" and toy.kind == "object"
    assert resolve_config(make_config("Van Gogh", "painting"), "toy").kind == "style"
    chosen = resolve_config(make_config("snoopy", "dog", steps=7, learning_rate=0.5), "toy")
    assert (chosen.steps, chosen.learning_rate) == (7, 0.5)
    assert resolve_config(toy, "toy") == toy


@pytest.mark.parametrize("family", ["toy", "sd1", "sdxl"])
def test_the_defaults_work_costs_under_a_third_of_the_earlier_default_and_fast_under_half_of_it(family):
    """Sampling and training; the held-out check is the same for every preset: 80 passes for the gap, and three
    guided images of 8 solver steps for each of 8 held-out prompts (384)."""
    def evaluations(preset: str) -> dict[str, int]:
        return unet_evaluations(resolve_config(make_config("Snoopy", "dog", preset), family))

    def work(preset: str) -> int:
        return evaluations(preset)["anchor_sampling"] + evaluations(preset)["training"]

    assert {evaluations(p)["check"] for p in ("fast", "default", "thorough")} == {80 + 384}
    assert work("thorough") == 4160
    assert work("default") == 1156, "956 and 200 for the preserved row (one frozen, one trained pass)"
    assert work("default") <= work("thorough") / 3
    assert work("fast") <= work("default") * 0.5


@pytest.mark.parametrize("family", ["toy", "sd1", "sdxl"])
def test_the_sd_default_keeps_one_preserved_row_at_one_and_a_half_times_the_rate_and_flux_keeps_its_own(family):
    sd = resolve_config(make_config("tree", "car"), family)
    plain = resolve_config(make_config("tree", "car", preset="thorough"), family)
    assert sd.preserved_rows == 1 and plain.preserved_rows == 0
    assert sd.learning_rate == pytest.approx((1e-3 if family == "toy" else 1e-5) * 1.5)
    flux = resolve_config(make_config("tree", "car"), "toy-flux" if family == "toy" else "flux")
    assert flux.learning_rate == pytest.approx(1e-3 if family == "toy" else 1e-5), "measured on toy-flux at this rate"
    assert (flux.group, flux.preserved_rows, flux.steps) == ("embedding", 1, 75)


def test_unknown_concepts_on_the_toy_model_are_refused_by_name():
    with pytest.raises(PromptError, match="does not know the target 'r2d2'"):
        resolve_config(make_config("R2D2", "dog"), "toy")


def test_cli_ablate_on_the_toy_model_erases_a_pair_the_demo_does_not_use(toy_view, tmp_path, capsys):
    out = tmp_path / "snoopy.safetensors"
    assert main(["ablate", "--model", "toy", "--target", "snoopy", "--anchor", "dog", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out check" in printed and "warning" not in printed.lower()
    patch = load_patch(out)
    settings = json.loads(patch.metadata["ablation.settings"])
    assert settings["learning_rate"] == preset_values("toy")["learning_rate"]
    assert json.loads(patch.metadata["ablation.check"])["erased_fraction"] > 0.8
    evaluation = evaluate_toy(toy_view, patch, "snoopy", "dog", per_set=8, preservation=False)
    assert evaluation.summary["target_recognised_before"] >= 0.9
    assert evaluation.summary["target_recognised"] <= 0.2
    assert evaluation.summary["anchor_retained"] >= 0.9


def test_a_run_that_barely_changes_the_model_says_so(toy_view, tmp_path, caplog):
    out = tmp_path / "weak.safetensors"
    with caplog.at_level("WARNING"):
        code = main(["ablate", "--model", "toy", "--target", "nemo", "--anchor", "fish", "--out", str(out),
                     "--steps", "2", "--lr", "1e-7", "--anchor-images", "4", "--sampler-steps", "4"])
    assert code == 0 and out.exists()
    assert "barely changed the model" in caplog.text and "more steps" in caplog.text
    check = json.loads(load_patch(out).metadata["ablation.check"])
    assert check["erased_fraction"] < 0.5


def test_the_default_preserved_row_keeps_a_neighbour_of_another_anchor_on_the_toy_model(toy_view):
    """tree -> car moved bird's samples at the earlier default (no preserved row: bird kept 62 %); the default's row
    holds the other concepts' prompts at the frozen prediction, so bird's prompts move much less for each unit the
    target moves, and the cost model counts the row's two passes."""
    from ablation_core import ablate
    from ablation_core.evaluation.cost import RunMeter

    settings = {"steps": 30, "anchor_images": 8, "held_out_prompts": ("a photo of a car",)}

    def moved(result, prompt: str) -> float:
        return prediction_change(toy_view, result.patch, [prompt] * 4)

    plain = ablate(toy_view, make_config("tree", "car", preserved_rows=0, **settings))
    meter = RunMeter(toy_view.unet, [], toy_view.device)
    with meter.measuring():
        held = ablate(toy_view, make_config("tree", "car", **settings))
    assert held.config.preserved_rows == 1 and plain.config.preserved_rows == 0
    bird, target = "a photo of a bird", "a photo of a tree"
    assert moved(held, bird) / moved(held, target) < 0.7 * moved(plain, bird) / moved(plain, target)
    counted = {name: phase.unet_evaluations for name, phase in meter.phases.items() if phase.unet_evaluations}
    assert counted == unet_evaluations(held.config, held_out_prompts=1)
    assert counted["training"] == unet_evaluations(plain.config, held_out_prompts=1)["training"] + 2 * 30
