"""Recipes by concept type, several targets in one trained run, and anchor images near the memorized one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config

from ablation_core import ablate, evaluate_toy, load_model, make_config, resolve_config
from ablation_core.errors import PromptError
from ablation_core.methods.ablation.loop import _prompt_pairs
from ablation_core.methods.ablation.recipes import drop_near_copies, memorized_variations, overlapping


def test_each_concept_type_sets_its_recipe_and_explicit_choices_win():
    instance = resolve_config(make_config("Grumpy Cat", "cat", concept_type="instance"), "sd1")
    assert (instance.group, instance.objective, instance.kind, instance.regularization) == ("kv", "mixed", "object",
                                                                                           True)
    assert resolve_config(make_config("R2D2", "robot", concept_type="object"), "sd1").regularization is False
    assert resolve_config(make_config("Van Gogh", "painting", concept_type="style"), "sd1").kind == "style"
    memorized = resolve_config(make_config("a photo of Ann Graham Lotz smiling", "a woman", concept_type="memorized"),
                               "sd1")
    assert (memorized.group, memorized.kind) == ("full", "memorization")
    assert "a woman" in memorized.anchor_prompts and len(memorized.anchor_prompts) > 5
    assert all(p != "a photo of Ann Graham Lotz smiling" for p in memorized.anchor_prompts)
    unsafe = resolve_config(make_config("nudity", "a person, fully clothed", concept_type="inappropriate"), "sd1")
    assert (unsafe.group, unsafe.negative_prompt, unsafe.objective) == ("attn", "nudity", "model")
    assert unsafe.guidance > 1  # the negative prompt acts through guidance, which the default's anchors leave out
    assert memorized.objective == "model"
    chosen = resolve_config(make_config("Grumpy Cat", "cat", concept_type="instance", group="attn",
                                        regularization=False), "sd1")
    assert (chosen.group, chosen.regularization) == ("attn", False)
    assert overlapping("grumpy cat", "cat") and not overlapping("snoopy", "dog")


def test_several_targets_pair_every_target_prompt_with_its_anchor_twin():
    config = resolve_config(make_config(["Grumpy Cat", "Snoopy"], ["cat", "dog"], misspelled_targets=1,
                                        anchor_prompt_count=4), "sd1")
    anchors, targets = _prompt_pairs(config)
    assert len(targets) == 2 * len(anchors) and len(anchors) == 8
    assert all("cat" in a and "Grumpy Cat" in t for a, t in zip(anchors[:4], targets[:4]))
    assert all("dog" in a and "Snoopy" in t for a, t in zip(anchors[4:], targets[4:8]))
    assert all("Grumpy Cat" not in t for t in targets[8:12])  # the misspelt block
    with pytest.raises(PromptError, match="one anchor for all targets or one per target"):
        make_config(["a", "b", "c"], ["x", "y"])


def test_targets_of_different_kinds_keep_their_own_phrasing_and_steps_scale_with_targets():
    config = resolve_config(make_config(["nemo", "monet"], ["fish", "painting"]), "toy")
    assert config.kinds() == ["object", "style"]
    assert config.steps == 2 * resolve_config(make_config("nemo", "fish"), "toy").steps
    anchors, targets = _prompt_pairs(config)
    styled = [t.endswith(", in the style of monet") for t in targets]
    assert 0 < sum(styled) < len(targets)
    assert all("fish" in a and "nemo" in t for a, t, s in zip(anchors, targets, styled) if not s)
    assert resolve_config(make_config(["nemo", "monet"], "fish", steps=7, kind="object"), "toy").kinds() == [
        "object", "object"]  # an explicit kind is the user's choice for every target


def test_a_joint_run_records_every_target_and_checks_each(sd1_view):
    result = ablate(sd1_view, tiny_config(["Grumpy Cat", "Snoopy"], "dog", steps=4))
    assert result.patch.listed("targets") == ["Grumpy Cat", "Snoopy"]
    check = json.loads(result.patch.metadata["ablation.check"])
    assert set(check["per_target"]) == {"Grumpy Cat", "Snoopy"}
    assert check["erased_fraction"] == min(c["erased_fraction"] for c in check["per_target"].values())


def test_three_targets_in_one_run_are_each_erased_on_the_toy_model():
    view = load_model("toy")
    pairs = [("snoopy", "dog"), ("nemo", "fish"), ("grumpy cat", "cat")]
    result = ablate(view, make_config([t for t, _ in pairs], [a for _, a in pairs]))
    for target, anchor in pairs:
        summary = evaluate_toy(view, result.patch, target, anchor, per_set=8, preservation=False).summary
        assert summary["target_recognised"] <= 0.25, (target, summary)
        assert summary["anchor_retained"] >= 0.85, (target, summary)


def test_near_copies_of_the_memorized_image_are_dropped():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, 8, 8, generator=generator)
    anchors = torch.cat([target[:1] * 1.1 + 0.01, torch.randn(4, 4, 8, 8, generator=generator)])
    assert drop_near_copies(anchors, target).tolist() == [1, 2, 3, 4]
    assert memorized_variations("a photo of Ann Graham Lotz", "a woman")[0] == "a woman"


def test_the_held_out_check_of_a_joint_run_never_uses_prompts_naming_another_target():
    from ablation_core.methods.ablation.check import held_out_pairs
    from ablation_core.methods.ablation.loop import _prompt_pairs

    # the toy world's held-out captions for a style include "a van gogh painting of a cat", and those for cat
    # "an oil painting of grumpy cat": each would measure the other target's erasure as a loss of the anchor
    config = resolve_config(make_config(["grumpy cat", "van gogh"], ["cat", "painting"]), "toy")
    anchors, _ = _prompt_pairs(config)
    checked = held_out_pairs(config, anchors)
    assert [target for target, _, _ in checked] == ["grumpy cat", "van gogh"]
    for target, check_anchors, check_targets in checked:
        assert check_anchors and not any(t in p for p in check_anchors for t in ("grumpy cat", "van gogh"))
        assert all(target in p for p in check_targets)
