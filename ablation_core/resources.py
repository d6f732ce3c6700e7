"""Every file the package reads at run time, named once.

They all lie inside the installed package (``package-data`` in ``pyproject.toml``), nothing is written beside them
and nothing is cached outside them: a fresh machine with an empty home folder has everything the first command
needs. ``packaged_files()`` is what the install test checks in the built wheel.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"
BPE_VOCAB = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
TOY_WEIGHTS_DIR = PACKAGE_DIR / "toy" / "weights"
TOY_CLASSIFIER = TOY_WEIGHTS_DIR / "classifier.safetensors"
TOY_WORLD_INFO = TOY_WEIGHTS_DIR / "toy_world.json"
TOY_MODEL_FILES = (
    TOY_WEIGHTS_DIR / "unet" / "config.json",
    TOY_WEIGHTS_DIR / "unet" / "diffusion_pytorch_model.safetensors",
    TOY_WEIGHTS_DIR / "text_encoder" / "config.json",
    TOY_WEIGHTS_DIR / "text_encoder" / "model.safetensors",
)

TOY_FLUX_WEIGHTS_DIR = PACKAGE_DIR / "toy" / "weights_flux"
TOY_FLUX_FILES = (
    TOY_FLUX_WEIGHTS_DIR / "transformer.safetensors",
    TOY_FLUX_WEIGHTS_DIR / "toy_world.json",
    TOY_FLUX_WEIGHTS_DIR / "text_encoder" / "config.json",
    TOY_FLUX_WEIGHTS_DIR / "text_encoder" / "model.safetensors",
    TOY_FLUX_WEIGHTS_DIR / "text_encoder_2" / "config.json",
    TOY_FLUX_WEIGHTS_DIR / "text_encoder_2" / "model.safetensors",
)


def packaged_files() -> list[Path]:
    """The data files the code opens, each of which must ship in the wheel."""
    return [BPE_VOCAB, TOY_CLASSIFIER, TOY_WORLD_INFO, *TOY_MODEL_FILES, *TOY_FLUX_FILES]
