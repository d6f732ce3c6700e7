"""Each part of the reliability stress harness (tests/stress.py) at a small count; the full counts run with
``python -m tests.stress``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ablation_core import AblationPatch, LayerDelta
from tests import stress


def test_damaged_patch_files_load_or_give_one_clear_error(tmp_path):
    figures = stress.fuzz_patches(330, seed=1, folder=tmp_path)
    assert figures["crashes"] == 0, figures["crash examples"]
    assert figures["unclear messages"] == 0, figures["unclear examples"]
    assert figures["model changed after"] == 0 and figures["model hash unchanged"]
    assert all(sum(counts.values()) == 30 for counts in figures["by family"].values())
    assert figures["refused at load"] and figures["refused at apply"] and figures["harmless"]


def test_killed_saves_leave_the_old_or_the_new_patch_and_no_leftovers(tmp_path):
    figures = stress.kill_saves(5, seed=1, folder=tmp_path)
    assert figures["damaged or missing"] == 0 and figures["old intact"] + figures["new complete"] == 5
    assert figures["max leftovers between kills"] <= 1 and figures["leftovers after a clean save"] == 0
    assert figures["max other files"] == 0 and figures["other files after a clean save"] == 0


def test_temporary_files_a_killed_writer_made_beside_its_file_are_cleared(tmp_path):
    """safetensors writes a temporary file of its own beside the path it is given; a writer killed then must leave
    nothing that the next save cannot clear."""
    target = tmp_path / "patch.safetensors"
    dies = ("import os\nfrom pathlib import Path\nfrom ablation_core.files import write_atomic\n"
            "def write(tmp):\n    (tmp.parent / '.tmpAbC123').write_bytes(b'half a file')\n    os._exit(9)\n"
            f"write_atomic(Path({str(target)!r}), write)\n")
    assert subprocess.run([sys.executable, "-c", dies], cwd=stress.ROOT).returncode == 9
    assert len(os.listdir(tmp_path)) == 1  # the dead writer's private folder
    AblationPatch({"lora_unet_x": LayerDelta(diff=torch.ones(2, 2))}, {}).save(target)
    assert os.listdir(tmp_path) == ["patch.safetensors"]


@pytest.fixture(scope="module")
def cancels(tmp_path_factory):
    return stress.cancel_ablations(8, seed=1, folder=tmp_path_factory.mktemp("cancels"))


@pytest.mark.parametrize("backend", ["diffusers", "comfy"])
def test_cancels_leave_the_model_unchanged_and_write_nothing(cancels, backend):
    figures = cancels[backend]
    assert sum(figures["landed in"].values()) == 8 and figures["ok"], figures
    assert {"prompts", "anchors", "train"} <= figures["cancel checks in a full run"].keys()
    assert figures["a full run afterwards gives the same patch"]


def test_a_delta_bin_that_would_run_code_is_refused(tmp_path):
    figures = stress.pickle_refusal(folder=tmp_path)
    assert figures["code ran"] == 0 and figures["payloads live (unsafe load runs them)"] == figures["files"]
    assert figures["refused"] == figures["files"], figures["cases"]


def test_every_command_refuses_bad_arguments_in_one_line_before_any_work(tmp_path):
    figures = stress.cli_bad_arguments(folder=tmp_path)
    assert figures["failures"] == 0, figures["failure examples"]
    assert figures["bad arguments"] > 200 and figures["legitimate (must pass)"] >= 10
    assert {"ablate", "inspect", "apply", "merge", "convert", "eval", "demo", "bench"} <= figures["by command"].keys()
