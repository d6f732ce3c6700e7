"""The command-line cases of the stress harness: every command with every class of bad argument that applies to it.

Bad arguments (empty, identical, very long prompts; missing, empty or unwritable paths; a folder or an existing file
as output; zero, negative or non-finite numbers; unknown choices) must each be refused in one line before any work;
legitimate ones, non-ASCII prompts and file names among them, must get past the checks. The cases point at files
made by ``fixtures``; no model is ever loaded (``stress.no_model_loading`` stubs the loaders).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ablation_core.patches.patch import AblationPatch, LayerDelta


@dataclass
class CliCase:
    command: str
    bad: str  # what is wrong with the arguments; "" for arguments that must pass the checks
    argv: list[str]


def _with(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced if present, added if not; removed if ``value`` is None)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == flag and i + 1 < len(argv):
            skip = True
            continue
        out.append(arg)
    return out if value is None else out + [flag, value]


def fixtures(folder: Path) -> dict[str, str]:
    """Files the cases point at. Only ``patch`` and ``delta`` are real; no model is ever loaded."""
    paths = {name: folder / name for name in ("model.safetensors", "patch.safetensors", "delta.bin", "folder",
                                              "a_file", "existing.safetensors", "existing.png", "empty.txt",
                                              "binary.txt", "prompts.txt", "locked")}
    paths["model.safetensors"].write_bytes(b"not a model: the loader is stubbed")
    AblationPatch({"lora_unet_x": LayerDelta(diff=torch.ones(2, 2))}, {}).save(paths["patch.safetensors"])
    torch.save({"unet": {"down_blocks.0.attentions.0.attn2.to_k.weight": torch.zeros(2, 2)}}, paths["delta.bin"])
    paths["folder"].mkdir()
    for name in ("a_file", "existing.safetensors", "existing.png"):
        paths[name].write_bytes(b"x")
    paths["empty.txt"].write_text("")
    paths["binary.txt"].write_bytes(b"\xff\xfe\x00\x81 cat")
    paths["prompts.txt"].write_text("a photo of a cat\n")
    paths["locked"].mkdir()
    paths["locked"].chmod(0o555)
    return {name: str(path) for name, path in paths.items()}


def cli_cases(folder: Path) -> tuple[list[CliCase], list[str]]:
    """Every command with every class of bad argument that applies to it, plus legitimate arguments (non-ASCII
    prompts among them) that must get past the checks; and the classes skipped here, with why."""
    f = fixtures(folder)
    new = str(folder / "new.safetensors")
    too_long = str(folder / ("x" * 250 + ".safetensors"))  # over the file system's 255 bytes
    long_name = str(folder / ("x" * 230 + ".safetensors"))  # fits, but not with the temporary folder's longer name
    valid = {
        "ablate": ["ablate", "--model", f["model.safetensors"], "--target", "Grumpy Cat", "--anchor", "cat",
                   "--out", new],
        "apply": ["apply", "--model", f["model.safetensors"], "--patch", f["patch.safetensors"], "--prompt", "a cat",
                  "--out", str(folder / "new.png")],
        "eval": ["eval", "--model", f["model.safetensors"], "--patch", f["patch.safetensors"], "--target",
                 "Grumpy Cat", "--anchor", "cat"],
        "merge": ["merge", f["patch.safetensors"], f["patch.safetensors"], "--out", new],
        "convert": ["convert", "--model", f["model.safetensors"], "--delta-bin", f["delta.bin"], "--out", new],
        "demo": ["demo", "--out", str(folder / "demo_output")],
        "bench": ["bench", "--arch", "sd15", "--device", "cpu"],
    }
    cases: list[CliCase] = []
    skipped: list[str] = []

    def add(command: str, bad: str, argv: list[str]) -> None:
        cases.append(CliCase(command, bad, argv))

    # Legitimate arguments reach the (stubbed) loader: non-ASCII prompts and file names are fine.
    for command in ("ablate", "apply", "eval", "convert", "demo", "bench"):
        add(command, "", valid[command])
    for target, anchor in (("Amélie Poulain", "woman"), ("猫のタマ", "猫"), ("Ñandú", "bird")):
        for command in ("ablate", "eval"):
            add(command, "", _with(_with(valid[command], "--target", target), "--anchor", anchor))
    add("apply", "", _with(valid["apply"], "--prompt", "猫の写真, Amélie"))
    add("ablate", "", _with(valid["ablate"], "--out", str(folder / "résultat_猫.safetensors")))
    add("ablate", "", _with(valid["ablate"], "--anchor-prompts", f["prompts.txt"]))

    # Prompts: empty, blank, identical, very long, control characters.
    for command, flags in (("ablate", ("--target", "--anchor")), ("eval", ("--target", "--anchor")),
                           ("demo", ("--target", "--anchor")), ("apply", ("--prompt",))):
        for flag in flags:
            for bad, value in (("empty prompt", ""), ("blank prompt", "   "), ("very long prompt", "cat " * 400),
                               ("prompt with a newline", "a\ncat"), ("prompt with an escape", "a \x1b[31m cat")):
                add(command, f"{flag} {bad}", _with(valid[command], flag, value))
        if "--target" in flags:
            for target, anchor in (("cat", "cat"), ("Cat", "cat"), (" cat ", "cat")):
                add(command, "identical target and anchor",
                    _with(_with(valid[command], "--target", target), "--anchor", anchor))
    add("demo", "a concept the toy model does not know", _with(valid["demo"], "--target", "Amélie Poulain"))
    add("eval", "a concept the toy model does not know",
        _with(_with(valid["eval"], "--model", "toy"), "--target", "猫のタマ"))
    add("ablate", "a concept the toy model does not know",
        _with(_with(valid["ablate"], "--model", "toy"), "--target", "Amélie"))

    # Input paths: missing, empty, a folder, the wrong kind of file.
    missing = str(folder / "missing.safetensors")
    for command in ("ablate", "apply", "eval", "convert"):
        for bad, value in (("missing model", missing), ("empty model path", "")):
            add(command, bad, _with(valid[command], "--model", value))
    for command in ("apply", "eval"):
        for bad, value in (("missing patch", missing), ("patch is a folder", f["folder"]), ("empty patch path", ""),
                           ("patch is not .safetensors", f["empty.txt"])):
            add(command, bad, _with(valid[command], "--patch", value))
    for bad, value in (("missing file", missing), ("a folder", f["folder"]), ("empty path", ""),
                       ("not .safetensors", f["empty.txt"])):
        add("inspect", bad, ["inspect", value])
        add("merge", f"input {bad}", ["merge", f["patch.safetensors"], value, "--out", new])
    for bad, value in (("missing delta.bin", missing), ("delta.bin is a folder", f["folder"]),
                       ("empty delta.bin path", "")):
        add("convert", bad, _with(valid["convert"], "--delta-bin", value))
    add("convert", "missing fine-tuned checkpoint",
        _with(_with(valid["convert"], "--delta-bin", None), "--finetuned", missing))
    for bad, value in (("missing anchor prompt file", missing), ("anchor prompt file is a folder", f["folder"]),
                       ("empty anchor prompt file", f["empty.txt"]), ("anchor prompt file not UTF-8", f["binary.txt"]),
                       ("empty anchor prompt path", "")):
        add("ablate", bad, _with(valid["ablate"], "--anchor-prompts", value))

    # Output paths: a folder, an existing file, the wrong suffix, empty, under a file, too long, unwritable.
    outputs = {"ablate": ("--out", ".safetensors"), "merge": ("--out", ".safetensors"),
               "convert": ("--out", ".safetensors"), "apply": ("--out", ".png"), "eval": ("--grid", ".png")}
    writable = os.access(f["locked"], os.W_OK)
    for command, (flag, suffix) in outputs.items():
        existing = f["existing" + suffix]
        for bad, value in (("output is a folder", f["folder"]), ("output exists", existing),
                           ("output with the wrong suffix", str(folder / "new.txt")), ("empty output path", ""),
                           ("output under a file", f["a_file"] + "/new" + suffix),
                           ("output name too long", too_long.replace(".safetensors", suffix)),
                           ("output name too long to save atomically", long_name.replace(".safetensors", suffix)),
                           ("output in an unwritable folder", f["locked"] + "/new" + suffix)):
            if bad == "output in an unwritable folder" and writable:
                continue
            add(command, bad, _with(valid[command], flag, value))
    if writable:
        skipped.append("output in an unwritable folder: this user may write anywhere (root), so it is not tested")
    for bad, value in (("output is an existing file", f["a_file"]), ("output under a file", f["a_file"] + "/out"),
                       ("empty output path", "")):
        add("demo", bad, _with(valid["demo"], "--out", value))
    if not writable:
        add("demo", "output in an unwritable folder", _with(valid["demo"], "--out", f["locked"] + "/out"))

    # Counts and numbers: zero, negative, not a number, not finite.
    numbers = {
        "ablate": ["--steps", "--batch-size", "--anchor-images", "--sampler-steps", "--latent-size", "--lr", "--rank",
                   "--energy", "--misspellings", "--lora-rank", "--seed", "--guidance"],
        "apply": ["--images", "--sampler-steps", "--latent-size", "--seed", "--guidance", "--strength"],
        "eval": ["--per-set", "--seed", "--strength"],
        "merge": ["--rank", "--energy"], "convert": ["--rank", "--energy"], "demo": ["--seed"],
        "bench": ["--steps", "--anchor-images", "--sampler-steps", "--batch-size"],
    }
    may_be_zero = {"--misspellings", "--lora-rank", "--seed", "--guidance", "--strength"}
    for command, flags in numbers.items():
        for flag in flags:
            values = [("not a number", "ten"), ("not finite", "nan")]
            if flag != "--strength":  # a negative strength undoes a patch
                values.append(("negative", "-1"))
            if flag not in may_be_zero:
                values.append(("zero", "0"))
            for bad, value in values:
                add(command, f"{flag} {bad}", _with(valid[command], flag, None) + [f"{flag}={value}"])
    add("ablate", "--seed too large", _with(valid["ablate"], "--seed", str(2**64)))
    add("ablate", "--energy above 1", _with(valid["ablate"], "--energy", "1.5"))
    add("merge", "a weight per patch missing", valid["merge"] + ["--weights", "1"])
    add("merge", "a weight that is not finite", valid["merge"] + ["--weights", "1", "inf"])

    # Choices and the rest.
    for command in ("ablate", "apply", "eval", "convert", "bench"):
        add(command, "an unknown device", _with(valid[command], "--device", "quantum"))
        add(command, "an unknown dtype", _with(valid[command], "--dtype", "fp8"))
        if not torch.cuda.is_available():
            add(command, "a GPU that is not there", _with(valid[command], "--device", "cuda"))
        add(command, "an unknown option", valid[command] + ["--colour", "blue"])
    add("ablate", "an unknown group", _with(valid["ablate"], "--group", "everything"))
    add("ablate", "a missing required argument", _with(valid["ablate"], "--target", None))
    add("convert", "both --delta-bin and --finetuned", valid["convert"] + ["--finetuned", f["model.safetensors"]])
    add("bench", "an unknown architecture", _with(valid["bench"], "--arch", "sd9"))
    add("merge", "no patches", ["merge", "--out", new])
    add("inspect", "no file", ["inspect"])
    cases.append(CliCase("(none)", "no command", []))
    cases.append(CliCase("(none)", "an unknown command", ["erase", "--target", "cat"]))
    return cases, skipped
