"""Drive a running real ComfyUI through its HTTP API: chained Erase/Ablate nodes, fusion, workflows/mass_erasure.json.

``python tests/comfy_http_check.py closed_form|trained|fusion|mass|robust|robust_cancel TAG`` with ComfyUI's own
Python (it reads images and patch files), our nodes in its custom_nodes, and a small checkpoint. Settings by
environment: COMFY_URL (http://127.0.0.1:8188), COMFY_ROOT (the ComfyUI folder, for output/ and
models/ablation_patches/), COMFY_CKPT.
Prints each node's status line, the saved patches' metadata and mean pixel differences between the models' images
(same seed): e.g. a chained model against the plain checkpoint with the chained patch applied (0 when they agree).
A manual check, not a test: CI has no ComfyUI.
"""
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

URL = os.environ.get("COMFY_URL", "http://127.0.0.1:8188")
ROOT = Path(os.environ.get("COMFY_ROOT", "ComfyUI"))
OUT, PATCHES = ROOT / "output", ROOT / "models" / "ablation_patches"
CKPT = os.environ.get("COMFY_CKPT", "sd15_tiny320.safetensors")
TAG = sys.argv[2] if len(sys.argv) > 2 else str(int(time.time()))


def post(path, data):
    req = urllib.request.Request(URL + path, json.dumps(data).encode(), {"Content-Type": "application/json"})
    body = urllib.request.urlopen(req).read()
    return json.loads(body) if body.strip() else None


def get(path):
    return json.loads(urllib.request.urlopen(URL + path).read())


def run(prompt, label):
    started = time.time()
    pid = post("/prompt", {"prompt": prompt, "client_id": "nodes-helper"})["prompt_id"]
    while True:
        time.sleep(1)
        hist = get(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
            if hist[pid]["status"].get("status_str") != "success" or hist[pid]["status"].get("completed") is False:
                if hist[pid]["status"].get("status_str") == "error":
                    print(label, "ERROR", json.dumps(hist[pid]["status"]["messages"])[-3000:])
                    sys.exit(1)
            if hist[pid]["status"].get("completed"):
                break
    seconds = time.time() - started
    msgs = hist[pid]["status"]["messages"]
    print(f"== {label}: {seconds:.1f}s wall; status {hist[pid]['status']['status_str']}")
    for node, out in hist[pid]["outputs"].items():
        if "text" in out:
            print(f"   node {node} ({prompt[node]['class_type']}): {out['text']}")
    return hist[pid]["outputs"], msgs


def image(outputs, node):
    info = outputs[node]["images"][0]
    return np.asarray(Image.open(OUT / info["subfolder"] / info["filename"])).astype(np.int16)


def meta(name_prefix):
    files = sorted(PATCHES.glob(f"{name_prefix}_*.safetensors"))
    with safe_open(str(files[-1]), "pt") as f:
        return f.metadata(), files[-1]


def sampler(model, pos, neg, latent, seed=1, steps=3):
    return {"class_type": "KSampler", "inputs": {"model": model, "positive": pos, "negative": neg,
                                                 "latent_image": latent, "seed": seed, "steps": steps, "cfg": 6.0,
                                                 "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}


def base_graph(text):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": text}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }


def render(g, name, model):
    g[f"s_{name}"] = sampler(model, ["2", 0], ["3", 0], ["4", 0])
    g[f"d_{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"s_{name}", 0], "vae": ["1", 2]}}
    g[f"i_{name}"] = {"class_type": "SaveImage", "inputs": {"images": [f"d_{name}", 0],
                                                             "filename_prefix": f"chk{TAG}/{name}"}}


def erase(model, concepts, kind="style", base=None, robust_rounds=0):
    node = {"class_type": "EraseConceptsClosedForm", "inputs": {
        "model": model, "clip": ["1", 1], "concepts": concepts, "anchor": "", "kind": kind, "mode": "least-squares",
        "preserve_weight": 0.5, "preserve": "", "robust_rounds": robust_rounds}}
    if base:
        node["inputs"]["base_patch"] = base
    return node


def ablate(model, target, anchor="painting", steps=5, concept_type="auto", clip=("1", 1), checkpointing=False,
           robust_rounds=0):
    return {"class_type": "AblateConcept", "inputs": {
        "model": model, "clip": list(clip), "target": target, "anchor": anchor, "kind": "style", "group": "kv",
        "preset": "fast", "steps": steps, "seed": 0, "anchor_prompts": "", "image_size": 64, "use_cache": False,
        "concept_type": concept_type, "negative_prompt": "", "gradient_checkpointing": checkpointing,
        "robust_rounds": robust_rounds}}


def save(patch, prefix):
    return {"class_type": "SaveAblationPatch", "inputs": {"patch": patch, "filename_prefix": f"chk{TAG}/{prefix}",
                                                          "folder": "ablation_patches",
                                                          "storage": "full rank (exact)", "energy": 0.999}}


def differ(a, b):
    return float(np.abs(a - b).mean())


def report_meta(name):
    m, path = meta(f"chk{TAG}/{name}")
    print(f"   {path.name}: method={m.get('ablation.method')} targets={m.get('ablation.targets')} "
          f"fingerprint={m.get('ablation.base_fingerprint')} base_patch={m.get('ablation.base_patch')}")
    return m


def closed_form_chain():
    g = base_graph("a painting in the style of Van Gogh")
    g["5"] = erase(["1", 0], "Van Gogh -> painting")
    g["6"] = erase(["5", 0], "Claude Monet -> painting")
    g["7"] = {"class_type": "ApplyAblationPatch", "inputs": {"model": ["1", 0], "patch": ["6", 1], "strength": 1.0,
                                                             "clip": ["1", 1]}}
    g["8"] = erase(["1", 0], "Claude Monet -> painting")  # the second erasure alone, for comparison
    for name, model in (("orig", ["1", 0]), ("first", ["5", 0]), ("chained", ["6", 0]), ("reapplied", ["7", 0])):
        render(g, name, model)
    g["p5"], g["p6"], g["p8"] = save(["5", 1], "cf_first"), save(["6", 1], "cf_chained"), save(["8", 1], "cf_alone")
    out, _ = run(g, "closed form: Erase -> Erase (chained), Apply(chained patch) on the original")
    im = {k: image(out, f"i_{k}") for k in ("orig", "first", "chained", "reapplied")}
    print(f"   mean |pixel diff| orig-first {differ(im['orig'], im['first']):.2f}, first-chained "
          f"{differ(im['first'], im['chained']):.2f}, chained-reapplied {differ(im['chained'], im['reapplied']):.3f}")
    first, chained, alone = report_meta("cf_first"), report_meta("cf_chained"), report_meta("cf_alone")
    print("   chained fingerprint == original's:", chained["ablation.base_fingerprint"]
          == first["ablation.base_fingerprint"] == alone["ablation.base_fingerprint"])


def trained_chain():
    g = base_graph("a painting in the style of Van Gogh")
    g["5"] = ablate(["1", 0], "Van Gogh")
    g["6"] = erase(["5", 0], "Claude Monet -> painting")  # closed form on the trained model
    g["7"] = ablate(["6", 0], "Picasso\nSalvador Dali -> painting", concept_type="style", clip=("5", 1),
                    checkpointing=True)
    g["8"] = {"class_type": "ApplyAblationPatch", "inputs": {"model": ["1", 0], "patch": ["7", 2], "strength": 1.0,
                                                             "clip": ["1", 1]}}
    for name, model in (("t_orig", ["1", 0]), ("t_first", ["5", 0]), ("t_second", ["6", 0]), ("t_third", ["7", 0]),
                        ("t_reapplied", ["8", 0])):
        render(g, name, model)
    g["p5"], g["p6"], g["p7"] = save(["5", 2], "tr_first"), save(["6", 1], "tr_second"), save(["7", 2], "tr_third")
    out, _ = run(g, "trained: Ablate -> Erase -> Ablate (2 targets, concept type style), Apply(third) on original")
    im = {k: image(out, f"i_{k}") for k in ("t_orig", "t_first", "t_second", "t_third", "t_reapplied")}
    print(f"   mean |pixel diff| orig-first {differ(im['t_orig'], im['t_first']):.2f}, first-second "
          f"{differ(im['t_first'], im['t_second']):.2f}, second-third {differ(im['t_second'], im['t_third']):.2f}, "
          f"third-reapplied {differ(im['t_third'], im['t_reapplied']):.3f}")
    metas = [report_meta(n) for n in ("tr_first", "tr_second", "tr_third")]
    print("   fingerprints equal:", len({m["ablation.base_fingerprint"] for m in metas}) == 1)
    print("   third settings concept_type:", json.loads(metas[2]["ablation.settings"]).get("concept_type"),
          "group", metas[2].get("ablation.group"))


def fusion():
    g = base_graph("Snoopy in the style of Van Gogh")
    g["5"] = erase(["1", 0], "Van Gogh -> painting\nClaude Monet -> painting")
    g["6"] = erase(["1", 0], "Snoopy -> dog", kind="object")
    merge = {"weight_1": 1.0, "weight_2": 1.0, "patch_1": ["5", 1], "patch_2": ["6", 1]}
    g["7"] = {"class_type": "MergeAblationPatches", "inputs": {**merge, "method": "fusion", "model": ["1", 0],
                                                               "clip": ["1", 1]}}
    g["8"] = {"class_type": "MergeAblationPatches", "inputs": {**merge, "method": "weighted sum"}}
    g["9"] = {"class_type": "ApplyAblationPatch", "inputs": {"model": ["1", 0], "patch": ["7", 0], "strength": 1.0}}
    g["10"] = {"class_type": "ApplyAblationPatch", "inputs": {"model": ["1", 0], "patch": ["8", 0], "strength": 1.0}}
    for name, model in (("f_orig", ["1", 0]), ("f_fused", ["9", 0]), ("f_summed", ["10", 0])):
        render(g, name, model)
    g["p7"] = save(["7", 0], "fused")
    out, _ = run(g, "fusion in Merge Ablation Patches (and weighted sum)")
    im = {k: image(out, f"i_{k}") for k in ("f_orig", "f_fused", "f_summed")}
    print(f"   mean |pixel diff| orig-fused {differ(im['f_orig'], im['f_fused']):.2f}, fused-summed "
          f"{differ(im['f_fused'], im['f_summed']):.2f}")
    m = report_meta("fused")
    print("   fusion info:", m.get("ablation.fusion"), "sources:", m.get("ablation.sources"))


def robust():
    """The trained node with robust_rounds (fast preset: its quick adversary; 64 px), applied again on the original."""
    g = base_graph("a painting in the style of Van Gogh")
    g["5"] = ablate(["1", 0], "Van Gogh", steps=3, robust_rounds=1)
    g["7"] = {"class_type": "ApplyAblationPatch", "inputs": {"model": ["1", 0], "patch": ["5", 2], "strength": 1.0,
                                                             "clip": ["1", 1]}}
    for name, model in (("r_orig", ["1", 0]), ("r_trained", ["5", 0]), ("r_reapplied", ["7", 0])):
        render(g, name, model)
    g["p5"] = save(["5", 2], "robust_trained")
    out, _ = run(g, "robust: Ablate (fast, 3 steps, 64 px, robust_rounds 1), Apply(its patch) on the original")
    im = {k: image(out, f"i_{k}") for k in ("r_orig", "r_trained", "r_reapplied")}
    print(f"   mean |pixel diff| orig-trained {differ(im['r_orig'], im['r_trained']):.2f}, trained-reapplied "
          f"{differ(im['r_trained'], im['r_reapplied']):.3f}")
    found = json.loads(report_meta("robust_trained")["ablation.robust"])
    print(f"   rounds {found['rounds']}, adversary {found['adversary']}, found {found['found']}")


def robust_cancel():
    """Erase Concepts with robust_rounds 1 (its adversary draws at the model's resolution), interrupted after
    ``wait`` seconds (the third argument, default 240: past the plain solve): how long until ComfyUI reports the prompt
    stopped."""
    wait = float(sys.argv[3]) if len(sys.argv) > 3 else 240.0
    g = base_graph("a painting in the style of Van Gogh")
    g["6"] = erase(["1", 0], "Van Gogh -> painting", robust_rounds=1)
    render(g, "c_closed", ["6", 0])
    pid = post("/prompt", {"prompt": g, "client_id": "nodes-helper"})["prompt_id"]
    time.sleep(wait)
    asked = time.time()
    post("/interrupt", {})
    while pid not in get(f"/history/{pid}"):
        time.sleep(0.5)
    status = get(f"/history/{pid}")[pid]["status"]
    print(f"== robust closed form interrupted after {wait}s: stopped {time.time() - asked:.1f}s after the interrupt; "
          f"status {status.get('status_str')}; messages {[m[0] for m in status.get('messages', [])]}")


def ui_to_api(workflow, info):
    """What the front end sends for a UI-format workflow: widget values by input order, links as [node, slot]."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        spec = info[node["type"]]["input"]
        order = [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]
        values = list(node.get("widgets_values", []))
        inputs = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        for name, s in order:
            kind = s[0]
            if not (isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")) or name in inputs:
                continue
            if not values:
                break
            inputs[name] = values.pop(0)
            extra = s[1] if len(s) > 1 else {}
            if extra.get("control_after_generate") or (node["type"] == "KSampler" and name == "seed"):
                values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def mass_erasure():
    info = get("/object_info")
    wf = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "mass_erasure.json").read_text())
    prompt = ui_to_api(wf, info)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = CKPT
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = f"chk{TAG}/mass_" + node["inputs"]["filename_prefix"].replace("/", "_")
    print("   mass_erasure nodes:", sorted({n["class_type"] for n in prompt.values()}))
    run(prompt, "workflows/mass_erasure.json (64 px, 3 sampler steps)")


if __name__ == "__main__":
    {"closed_form": closed_form_chain, "trained": trained_chain, "fusion": fusion, "mass": mass_erasure,
     "robust": robust, "robust_cancel": robust_cancel}[sys.argv[1]]()
