"""A small CNN that says which subject and style a toy image shows: the judge of every toy ablation figure.

It has one head per axis an ablation can move (object class, instance marking, style), so "grumpy cat -> cat" is
judged by the instance head while the object head checks the image still shows a cat. It is trained on the
generator's images with noise, blur, shifts and colour jitter, so it also reads the slightly soft samples the toy
diffusion model draws.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .concepts import INSTANCE_LABELS, NO_INSTANCE, OBJECTS, STYLES, axis_of
from .data import ToyLabel, make_batch
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS, WEIGHTS_DIR, sample_images

log = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.safetensors"
HEADS: dict[str, tuple[str, ...]] = {"object": OBJECTS, "instance": INSTANCE_LABELS, "style": STYLES}


class ToyClassifier(nn.Module):
    """Three 3x3-conv stages (16 -> 8 -> 4 px) and one linear head per axis."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                                 nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.features = nn.Sequential(stage(3, width), nn.MaxPool2d(2), stage(width, 2 * width), nn.MaxPool2d(2),
                                      stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({axis: nn.Linear(4 * width, len(names)) for axis, names in HEADS.items()})

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        features = self.features(images)
        return {axis: head(features) for axis, head in self.heads.items()}


@dataclass(frozen=True)
class Prediction:
    """What one image shows according to the classifier, with the confidence of each call."""

    object: str
    instance: str
    style: str
    confidence: dict[str, float]

    def shows(self, concept: str) -> bool:
        """True when the image shows ``concept`` (an object, instance or style name)."""
        return getattr(self, axis_of(concept)) == concept

    def as_json(self) -> dict:
        return {"object": self.object, "instance": self.instance, "style": self.style, "confidence": self.confidence}


def label_targets(labels: list[ToyLabel]) -> dict[str, Tensor]:
    return {"object": torch.tensor([OBJECTS.index(lb.object) for lb in labels]),
            "instance": torch.tensor([INSTANCE_LABELS.index(lb.instance) for lb in labels]),
            "style": torch.tensor([STYLES.index(lb.style) for lb in labels])}


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Degrade clean renders the way model samples are degraded: shifts, blur, colour drift and noise."""
    n = images.shape[0]
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    images = torch.roll(images, shifts=shift, dims=(2, 3))
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    images = images * (1 - mix * 0.7) + blurred * mix * 0.7
    gain = 1 + 0.15 * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    bias = 0.1 * (torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1)
    sigma = 0.12 * torch.rand(n, 1, 1, 1, generator=generator)
    images = images * gain + bias + sigma * torch.randn(images.shape, generator=generator)
    return images.clamp(-1.2, 1.2)


def train_classifier(seed: int = 0, steps: int = 1500, batch_size: int = 128, lr: float = 2e-3,
                     width: int = 32) -> ToyClassifier:
    """Train on fresh generator batches (seeded), so the data never repeats and the result is reproducible."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    generator = torch.Generator().manual_seed(seed + 1)
    classifier = ToyClassifier(width)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    classifier.train()
    for step in range(steps):
        images, _, labels = make_batch(rng, batch_size)
        targets = label_targets(labels)
        logits = classifier(augment(images, generator))
        loss = sum(F.cross_entropy(logits[axis], targets[axis]) for axis in HEADS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps - 1:
            log.info("classifier step %d/%d loss %.4f", step, steps, float(loss.detach()))
    return classifier.eval()


@torch.no_grad()
def classify(classifier: ToyClassifier, images: Tensor) -> list[Prediction]:
    """Predictions for a batch of [n, 3, 16, 16] images in [-1, 1]."""
    logits = classifier(images.float())
    probs = {axis: logits[axis].softmax(-1) for axis in HEADS}
    best = {axis: probs[axis].max(-1) for axis in HEADS}
    return [Prediction(**{axis: HEADS[axis][int(best[axis].indices[i])] for axis in HEADS},
                       confidence={axis: round(float(best[axis].values[i]), 4) for axis in HEADS})
            for i in range(images.shape[0])]


@torch.no_grad()
def held_out_accuracy(classifier: ToyClassifier, seed: int, n: int = 2000, degrade: bool = False) -> dict[str, float]:
    """Per-axis and all-axes accuracy on ``n`` fresh images from ``seed`` (optionally augmented)."""
    images, _, labels = make_batch(np.random.default_rng([seed, 2]), n)
    if degrade:
        images = augment(images, torch.Generator().manual_seed(seed))
    preds = classify(classifier, images)
    pairs = list(zip(preds, labels, strict=True))
    correct = {axis: [getattr(p, axis) == getattr(lb, axis) for p, lb in pairs] for axis in HEADS}
    result = {axis: float(np.mean(c)) for axis, c in correct.items()}
    result["all"] = float(np.mean([all(c[i] for c in correct.values()) for i in range(n)]))
    return result


def save_classifier(classifier: ToyClassifier, path: str | Path, extra: dict | None = None) -> None:
    config = {"width": classifier.width, "heads": {k: list(v) for k, v in HEADS.items()}, **(extra or {})}
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in classifier.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(config)})


def load_toy_classifier(path: str | Path | None = None) -> ToyClassifier:
    """The shipped classifier, in eval mode."""
    path = Path(path) if path is not None else WEIGHTS_DIR / CLASSIFIER_FILE
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    if config["heads"] != {k: list(v) for k, v in HEADS.items()}:
        raise ValueError(f"{path} was trained for other concepts than this package's; retrain it")
    classifier = ToyClassifier(config["width"])
    classifier.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return classifier.eval()


def recognise_prompts(prompts: list[str], unet, text_encoder, tokenizer, classifier: ToyClassifier, seed: int = 0,
                      steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE) -> list[Prediction]:
    """Sample one image per prompt from the (possibly patched) toy model and say what each one shows.

    Noise depends only on ``seed`` and the prompt's position, so an unpatched and a patched model given the same
    prompts and seed are compared sample for sample.
    """
    images = sample_images(unet, text_encoder, tokenizer, prompts, seed=seed, steps=steps, guidance=guidance)
    return classify(classifier, images)


def concept_shown(predictions: list[Prediction], concept: str) -> float:
    """Fraction of images that show ``concept``."""
    return float(np.mean([p.shows(concept) for p in predictions])) if predictions else 0.0


__all__ = ["HEADS", "NO_INSTANCE", "Prediction", "ToyClassifier", "classify", "concept_shown", "held_out_accuracy",
           "load_toy_classifier", "recognise_prompts", "save_classifier", "train_classifier"]
