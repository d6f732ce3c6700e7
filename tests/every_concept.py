"""Every entry point on every concept of the toy world: the held-out check on quality settings.

``python -m tests.every_concept [--model toy|toy-flux] [--method trained|closed-form] [--entries api cli node]
[--per-set 48] [--out F] [--settings KEY=VALUE ...] [--compare-presets default thorough ...]``

For each toy concept (with its suggested anchor) and each entry point, makes a patch the way a user would:
  - ``api``:  ``ablate(load_model("toy"), make_config(target, anchor))`` (closed form:
    ``erase_closed_form(load_model("toy"), make_closed_form_config(target, anchor))``);
  - ``cli``:  ``python -m ablation_core ablate --model toy --target T --anchor A --out P`` in a subprocess (closed
    form: with ``--method closed-form``);
  - ``node``: the Ablate Concept (closed form: Erase Concepts) node's own function on the toy model held as a
    ComfyUI MODEL/CLIP (the fakes of ``tests/comfy_fakes.py`` around the shipped toy weights; for toy-flux those of
    ``tests/comfy_flux_fakes.py``, a ComfyUI Flux MODEL and flux CLIP), with the node's default widgets except
    target, anchor and kind;
(``--settings`` adds config settings to the api entry's call, trained or closed form; ``--compare-presets`` makes
and measures each concept once per named preset; the api rows count the run's UNet evaluations with a hook),
then measures it with ``evaluate_toy`` (evaluation templates and noise disjoint from the run's). No settings are
given beyond what each entry point's user types, so the figures show what users get.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ablation_core import evaluate_toy, load_model, load_patch, make_config
from ablation_core.cli.common import parse_settings
from ablation_core.files import write_text_atomic
from ablation_core.methods.ablation.loop import ablate
from ablation_core.toy.concepts import CONCEPTS

ENTRIES = ("api", "cli", "node")
API_SETTINGS: dict[str, object] = {}
COUNTED: dict[str, int] = {}
METHODS = ("trained", "closed-form")
MODEL = ["toy"]  # which toy world: toy or toy-flux (--model)


def _network(view):
    return getattr(view, "unet", None) or view.transformer


def patch_from_api(method: str, target: str, anchor: str, folder: Path):
    if method == "closed-form":
        from ablation_core.methods.closed_form.settings import make_closed_form_config
        from ablation_core.methods.closed_form.solve import erase_closed_form

        return erase_closed_form(load_model(MODEL[0]), make_closed_form_config(target, anchor, **API_SETTINGS)).patch
    view = load_model(MODEL[0])
    calls = []
    handle = _network(view).register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    try:
        result = ablate(view, make_config(target, anchor, **API_SETTINGS))
    finally:
        handle.remove()
    COUNTED[target] = sum(calls)
    return result.patch


def patch_from_cli(method: str, target: str, anchor: str, folder: Path):
    out = folder / f"{target.replace(' ', '_')}.safetensors"
    subprocess.run([sys.executable, "-m", "ablation_core", "ablate", "--model", MODEL[0], "--method", method,
                    "--target", target, "--anchor", anchor, "--out", str(out), "--overwrite"], check=True,
                   capture_output=True, text=True)
    return load_patch(out)


def patch_from_node(method: str, target: str, anchor: str, folder: Path):
    from tests import comfy_fakes as fakes

    monkeypatch = pytest.MonkeyPatch()
    try:
        fakes.install(folder, monkeypatch)
        import nodes

        if MODEL[0] == "toy-flux":
            from tests import comfy_flux_fakes

            model, clip = comfy_flux_fakes.make_toy_flux_model_and_clip()
        else:
            model, clip = fakes.make_toy_model_and_clip()
        kind = "style" if target in ("van gogh", "monet", "picasso") else "object"
        if method == "closed-form":
            node = nodes.NODE_CLASS_MAPPINGS["EraseConceptsClosedForm"]()
            return node.erase(model, clip, f"{target} -> {anchor}", "", kind, "least-squares", 0.5)["result"][1]
        node = nodes.NODE_CLASS_MAPPINGS["AblateConcept"]()
        group = node.INPUT_TYPES()["required"]["group"][1]["default"]  # the widget as a new node shows it
        output = node.ablate(model, clip, target, anchor, kind, group, "default", 0, 0, use_cache=False)
        return output["result"][2]
    finally:
        monkeypatch.undo()


MAKERS = {"api": patch_from_api, "cli": patch_from_cli, "node": patch_from_node}


def _unpatched_samples_cached() -> None:
    """Classify each unpatched prompt set once per process (evaluations of several patches share their "before")."""
    from ablation_core.evaluation import toy_eval

    real = toy_eval._classify_samples
    cache: dict[tuple, object] = {}

    def cached(view, classifier, prompts, seed, steps, guidance):
        state = float(sum(p.double().sum() for p in _network(view).parameters()))  # the patch changes the weights
        key = (tuple(prompts), seed, steps, guidance, state)
        if key not in cache:
            cache[key] = real(view, classifier, prompts, seed, steps, guidance)
        return cache[key]

    toy_eval._classify_samples = cached


def anchors_of(concept, which: str) -> list[str]:
    """The concept's anchors to measure: its suggested one, the other one a user could pick, or both."""
    return {"suggested": [concept.anchor], "other": [concept.other_anchor],
            "both": [concept.anchor, concept.other_anchor]}[which]


def run(method: str, entries: list[str], per_set: int, concepts: list[str] | None,
        variants: dict[str, dict] | None = None, anchors: str = "suggested", seeds: int = 1) -> list[dict]:
    """``variants``: api settings by label (each concept is made and measured once per variant); ``seeds``: the api
    entry makes and measures each pair once per run seed 0..seeds-1 (evaluation noise moves with it), for the
    figures' spread."""
    view = load_model(MODEL[0])
    rows = []
    variants = variants or {"": dict(API_SETTINGS)}
    if len(variants) > 1 or seeds > 1:
        _unpatched_samples_cached()
    with tempfile.TemporaryDirectory() as tmp:
        for concept in CONCEPTS:
            if concepts and concept.name not in concepts:
                continue
            for anchor, entry, label in [(a, e, v) for a in anchors_of(concept, anchors) for e in entries
                                         for v in variants]:
                for seed in range(seeds if entry == "api" else 1):
                    API_SETTINGS.clear()
                    API_SETTINGS.update(variants[label])
                    if seed:
                        API_SETTINGS["seed"] = seed
                    rows.append(_measure(view, method, entry, label, concept, anchor, per_set, seed, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def _measure(view, method: str, entry: str, label: str, concept, anchor: str, per_set: int, seed: int,
             folder: Path) -> dict:
    started = time.perf_counter()
    patch = MAKERS[entry](method, concept.name, anchor, folder)
    made = time.perf_counter() - started
    evaluation = evaluate_toy(view, patch, concept.name, anchor, per_set=per_set, seed=seed)
    check = json.loads(patch.metadata.get("ablation.check", "{}"))
    solve = json.loads(patch.metadata.get("ablation.solve", "{}"))
    neighbours = {s.concept: [s.shown_before, s.shown_after] for s in evaluation.sets
                  if s.name.startswith("surrounding")}
    preservation = evaluation.preservation.as_json() if evaluation.preservation is not None else None
    return {"concept": concept.name, "kind": concept.kind, "anchor": anchor, "entry": entry,
            "method": method + (f" ({label})" if label else ""), "seed": seed, "seconds_to_patch": round(made, 1),
            "unet_evaluations": COUNTED.pop(concept.name, None) if entry == "api" else None,
            "moved_onto_anchor": check.get("erased_fraction", solve.get("target_moved_fraction")),
            "check_images_still_target": check.get("images_still_target"),
            **evaluation.summary, "neighbours": neighbours, "preservation": preservation}


def _worst_neighbour(row: dict) -> tuple[str, float, float]:
    name, (before, after) = min(row["neighbours"].items(), key=lambda kv: kv[1][1] - kv[1][0])
    return name, before, after


def _spread(values: list[float], percent: bool = True, digits: int = 2) -> str:
    """Mean, and with several seeds its spread (sample standard deviation) as mean +- sd."""
    mean = sum(values) / len(values)
    form = ".0%" if percent else f".{digits}f"
    text = format(mean, form)
    if len(values) > 1:
        sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        text += " ± " + format(sd, form)
    return text


def markdown(rows: list[dict]) -> str:
    """One line per concept, anchor, method and entry point; several seeds' rows become mean +- sd."""
    lines = ["| concept -> anchor | method | entry point (seeds) | target shown | anchor kept | surroundings kept "
             "| worst neighbour | neighbour change mean / worst (set) | neighbour FID (floor) | prediction drift "
             "mean / worst |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["concept"], r["anchor"], r["method"], r["entry"]), []).append(r)
    for (concept, anchor, method, entry), found in groups.items():
        worst = [_worst_neighbour(r) for r in found]
        worst_name = min(worst, key=lambda w: w[2] - w[1])[0]
        before = found[0]["target_recognised_before"]
        line = (f"| {concept} -> {anchor} | {method} | {entry} ({len(found)}) "
                f"| {before:.0%} -> **{_spread([r['target_recognised'] for r in found])}** "
                f"| {_spread([r['anchor_retained'] for r in found])} "
                f"| {_spread([r['surrounding_retained'] for r in found])} "
                f"| {worst_name} **{_spread([w[2] for w in worst])}** ")
        kept = [r["preservation"] for r in found if r.get("preservation")]
        if kept:
            change_worst = [p["neighbour_change"]["worst"] for p in kept]
            worst_set = max(kept, key=lambda p: p["neighbour_change"]["worst"])["neighbour_change"]["worst_set"]
            floor = [p["neighbour_fid"]["floor"] for p in kept if p["neighbour_fid"]["floor"] is not None]
            drift = [p["prediction_drift"] for p in kept if p["prediction_drift"]]
            line += (f"| {_spread([p['neighbour_change']['mean'] for p in kept], False)} / "
                     f"**{_spread(change_worst, False)}** ({worst_set.split(': ')[-1]}) "
                     f"| {_spread([p['neighbour_fid']['value'] for p in kept], False, 4)} "
                     f"({_spread(floor, False, 4) if floor else '-'}) "
                     + (f"| {_spread([d['mean'] for d in drift], False)} / "
                        f"{_spread([d['worst'] for d in drift], False)} |"
                        if drift else "| - |"))
        else:
            line += "| - | - | - |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.every_concept", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("toy", "toy-flux"), default="toy")
    parser.add_argument("--method", choices=METHODS, default="trained")
    parser.add_argument("--entries", nargs="+", choices=ENTRIES, default=list(ENTRIES))
    parser.add_argument("--concepts", nargs="+", default=None, help="only these (default: every concept)")
    parser.add_argument("--per-set", type=int, default=48)
    parser.add_argument("--anchors", choices=("suggested", "other", "both"), default="suggested",
                        help="each concept's suggested anchor, the second one a user could pick, or both")
    parser.add_argument("--seeds", type=int, default=1,
                        help="api entry: make and measure each pair with run seeds 0..N-1 (mean +- sd in the table)")
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.md")
    parser.add_argument("--settings", nargs="+", default=[], metavar="KEY=VALUE",
                        help="api entry: config settings of the method (values read as JSON, else as text), e.g. "
                             "preserve_weight=2 or builtin_preserve=false for the closed form")
    parser.add_argument("--compare-presets", nargs="+", default=None, metavar="PRESET",
                        help="trained api entry: each concept once per preset (e.g. default thorough fast)")
    args = parser.parse_args(argv)
    MODEL[0] = args.model
    API_SETTINGS.update(parse_settings(args.settings))
    variants = None
    if args.compare_presets:
        variants = {preset: {**API_SETTINGS, "preset": preset} for preset in args.compare_presets}
    rows = run(args.method, args.entries, args.per_set, args.concepts, variants, args.anchors, args.seeds)
    table = markdown(rows)
    print(table)
    if args.out:
        write_text_atomic(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
        write_text_atomic(Path(args.out).with_suffix(".md"), table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
