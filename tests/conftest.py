"""Tiny models of the real architectures, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# two threads a process; under pytest-xdist the cores are shared among the workers (one each on a 2-core machine)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

from ablation_core import make_config  # noqa: E402
from ablation_core.backends.diffusers import DiffusersModelView  # noqa: E402
from ablation_core.models.random_models import build_components  # noqa: E402
from ablation_core.models.single_file import save_single_file  # noqa: E402

# The tiny random models are tested with the model-based loss on guided anchors (the paper's Eq. 5, the thorough
# preset's choice); the default's noise-based loss is exercised on the toy model, which can learn.
# the loop's mechanics on tiny random models; the preserved row (the default preset's) has its own tests
TINY_TRAINING = dict(steps=12, batch_size=4, learning_rate=1e-3, anchor_images=8, sampler_steps=3,
                     anchor_prompt_count=16, objective="model", guidance=6.0, preserved_rows=0)


def tiny_config(target: str = "Grumpy Cat", anchor: str = "cat", **overrides):
    return make_config(target, anchor, **{**TINY_TRAINING, **overrides})


@pytest.fixture(scope="session")
def tiny_components():
    return {family: build_components(family, seed=1, with_vae=True) for family in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="session")
def sd1_view(tiny_components):
    return DiffusersModelView(tiny_components["sd1"])


@pytest.fixture(scope="session")
def sdxl_view(tiny_components):
    return DiffusersModelView(tiny_components["sdxl"])


@pytest.fixture(scope="session")
def checkpoint_files(tiny_components, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for family, components in tiny_components.items():
        paths[family] = folder / f"tiny_{family}.safetensors"
        save_single_file(components, paths[family])
    return paths


@pytest.fixture(scope="session")
def sd1_result(sd1_view):
    from ablation_core import ablate

    return ablate(sd1_view, tiny_config(steps=30))


def unet_weights(view) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in view.unet.state_dict().items()}


def prediction_change(view, patch, prompts: list[str], seed: int = 5) -> float:
    """Mean squared change of the view's prediction for ``prompts`` (one noisy 16x16 image each, t = 500) when
    ``patch`` is applied: how far a run moved these prompts."""
    from ablation_core.patches.apply import apply_patch

    generator = torch.Generator().manual_seed(seed)
    shape = (len(prompts), 3, 16, 16)
    x0, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    t = torch.full((len(prompts),), 500)
    x_t = view.schedule.noisy(x0, noise, t)
    cond = view.encode(prompts)
    with torch.no_grad():
        before = view.predict(x_t, t, cond)
        with apply_patch(view, patch):
            after = view.predict(x_t, t, cond)
    return float((after - before).pow(2).mean())
