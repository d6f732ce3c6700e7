"""The tab as a user meets it (#22 item 5), in A1111 and Forge alike: one progress plan and one ETA for the whole
run, the preview sized to the device and its cost said first, and the concept type guessed (``auto``)."""

from __future__ import annotations

import re
import types

import pytest
import torch

from ablation_core import load_patch
from ablation_core.backends.a1111.flows import preview_defaults
from ablation_core.backends.a1111.progress import SCALE, RunProgress
from ablation_core.methods.ablation.recipes import guess_concept_type
from ablation_core.methods.progress import Progress
from tests import a1111_fakes, forge_fakes
from tests.test_a1111 import CONCEPT_TYPE, a1111, build_tab, form, load_script, press  # noqa: F401  (a fixture)
from tests.test_a1111 import PREVIEW_SIZE as SIZE
from tests.test_a1111 import PREVIEW_STEPS as STEPS

PATCH = "ablate_Van_Gogh_to_painting"


@pytest.fixture
def forge(tmp_path, monkeypatch):
    lora_dir = tmp_path / "models" / "Lora"
    lora_dir.mkdir(parents=True)
    env = forge_fakes.install(monkeypatch, lora_dir)
    env.lora_dir = lora_dir
    env.script = load_script(monkeypatch)
    return env


def a1111_eta(state: types.SimpleNamespace, now: float) -> float | None:
    """A1111's (and Forge's) ``modules/progress.py``: the bar's fraction and ETA from ``shared.state``."""
    progress = state.job_no / state.job_count + state.sampling_step / state.sampling_steps / state.job_count
    if progress <= 0:
        return None
    elapsed = now - state.time_start
    return elapsed / min(progress, 1) - elapsed


def test_the_texts_left_is_the_bars_eta_and_the_bar_never_goes_back():
    now = [1010.0]
    state = types.SimpleNamespace(time_start=1000.0, textinfo=None, job="")
    progress = RunProgress(state, clock=lambda: now[0])
    progress.plan("prompts", 1.0)
    progress.plan("solve", 2.0)
    progress.plan("preview", 1.0)
    progress(Progress("prompts", 1, 1))  # a quarter of the plan in 10 s: 30 s left
    assert state.sampling_step == SCALE // 4
    assert a1111_eta(state, now[0]) == pytest.approx(30.0)
    assert state.textinfo.endswith("25% of the run, 30s left")
    now[0] = 1030.0
    progress(Progress("solve", 1, 2))  # half in 30 s
    assert a1111_eta(state, now[0]) == pytest.approx(30.0) and "30s left" in state.textinfo
    progress(Progress("prompts", 0, 5))  # an earlier phase reported again (a robust round) holds the bar
    assert state.sampling_step == SCALE // 2
    progress(Progress("adversary 1", 1, 10))  # an unplanned phase joins the plan's end without a step back
    assert state.sampling_step == SCALE // 2
    progress(Progress("preview", 2, 2))
    assert state.sampling_step <= SCALE and state.sampling_steps == SCALE


def bar_fractions(state) -> list[float]:
    totals = {total for _, total in state.bar}
    assert totals == {SCALE}, f"one plan for the whole run, not one per phase: {totals}"
    return [step / total for step, total in state.bar]


@pytest.mark.parametrize("method", ["trained", "closed form"])
def test_one_monotone_plan_from_the_first_prompt_to_the_preview(a1111, method):  # noqa: F811
    _, buttons = build_tab(a1111)
    *_, message = press(buttons["Ablate"], form(method))
    assert (a1111.lora_dir / f"{PATCH}.safetensors").exists(), message
    texts, fractions = a1111.state.texts, bar_fractions(a1111.state)
    assert texts[0].startswith("Encoding prompts") and fractions[0] > 0, "prompt encoding counts from the start"
    assert all(b >= a for a, b in zip(fractions, fractions[1:])), f"the bar went back: {fractions}"
    drawing = [f for t, f in zip(texts, fractions) if t.startswith("Drawing the before/after preview")]
    assert drawing and drawing[0] < 1 and fractions[-1] > 0.99, "the preview is the plan's last part"
    assert all(" left" in t for t, f in zip(texts, fractions) if 0 < f < 1), "every text has the run's time left"
    percents = [int(m.group(1)) for t in texts for m in [re.search(r"(\d+)% of the run", t)] if m]
    assert len(percents) == len(texts) and percents == sorted(percents)


def test_forge_shares_the_plan(forge):
    _, buttons = build_tab(forge)
    *_, message = press(buttons["Ablate"], form("closed form"))
    assert (forge.lora_dir / f"{PATCH}.safetensors").exists(), message
    fractions = bar_fractions(forge.state)
    assert fractions[0] > 0 and fractions == sorted(fractions) and fractions[-1] > 0.99


@pytest.mark.parametrize("env", ["a1111", "forge"])
def test_a_repeated_closed_form_plans_only_the_prompts_it_encodes(env, request):
    """The real Forge, pressing Ablate again for the same concept: the prompts' moments came from the process's
    cache in 4 s and the preview took 56 s of 62, yet the plan gave the prompts 66 % and the ETA said 2-6 s while
    the preview drew. The plan now counts only the prompts the run will encode."""
    from ablation_core.methods.closed_form.embeddings import MOMENT_CACHE

    host = request.getfixturevalue(env)
    MOMENT_CACHE.clear()
    _, buttons = build_tab(host)
    first_preview = []
    for name in ("first", "second"):
        start = len(host.state.texts)
        *_, message = press(buttons["Ablate"], form("closed form", **{"Save as models/Lora/NAME.safetensors": name}))
        assert (host.lora_dir / f"{name}.safetensors").exists(), message
        texts, fractions = host.state.texts[start:], bar_fractions(host.state)[start:]
        assert all(b >= a for a, b in zip(fractions, fractions[1:])) and fractions[-1] > 0.99
        first_preview.append(next(f for t, f in zip(texts, fractions) if t.startswith("Drawing the before/after")))
    assert MOMENT_CACHE.misses and MOMENT_CACHE.hits >= MOMENT_CACHE.misses  # the second run encoded no chunk
    # the prompts are most of the first plan; in the second only their probes are left, and the preview's share grows
    assert first_preview[0] > 0.9 and 1 - first_preview[1] > 5 * (1 - first_preview[0]), first_preview
    MOMENT_CACHE.clear()


def test_the_default_preview_is_sized_to_the_device_and_its_cost_said_first(a1111):  # noqa: F811
    assert preview_defaults(types.SimpleNamespace(device=torch.device("cpu"))) == (64, 8)
    assert preview_defaults(types.SimpleNamespace(device=torch.device("cuda", 0))) == (512, 20)
    line = a1111.script.model_text()
    assert "64 px, 8 steps" in line and "64 UNet passes" in line and "the CPU" in line
    _, buttons = build_tab(a1111)
    sizes = {c.kwargs.get("label"): c.kwargs.get("value") for c in a1111_fakes.Component.created}
    assert sizes[SIZE] == 0 and sizes[STEPS] == 0  # 0: by device
    *_, message = press(buttons["Ablate"], form("closed form", **{SIZE: 0, STEPS: 0}))
    assert "The preview (64 px, 8 steps) took" in message
    assert (a1111.lora_dir / f"{PATCH}.preview.png").exists()


def saved_defaults(settings: dict[str, object]) -> dict[str, object]:
    """A1111's and Forge's ``ui_loadsave.UiLoadsave.add_component``: a value saved in ui-config.json under
    ``TAB/LABEL/value`` replaces the control's default on the next start; what the controls then show, by label."""
    shown = {}
    for component in a1111_fakes.Component.created:
        label = component.kwargs.get("label")
        if label is not None:
            shown[label] = settings.get(f"concept_ablation/{label}/value", component.kwargs.get("value"))
    return shown


def test_defaults_saved_by_an_older_tab_do_not_hide_the_new_ones(a1111):  # noqa: F811
    # what the real Forge's ui-config.json held from the tab before #22 item 5 (its first defaults, saved on start)
    old = {"concept_ablation/Concept type/value": "object", "concept_ablation/Preview size, px/value": 512,
           "concept_ablation/Preview steps/value": 20, "concept_ablation/Method/value": "trained"}
    _, buttons = build_tab(a1111)
    shown = saved_defaults(old)
    assert (shown[CONCEPT_TYPE], shown[SIZE], shown[STEPS]) == ("auto", 0, 0)
    *_, message = press(buttons["Ablate"], form("closed form", **{label: shown[label]
                                                                  for label in (CONCEPT_TYPE, SIZE, STEPS)}))
    assert "Concept type: style (auto)" in message and "The preview (64 px, 8 steps) took" in message


@pytest.mark.parametrize(("target", "anchor", "picked"), [
    ("Van Gogh", "painting", "style"), ("Claude Monet", "impressionist painting", "style"),
    ("Grumpy Cat", "cat", "instance"), ("R2D2", "robot", "object"),
    ("nudity", "a person, fully clothed", "inappropriate")])
def test_auto_guesses_the_concept_type_from_the_words(target, anchor, picked):
    assert guess_concept_type(target, anchor) == picked


def test_the_tab_defaults_to_auto_and_says_what_it_picked(a1111):  # noqa: F811
    _, buttons = build_tab(a1111)
    dropdown = next(c for c in a1111_fakes.Component.created if c.kwargs.get("label") == CONCEPT_TYPE)
    assert dropdown.kwargs["value"] == "auto" and dropdown.args[0][0] == "auto"
    values = form("closed form")
    del values[CONCEPT_TYPE]  # untouched: the dropdown's default
    *_, message = press(buttons["Ablate"], values)
    assert "Concept type: style (auto)" in message
    patch = load_patch(a1111.lora_dir / f"{PATCH}.safetensors")
    assert patch.metadata["ablation.kind"] == "style"
    # the closed form's low-rank solve is stored as the smaller of its factors and its exact change, layer by layer
    for delta in patch.deltas.values():
        exact = delta.full().numel()
        assert delta.numel() < exact if delta.is_low_rank else delta.numel() == exact
