"""The embedded toy world: its data, its shipped model and classifier, and its training script."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ablation_core.toy.classifier import classify, held_out_accuracy, load_toy_classifier, train_classifier
from ablation_core.toy.concepts import ARTISTS, CONCEPTS, INSTANCES, OBJECTS, STYLES, SUGGESTED_PAIRS, axis_of
from ablation_core.toy.data import IMAGE_SIZE, SUBJECTS, ToyLabel, caption, make_batch, render_batch, subject_phrase
from ablation_core.toy.model import WEIGHTS_DIR, encode_prompts, load_toy_model, sample_images, toy_world_info
from ablation_core.toy.train import ToyRecipe, train_model


@pytest.fixture(scope="module")
def toy_model():
    return load_toy_model()


@pytest.fixture(scope="module")
def toy_classifier():
    return load_toy_classifier()


def test_generator_is_deterministic_per_seed():
    first = make_batch(np.random.default_rng(7), 16)
    second = make_batch(np.random.default_rng(7), 16)
    other = make_batch(np.random.default_rng(8), 16)
    assert torch.equal(first[0], second[0]) and first[1] == second[1] and first[2] == second[2]
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (16, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert first[0].min() >= -1 and first[0].max() <= 1


def test_captions_name_the_subject_and_only_the_asked_style():
    _, captions, labels = make_batch(np.random.default_rng(0), 200)
    for text, label in zip(captions, labels, strict=True):
        assert subject_phrase(label.subject) in text
        named = [a for a in ARTISTS if a in text]
        assert named == ([label.style] if label.style in ARTISTS else [])
        assert ("paint" in text) == (label.style == "painting") or label.style in ARTISTS
    assert caption(ToyLabel("grumpy cat", "van gogh")) == "a painting of grumpy cat in the style of van gogh"
    assert caption(ToyLabel("cat", "photo")) == "a photo of a cat"


def test_every_subject_and_style_is_drawn_differently():
    rng = np.random.default_rng(0)
    labels = [ToyLabel(s, "photo") for s in SUBJECTS] + [ToyLabel("cat", st) for st in STYLES]
    images = render_batch(labels, rng).flatten(1)
    distances = torch.cdist(images, images) + torch.eye(len(labels)) * 1e3
    assert distances.min() > 1.0


def test_concepts_json_lists_kinds_anchors_and_neighbours():
    result = subprocess.run([sys.executable, "-m", "ablation_core.toy", "concepts", "--json"], capture_output=True,
                            text=True, check=True)
    concepts = json.loads(result.stdout)
    assert [c["name"] for c in concepts] == [c.name for c in CONCEPTS]
    assert {c["kind"] for c in concepts} == {"object", "instance", "style"}
    known = set(OBJECTS + INSTANCES + STYLES)
    for c in concepts:
        assert c["anchor"] in known and set(c["neighbours"]) <= known and c["name"] not in c["neighbours"]
    for target, anchor in SUGGESTED_PAIRS.values():
        assert axis_of(target) and axis_of(anchor)


def test_each_concept_has_a_second_anchor_of_its_kind_for_the_any_anchor_measurement():
    for concept in CONCEPTS:
        other = concept.other_anchor
        assert other not in (concept.name, concept.anchor)
        assert axis_of(other) == ("style" if concept.kind == "style" else "object"), concept.name


def test_the_every_concept_table_gives_mean_and_spread_over_seeds():
    from tests.every_concept import markdown

    def row(seed: int, shown: float, bird: float, change: float) -> dict:
        return {"concept": "tree", "anchor": "car", "method": "trained", "entry": "api", "seed": seed,
                "target_recognised_before": 1.0, "target_recognised": shown, "anchor_retained": 1.0,
                "surrounding_retained": 0.9, "neighbours": {"bird": [1.0, bird], "cat": [1.0, 1.0]},
                "preservation": {"neighbour_change": {"mean": change / 2, "worst": change, "worst_set": "unrelated: x"},
                                 "neighbour_fid": {"value": 0.01, "floor": 0.001}, "prediction_drift": None}}

    table = markdown([row(0, 0.0, 0.5, 0.4), row(1, 0.1, 0.7, 0.2)])
    line = table.splitlines()[-1]
    assert "api (2)" in line and "**5% ± 7%**" in line and "bird **60% ± 14%**" in line
    assert "**0.30 ± 0.14** (x)" in line and "0.0100 ± 0.0000 (0.0010 ± 0.0000)" in line


def test_shipped_weights_load_and_denoise_16px_images(toy_model):
    unet, text_encoder, tokenizer = toy_model
    context = encode_prompts(text_encoder, tokenizer, ["a photo of a cat", ""])
    assert context.shape == (2, 77, text_encoder.config.hidden_size)
    with torch.no_grad():
        eps = unet(torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE), torch.tensor([10, 900]), encoder_hidden_states=context)
    assert eps.sample.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (WEIGHTS_DIR / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size < 8e6


def test_classifier_reads_fresh_images_as_well_as_recorded(toy_classifier):
    stored = toy_world_info()["classifier_held_out_accuracy"]
    measured = held_out_accuracy(toy_classifier, seed=99, n=300)
    assert measured["all"] >= 0.95
    assert measured["all"] >= stored["all"] - 0.03


def test_shipped_model_follows_prompts(toy_model, toy_classifier):
    unet, text_encoder, tokenizer = toy_model
    labels = [ToyLabel(s, st) for s in SUBJECTS for st in ("photo", "van gogh")]
    images = sample_images(unet, text_encoder, tokenizer, [caption(lb) for lb in labels], seed=5, steps=12)
    preds = classify(toy_classifier, images)
    right = [(p.object, p.instance, p.style) == (lb.object, lb.instance, lb.style)
             for p, lb in zip(preds, labels, strict=True)]
    assert np.mean(right) >= 0.8


def test_tiny_training_run_is_deterministic():
    recipe = ToyRecipe(steps=2, batch_size=4, warmup=1)
    unet_a, text_a, losses_a = train_model(recipe)
    unet_b, _, losses_b = train_model(recipe)
    assert losses_a == losses_b and all(np.isfinite(losses_a))
    for p, q in zip(unet_a.parameters(), unet_b.parameters(), strict=True):
        assert torch.equal(p, q)
    first = train_classifier(seed=3, steps=2, batch_size=8)
    second = train_classifier(seed=3, steps=2, batch_size=8)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), second.parameters(), strict=True))
