"""End to end on the embedded toy world: ablation really removes the concept and keeps the rest."""

from __future__ import annotations

import json

import pytest

from ablation_core import ablate, evaluate_toy, make_config
from ablation_core.backends.loading import load_model
from ablation_core.evaluation.toy_eval import toy_prompt_sets
from ablation_core.toy.prompts import anchor_prompts as toy_anchor_prompts


@pytest.fixture(scope="module")
def toy_view():
    return load_model("toy")


def test_toy_prompt_sets_cover_target_typos_anchor_and_neighbours():
    sets = toy_prompt_sets("grumpy cat", "cat", per_set=10)
    names = [s.name for s in sets]
    assert names[:3] == ["target", "misspelt target", "anchor"] and any(n.startswith("surrounding") for n in names)
    assert all("grumpy cat" not in p for p in sets[1].prompts)
    assert all(len(s.prompts) >= 10 for s in sets)
    assert "a painting of a cat" in toy_anchor_prompts("cat")
    trained_on = set(toy_anchor_prompts("cat")) | set(toy_anchor_prompts("grumpy cat"))
    assert not trained_on & {p for s in sets for p in s.prompts}, "evaluation prompts must not be training prompts"


def test_toy_ablation_removes_the_target_and_keeps_the_anchor(toy_view, tmp_path):
    result = ablate(toy_view, make_config("grumpy cat", "cat", steps=50, anchor_images=16, sampler_steps=12))
    grid = tmp_path / "grid.png"
    evaluation = evaluate_toy(toy_view, result.patch, "grumpy cat", "cat", per_set=8, grid_path=str(grid),
                              preservation=False)
    summary = evaluation.summary
    assert summary["target_recognised_before"] >= 0.9, "the shipped toy model should draw grumpy cats"
    assert summary["target_recognised"] <= 0.2
    assert summary["anchor_retained"] >= 0.9 and summary["surrounding_retained"] >= 0.8
    assert grid.exists() and json.loads(json.dumps(evaluation.as_json()))["target"] == "grumpy cat"
