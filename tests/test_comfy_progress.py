"""Never waiting blind in ComfyUI (#24 item 6): every node that runs for a while makes one ComfyUI progress bar when it
starts, with one total for the whole node, moves it from the first prompts encoded, never back, to its end, and its
websocket events carry the whole node's ETA."""

from __future__ import annotations

import pytest
import torch

from ablation_core.backends import comfy as backend
from ablation_core.methods import phases
from ablation_core.methods.progress import Progress
from ablation_core.methods.run_plan import SCALE, SVD_UNIT_WORK, RunPlan
from tests import comfy_fakes as fakes
from tests.test_nodes import _nodes, _tiny_inputs, comfy  # noqa: F401  (comfy is a fixture)


class Watch:
    """The phase each bar update came in (the methods announce their phases), and the node's events."""

    def __init__(self, state: fakes.ComfyState):
        self.state, self.marks = state, []

    def __call__(self, name: str) -> None:
        self.marks.append((len(self.state.progress), name))

    def phase_of_update(self, index: int) -> str | None:
        return next((name for count, name in reversed(self.marks) if count <= index), None)

    def events(self) -> list[dict]:
        return [data for event, data in self.state.messages if event == backend.PROGRESS_EVENT]

    def check_one_monotone_bar(self, bars_before: int = 0) -> list[float]:
        assert self.state.bars[bars_before:] == [SCALE], "one bar per node, made with the node's one total"
        values = [value for value, _ in self.state.progress]
        assert {total for _, total in self.state.progress} == {SCALE}, "one total for the whole node"
        assert all(b >= a for a, b in zip(values, values[1:])), f"the bar went back: {values}"
        assert values[-1] == SCALE
        events = [e for e in self.events() if e["phase"] != "done"]
        assert all(e["eta"] is not None and e["eta"] >= 0 for e in events[3:]), "the whole node's time left"
        fractions = [e["fraction"] for e in events]
        assert fractions == sorted(fractions)
        return values


@pytest.fixture
def watch(comfy):  # noqa: F811
    seen = Watch(comfy)
    with phases.listening(seen):
        yield seen


def test_ablate_moves_the_bar_from_the_first_prompts_to_its_end(comfy, watch, monkeypatch):  # noqa: F811
    node = _nodes()["AblateConcept"]()
    node.ablate(*_tiny_inputs(fakes.make_model(), fakes.make_clip(), monkeypatch), use_cache=True, unique_id="5")
    values = watch.check_one_monotone_bar()
    assert watch.phase_of_update(0) == "encoding prompts", "the bar starts with the prompts being encoded"
    encoding = [v for i, v in enumerate(values) if watch.phase_of_update(i) == "encoding prompts"]
    assert encoding and encoding[-1] > 0, "encoding the prompts moves the bar"
    events = watch.events()
    train = [e for e in events if e["phase"] == "train"]
    assert train[0]["step"] == 0, "training says it began before its first step ends"
    assert [e["phase"] for e in events if e["phase"] in ("check", "write")][-1] == "write", "the cache's file too"
    assert events[-1]["phase"] == "done" and events[-1]["fraction"] == 1.0


def test_erase_concepts_moves_the_bar_from_its_first_prompts(comfy, watch):  # noqa: F811
    from ablation_core.methods.closed_form.embeddings import MOMENT_CACHE

    MOMENT_CACHE.clear()  # an earlier test's erasure may hold these prompts' moments: nothing would be encoded
    model, clip = fakes.make_toy_model_and_clip()
    _nodes()["EraseConceptsClosedForm"]().erase(model, clip, "snoopy -> dog\nnemo -> fish", "", "object",
                                                "least-squares", 0.5, unique_id="8")
    values = watch.check_one_monotone_bar()
    assert watch.phase_of_update(0) == "encoding prompts"
    prompts = [e for e in watch.events() if e["phase"] == "prompts"]
    assert prompts[0]["step"] == 0 and len({e["total"] for e in prompts}) == 1
    assert len(prompts) >= prompts[-1]["total"] // 8, "a report every few prompts encoded, not every 32 pairs"
    assert values[len(prompts) // 2] > 0


def test_merge_fusion_counts_every_prompt_once_and_reports_the_fusing(comfy, watch):  # noqa: F811
    model, clip = fakes.make_toy_model_and_clip()
    erase = _nodes()["EraseConceptsClosedForm"]()
    first = erase.erase(model, clip, "snoopy -> dog", "", "object", "least-squares", 0.5)["result"][1]
    second = erase.erase(model, clip, "grumpy cat -> cat", "", "object", "least-squares", 0.5)["result"][1]
    bars, comfy.progress[:], comfy.messages[:] = len(comfy.bars), [], []
    _nodes()["MergeAblationPatches"]().merge(first, 1.0, second, 1.0, "fusion", model=model, clip=clip,
                                             unique_id="4")
    watch.check_one_monotone_bar(bars)
    events = watch.events()
    prompts = [e for e in events if e["phase"] == "prompts"]
    assert len({e["total"] for e in prompts}) == 1, "one count over every patch's prompts and the preserved ones"
    assert [e["step"] for e in prompts] == sorted(e["step"] for e in prompts)
    fuse = [e for e in events if e["phase"] == "fuse"]
    assert fuse and fuse[-1]["step"] == fuse[-1]["total"] > 0, "the layers' solve after the prompts says so"


def test_save_reports_compressing_and_writing(comfy, watch, tmp_path):  # noqa: F811
    model = fakes.make_model()
    view = backend.ComfyModelView(model)
    deltas = {layer.key: torch.randn(layer.weight.shape) for layer in view.unet_layers("kv")}
    from ablation_core import AblationPatch

    patch = AblationPatch.from_deltas(deltas, {"ablation.targets": '["x"]', "ablation.anchors": '["y"]'})
    save = _nodes()["SaveAblationPatch"]()
    save.save(patch, "ablation/p", "loras", "low rank (small)", 0.99, unique_id="9")
    watch.check_one_monotone_bar()
    events = watch.events()
    compress = [e for e in events if e["phase"] == "compress"]
    assert len(compress) == len(deltas) + 1 and compress[-1]["step"] == compress[-1]["total"] == patch.svd_work()
    assert [e["phase"] for e in events][-2:] == ["write", "done"]


def test_the_bar_moves_with_the_work_of_each_svd_and_solve():
    """Saved in the real ComfyUI, a Flux patch's 3072 x 4096 txt_in took 7.2 of its 7.4 s, with the bar at 5 % and
    "140 s left" until it ended (here a quarter-size pair of the same disproportion); the Erase node's 4096-wide
    solve sat at 99.7 % for 38 s, "6 s left"."""
    from ablation_core import AblationPatch
    from ablation_core.methods.closed_form.settings import make_closed_form_config, resolve_closed_form
    from ablation_core.methods.run_plan import plan_closed_form, plan_compress, plan_write

    patch = AblationPatch.from_deltas({"txt_in": torch.randn(768, 1024), "vector_in": torch.randn(768, 64)}, {})
    reported = []
    patch.compressed(rank=1, on_layer=lambda done, total: reported.append(done / total))
    assert reported[0] > 0.95 and reported[-1] == 1.0
    plan = RunPlan()
    plan_compress(plan, patch.svd_work() / SVD_UNIT_WORK)
    plan_write(plan, 2 * patch.numel() / 2**20)
    assert plan.phases["compress"].units > 5 * plan.phases["write"].units
    config = resolve_closed_form(make_closed_form_config("Van Gogh", "painting", builtin_preserve=False), "flux")
    plan = RunPlan()
    plan_closed_form(plan, config, 2, family="flux")
    assert plan.phases["solve"].units / plan.phases["prompts"].units > 0.02  # 38 s of 1,859 s; 0.003 before


def test_the_report_moves_one_bar_through_both_drawings(comfy, watch):  # noqa: F811
    model, clip, vae = fakes.make_model(), fakes.make_clip(), fakes.VAE()
    view = backend.ComfyModelView(model)
    from ablation_core import AblationPatch

    deltas = {layer.key: 0.01 * torch.randn(layer.weight.shape) for layer in view.unet_layers("kv")}
    patch = AblationPatch.from_deltas(deltas, {"ablation.targets": '["x"]', "ablation.anchors": '["y"]'})
    _nodes()["AblationReport"]().report(model, clip, vae, patch, 1.0, "a dog", 0, 2, 3.0, 1, 64, unique_id="2")
    watch.check_one_monotone_bar()
    assert {e["phase"] for e in watch.events()} >= {"before prompts", "before", "after prompts", "after", "done"}


def test_the_reports_clip_figures_move_the_same_bar_to_its_end(comfy, watch, tmp_path):  # noqa: F811
    from ablation_core import AblationPatch
    from tests import clip_models

    model, clip, vae = fakes.make_model(), fakes.make_clip(), fakes.VAE()
    view = backend.ComfyModelView(model)
    deltas = {layer.key: 0.01 * torch.randn(layer.weight.shape) for layer in view.unet_layers("kv")}
    patch = AblationPatch.from_deltas(deltas, {"ablation.targets": '["grumpy cat"]', "ablation.anchors": '["cat"]'})
    folder = clip_models.random_clip(tmp_path / "clip")
    _nodes()["AblationReport"]().report(model, clip, vae, patch, 1.0, "a dog", 0, 2, 3.0, 1, 64,
                                        clip_model=str(folder), images_per_set=2, unique_id="2")
    watch.check_one_monotone_bar()
    figures = [e for e in watch.events() if e["phase"] == "CLIP figures"]
    assert figures and figures[-1]["step"] == figures[-1]["total"] and figures[0]["fraction"] < 1
    assert all(e["fraction"] < 1 for e in watch.events() if e["phase"] in ("before", "after"))  # planned up front


def test_a_phase_run_again_takes_its_next_planned_occurrence_and_the_eta_is_the_whole_runs():
    now = [100.0]
    plan = RunPlan(clock=lambda: now[0])
    for phase in ("prompts", "train", "adversary 1", "prompts", "train"):
        plan.plan(phase, 1.0)
    assert plan.phases["train #2"].offset == 4.0
    assert plan.eta() is None
    now[0] = 110.0
    plan.advance(Progress("prompts", 1, 1))
    assert plan.eta() == pytest.approx(40.0)  # a fifth of the run in 10 s
    plan.advance(Progress("train", 1, 1))
    plan.advance(Progress("adversary 1", 5, 10))
    assert plan.advance(Progress("prompts", 0, 3)) == pytest.approx(0.6)  # the second round's prompts
    assert plan.current == "prompts #2"
    assert plan.advance(Progress("train", 1, 2)) == pytest.approx(0.9)
    assert plan.advance(Progress("check", 1, 1)) == 1.0  # never planned: joins the end


def test_a_robust_run_plans_its_rounds_and_each_one_moves_the_bar(comfy, watch, monkeypatch):  # noqa: F811
    node = _nodes()["AblateConcept"]()
    node.ablate(*_tiny_inputs(fakes.make_model(), fakes.make_clip(), monkeypatch), use_cache=False, robust_rounds=1,
                unique_id="6")
    watch.check_one_monotone_bar()
    events = [e for e in watch.events() if e["phase"] != "done"]
    assert events[0]["phase"] == "preserved", "the kept concepts' prompts are encoded first, and say so"
    assert "adversary images" in {e["phase"] for e in events}
    starts = [i for i, e in enumerate(events) if e["phase"] == "train" and e["step"] == 0 and not e["within"]]
    assert len(starts) == 2, "two trainings: the run and its round"
    second = [e["fraction"] for e in events[starts[1]:] if e["phase"] == "train"]
    assert second[-1] > second[0] and second[-1] < 1, "the round's training moves the bar, within the plan"


def test_a_run_with_preserved_rows_plans_them_after_its_own_prompts():
    """Flux's default trains one preserved row: the node encoded the run's 2 prompts, then the 200 kept ones; the
    plan had put the kept ones first, so the bar stood at 64 % through them while the time left grew from 25 s."""
    from ablation_core import make_config, resolve_config
    from ablation_core.methods.run_plan import plan_trained

    config = resolve_config(make_config("Van Gogh", "painting", anchor_prompts=("a painting of a village",),
                                        preserved_rows=1), "flux")
    plan = RunPlan()
    plan_trained(plan, config, 16, "flux")
    assert list(plan.phases)[:3] == ["prompts", "preserved", "anchors"]
    assert plan.phases["prompts"].units < plan.phases["preserved"].units / 50  # 2 prompts against 200
    before = plan.advance(Progress("prompts", 2, 2))
    assert plan.advance(Progress("preserved", 100, 200)) > before


def test_between_steps_the_pacer_reports_the_share_of_the_next_step_from_the_phases_own_pace():
    from ablation_core.methods.progress import PULSE_CAP, PULSE_KNEE, Pacer

    now, sent = [0.0], []
    pacer = Pacer(sent.append, clock=lambda: now[0])
    pacer.pulse()
    pacer(Progress("train", 0, 4))
    now[0] = 5.0
    pacer.pulse()
    assert sent == [Progress("train", 0, 4)], "no pace is known before the phase's first step ends"
    now[0] = 10.0
    pacer(Progress("train", 1, 4, loss=0.5, eta_seconds=30.0))  # 10 s a step
    now[0] = 10.5
    pacer.pulse()
    assert len(sent) == 2, "at most one report a second"
    now[0] = 14.0
    pacer.pulse()
    assert sent[-1] == Progress("train", 1, 4, loss=0.5, eta_seconds=26.0, within=pytest.approx(0.4))
    now[0] = 30.0
    pacer.pulse()
    late = sent[-1].within
    assert PULSE_KNEE * PULSE_CAP < late < PULSE_CAP and sent[-1].eta_seconds == 10.0, "never claims to be done"
    now[0] = 60.0
    pacer.pulse()
    assert late < sent[-1].within < PULSE_CAP, "a step slower than its pace still moves the bar, ever slower"
    pacer(Progress("train", 4, 4, loss=0.1, eta_seconds=0.0))
    now[0] = 60.0
    pacer.pulse()
    pacer(Progress("check", 0, 10))
    now[0] = 70.0
    pacer.pulse()
    assert [p.phase for p in sent[-2:]] == ["train", "check"], "nothing after a phase's end, nor from its pace"
    pacer(Progress("anchors", 0, 10))
    now[0] = 71.0
    pacer(Progress("anchors", 1, 10))  # a step of a second: its own reports come often enough
    now[0] = 73.0
    pacer.pulse()
    assert sent[-1] == Progress("anchors", 1, 10)
    inner = Progress("train", 2, 4, within=0.3)
    pacer(inner)
    assert sent[-1] is inner and pacer.last.phase == "anchors", "a nested run's pulse passes through"


def test_a_phases_first_step_moves_at_the_runs_pace_and_later_ones_at_the_phases_own():
    from ablation_core.methods.progress import PULSE_CAP, Pacer

    class Shown(list):
        def __call__(self, progress: Progress) -> None:
            self.append(progress)

        def step_seconds(self, progress: Progress) -> float:  # what the front end's plan says a step takes
            return 20.0

    now, sent = [0.0], Shown()
    pacer = Pacer(sent, clock=lambda: now[0])
    pacer(Progress("anchors", 0, 16))
    now[0] = 5.0
    pacer.pulse()
    assert sent[-1].within == pytest.approx(0.25), "5 s of a step the plan gives 20 s"
    now[0] = 45.0
    pacer.pulse()
    assert sent[-1].within == pytest.approx(2.25), "a first report may cover several steps: up to the phase's end"
    now[0] = 60.0
    pacer(Progress("anchors", 2, 16))  # a sampler step of the whole batch: two images a report, 30 s each
    now[0] = 105.0
    pacer.pulse()
    assert sent[-1].step == 2 and 1.4 < sent[-1].within < 1.5, "the phase's own pace (1.5 images), easing near 1.8"
    now[0] = 200.0
    pacer.pulse()
    assert 1.75 < sent[-1].within < 2 * PULSE_CAP, "short of the next report's two images"


def test_a_long_training_step_moves_the_bar_while_it_runs_and_not_the_loss_curve(comfy, watch, monkeypatch):  # noqa: F811
    """A CPU's step of SD1.5 or Flux takes tens of seconds: the node's bar and time left move inside it (here every
    layer, with the intervals at 0), monotone, and the curve gets one point a step."""
    from ablation_core.methods import progress

    monkeypatch.setattr(progress, "CHECK_INTERVAL_S", 0.0)
    monkeypatch.setattr(progress, "PULSE_INTERVAL_S", 0.0)
    monkeypatch.setattr(progress, "PULSE_MIN_STEP_S", 0.0)
    node = _nodes()["AblateConcept"]()
    node.ablate(*_tiny_inputs(fakes.make_model(), fakes.make_clip(), monkeypatch), use_cache=False, unique_id="5")
    watch.check_one_monotone_bar()
    train = [e for e in watch.events() if e["phase"] == "train"]
    pulses = [e for e in train if e["within"] > 0]
    steps = [e for e in train if e["within"] == 0]
    assert pulses and all(0 < e["within"] <= progress.PULSE_CAP * e["total"] for e in pulses)
    assert {e["step"] for e in pulses} <= set(range(steps[-1]["total"])), "never after the last step"
    assert 0 in {e["step"] for e in pulses}, "the first step moves the bar too, at the node's pace so far"
    inside = [b["fraction"] for a, b in zip(train, train[1:]) if b["within"] > 0 and b["fraction"] > a["fraction"]]
    assert inside, "a pulse moves the bar on"
    assert len([e for e in steps if e["loss"] is not None]) == steps[-1]["total"], "one loss a step"


def test_a_pulses_share_is_continuous_monotone_and_below_its_cap():
    from ablation_core.methods.progress import PULSE_KNEE, eased

    shares = [eased(0.05 * k, 1.8) for k in range(200)]
    below = [k for k in range(200) if 0.05 * k <= PULSE_KNEE * 1.8]
    assert len(below) >= 26 and [shares[k] for k in below] == pytest.approx([0.05 * k for k in below])
    assert all(b > a for a, b in zip(shares, shares[1:])) and shares[-1] < 1.8
    assert max(abs(b - a) for a, b in zip(shares, shares[1:])) <= 0.05 + 1e-9, "no jump at the knee"
    assert eased(3.0, 0.0) == 0.0, "nothing left to claim"
