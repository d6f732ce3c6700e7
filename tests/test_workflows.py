"""The example workflows load in ComfyUI: valid UI-format JSON, only known node types, consistent links, and one
widget value per widget of each node."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import comfy_fakes as fakes

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
CONNECTION_TYPES = {"MODEL", "CLIP", "VAE", "IMAGE", "LATENT", "CONDITIONING", "ABLATION_PATCH"}

# ComfyUI core nodes the examples use: their widget values in UI order (KSampler's seed brings a control value).
CORE_WIDGETS = {
    "CheckpointLoaderSimple": 1,
    "CLIPTextEncode": 1,
    "EmptyLatentImage": 3,
    "KSampler": 7,
    "VAEDecode": 0,
    "SaveImage": 1,
    "PreviewImage": 0,
    "ImageBatch": 0,
    "LoraLoader": 3,
    "LoraLoaderModelOnly": 2,
    "UNETLoader": 2,
    "DualCLIPLoader": 4,  # clip_name1, clip_name2, type, device
    "VAELoader": 1,
    "FluxGuidance": 1,
    "EmptySD3LatentImage": 3,
}


def _our_widget_counts() -> dict[str, int]:
    import nodes

    counts = {}
    for name, cls in nodes.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        specs = [*inputs.get("required", {}).values(), *inputs.get("optional", {}).values()]
        widgets = [s for s in specs if isinstance(s[0], list) or s[0] not in CONNECTION_TYPES]
        controls = [s for s in widgets if len(s) > 1 and s[1].get("control_after_generate")]
        counts[name] = len(widgets) + len(controls)
    return counts


@pytest.fixture
def widget_counts(tmp_path, monkeypatch):
    fakes.install(tmp_path, monkeypatch)
    return {**CORE_WIDGETS, **_our_widget_counts()}


def test_there_are_at_least_three_examples():
    assert len(WORKFLOWS) >= 3


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_loadable_ui_json(path, widget_counts):
    workflow = json.loads(path.read_text())
    assert {"nodes", "links", "version", "last_node_id", "last_link_id"} <= set(workflow)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert max(nodes) <= workflow["last_node_id"]
    for node in nodes.values():
        assert node["type"] in widget_counts, f"{path.name}: unknown node type {node['type']}"
        assert len(node.get("widgets_values", [])) == widget_counts[node["type"]], (path.name, node["type"])
    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        assert link_id <= workflow["last_link_id"]
        assert nodes[origin]["outputs"][origin_slot]["type"] == kind
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"]
        assert nodes[target]["inputs"][target_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    assert any(node["type"] in _our_widget_counts() for node in nodes.values())


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_each_workflow_has_the_thumbnail_the_templates_dialog_asks_for(path):
    assert path.with_suffix(".jpg").exists(), "ComfyUI's Templates dialog shows <name>.jpg beside <name>.json"


def test_mass_erasure_lists_about_ten_styles_and_compares_before_and_after():
    from ablation_core.methods.closed_form.settings import make_closed_form_config, parse_concept_lines

    workflow = json.loads((WORKFLOWS[0].parent / "mass_erasure.json").read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    (erase,) = [node for node in nodes.values() if node["type"] == "EraseConceptsClosedForm"]
    concepts, anchor, kind = erase["widgets_values"][:3]
    targets, anchors = parse_concept_lines(concepts, anchor)
    make_closed_form_config(targets, anchors, kind=kind)  # a valid request
    assert len(targets) >= 8 and kind == "style"
    sources = {link[0]: link for link in workflow["links"]}
    samplers = [node for node in nodes.values() if node["type"] == "KSampler"]
    models = {nodes[sources[s["inputs"][0]["link"]][1]]["type"] for s in samplers}
    assert models == {"CheckpointLoaderSimple", "EraseConceptsClosedForm"}
    assert len({json.dumps(s["widgets_values"]) for s in samplers}) == 1  # same seed and settings
    assert any(node["type"] == "SaveAblationPatch" for node in nodes.values())


def test_flux_workflow_loads_flux_and_compares_with_the_original_from_the_same_seed():
    workflow = json.loads((WORKFLOWS[0].parent / "flux_ablate_then_generate.json").read_text())
    nodes = {node["id"]: node for node in workflow["nodes"]}
    types = {node["type"] for node in nodes.values()}
    assert {"UNETLoader", "DualCLIPLoader", "VAELoader", "FluxGuidance", "EmptySD3LatentImage"} <= types
    (dual,) = [node for node in nodes.values() if node["type"] == "DualCLIPLoader"]
    assert dual["widgets_values"][2] == "flux"
    sources = {link[0]: link for link in workflow["links"]}
    samplers = [node for node in nodes.values() if node["type"] == "KSampler"]
    models = {nodes[sources[s["inputs"][0]["link"]][1]]["type"] for s in samplers}
    assert models == {"UNETLoader", "EraseConceptsClosedForm"}
    assert len({json.dumps(s["widgets_values"]) for s in samplers}) == 1
    assert all(s["widgets_values"][3] == 1.0 for s in samplers)  # Flux dev: guidance is an input, no CFG
