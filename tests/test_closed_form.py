"""Closed-form erasure: the solve does what its math says, the null-space mode keeps preserved outputs, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ablation_core import AblationError, PromptError, apply_patch
from ablation_core.backends.diffusers import DiffusersModelView
from ablation_core.methods.closed_form.embeddings import Moments, aligned_positions
from ablation_core.methods.closed_form.focus import focused_solve
from ablation_core.methods.closed_form.fusion import fuse_patches
from ablation_core.methods.closed_form.settings import make_closed_form_config, resolve_closed_form
from ablation_core.methods.closed_form.solve import _prompt_pairs, erase_closed_form, solve_text_map
from ablation_core.methods.progress import Progress
from ablation_core.patches.merge import merge_weighted

TINY = {"prompts_per_target": 3, "builtin_preserve": False}


def _pairs(view, config):
    """The aligned (target, anchor) embedding rows the solve uses, gathered the slow way."""
    targets, anchors = _prompt_pairs(config)
    with torch.no_grad():
        t_ctx, a_ctx = view.encode(targets).context, view.encode(anchors).context
    rows_c, rows_a = [], []
    for i, (t, a) in enumerate(zip(targets, anchors)):
        for tp, ap in aligned_positions(view.token_ids(t)[0], view.token_ids(a)[0], t_ctx.shape[1]):
            rows_c.append(t_ctx[i, tp])
            rows_a.append(a_ctx[i, ap])
    return torch.stack(rows_c).double(), torch.stack(rows_a).double()


def test_alignment_pairs_the_differing_middle_then_suffix_end_and_padding():
    # "a photo of a | grumpy cat | in snow" vs "a photo of a | cat | in snow", as token ids
    target, anchor = [1, 2, 3, 4, 50, 60, 7, 8], [1, 2, 3, 4, 60, 7, 8]
    pairs = aligned_positions(target, anchor, 12)
    assert pairs[0] == (5, 5) and pairs[1] == (6, 5)  # "grumpy" and "cat" both onto "cat"
    assert (7, 6) in pairs and (9, 8) in pairs  # suffix "in snow" and the end token, one to one
    assert pairs[-1] == (11, 10)  # padding up to the sequence length
    style = aligned_positions([1, 2, 3, 9, 9], [1, 2, 3], 8)  # "..., in the style of X" vs "...": onto the end token
    assert style[:2] == [(4, 4), (5, 4)]
    assert aligned_positions([1, 2], [1, 2], 8) == []


@pytest.mark.parametrize("mode", ["least-squares", "null-space"])
def test_the_solve_moves_target_outputs_onto_anchor_outputs_as_stated(sd1_view, mode):
    config = make_closed_form_config(["Grumpy Cat", "Snoopy"], "dog", mode=mode, preserve=["a tree"],
                                     null_space_tolerance=1e-3, **TINY)
    result = erase_closed_form(sd1_view, config)
    c, a = _pairs(sd1_view, result.config)
    layers = sd1_view.unet_layers("kv")
    measured = []
    for layer in (layers[0], layers[-1]):  # the layers the stated figure is computed on
        before_weight = layer.weight.detach().double().clone()
        with apply_patch(sd1_view, result.patch):
            after_weight = layer.weight.detach().double().clone()
        assert torch.equal(layer.weight.detach().double(), before_weight), "the view's weights must be back"
        gap_before = ((c - a) @ before_weight.T).square().sum()
        gap_after = (c @ after_weight.T - a @ before_weight.T).square().sum()
        measured.append(1 - float(gap_after / gap_before))
    assert min(measured) > 0.3
    assert sum(measured) / 2 == pytest.approx(result.stats["target_moved_fraction"], abs=1e-3)
    assert result.patch.metadata["ablation.method"] == "closed-form"


def test_null_space_edit_leaves_preserved_outputs_unchanged():
    """Preserved embeddings spanning a subspace: the edit of any weight cannot move their outputs."""
    generator = torch.Generator().manual_seed(0)
    dim, rank = 48, 20
    basis = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    preserved_vectors = (basis @ torch.randn(rank, 300, generator=generator, dtype=torch.float64)).T
    targets = torch.randn(200, dim, generator=generator, dtype=torch.float64)
    anchors = targets + torch.randn(200, dim, generator=generator, dtype=torch.float64)
    moments = Moments.zeros(dim)
    moments.add(targets, anchors)
    for mode in ("null-space", "least-squares"):
        g, stats = solve_text_map(moments, preserved_vectors.T @ preserved_vectors, len(preserved_vectors), mode,
                                  preserve_weight=1.0, ridge=1e-6, tolerance=1e-9)
        weight = torch.randn(32, dim, generator=generator, dtype=torch.float64)
        change = (preserved_vectors @ (weight @ g).T).norm() / (preserved_vectors @ weight.T).norm()
        moved = 1 - ((targets @ (weight + weight @ g).T - anchors @ weight.T).norm()
                     / ((targets - anchors) @ weight.T).norm()) ** 2
        if mode == "null-space":
            assert stats["null_space_dim"] == dim - rank
            assert float(change) < 1e-9 and float(moved) > 0.1  # only what lies outside the preserved span
        else:
            assert float(change) > 1e-3  # a penalty, not a constraint: preserved outputs move a little


def test_many_targets_in_one_solve_on_every_family(tiny_components):
    for family in ("sd1", "sd2", "sdxl"):
        view = DiffusersModelView(tiny_components[family])
        result = erase_closed_form(view, make_closed_form_config(["Grumpy Cat", "Van Gogh", "Nemo"],
                                                                 ["cat", "painting", "fish"], **TINY))
        assert len(result.patch.deltas) == len(view.unet_layers("kv"))
        assert result.patch.listed("targets") == ["Grumpy Cat", "Van Gogh", "Nemo"]
        assert result.stats["target_moved_fraction"] > 0.3
        with apply_patch(view, result.patch):
            pass


def test_bad_requests_get_clear_errors():
    with pytest.raises(PromptError, match="no targets"):
        make_closed_form_config([], "cat")
    with pytest.raises(PromptError, match="both 'Cat'"):
        make_closed_form_config(["Cat"], "cat")
    with pytest.raises(PromptError, match="one anchor for all targets or one per target"):
        make_closed_form_config(["a", "b"], ["x", "y", "z"])
    with pytest.raises(PromptError, match="empty"):
        make_closed_form_config(["  "], "cat")


def _moved_on_own_concept(view, patch, config) -> float:
    """How far ``patch`` moves ``config``'s target outputs onto its anchors' (first K/V layer; 1 = all the way)."""
    c, a = _pairs(view, resolve_closed_form(config, view.family.name))
    layer = view.unet_layers("kv")[0]
    weight = layer.weight.detach().double()
    delta = patch.deltas[layer.key].full().double()
    return 1 - float(((c @ (weight + delta).T - a @ weight.T).square().sum()) / ((c - a) @ weight.T).square().sum())


def test_fusion_keeps_each_erasure_where_the_weighted_sum_lets_them_interfere(sd1_view):
    configs = [make_closed_form_config("Grumpy Cat", "cat", **TINY), make_closed_form_config("Garfield", "cat", **TINY)]
    patches = [erase_closed_form(sd1_view, config).patch for config in configs]
    fused = fuse_patches(sd1_view, patches)
    summed = merge_weighted(patches)
    assert fused.metadata["ablation.method"] == "merge-fusion"
    assert fused.listed("targets") == ["Grumpy Cat", "Garfield"]
    for patch, config in zip(patches, configs):
        alone = _moved_on_own_concept(sd1_view, patch, config)
        by_fusion = _moved_on_own_concept(sd1_view, fused, config)
        by_sum = _moved_on_own_concept(sd1_view, summed, config)
        assert abs(by_fusion - alone) < abs(by_sum - alone), (alone, by_fusion, by_sum)


def test_training_on_top_of_a_closed_form_patch_keeps_both_and_the_original_fingerprint(sd1_view):
    from conftest import tiny_config, unet_weights

    from ablation_core import ablate

    before = unet_weights(sd1_view)
    base = erase_closed_form(sd1_view, make_closed_form_config("Van Gogh", "painting", **TINY)).patch
    result = ablate(sd1_view, tiny_config("Grumpy Cat", "cat", steps=3), base_patch=base)
    assert all(torch.equal(before[k], v) for k, v in unet_weights(sd1_view).items()), "the model was modified"
    assert result.patch.listed("targets") == ["Van Gogh", "Grumpy Cat"]
    assert set(base.deltas) <= set(result.patch.deltas)
    key = next(iter(base.deltas))
    assert not torch.allclose(result.patch.deltas[key].full(), base.deltas[key].full())
    with apply_patch(sd1_view, result.patch, strict=True):  # the fingerprint is the original model's
        pass


def test_a_joint_list_never_anchors_one_target_on_prompts_naming_another():
    config = resolve_closed_form(make_closed_form_config(["van gogh", "monet", "nemo"], ["painting", "painting",
                                                                                         "fish"]), "toy")
    assert config.kinds() == ["style", "style", "object"]
    targets, anchors = _prompt_pairs(config)
    assert anchors and not any(word in a for a in anchors for word in ("van gogh", "monet", "nemo"))
    assert any(t.endswith(", in the style of monet") for t in targets)
    assert sum("nemo" in t for t in targets) > 0


def test_a_rerun_reuses_encoded_chunks_and_an_edited_text_encoder_is_never_served_stale(sd1_view):
    from ablation_core.methods.closed_form.embeddings import MOMENT_CACHE

    MOMENT_CACHE.clear()
    config = make_closed_form_config(["Grumpy Cat"], "cat", preserve=["a tree", "a house"], **TINY)
    first = erase_closed_form(sd1_view, config)
    misses = MOMENT_CACHE.misses
    again = erase_closed_form(sd1_view, config)
    assert MOMENT_CACHE.misses == misses and MOMENT_CACHE.hits >= misses  # nothing encoded the second time
    for key, delta in first.patch.deltas.items():
        assert torch.equal(delta.full(), again.patch.deltas[key].full())

    # one token embedding of a preserved word changes: the chunk holding it is encoded afresh, and the result is
    # what a process that never cached anything computes
    embeddings = sd1_view.text_encoders[0].get_input_embeddings().weight
    row = sd1_view.token_ids("tree")[0][0]
    saved = embeddings.data[row].clone()
    try:
        embeddings.data[row] += 0.5
        edited = erase_closed_form(sd1_view, config)
        assert MOMENT_CACHE.misses > misses
        MOMENT_CACHE.clear()
        fresh = erase_closed_form(sd1_view, config)
    finally:
        embeddings.data[row] = saved
    key = next(iter(first.patch.deltas))
    assert not torch.equal(edited.patch.deltas[key].full(), first.patch.deltas[key].full())
    assert torch.equal(edited.patch.deltas[key].full(), fresh.patch.deltas[key].full())


def test_a_mass_erasure_never_pushes_the_preserved_bank_out_of_the_cache():
    from ablation_core.methods.closed_form.embeddings import MomentCache

    cache = MomentCache(max_bytes=8 * 4 * 100)  # room for 100 float32 values of each kind
    bank = ("preserved", ("a photo of a cat",), "cpu", "torch.float32", "probe")
    cache.put(bank, (torch.zeros(40),))
    for index in range(30):  # many target chunks, each newer than the bank
        cache.put(("pairs", (f"target {index}",), "cpu", "torch.float32", "probe"), (torch.zeros(30),))
    assert cache.get(bank) is not None
    kept = [k for k in cache.entries if k[0] == "pairs"]
    assert len(kept) == 13 and kept[-1][1] == ("target 29",)  # the newest that fit in half the budget


def test_the_prompts_phase_counts_every_prompt_encoded_probes_included():
    """The bar's prompts phase is in prompts through the text encoder: each pair's two, each preserved one and each
    chunk's cache probe (a probe encodes before its chunk, so a phase counted in pairs without probes gave an ETA
    about four times too long at first on a slow T5). A cold cache ends exactly at the total; a warm one jumps."""
    from ablation_core import load_model
    from ablation_core.methods.closed_form.embeddings import MOMENT_CACHE

    view = load_model("toy")
    encoded, seen = [], []
    real_encode = view.encode
    view.encode = lambda prompts: (encoded.append(len(prompts)), real_encode(prompts))[1]
    config = make_closed_form_config(["snoopy", "nemo"], ["dog", "fish"])

    def run() -> list[Progress]:
        seen.clear()
        erase_closed_form(view, config, on_progress=seen.append)
        return [p for p in seen if p.phase == "prompts"]

    MOMENT_CACHE.clear()
    cold = run()
    assert len({p.total for p in cold}) == 1 and cold[-1].step == cold[-1].total == sum(encoded)
    assert [p.step for p in cold] == sorted(p.step for p in cold)
    assert cold[1].step == 1, "the first probe moves the bar"
    encoded.clear()
    warm = run()
    assert warm[-1].step == warm[-1].total == cold[-1].total and sum(encoded) < cold[-1].total // 10


def _solve_with(moments: Moments):
    def solve(preserved_sum, count):
        return solve_text_map(moments, preserved_sum, count, "least-squares", preserve_weight=0.5, ridge=1e-6,
                              tolerance=1e-6)
    return solve


def test_the_focus_weighs_most_the_preserved_vectors_the_solve_moves_most():
    """A few preserved vectors lie next to the targets (a neighbour's tokens): the plain average barely sees them,
    the focus keeps them, and the targets still move most of the way."""
    generator = torch.Generator().manual_seed(0)
    dim = 24

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    concept, anchor_concept, other = (v / v.norm() for v in randn(3, dim))
    contexts = randn(200, dim) * 0.3  # the words around the concept
    strength = 1 + randn(200, 1).abs()
    targets, anchors = contexts + strength * concept, contexts + strength * anchor_concept
    moments = Moments.zeros(dim)
    moments.add(targets, anchors)
    bulk = randn(2000, dim) * 0.3
    bulk -= (bulk @ concept)[:, None] * concept  # unrelated words: nothing of the target's direction
    neighbour = randn(5, dim) * 0.3 + 2 * (0.6 * concept + 0.8 * other)  # shares part of the target's direction
    preserved = torch.cat([bulk, neighbour])
    solve = _solve_with(moments)

    plain, _ = solve(preserved.T @ preserved, len(preserved))
    same, stats = focused_solve(preserved, 0, solve)
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-7)  # no focus: the plain solve
    assert stats["preserved_worst_move"] == stats["preserved_worst_move_plain"]

    focused, stats = focused_solve(preserved, 4, solve)

    def moved(g, rows):
        return ((rows @ g.T).norm(dim=1) / rows.norm(dim=1)).max()

    assert float(moved(focused, neighbour)) < 0.75 * float(moved(plain, neighbour))
    assert stats["preserved_worst_move"] < stats["preserved_worst_move_plain"]
    assert stats["focus_max_weight"] > 10  # the neighbour's vectors, not a uniform raise

    def erased(g):
        return 1 - float((targets @ (torch.eye(dim, dtype=torch.float64) + g).T - anchors).square().sum()
                         / (targets - anchors).square().sum())

    assert erased(focused) > 0.8 * erased(plain)


def test_the_focus_through_a_solve_of_prompts(sd1_view):
    config = make_closed_form_config("Grumpy Cat", "cat", preserve=["a tree", "a cat on a sofa"], **TINY)
    plain = erase_closed_form(sd1_view, config)
    focused = erase_closed_form(sd1_view, replace(config, preserve_focus=3))
    assert "focus_iterations" not in plain.stats and focused.stats["focus_iterations"] == 3
    assert focused.stats["preserved_worst_move"] < focused.stats["preserved_worst_move_plain"]
    assert focused.focus_vectors["context"].shape[-1] == sd1_view.encode(["x"]).context.shape[-1]
    assert not torch.equal(plain.text_maps["context"], focused.text_maps["context"])
    assert json.loads(focused.patch.metadata["ablation.settings"])["preserve_focus"] == 3
    with pytest.raises(AblationError, match="preserve focus"):
        erase_closed_form(sd1_view, replace(config, preserve_focus=-1))


def test_a_focused_solve_encodes_the_preserved_prompts_once_and_holds_at_most_its_budget(sd1_view, monkeypatch):
    from ablation_core.methods.closed_form import focus, solve
    from ablation_core.methods.progress import EncodeCount, no_progress

    def refuse(*_, **__):
        raise AssertionError("the focus keeps the preserved set as vectors: no second encoding of its prompts")

    monkeypatch.setattr(solve, "preserved_moments", refuse)
    config = make_closed_form_config("Grumpy Cat", "cat", preserve=["a tree", "a dog"], preserve_focus=1, **TINY)
    result = erase_closed_form(sd1_view, config)
    prompts = list(result.config.preserved_prompts)
    full = result.focus_vectors["context"]
    assert result.stats["preserved_vectors"] == len(full)

    monkeypatch.setattr(focus, "VECTOR_BYTES", full.numel())  # a quarter of the float32 rows' bytes
    count = EncodeCount(no_progress, solve.Canceller(None), len(prompts))
    sampled = focus.preserved_vectors(sd1_view, prompts, count)["context"]
    assert 0 < len(sampled) <= len(full) // 4, "each chunk sampled to the budget's share"
    assert count.done == len(prompts)
