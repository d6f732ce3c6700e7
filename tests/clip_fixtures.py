"""The fixtures the CLIP figures' tests and the CLIP-judged attacks' tests share: a tiny random SD1, a random CLIP
folder and a closed form that swaps the target for its anchor (import them into a test module to use them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ablation_core.backends.diffusers import DiffusersModelView
from ablation_core.evaluation.clip import Sampling
from ablation_core.methods.closed_form.settings import make_closed_form_config
from ablation_core.methods.closed_form.solve import erase_closed_form
from ablation_core.models.random_models import build_components
from tests import clip_models

TARGET, ANCHOR = "Grumpy Cat", "cat"
FAST = Sampling(steps=4, guidance=6.0, batch_size=16)


@pytest.fixture(scope="module")
def components():
    return build_components("sd1", seed=1, with_vae=True)


@pytest.fixture(scope="module")
def view(components):
    return DiffusersModelView(components)


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory) -> Path:
    return clip_models.random_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def swap_patch(view):
    """A closed form that maps the target's text onto the anchor's: target prompts draw anchor images."""
    return erase_closed_form(view, make_closed_form_config(TARGET, ANCHOR, builtin_preserve=False)).patch
