"""The sensitive preservation figures: zero for a patch that changes nothing, larger for one that harms a neighbour
on purpose, the same for the same seed; and the measures themselves on constructed samples."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ablation_core import evaluate_toy, load_model
from ablation_core.evaluation import preservation as pres
from ablation_core.methods.closed_form.settings import make_closed_form_config
from ablation_core.methods.closed_form.solve import erase_closed_form

PER_SET = 4


def test_frechet_distance_of_gaussians_with_one_covariance_is_the_squared_mean_shift():
    samples = torch.randn(400, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([3.0, 0, 0, 0, 0, 4.0], dtype=torch.float64)
    assert pres.frechet_distance(samples, samples) == pytest.approx(0.0, abs=1e-6)
    assert pres.frechet_distance(samples, samples + shift) == pytest.approx(25.0, rel=1e-6)
    # a wider spread about the same mean: tr(S + 4S - 2 * 2S) = tr(S)
    centred = samples - samples.mean(0)
    assert pres.frechet_distance(centred, 2 * centred) == pytest.approx(float(torch.cov(centred.T).trace()), rel=1e-6)
    # fewer samples than dimensions: still finite and zero on itself
    few = samples[:5, :]
    assert pres.frechet_distance(few, few) == pytest.approx(0.0, abs=1e-6)


def test_scale_and_change_on_constructed_samples():
    a = torch.zeros(4, 2, dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0]] * 4, dtype=torch.float64)
    assert pres.concept_scale({"a": a, "b": b}) == pytest.approx(2.0)
    still = pres.PreservedSamples("surrounding: a", "a", ["p0", "p1", "p2", "p3"], a, a.clone())
    moved_after = a.clone()
    moved_after[2] = torch.tensor([1.0, 0.0])
    moved = pres.PreservedSamples("unrelated: b", "b", ["q0", "q1", "q2", "q3"], a, moved_after)
    found = pres.measure_preservation([still, moved], scale=2.0)
    assert found.change == {"surrounding: a": 0.0, "unrelated: b": pytest.approx(0.125)}
    assert (found.worst_set, found.worst_prompt, found.change_worst) == ("unrelated: b", "q2", pytest.approx(0.125))
    assert found.change_mean == pytest.approx(0.0625) and found.fid > 0 and found.samples == 8


@pytest.fixture(scope="module")
def evaluations():
    """Snoopy -> dog measured for three patches: that erasure at strength 0 (nothing changes), that erasure, and
    one that erases a neighbour of snoopy (bird, a word no other concept's name holds) on purpose."""
    view = load_model("toy")
    fair = erase_closed_form(view, make_closed_form_config("snoopy", "dog")).patch
    # it says it erases snoopy (a patch's own targets are left out of the figures: they are meant to change)
    bird = erase_closed_form(view, make_closed_form_config("bird", "car")).patch
    harmful = replace(bird, metadata={**bird.metadata, "ablation.targets": json.dumps(["snoopy"])})
    return {"untouched": evaluate_toy(view, fair, "snoopy", "dog", per_set=PER_SET, strength=0.0),
            "kept": evaluate_toy(view, fair, "snoopy", "dog", per_set=PER_SET, seed=3),
            "kept again": evaluate_toy(view, fair, "snoopy", "dog", per_set=PER_SET, seed=3),
            "plain": evaluate_toy(view, fair, "snoopy", "dog", per_set=PER_SET, seed=3, preservation=False),
            "damaged": evaluate_toy(view, harmful, "snoopy", "dog", per_set=PER_SET, seed=3)}


def test_figures_are_zero_for_a_patch_that_changes_nothing_and_grow_when_a_neighbour_is_harmed(evaluations):
    untouched = evaluations["untouched"].preservation
    assert untouched is not None and untouched.change_worst == 0.0 and untouched.fid == pytest.approx(0.0, abs=1e-9)
    assert untouched.fid_floor > 0, "two noise seeds of the same model differ: the floor is above zero"
    assert any(name.startswith("unrelated") for name in untouched.change), "unrelated concepts are measured too"
    damaged, kept = evaluations["damaged"].preservation, evaluations["kept"].preservation
    assert damaged.worst_set == "surrounding: bird"
    assert damaged.change["surrounding: bird"] > 2 * kept.change["surrounding: bird"]
    assert damaged.change_worst > kept.change_worst and damaged.change_mean > kept.change_mean
    assert damaged.fid > kept.fid and damaged.fid > damaged.fid_floor
    assert untouched.drift["prediction_drift"] == pytest.approx(0.0, abs=1e-9)
    assert damaged.drift["prediction_drift_worst"] > 2 * kept.drift["prediction_drift_worst"]
    assert "bird" in damaged.drift["prediction_drift_worst_prompt"]


def test_figures_are_deterministic_by_seed_and_reported(evaluations):
    first, second = evaluations["kept"], evaluations["kept again"]
    assert first.preservation.as_json() == second.preservation.as_json()
    reported = first.as_json()["preservation"]
    assert set(reported) >= {"neighbour_change", "neighbour_fid", "prediction_drift", "scale"}
    assert set(reported["prediction_drift"]) == {"mean", "worst", "worst_prompt"}
    worst = reported["neighbour_change"]["worst_set"]
    assert worst in reported["neighbour_change"]["per_set"]
    assert "preservation: neighbour change" in first.table() and worst in first.table()
    assert "prediction drift" in first.table()
    plain = evaluations["plain"]
    assert plain.preservation is None and "preservation" not in plain.as_json()
    assert [s.shown_after for s in plain.sets] == [s.shown_after for s in first.sets[:len(plain.sets)]]


def test_unrelated_sets_leave_out_what_the_patch_erases():
    from ablation_core.evaluation.toy_eval import toy_prompt_sets

    sets = toy_prompt_sets("tree", "car", per_set=8, unrelated=True, erased=("tree", "snoopy"))
    unrelated = {s.concept: s.prompts for s in sets if s.name.startswith("unrelated")}
    assert {"van gogh", "grumpy cat", "nemo"} <= set(unrelated) and "snoopy" not in unrelated
    assert not any("tree" in p or "snoopy" in p for prompts in unrelated.values() for p in prompts)
    cat_sets = toy_prompt_sets("cat", "dog", per_set=8, unrelated=True)
    assert all("grumpy cat" in p for s in cat_sets if s.concept == "grumpy cat" for p in s.prompts)
    plain = [s.name for s in toy_prompt_sets("tree", "car", per_set=8)]
    assert plain == [s.name for s in sets][:len(plain)], "the unrelated sets come after the usual ones"
    mixed = toy_prompt_sets("snoopy", "dog", per_set=8, erased=("snoopy", "van gogh", "bird"))
    assert "bird" not in {s.concept for s in mixed}, "another target of the joint patch is no one's neighbour"
    assert "bird" in {s.concept for s in toy_prompt_sets("snoopy", "dog", per_set=8)}
    joint = toy_prompt_sets("bird", "fish", per_set=8, erased=("bird", "van gogh"))
    assert not any("van gogh" in p for s in joint if s.name.startswith("surrounding") for p in s.prompts)
    assert any("van gogh" in p for s in toy_prompt_sets("bird", "fish", per_set=8) for p in s.prompts)


def test_the_unpatched_models_samples_are_drawn_once_and_again_when_its_weights_change(monkeypatch):
    from ablation_core.evaluation import toy_eval

    view, drawn = load_model("toy"), []
    monkeypatch.setattr(toy_eval, "_UNPATCHED", {})
    monkeypatch.setattr(toy_eval, "_classify_samples", lambda *args: drawn.append(args[2]) or ([], None))
    key = toy_eval._weights_key(view)
    toy_eval._unpatched_samples(view, key, None, ["a cat"], 1, 4, 3.0)
    toy_eval._unpatched_samples(view, key, None, ["a cat"], 1, 4, 3.0)
    toy_eval._unpatched_samples(view, key, None, ["a cat"], 2, 4, 3.0)
    assert drawn == [["a cat"], ["a cat"]], "the same prompts and noise are drawn once"
    layer = next(iter(view.all_layers().values()))
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight[0, 0] += 1e-5  # a tiny change is a change: the key hashes the exact float32 values
        changed = toy_eval._weights_key(view)
        layer.weight.copy_(original)
    assert changed != key and toy_eval._weights_key(view) == key
