"""The attacks on a real-architecture model, judged by CLIP: a tiny random SD1 and tiny CLIP models (no download).

The judge is ``clip_accuracy``'s rule: a sample shows the target when CLIP places it nearer a target prompt than that
prompt's anchor twin. The CLIP that knows the concept is taught, in seconds, on the images this model draws for the
attack world's evaluation prompts and their twins, as ``test_clip_eval`` teaches its own.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ablation_core.cli import main
from ablation_core.evaluation.attacks import ATTACK_NAMES, ATTACKS, attacks_table, budget_of, run_attack, run_attacks
from ablation_core.evaluation.attacks.common import ATTACK_SEED_OFFSET, SUCCESS_SEED_OFFSET, success_rate
from ablation_core.evaluation.attacks.cost import attack_costs
from ablation_core.evaluation.attacks.soft_prompt import SoftPromptBudget
from ablation_core.evaluation.attacks.token_search import TokenSearchBudget
from ablation_core.evaluation.attacks.variants import VariantsBudget
from ablation_core.evaluation.clip import load_clip
from ablation_core.evaluation.clip.attack_world import ClipWorld
from ablation_core.evaluation.clip.prompts import caption_halves
from ablation_core.models.single_file import save_single_file
from ablation_core.patches.apply import apply_patch
from tests import clip_models
from tests.clip_fixtures import ANCHOR, FAST, TARGET, components, random_clip, swap_patch, view  # noqa: F401

TINY = {"variants": VariantsBudget(per_family=2, misspellings=2, fills=1, screen=1),
        "soft-prompt": SoftPromptBudget(images=4, steps=3, batch_size=2, samples=4),
        "token-search": TokenSearchBudget(prompts=1, images=2, iterations=1, candidates=2, top_k=8,
                                          images_per_gradient=2, samples=4)}
JUDGED = 16  # samples of the judge's own test


def _world(path: Path) -> ClipWorld:
    return ClipWorld(load_clip(path), TARGET, ANCHOR, "object", FAST)


def test_the_world_learns_on_one_half_and_is_measured_on_the_other(random_clip):
    world = _world(random_clip)
    train, evaluation = world.captions("grumpy cat", "train"), world.captions("grumpy cat", "eval")
    assert train and evaluation and not set(train) & set(evaluation)
    assert all("grumpy cat" in p for p in train + evaluation)
    assert [p.replace("grumpy cat", "cat") for p in evaluation] == world.halves["eval"][1]
    fills = world.fills("grumpy cat")
    assert not fills.style and "tabby cat" in fills.subjects and "cat" not in fills.subjects and fills.artists


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_each_attack_is_judged_by_clip_deterministically_by_seed(view, random_clip, name):
    world = _world(random_clip)
    first = run_attack(view, name, "grumpy cat", "cat", TINY[name], seed=0, world=world)
    again = run_attack(view, name, "grumpy cat", "cat", TINY[name], seed=0, world=_world(random_clip))
    assert 0 <= first.success <= 1
    assert (first.success, first.samples, first.details) == (again.success, again.samples, again.details)


def test_the_cost_printed_first_is_what_the_attacks_run(view, swap_patch, random_clip, monkeypatch):
    """Every UNet evaluation counted (variants' figure is an upper bound; here every family keeps candidates)."""
    world = _world(random_clip)
    for name, budget in TINY.items():
        monkeypatch.setitem(ATTACKS, name, replace(ATTACKS[name], small=budget))
    rows = []
    hook = view.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        results = run_attacks(view, swap_patch, TARGET, ANCHOR, ["all"], budget="small", world=world)
    finally:
        hook.remove()
    assert sum(rows) == sum(attack_costs(view, list(ATTACK_NAMES), TINY, TARGET, 0, world).values())
    assert [r.budget for r in results.values()] == [TINY[n].as_json() for n in ATTACK_NAMES]
    table = attacks_table(results, world)
    assert "nearer the target prompt than its anchor twin" in table and "token-search" in table


def test_the_judge_sees_the_target_and_loses_it_after_a_swap(view, swap_patch, tmp_path):
    """Taught on this model's images of the evaluation half (the noise the judge then samples with), CLIP reads the
    target's samples as the target; after the swap the same prompts and noise draw the anchor, and it does not."""
    seed = SUCCESS_SEED_OFFSET
    targets, twins = caption_halves("grumpy cat", "cat", "object", JUDGED, ATTACK_SEED_OFFSET)["eval"]
    knowing = clip_models.taught_clip(view, targets, twins, FAST.steps, FAST.guidance, seed, tmp_path / "knowing")
    world = ClipWorld(load_clip(knowing), TARGET, ANCHOR, "object", FAST, per_half=JUDGED)
    assert world.captions("grumpy cat", "eval") == targets
    with torch.no_grad():
        cond = view.encode(targets)
    before, hits = success_rate(view, cond, "grumpy cat", seed, world)
    with apply_patch(view, swap_patch):
        after, _ = success_rate(view, cond, "grumpy cat", seed, world)
    assert len(hits) == JUDGED and before >= 0.75, f"the taught CLIP should know the target's images ({before:.0%})"
    assert after <= before - 0.3, f"{before:.0%} -> {after:.0%}"


def test_eval_with_clip_prints_the_attacks_and_their_json(components, swap_patch, random_clip, tmp_path, capsys):
    checkpoint = tmp_path / "tiny_sd1.safetensors"
    save_single_file(components, checkpoint)
    patch_file = swap_patch.save(tmp_path / "swap.safetensors")
    command = ["eval", "--model", str(checkpoint), "--patch", str(patch_file), "--target", TARGET, "--anchor", ANCHOR,
               "--clip", str(random_clip), "--per-set", "2", "--sampler-steps", "2", "--latent-size", "8",
               "--neighbours", "dog", "--device", "cpu", "--attack-budget", "small"]
    assert main([*command, "--attack", "all", "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert "attacks' cost: at most" in captured.err and "clip_accuracy_before" in report
    assert set(report["attacks"]) == set(ATTACK_NAMES)
    for name, found in report["attacks"].items():
        assert 0 <= found["success_before"] <= 1 and 0 <= found["success_after"] <= 1
        assert found["budget"] == budget_of(name, "small").as_json()
    assert main([*command, "--attack", "variants"]) == 0
    out = capsys.readouterr().out
    assert out.index("cost:") < out.index("attacks' cost:") < out.index("clip_accuracy") < out.index("Attacks (")
    assert "nearer the target prompt than its anchor twin" in out and "\nvariants" in out


def test_eval_without_clip_reports_the_model_side_gaps_and_the_prediction_drift(components, swap_patch, tmp_path,
                                                                                capsys):
    checkpoint = tmp_path / "tiny_sd1.safetensors"
    save_single_file(components, checkpoint)
    patch_file = swap_patch.save(tmp_path / "swap.safetensors")
    command = ["eval", "--model", str(checkpoint), "--patch", str(patch_file), "--target", TARGET, "--anchor", ANCHOR,
               "--latent-size", "8"]
    assert main([*command, "--json"]) == 0
    gaps = json.loads(capsys.readouterr().out)
    assert gaps["target_anchor_gap_after"] < gaps["target_anchor_gap_before"]
    assert gaps["prediction_drift_worst"] >= gaps["prediction_drift"] >= 0
    from ablation_core.evaluation.clip.prompts import builtin_neighbours

    neighbours = builtin_neighbours(TARGET, ANCHOR, "object")[0]
    assert any(name in gaps["prediction_drift_worst_prompt"] for name in neighbours)  # a neighbour's prompt
    assert main(command) == 0
    assert "prediction_drift_worst_prompt: " in capsys.readouterr().out
