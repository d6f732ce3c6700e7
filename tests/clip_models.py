"""Tiny CLIP models for the CLIP figures' tests: built from a config (no download), random or taught in seconds to
tell a tiny random SD1's target images from its anchor images (contrastive steps on those images and their prompts,
as a real CLIP knows the concept)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from ablation_core.evaluation.clip.model import Preprocess
from ablation_core.models.sampling import sample_latents
from ablation_core.models.tokenizer import sd_clip_tokenizer
from ablation_core.models.view import ModelView


def tiny_clip_config() -> CLIPConfig:
    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def save_clip(model: CLIPModel, folder: Path) -> Path:
    model.save_pretrained(folder)
    sd_clip_tokenizer().save_pretrained(folder)  # the real CLIP vocabulary, from the package's BPE file
    return folder


def random_clip(folder: Path) -> Path:
    torch.manual_seed(0)
    return save_clip(CLIPModel(tiny_clip_config()), folder)


def taught_clip(view: ModelView, targets: list[str], twins: list[str], steps: int, guidance: float, seed: int,
                folder: Path, latent_size: int | None = None) -> Path:
    """A tiny CLIP taught on the images ``view`` draws for ``targets`` and their anchor ``twins`` (noise from
    ``seed``, the same for both lists), each with its own prompt."""
    count = len(targets)
    latents = torch.cat([sample_latents(view, p, torch.arange(count), steps, guidance, count, seed, latent_size)
                         for p in (targets, twins)])
    pixels = Preprocess(32, 32)(view.decode(latents))
    tokens = sd_clip_tokenizer()(targets + twins, padding="max_length", max_length=77, return_tensors="pt")
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(80):
        loss = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels,
                     return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_clip(model, folder)
