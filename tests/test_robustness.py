"""Attacks and robust erasure on the embedded toy world, at small budgets (seconds each).

An attack that does not bring the target back on the unpatched model is no attack: each must recover it. Thresholds
are below what was measured at these budgets and seeds (variants 92 %, soft prompt 100 %, token search 100 % on
nemo), with room for platform differences; the full budgets and the whole table are
``python -m ablation_core.cli.robustness`` (docs/robustness.md).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch

from ablation_core.evaluation.attacks import ATTACK_NAMES, budget_of, run_attack
from ablation_core.methods.robust.rounds import AdversaryBudget, robust_ablate, robust_erase_closed_form
from tests.conftest import tiny_config

RECOVERED_ON_BASE = {"variants": 0.8, "soft-prompt": 0.9, "token-search": 0.9}
TINY_ADVERSARY = AdversaryBudget(images=4, inversion_steps=3, inversion_batch=2, search_images=2,
                                 search_iterations=1, search_candidates=4, top_k=8)
QUICK_ADVERSARY = AdversaryBudget(images=16, inversion_steps=60, search_images=4, search_iterations=1,
                                  search_candidates=4)


@pytest.fixture(scope="module")
def toy_view():
    from ablation_core import load_model

    return load_model("toy")


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_each_attack_recovers_the_target_on_the_unpatched_model(toy_view, name):
    outcome = run_attack(toy_view, name, "nemo", "fish", budget_of(name, "small"), seed=0)
    assert outcome.samples >= 8
    assert outcome.success >= RECOVERED_ON_BASE[name], f"{name} recovered {outcome.success:.0%} on the base model"


def test_eval_attack_json_has_before_after_and_budget(toy_view, tmp_path, capsys):
    from ablation_core.cli import main
    from ablation_core.methods.closed_form.settings import make_closed_form_config
    from ablation_core.methods.closed_form.solve import erase_closed_form
    from ablation_core.patches.storage import save_patch

    patch = erase_closed_form(toy_view, make_closed_form_config("nemo", "fish")).patch
    path = tmp_path / "nemo.safetensors"
    save_patch(patch, path)
    code = main(["eval", "--model", "toy", "--patch", str(path), "--target", "nemo", "--anchor", "fish",
                 "--per-set", "2", "--attack", "token-search", "--attack-budget", "small", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["attacks"]) == {"token-search"}
    found = report["attacks"]["token-search"]
    assert 0 <= found["success_before"] <= 1 and 0 <= found["success_after"] <= 1
    assert found["budget"]["iterations"] == budget_of("token-search", "small").iterations
    assert found["success_before"] >= RECOVERED_ON_BASE["token-search"]


def test_robust_closed_form_lowers_soft_prompt_recovery_on_nemo(toy_view):
    """One RECE-style round (a 60-step inversion) against the plain closed form, attacked alike (the same images the
    attacker learns from, the same seeds). Measured: 100 % -> 69 %. The robust trained method does better (0 % in
    docs/robustness.md) but costs minutes, so the test uses the closed form."""
    from ablation_core.evaluation.attacks import ATTACKS
    from ablation_core.methods.closed_form.settings import make_closed_form_config
    from ablation_core.patches.apply import apply_patch

    budget = budget_of("soft-prompt", "small")
    prepared = ATTACKS["soft-prompt"].prepare(toy_view, "nemo", budget, 0)
    config = make_closed_form_config("nemo", "fish")
    plain = robust_erase_closed_form(toy_view, config).patch
    robust = robust_erase_closed_form(toy_view, replace(config, robust_rounds=1), budget=QUICK_ADVERSARY).patch

    def recovered(patch) -> float:
        with apply_patch(toy_view, patch):
            return run_attack(toy_view, "soft-prompt", "nemo", "fish", budget, 0, prepared).success

    plain_success, robust_success = recovered(plain), recovered(robust)
    assert plain_success >= 0.9, f"the plain closed form already resists the attack ({plain_success:.0%})"
    assert robust_success <= plain_success - 0.2, f"robust {robust_success:.0%} vs plain {plain_success:.0%}"


def test_robust_rounds_run_on_sd1_and_record_what_they_found(sd1_view):
    config = tiny_config(robust_rounds=1, steps=4)
    result = robust_ablate(sd1_view, config, budget=TINY_ADVERSARY)
    robust = json.loads(result.patch.metadata["ablation.robust"])
    assert robust["rounds"] == 1 and len(robust["found"]) == 1 and "tokens" in robust["found"][0]
    assert result.config.group == "attn"  # robust runs train every attention projection unless told otherwise
    assert json.loads(result.patch.metadata["ablation.targets"]) == ["Grumpy Cat"]
    assert json.loads(result.patch.metadata["ablation.settings"])["robust_rounds"] == 1
    assert len(result.losses) == 2 * 4


def test_robust_closed_form_adds_the_adversarial_embeddings_to_the_solve(sd1_view):
    from ablation_core.methods.closed_form.settings import make_closed_form_config

    config = make_closed_form_config("Grumpy Cat", "cat", prompts_per_target=4, builtin_preserve=False,
                                     preserve=("dog",))
    plain = robust_erase_closed_form(sd1_view, config)
    robust = robust_erase_closed_form(sd1_view, replace(config, robust_rounds=1), budget=TINY_ADVERSARY)
    assert "ablation.robust" not in plain.patch.metadata
    assert json.loads(robust.patch.metadata["ablation.robust"])["rounds"] == 1
    assert robust.stats["target_vectors"] > plain.stats["target_vectors"]
    key = next(iter(plain.patch.deltas))
    assert not torch.allclose(plain.patch.deltas[key].full(), robust.patch.deltas[key].full())


def test_a_focused_robust_solve_encodes_the_preserved_vectors_once_for_all_its_rounds(sd1_view, monkeypatch):
    from ablation_core.methods.closed_form import solve
    from ablation_core.methods.closed_form.settings import make_closed_form_config

    encoded = []
    original = solve.preserved_vectors
    monkeypatch.setattr(solve, "preserved_vectors", lambda *a, **k: encoded.append(1) or original(*a, **k))
    config = make_closed_form_config("Grumpy Cat", "cat", prompts_per_target=4, builtin_preserve=False,
                                     preserve=("dog",), preserve_focus=2, robust_rounds=2)
    robust = robust_erase_closed_form(sd1_view, config, budget=TINY_ADVERSARY)
    assert robust.stats["focus_iterations"] == 2 and len(encoded) == 1
    assert robust.stats["preserved_worst_move"] <= robust.stats["preserved_worst_move_plain"]


def test_both_robust_adversaries_draw_guided_target_images(sd1_view, monkeypatch):
    """The adversary draws the target as the thorough preset draws anchors (guided), whatever the run's preset."""
    from ablation_core.methods.ablation.settings import preset_values
    from ablation_core.methods.closed_form.settings import make_closed_form_config
    from ablation_core.methods.robust import rounds

    drawn = []

    def recording(view, prompts, count, steps, guidance, seed, *args):
        drawn.append((steps, guidance))
        return real(view, prompts, count, steps, guidance, seed, *args)

    real = rounds.draw_images
    monkeypatch.setattr(rounds, "draw_images", recording)
    config = make_closed_form_config("Grumpy Cat", "cat", prompts_per_target=4, builtin_preserve=False,
                                     preserve=("dog",))
    robust_erase_closed_form(sd1_view, replace(config, robust_rounds=1), budget=TINY_ADVERSARY)
    robust_ablate(sd1_view, tiny_config(robust_rounds=1, steps=2, guidance=None), budget=TINY_ADVERSARY)
    thorough = preset_values("sd1", "thorough")
    assert drawn[0] == (thorough["sampler_steps"], thorough["guidance"]) and thorough["guidance"] > 1
    assert drawn[1][1] == thorough["guidance"]


def test_the_fast_preset_gets_the_quick_adversary(sd1_view, monkeypatch):
    from ablation_core.methods.robust import rounds

    seen = []

    class Recorded(Exception):
        pass

    def search(view, pairs, twins, sampler_steps, guidance, seed, budget, *rest):
        seen.append(budget)
        raise Recorded

    monkeypatch.setattr(rounds, "_Search", search)
    for preset in ("fast", "default", "thorough"):
        with pytest.raises(Recorded):
            robust_ablate(sd1_view, tiny_config(robust_rounds=1, steps=1, preset=preset))
    assert seen == [rounds.QUICK_BUDGET, rounds.BUDGET, rounds.BUDGET]
    assert rounds.QUICK_BUDGET.inversion_steps * 3 < rounds.BUDGET.inversion_steps


def test_the_adversary_never_writes_the_model_weights(sd1_view, monkeypatch):
    """It attacks each round's patch through hooks: ComfyUI's weights are inference tensors that cannot change in
    place outside inference mode (the real ComfyUI failed there when the patch was added in place)."""
    from ablation_core.methods.robust import rounds

    weights = [layer.weight for layer in sd1_view.all_layers().values()]
    versions = []
    against = rounds._Search.against

    def recording(self, patch, round_index):
        before = [w._version for w in weights]
        found = against(self, patch, round_index)
        versions.append((before, [w._version for w in weights]))
        return found

    monkeypatch.setattr(rounds._Search, "against", recording)
    robust_ablate(sd1_view, tiny_config(robust_rounds=1, steps=1), budget=TINY_ADVERSARY)
    assert len(versions) == 1 and versions[0][0] == versions[0][1]


def test_a_cancel_stops_the_adversary_inside_its_sampling(sd1_view, monkeypatch):
    """Its images are drawn at the model's resolution: one sampler step can take minutes on a CPU, so the checks sit
    inside the UNet, not between steps (the real ComfyUI's Cancel waited on the sampler before)."""
    from ablation_core.errors import AblationCancelled
    from ablation_core.methods import progress
    from ablation_core.methods.closed_form.settings import make_closed_form_config
    from ablation_core.methods.robust import rounds

    monkeypatch.setattr(progress, "CHECK_INTERVAL_S", 0.0)
    state = {"cancel": False, "finished": False}
    real = rounds.draw_images

    def drawing(*args):
        state["cancel"] = True
        latents = real(*args)
        state["finished"] = True
        return latents

    monkeypatch.setattr(rounds, "draw_images", drawing)
    config = make_closed_form_config("Grumpy Cat", "cat", prompts_per_target=4, builtin_preserve=False,
                                     preserve=("dog",), robust_rounds=1)
    with pytest.raises(AblationCancelled, match="adversary"):
        robust_erase_closed_form(sd1_view, config, should_cancel=lambda: state["cancel"], budget=TINY_ADVERSARY)
    assert not state["finished"]


def test_the_token_search_takes_gradients_through_an_inference_tensor_table(sd1_view):
    """ComfyUI loads CLIP's token embedding under inference mode; the search's one-hot gradient still flows (the real
    ComfyUI failed there when autograd had to save the table)."""
    from ablation_core.methods.robust.token_hook import embedding_modules, encode_ids, prompt_ids

    module = embedding_modules(sd1_view)[0]
    original = module.weight
    with torch.inference_mode():
        table = original.detach().clone()
    module.weight = torch.nn.Parameter(table, requires_grad=False)
    try:
        ids = torch.tensor([prompt_ids(sd1_view, "a photo of a cat")])
        one_hot = torch.zeros(1, 1, table.shape[0], requires_grad=True)
        with torch.no_grad():
            one_hot[0, 0, ids[0, 4]] = 1.0
        encode_ids(sd1_view, ids, one_hot=one_hot, positions=[4]).context.sum().backward()
    finally:
        module.weight = original
    assert one_hot.grad is not None and torch.isfinite(one_hot.grad).all() and one_hot.grad.abs().sum() > 0


def test_token_ids_reach_an_encoder_that_embeds_row_by_row(sd1_view, monkeypatch):
    """ComfyUI calls the token embedding once per prompt; each call must get its own row of the ids."""
    from ablation_core.methods.robust.token_hook import encode_ids, prompt_ids
    from ablation_core.models.view import Conditioning

    ids = torch.tensor([prompt_ids(sd1_view, p) for p in ("a photo of a cat", "a dog", "a painting by Monet")])
    together = encode_ids(sd1_view, ids).context
    real = sd1_view.encode
    monkeypatch.setattr(sd1_view, "encode", lambda prompts: Conditioning.cat([real([p]) for p in prompts]))
    apart = encode_ids(sd1_view, ids).context
    torch.testing.assert_close(apart, together)
    assert not torch.allclose(together[0], together[1])


def test_cli_passes_robust_rounds_to_both_methods(monkeypatch, tmp_path):
    from ablation_core.cli import erase
    from ablation_core.cli.parser import build_parser

    seen = {}

    def fake(name):
        def run(view, config, on_progress=None, base_patch=None, **_):
            seen[name] = config.robust_rounds
            seen[name + " focus"] = getattr(config, "preserve_focus", None)
            raise SystemExit(0)
        return run

    monkeypatch.setattr("ablation_core.methods.robust.rounds.robust_ablate", fake("trained"))
    monkeypatch.setattr("ablation_core.methods.robust.rounds.robust_erase_closed_form", fake("closed-form"))
    monkeypatch.setattr(erase, "load_view", lambda args: None)
    for method in ("trained", "closed-form"):
        out = str(tmp_path / "p.safetensors")
        args = build_parser().parse_args(["ablate", "--model", "toy", "--method", method, "--target", "nemo",
                                          "--anchor", "fish", "--robust", "3", "--preserve-focus", "4", "--out", out])
        with pytest.raises(SystemExit):
            erase.cmd_ablate(args)
    assert seen == {"trained": 3, "closed-form": 3, "trained focus": None, "closed-form focus": 4}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ablate", "--model", "toy", "--target", "nemo", "--anchor", "fish", "--robust", "-1",
                                   "--out", str(tmp_path / "p.safetensors")])


def test_a_robust_rounds_kept_rows_are_held_at_the_original_model_not_at_the_last_round(sd1_view, monkeypatch):
    """Each round builds on the last round's patch; its kept rows are held at the original model's prediction, so
    harm a round did to a kept concept is undone by the next rather than kept (a user's own base patch stays the
    reference of a plain run)."""
    from ablation_core.methods.ablation import loop
    from ablation_core.methods.ablation.adapters import AdapterSet

    first = robust_ablate(sd1_view, tiny_config(steps=2))
    base, fresh = AdapterSet.of_patch(sd1_view, first.patch), AdapterSet(sd1_view.layers("kv"))
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, sd1_view.latent_channels, 8, 8, generator=generator).to(sd1_view.device, sd1_view.dtype)
    t, kept = torch.tensor([100, 600], device=sd1_view.device), sd1_view.encode(["a photo of a house", "a dog"])
    with base.attached(), fresh.attached(), torch.no_grad():
        assert float(loop._kept_loss(sd1_view, fresh, x_t, t, kept)) == 0.0  # held at the base: nothing to undo
        assert float(loop._kept_loss(sd1_view, fresh, x_t, t, kept, base)) > 0.0  # held at the original

    calls = []
    real = loop.ablate
    monkeypatch.setattr(loop, "ablate", lambda *a, **k: calls.append(k.get("kept_at_original")) or real(*a, **k))
    robust_ablate(sd1_view, tiny_config(steps=2, robust_rounds=1), budget=TINY_ADVERSARY)
    assert calls == [None, True], "the first run has no base; the round is held at the original"


def test_the_robustness_table_carries_the_worst_neighbour_change():
    """Each row keeps ``eval --json``'s preservation figures; rows measured before they existed read "-"."""
    from ablation_core.cli.robustness import markdown

    attack = {"success_before": 1.0, "success_after": 0.0, "samples": 16}
    row = {"target": "snoopy", "anchor": "dog", "method": "trained-robust", "seconds_erase": 183.0,
           "target_recognised_before": 1.0, "target_recognised": 0.0, "anchor_retained": 1.0,
           "surrounding_retained": 0.975, "neighbours": {"cat": [1.0, 0.875]}, "attacks": {"soft-prompt": attack},
           "preservation": {"neighbour_change": {"mean": 0.05, "worst": 0.31, "worst_set": "surrounding: cat"}}}
    older = {**row, "target": "nemo", "anchor": "fish", "neighbours": {}, "preservation": None}
    table = markdown([row, older], {"soft-prompt": {}})
    lines = table.splitlines()
    assert "neighbour change worst" in lines[0] and lines[1].count("---") == lines[0].count("|") - 1
    assert "| cat 100% -> 88% | 0.31 (cat) | 183 |" in lines[2]
    assert "| - | - | 183 |" in lines[3]
    assert "| - | 0.31 | 183 |" in lines[4], "the mean row averages the rows that have the figure"


def test_the_robustness_tables_settings_reach_the_method_and_guard_a_resume(monkeypatch, tmp_path):
    from ablation_core.cli import robustness

    seen = {}

    def fake(view, config, *_, **__):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(robustness, "robust_erase_closed_form", fake)
    with pytest.raises(SystemExit):
        robustness.erase(None, "closed-form-robust", "house", "car", 2, 0, settings={"preserve_focus": 4})
    assert seen["config"].preserve_focus == 4 and seen["config"].robust_rounds == 2
    out = tmp_path / "table"
    out.with_suffix(".json").write_text(json.dumps({"budgets": {}, "rounds": 2, "per_set": 16, "seed": 0,
                                                    "preset": "default", "model": "toy", "settings": {},
                                                    "rows": []}))
    args = argparse.Namespace(out=str(out), rounds=2, per_set=16, seed=0, preset="default", model="toy",
                              settings=["preserve_focus=4"])
    with pytest.raises(SystemExit, match="other settings"):
        robustness._earlier_rows(args, {})
    assert robustness._earlier_rows(argparse.Namespace(**{**vars(args), "settings": []}), {}) == []
