"""Reliability stress harness: the figures the reliability issue asks for, one function per part.

    python -m tests.stress [--patches 10000] [--kills 100] [--cancels 100] [--json]

- ``fuzz_patches``: damaged patch files (``tests/patch_mutations.py``) must load, or fail with one clear
  ``PatchError``; never another exception, and the model is bit-identical after every attempt.
- ``kill_saves``: a writer saving over an existing patch is SIGKILLed at random moments; the file is always the
  old or the new patch, and dead writers' temporary files do not pile up.
- ``cancel_ablations``: cancels at random points of an ablation (diffusers backend and the ComfyUI fakes) leave
  the model bit-identical, no hooks and no files.
- ``pickle_refusal``: a ``delta.bin`` whose unpickling would run code is refused and the code does not run.
- ``cli_bad_arguments``: every command with bad arguments (``tests/cli_cases.py``): one ``error:`` line, exit code
  2, nothing written, and no model loaded first.

Each part returns a dict of figures with ``ok``; ``tests/test_reliability.py`` runs each at a small count.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import pickle
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ablation_core.errors import AblationCancelled, PatchError  # noqa: E402
from ablation_core.files import partial_files  # noqa: E402
from ablation_core.patches.patch import AblationPatch, LayerDelta  # noqa: E402
from ablation_core.patches.storage import load_patch  # noqa: E402
from tests.cli_cases import cli_cases  # noqa: E402
from tests.patch_mutations import FAMILIES, Base, Mutant  # noqa: E402

# A PatchError message is one plain sentence: printable, short, and not a parser's or torch's own text.
MAX_MESSAGE_CHARS = 400
RAW_LIBRARY_TEXT = ("Error while", "deserializ", "SafetensorError", "safetensors_rust", "Traceback", "Expecting ",
                    "line 1 column", "torch.", "Errno")
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# Shared helpers ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _work_folder(folder: Path | None) -> Iterator[Path]:
    """``folder`` if given (a test's tmp_path), else a temporary folder removed afterwards."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="ablation_stress_") as name:
        yield Path(name)


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """Damaged fingerprints only warn; thousands of warnings would bury the figures."""
    logger = logging.getLogger("ablation_core")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with ``folder`` as the working directory, so a file written to a relative path would show there."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def clear_message(message: str) -> bool:
    """One printable line of our own words, not a dump of a parser's or torch's message."""
    return (bool(message) and message.isprintable() and len(message) <= MAX_MESSAGE_CHARS
            and not any(text in message for text in RAW_LIBRARY_TEXT))


def _bits(tensor: Tensor) -> np.ndarray:
    """The tensor's bits as integers of its element size (NaN == NaN and 0.0 != -0.0 here, unlike float equality)."""
    return tensor.detach().reshape(-1).view(BITS[tensor.element_size()]).numpy()


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))


def _state(modules: list[nn.Module]) -> dict[str, Tensor]:
    return {f"{i}.{name}": tensor for i, module in enumerate(modules) for name, tensor in module.state_dict().items()}


def _snapshot(modules: list[nn.Module]) -> dict[str, Tensor]:
    return {name: tensor.detach().clone() for name, tensor in _state(modules).items()}


def _changed(modules: list[nn.Module], reference: dict[str, Tensor]) -> list[str]:
    """Names of the tensors whose bits differ from ``reference``."""
    current = _state(modules)
    return [name for name in reference.keys() | current.keys()
            if name not in current or name not in reference or not _same_bits(current[name], reference[name])]


def _digest(modules: list[nn.Module]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(_state(modules).items()):
        digest.update(name.encode())
        digest.update(_bits(tensor).tobytes())
    return digest.hexdigest()[:16]


def _hooks_left(modules: list[nn.Module]) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for root in modules for m in root.modules())


def _error_text(err: BaseException) -> str:
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return f"{type(err).__name__}: {first}" + (f" (at {Path(where.filename).name}:{where.lineno})" if where else "")


def _tiny_view(seed: int = 1):
    """The tiny SD1 model of the test suite (tests/conftest.py), in the diffusers backend."""
    from ablation_core.backends.diffusers import DiffusersModelView
    from ablation_core.models.random_models import build_components

    return DiffusersModelView(build_components("sd1", seed=seed))


# 1. Damaged patch files -------------------------------------------------------------------------------------------

FUZZ_LAYERS = ("attn2_to_k", "attn2_to_v", "proj_in", "in_layers_2", "ff_net_0_proj", "time_embed_0")


def _fuzz_bases(view, folder: Path) -> list[Base]:
    """Valid patches of the tiny model (linear and conv layers): LoRA and full-rank, float16 and float32."""
    layers = view.all_layers()
    chosen = {key: layer for key, layer in layers.items() if key == layer.key and key.endswith(FUZZ_LAYERS)}
    generator = torch.Generator().manual_seed(0)
    deltas = {key: torch.randn(layer.weight.shape, generator=generator) * 0.01 for key, layer in chosen.items()}
    exact = AblationPatch.from_deltas(deltas, {"ablation.targets": '["fuzz"]'},
                                      {key: layer.weight for key, layer in chosen.items()})
    aliases = {layer.key: name for name, layer in layers.items() if name != layer.key}
    bases = []
    for storage, patch in (("diff", exact), ("lora", exact.compressed(rank=2))):
        for dtype in (torch.float16, torch.float32):
            name = f"{storage} {str(dtype).removeprefix('torch.')}"
            path = patch.save(folder / f"base_{name.replace(' ', '_')}.safetensors", dtype)
            bases.append(Base(name, path.read_bytes(), aliases))
    return bases


def _write(path: Path, mutant: Mutant) -> None:
    with open(path, "wb") as f:
        f.write(mutant.data)
        if mutant.sparse_size:
            f.truncate(mutant.sparse_size)  # a file of gigabytes without writing them


def _attempt(view, path: Path) -> tuple[str, str]:
    """Load ``path`` and, if it loads, apply and remove it: (outcome, the refusal's message or the crash)."""
    from ablation_core.patches.apply import apply_patch

    try:
        patch = load_patch(path)
    except PatchError as err:
        return "refused at load", str(err)
    except Exception as err:  # anything but a PatchError is what this part counts as a crash
        return "crash", _error_text(err)
    try:
        applied = apply_patch(view, patch)
    except PatchError as err:
        return "refused at apply", str(err)
    except Exception as err:
        return "crash", _error_text(err)
    try:
        applied.remove()
    except Exception as err:
        return "crash", _error_text(err)
    return "harmless", ""


def fuzz_patches(count: int, seed: int = 0, folder: Path | None = None) -> dict[str, object]:
    """``count`` damaged patch files, the families taken in turn, each from a random valid base file."""
    started = time.perf_counter()
    with _work_folder(folder) as work, _quiet_library():
        view = _tiny_view()
        modules = view.modules()
        bases = _fuzz_bases(view, work)
        for base in bases:  # the harness itself is sound: undamaged files load and apply
            (work / "base.safetensors").write_bytes(base.raw)
            assert _attempt(view, work / "base.safetensors") == ("harmless", ""), base.name
        reference, digest = _snapshot(modules), _digest(modules)
        outcomes: Counter[str] = Counter()
        by_family: dict[str, Counter[str]] = {family: Counter() for family in FAMILIES}
        crashes, unclear, changed = [], [], 0
        path = work / "fuzzed.safetensors"
        for case in range(count):
            rng = random.Random(seed * 1_000_003 + case)
            family = list(FAMILIES)[case % len(FAMILIES)]
            base = bases[rng.randrange(len(bases))]
            mutant = FAMILIES[family](rng, base)
            _write(path, mutant)
            outcome, detail = _attempt(view, path)
            outcomes[outcome] += 1
            by_family[family][outcome] += 1
            example = {"case": case, "family": family, "variant": mutant.variant, "base": base.name, "detail": detail}
            if outcome == "crash":
                crashes.append(example)
            elif outcome.startswith("refused") and not clear_message(detail):
                unclear.append(example)
            if _changed(modules, reference):
                changed += 1
                with torch.no_grad():  # put the model back so later cases start from the same weights
                    for name, tensor in _state(modules).items():
                        tensor.copy_(reference[name])
        path.unlink(missing_ok=True)
        same_digest = _digest(modules) == digest
    return {
        "patches": count, "harmless": outcomes["harmless"], "refused at load": outcomes["refused at load"],
        "refused at apply": outcomes["refused at apply"], "crashes": len(crashes), "unclear messages": len(unclear),
        "model changed after": changed, "model hash unchanged": same_digest,
        "by family": {family: dict(counts) for family, counts in by_family.items()},
        "crash examples": crashes[:10], "unclear examples": unclear[:10],
        "seconds": round(time.perf_counter() - started, 1),
        "ok": not crashes and not unclear and not changed and same_digest,
    }


# 2. Killed saves --------------------------------------------------------------------------------------------------

KILL_SHAPE = (1024, 1024)  # two such layers: 4 MiB in float16, so a save lasts long enough to be killed half-way


def _kill_patch(version: str) -> AblationPatch:
    generator = torch.Generator().manual_seed(ord(version))
    deltas = {f"lora_unet_layer_{i}": LayerDelta(diff=torch.randn(KILL_SHAPE, generator=generator)) for i in range(2)}
    return AblationPatch(deltas, {"stress.version": version})


def _other(version: str) -> str:
    return "B" if version == "A" else "A"


def _save_loop(path: Path, first: str) -> None:
    """The writer the kill part kills: saves the two versions over ``path`` in turn until it is killed."""
    patches = [_kill_patch(first), _kill_patch(_other(first))]
    print("ready", flush=True)
    for turn in itertools.count():
        patches[turn % 2].save(path)


def _version(path: Path, references: dict[str, AblationPatch]) -> str | None:
    """Which reference patch ``path`` holds exactly, or None when it is missing, damaged or anything else."""
    try:
        patch = load_patch(path)
    except PatchError:
        return None
    for version, reference in references.items():
        if patch.metadata == reference.metadata and patch.deltas.keys() == reference.deltas.keys() and all(
                _same_bits(patch.deltas[k].diff, reference.deltas[k].diff) for k in reference.deltas):
            return version
    return None


def kill_saves(count: int, seed: int = 0, folder: Path | None = None) -> dict[str, object]:
    """``count`` writers saving over an existing patch, each SIGKILLed after a random delay."""
    rng = random.Random(seed)
    started = time.perf_counter()
    with _work_folder(folder) as work:
        target = work / "patches" / "patch.safetensors"
        references = {v: load_patch(_kill_patch(v).save(work / "reference" / f"{v}.safetensors")) for v in "AB"}
        durations = []
        for _ in range(3):
            begun = time.perf_counter()
            _kill_patch("A").save(target)
            durations.append(time.perf_counter() - begun)
        save_seconds = statistics.median(durations)
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        counts: Counter[str] = Counter()
        current, previous, most, cleared, strays, startup = "A", set(), 0, 0, 0, []

        def others(leftovers: set[str]) -> int:
            """Files beside the target that are neither it nor a writer's temporary folder."""
            return sum(1 for p in target.parent.iterdir() if p != target and p.name not in leftovers)

        for _ in range(count):
            begun = time.perf_counter()
            writer = subprocess.Popen([sys.executable, "-m", "tests.stress", "--save-loop", str(target), "--first",
                                       _other(current)], cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            if writer.stdout.readline().strip() != "ready":
                writer.kill()
                raise RuntimeError(f"the writer did not start: {writer.communicate()[1][-2000:]}")
            startup.append(time.perf_counter() - begun)
            time.sleep(rng.uniform(0, 3 * save_seconds))
            writer.send_signal(signal.SIGKILL)
            writer.communicate()
            leftovers = {p.name for p in partial_files(target)}
            counts["killed mid-write"] += any(f".{writer.pid}." in name for name in leftovers)
            cleared += len(previous - leftovers)
            previous, most = leftovers, max(most, len(leftovers))
            strays = max(strays, others(leftovers))
            found = _version(target, references)
            counts["old intact" if found == current else "new complete" if found else "damaged or missing"] += 1
            current = found or current
        _kill_patch(current).save(target)  # a clean save clears the last dead writer's leftovers
        after, strays_after = len(partial_files(target)), others(set())
    return {
        "kills": count, "old intact": counts["old intact"], "new complete": counts["new complete"],
        "damaged or missing": counts["damaged or missing"], "killed mid-write": counts["killed mid-write"],
        "max leftovers between kills": most, "leftovers cleared by the next writer": cleared,
        "leftovers after a clean save": after, "max other files": strays,
        "other files after a clean save": strays_after, "save seconds (4 MiB)": round(save_seconds, 4),
        "writer start seconds": round(statistics.mean(startup), 2) if startup else None,
        "seconds": round(time.perf_counter() - started, 1),
        "ok": counts["damaged or missing"] == 0 and most <= 1 and after == 0 and strays == strays_after == 0,
    }


# 3. Cancels -------------------------------------------------------------------------------------------------------

CANCEL_PHASES = ("prompts", "anchors", "train")  # aimed at in turn; a cancel may also land in the held-out check
PHASE_OF_MESSAGE = {"encoding prompts": "prompts", "sampling anchor images": "anchors", "training": "train",
                    "checking the result": "check"}
NEXT_PHASE = {"prompts": "anchors", "anchors": "train", "train": "check"}
# Tiny runs, with enough prompts for three encoding chunks so that cancels can land between them.
DIFFUSERS_RUN = dict(steps=12, batch_size=4, learning_rate=1e-3, anchor_images=8, sampler_steps=3,
                     anchor_prompt_count=40)
COMFY_RUN = dict(steps=6, batch_size=2, anchor_images=4, sampler_steps=3, sample_batch_size=2,
                 anchor_prompt_count=40, latent_size=4)


def _phase_after(event: tuple[str, int, int] | None) -> str:
    """The phase a cancel check is in, from the last progress report before it (a finished phase hands over)."""
    if event is None:
        return "prompts"
    phase, step, total = event
    return NEXT_PHASE.get(phase, phase) if step >= total else phase


def _cancel_points(labels: list[str], runs: int, rng: random.Random) -> list[int]:
    """For each run, a random cancel check (1-based) in the phase its turn aims at."""
    points = []
    for run in range(runs):
        aimed = [i for i, label in enumerate(labels, 1) if label == CANCEL_PHASES[run % len(CANCEL_PHASES)]]
        points.append(rng.choice(aimed or list(range(1, len(labels) + 1))))
    return points


def _files_in(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*")) if folder.exists() else 0


def _diffusers_cancels(count: int, rng: random.Random, work: Path) -> dict[str, object]:
    from ablation_core.methods.ablation.loop import ablate
    from ablation_core.methods.ablation.settings import make_config

    view = _tiny_view()
    modules = view.modules()
    config = make_config("Grumpy Cat", "cat", **DIFFUSERS_RUN)
    labels: list[str] = []

    def run(cancel_at: int | None):
        last: list[tuple[str, int, int] | None] = [None]
        labels.clear()

        def should_cancel() -> bool:
            labels.append(_phase_after(last[0]))
            return len(labels) == cancel_at

        def on_progress(progress) -> None:
            last[0] = (progress.phase, progress.step, progress.total)

        return ablate(view, config, on_progress, should_cancel)

    reference, grads = _snapshot(modules), [p.requires_grad for m in modules for p in m.parameters()]
    first = run(None)
    landed: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    folder = work / "diffusers_cwd"
    folder.mkdir()
    for cancel_at in _cancel_points(list(labels), count, rng):
        with _inside(folder):
            try:
                run(cancel_at)
                problems["ran to the end"] += 1
            except AblationCancelled as err:
                landed[PHASE_OF_MESSAGE.get(str(err).removeprefix("cancelled while ").split(";")[0], "?")] += 1
        problems["model changed"] += bool(_changed(modules, reference))
        problems["hooks left"] += bool(_hooks_left(modules))
        problems["gradients left"] += any(p.grad is not None for m in modules for p in m.parameters())
        problems["requires_grad changed"] += grads != [p.requires_grad for m in modules for p in m.parameters()]
        problems["files written"] += bool(_files_in(folder))
    again = run(None)
    same_result = again.losses == first.losses and all(
        _same_bits(again.patch.deltas[k].diff, d.diff) for k, d in first.patch.deltas.items())
    return {"cancels": count, "landed in": dict(landed), "cancel checks in a full run": dict(Counter(labels)),
            **{k: v for k, v in problems.items()}, "a full run afterwards gives the same patch": same_result,
            "ok": not any(problems.values()) and same_result}


def _comfy_cancels(count: int, rng: random.Random, work: Path) -> dict[str, object]:
    import pytest

    from ablation_core.backends.comfy import PROGRESS_EVENT, ablate_concept
    from ablation_core.methods.ablation.settings import make_config
    from tests import comfy_fakes as fakes

    labels: list[str] = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        state = fakes.install(work / "comfy", monkeypatch)
        management = sys.modules["comfy.model_management"]
        check = management.throw_exception_if_processing_interrupted

        def recording_check() -> None:
            events = [data for event, data in state.messages if event == PROGRESS_EVENT]
            last = (events[-1]["phase"], events[-1]["step"], events[-1]["total"]) if events else None
            labels.append(_phase_after(last))
            check()

        monkeypatch.setattr(management, "throw_exception_if_processing_interrupted", recording_check)
        model, clip = fakes.make_model(), fakes.make_clip()
        modules = [model.model, clip.cond_stage_model]
        config = make_config("Van Gogh", "painting", "fast", kind="style", **COMFY_RUN)
        cache = work / "comfy_cache"

        def run(interrupt_after: int | None) -> AblationPatch:
            labels.clear()
            state.messages.clear()
            state.interrupt_checks, state.interrupt_after = 0, interrupt_after
            with torch.inference_mode():  # as ComfyUI runs nodes
                return ablate_concept(model, clip, config, cache_dir=cache if interrupt_after is not None else None)[2]

        reference, grads = _snapshot(modules), [p.requires_grad for m in modules for p in m.parameters()]
        first = run(None)
        landed: Counter[str] = Counter()
        problems: Counter[str] = Counter()
        for cancel_at in _cancel_points(list(labels), count, rng):
            try:
                run(cancel_at - 1)  # the fake raises once the checks exceed interrupt_after
                problems["ran to the end"] += 1
            except fakes.InterruptProcessingException:
                landed[labels[-1]] += 1
            problems["model changed"] += bool(_changed(modules, reference))
            problems["patches added to the input"] += bool(model.patches or clip.patcher.patches
                                                           or model.weight_wrapper_patches)
            problems["hooks left"] += bool(_hooks_left(modules))
            problems["forward replaced"] += any("forward" in vars(m) for root in modules for m in root.modules())
            problems["requires_grad changed"] += grads != [p.requires_grad for m in modules for p in m.parameters()]
            problems["files written"] += bool(_files_in(cache))
        again = run(None)
    same_result = all(_same_bits(again.deltas[k].full(), d.full()) for k, d in first.deltas.items())
    return {"cancels": count, "landed in": dict(landed), "cancel checks in a full run": dict(Counter(labels)),
            **{k: v for k, v in problems.items()}, "a full run afterwards gives the same patch": same_result,
            "ok": not any(problems.values()) and same_result}


def cancel_ablations(count: int, seed: int = 0, folder: Path | None = None) -> dict[str, object]:
    """``count`` cancels in each backend, aimed in turn at prompt encoding, anchor sampling and training."""
    started = time.perf_counter()
    with _work_folder(folder) as work, _quiet_library():  # a cancelled run's weak-effect warning is expected
        diffusers = _diffusers_cancels(count, random.Random(seed), work)
        comfy = _comfy_cancels(count, random.Random(seed + 1), work)
    return {"diffusers": diffusers, "comfy": comfy, "seconds": round(time.perf_counter() - started, 1),
            "ok": bool(diffusers["ok"] and comfy["ok"])}


# 4. Pickles that would run code -----------------------------------------------------------------------------------

class RunsCode:
    """Unpickling this calls ``os.mkdir(marker)`` (or ``exec`` of code creating it): what a malicious delta.bin does."""

    def __init__(self, marker: Path, use_exec: bool = False):
        self.marker, self.use_exec = str(marker), use_exec

    def __reduce__(self):
        if self.use_exec:
            return exec, (f"open({self.marker!r}, 'w').close()",)
        return os.mkdir, (self.marker,)


def _pickle_writers() -> dict[str, Callable[[Path, RunsCode], None]]:
    def raw(protocol: int) -> Callable[[Path, RunsCode], None]:
        return lambda path, payload: path.write_bytes(pickle.dumps({"unet": payload}, protocol=protocol))

    return {
        "raw pickle, protocol 0": raw(0), "raw pickle, protocol 2": raw(2), "raw pickle, protocol 5": raw(5),
        "torch zip archive": lambda path, payload: torch.save({"unet": payload}, path),
        "torch legacy format": lambda path, payload: torch.save({"unet": payload}, path,
                                                                 _use_new_zipfile_serialization=False),
        "beside real tensors": lambda path, payload: torch.save(
            {"unet": {"down.attn2.to_k.weight": torch.zeros(2, 2), "x": payload}}, path),
        "the whole file": lambda path, payload: torch.save(payload, path),
    }


def pickle_refusal(folder: Path | None = None) -> dict[str, object]:
    """Malicious delta.bin files, through ``read_delta_bin`` and through ``convert`` on the command line."""
    from ablation_core.patches.importers import read_delta_bin

    cases = []
    with _work_folder(folder) as work:
        model = work / "model.safetensors"
        model.write_bytes(b"never loaded")
        for number, (variant, write) in enumerate(_pickle_writers().items()):
            for use_exec in (False, True):
                case = work / f"case_{number}_{int(use_exec)}"
                case.mkdir()
                marker, path = case / "code_ran", case / "delta.bin"
                write(path, RunsCode(marker, use_exec))
                try:
                    read_delta_bin(path)
                    outcome = "loaded"
                except PatchError as err:
                    outcome = "refused" if clear_message(str(err)) else "refused unclearly"
                except Exception as err:
                    outcome = f"crash: {_error_text(err)}"
                cli = _run_cli(["convert", "--model", str(model), "--delta-bin", str(path), "--out",
                                str(case / "out.safetensors")])
                cli_refused = cli.code == 2 and cli.one_error_line and not cli.reached_loader
                cases.append({"variant": variant + (" (exec)" if use_exec else " (os.mkdir)"), "outcome": outcome,
                              "refused by the CLI": cli_refused, "code ran": marker.exists(),
                              "files written": sorted(p.name for p in case.iterdir() if p.name != "delta.bin"),
                              "runs code when unpickled unsafely": _unsafe_load_runs(path, marker)})
    refused = sum(c["outcome"] == "refused" and c["refused by the CLI"] for c in cases)
    ran = sum(c["code ran"] for c in cases)
    live = sum(c["runs code when unpickled unsafely"] for c in cases)
    return {"files": len(cases), "refused": refused, "code ran": ran, "payloads live (unsafe load runs them)": live,
            "cases": cases,
            "ok": refused == live == len(cases) and ran == 0 and not any(c["files written"] for c in cases)}


def _unsafe_load_runs(path: Path, marker: Path) -> bool:
    """The control: loading the file the unsafe way does run its code (so the refusal above is what stopped it)."""
    with contextlib.suppress(Exception):  # the payload runs before anything fails on what it returned
        torch.load(path, weights_only=False)
    if not marker.exists():  # a raw pickle that torch.load does not read as one
        with contextlib.suppress(Exception):
            pickle.loads(path.read_bytes())
    ran = marker.exists()
    if marker.is_dir():
        marker.rmdir()
    else:
        marker.unlink(missing_ok=True)
    return ran


# 5. The command line with bad arguments ---------------------------------------------------------------------------

class WorkStarted(Exception):
    """Raised by the stubbed model loaders: the command got past its argument checks."""


@contextlib.contextmanager
def no_model_loading() -> Iterator[None]:
    """Every way a command starts its real work (loading a model, building one for bench) raises ``WorkStarted``."""
    import ablation_core.backends.loading as loading
    import ablation_core.cli.bench as bench
    import ablation_core.cli.demo as demo

    def refuse(*args: object, **kwargs: object) -> None:
        raise WorkStarted

    with mock.patch.object(loading, "load_model", refuse), mock.patch.object(demo, "load_model", refuse), \
            mock.patch.object(bench, "build_components", refuse), mock.patch.object(bench, "load_model", refuse):
        yield


@dataclass
class CliRun:
    code: int | str | None
    stdout: str
    stderr: str
    reached_loader: bool
    seconds: float

    @property
    def one_error_line(self) -> bool:
        lines = self.stderr.splitlines()
        return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in self.stderr


def _run_cli(argv: list[str]) -> CliRun:
    """``main(argv)`` in this process, with stdout, stderr and log records captured and model loading stubbed."""
    from ablation_core.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    root = logging.getLogger()
    root.addHandler(handler)
    code: int | str | None = None
    reached = False
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), no_model_loading():
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
            except WorkStarted:
                reached = True
            except Exception:
                traceback.print_exc()
                code = "crash"
    finally:
        root.removeHandler(handler)
    return CliRun(code, out.getvalue(), err.getvalue(), reached, time.perf_counter() - started)


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def cli_bad_arguments(folder: Path | None = None) -> dict[str, object]:
    """Run every case in-process; a bad one must give one ``error:`` line, exit code 2, no files and no model."""
    started = time.perf_counter()
    failures, by_command, slowest = [], Counter(), 0.0
    with _work_folder(folder) as work:
        cases, skipped = cli_cases(work)
        try:
            for case in cases:
                before = _tree(work)
                run = _run_cli(case.argv)
                slowest = max(slowest, run.seconds)
                problems = []
                if case.bad:
                    if run.reached_loader:
                        problems.append("got past the checks to the model loader")
                    if run.code != 2:
                        problems.append(f"exit code {run.code}")
                    if not run.one_error_line:
                        problems.append(f"stderr {run.stderr[-300:]!r}")
                    if run.stdout:
                        problems.append(f"stdout {run.stdout[-200:]!r}")
                elif not run.reached_loader:
                    problems.append(f"refused legitimate arguments (exit code {run.code}): {run.stderr[-300:]!r}")
                if _tree(work) != before:
                    problems.append("wrote files")
                by_command[case.command] += 1
                if problems:
                    failures.append({"command": case.command, "bad": case.bad or "(legitimate)",
                                     "argv": [a[:60] for a in case.argv], "problems": problems})
                    by_command[case.command + " failed"] += 1
        finally:
            (work / "locked").chmod(0o755)  # the fixtures' read-only folder, so that it can be removed
    legitimate = sum(not c.bad for c in cases)
    return {"cases": len(cases), "bad arguments": len(cases) - legitimate, "legitimate (must pass)": legitimate,
            "failures": len(failures), "slowest case seconds": round(slowest, 3), "by command": dict(by_command),
            "failure examples": failures[:20],
            "skipped": skipped, "seconds": round(time.perf_counter() - started, 1), "ok": not failures}


# The summary ------------------------------------------------------------------------------------------------------

HEADLINES = {
    "fuzzed patch files": ["patches", "harmless", "refused at load", "refused at apply", "crashes",
                           "unclear messages", "model changed after", "model hash unchanged"],
    "killed saves": ["kills", "old intact", "new complete", "damaged or missing", "killed mid-write",
                     "max leftovers between kills", "leftovers cleared by the next writer",
                     "leftovers after a clean save", "max other files", "other files after a clean save"],
    "malicious delta.bin": ["files", "refused", "code ran", "payloads live (unsafe load runs them)"],
    "CLI bad arguments": ["cases", "bad arguments", "legitimate (must pass)", "failures", "slowest case seconds",
                          "skipped"],
}


def _summary(results: dict[str, dict[str, object]], seconds: float) -> str:
    lines = [f"Reliability stress: {'all parts OK' if all(r['ok'] for r in results.values()) else 'FAILURES'} "
             f"in {seconds:.0f} s (torch threads: {torch.get_num_threads()})", ""]
    for part, figures in results.items():
        took = f", {figures['seconds']} s" if "seconds" in figures else ""
        lines.append(f"{part}: {'OK' if figures['ok'] else 'FAILED'}{took}")
        if part == "cancelled ablations":
            for backend in ("diffusers", "comfy"):
                shown = {k: v for k, v in figures[backend].items() if k != "ok"}
                lines.append(f"  {backend:<10} " + "; ".join(f"{k}: {v}" for k, v in shown.items()))
            continue
        for key in HEADLINES[part]:
            lines.append(f"  {key:<40} {figures[key]}")
        for key in ("crash examples", "unclear examples", "failure examples"):
            for example in figures.get(key, []):
                lines.append(f"  ! {json.dumps(example, ensure_ascii=False)[:300]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.stress", description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=10_000, help="damaged patch files (default: 10000)")
    parser.add_argument("--kills", type=int, default=100, help="writers killed while saving (default: 100)")
    parser.add_argument("--cancels", type=int, default=100, help="cancels per backend (default: 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    parser.add_argument("--json", action="store_true", help="also print every figure as JSON")
    parser.add_argument("--save-loop", type=Path, help=argparse.SUPPRESS)  # the writer process of the kill part
    parser.add_argument("--first", default="A", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.save_loop:
        _save_loop(args.save_loop, args.first)
        return 0
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = {
        "fuzzed patch files": fuzz_patches(args.patches, args.seed),
        "killed saves": kill_saves(args.kills, args.seed),
        "cancelled ablations": cancel_ablations(args.cancels, args.seed),
        "malicious delta.bin": pickle_refusal(),
        "CLI bad arguments": cli_bad_arguments(),
    }
    print(_summary(results, time.perf_counter() - started))
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
