"""The sensitive preservation figures: zero for a patch that changes nothing, larger for one that harms a neighbour
on purpose, the same for the same seed; and the measures themselves on constructed samples."""

from __future__ import annotations

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
    # a wider spread with the same mean: (2 - 1)^2 per dimension
    assert pres.frechet_distance(samples, 2 * samples) == pytest.approx(float(torch.diag(torch.cov(samples.T)).sum()),
                                                                  rel=1e-6)
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
def toy_view():
    return load_model("toy")


@pytest.fixture(scope="module")
def patches(toy_view):
    """An erasure of the evaluated target, and one that erases a neighbour of it (cat, for snoopy) on purpose."""
    fair = erase_closed_form(toy_view, make_closed_form_config("snoopy", "dog")).patch
    harmful = erase_closed_form(toy_view, make_closed_form_config("cat", "car")).patch
    return fair, harmful


def test_figures_are_zero_for_a_patch_that_changes_nothing_and_grow_when_a_neighbour_is_harmed(toy_view, patches):
    fair, harmful = patches
    untouched = evaluate_toy(toy_view, fair, "snoopy", "dog", per_set=PER_SET, strength=0.0).preservation
    assert untouched is not None and untouched.change_worst == 0.0 and untouched.fid == pytest.approx(0.0, abs=1e-9)
    assert untouched.fid_floor > 0, "two noise seeds of the same model differ: the floor is above zero"
    assert any(name.startswith("unrelated") for name in untouched.change), "unrelated concepts are measured too"

    damaged = evaluate_toy(toy_view, harmful, "snoopy", "dog", per_set=PER_SET).preservation
    kept = evaluate_toy(toy_view, fair, "snoopy", "dog", per_set=PER_SET).preservation
    assert damaged.worst_set == "surrounding: cat"
    assert damaged.change["surrounding: cat"] > 2 * kept.change["surrounding: cat"]
    assert damaged.change_worst > kept.change_worst and damaged.change_mean > kept.change_mean
    assert damaged.fid > kept.fid and damaged.fid > damaged.fid_floor


def test_figures_are_deterministic_by_seed_and_reported(toy_view, patches):
    fair, _ = patches
    first = evaluate_toy(toy_view, fair, "snoopy", "dog", per_set=PER_SET, seed=3)
    second = evaluate_toy(toy_view, fair, "snoopy", "dog", per_set=PER_SET, seed=3)
    assert first.preservation.as_json() == second.preservation.as_json()
    reported = first.as_json()["preservation"]
    assert set(reported) >= {"neighbour_change", "neighbour_fid", "scale"}
    assert reported["neighbour_change"]["worst_set"] in reported["neighbour_change"]["per_set"]
    assert "preservation: neighbour change" in first.table() and reported["neighbour_change"]["worst_set"] in \
        first.table()
    plain = evaluate_toy(toy_view, fair, "snoopy", "dog", per_set=PER_SET, seed=3, preservation=False)
    assert plain.preservation is None and "preservation" not in plain.as_json()
    assert [s.shown_after for s in plain.sets] == [s.shown_after for s in first.sets[:len(plain.sets)]]
