"""The command line's arguments: every option says what it does and its default."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..errors import printable
from . import checks

DESCRIPTION = """Remove a concept from a Stable Diffusion model and keep the change as a small LoRA-format patch.

Commands: ablate (make a patch), inspect, apply (before/after images), merge, convert (import other tools' output),
eval (measure a patch), demo (the whole thing on the embedded toy model), bench (speed and memory)."""


class Parser(argparse.ArgumentParser):
    """Errors as one line ("error: ...; see --help") with exit code 2, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {printable(message)} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _preset_default(name: str, unit: str = "") -> str:
    """'default: from --preset: fast 50, default 100, paper 200 (toy model: 50, 100, 200)'."""
    from ..methods.ablation.settings import PRESET_NAMES, preset_values

    real = [preset_values("sd1", p)[name] for p in PRESET_NAMES]
    toy = [preset_values("toy", p)[name] for p in PRESET_NAMES]
    listed = ", ".join(f"{p} {v:g}{unit}" for p, v in zip(PRESET_NAMES, real))
    toy_text = "" if toy == real else f" (toy model: {', '.join(f'{v:g}' for v in toy)})"
    return f"default: from --preset: {listed}{toy_text}"


def _model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--model", required=required,
                        help="a single-file .safetensors checkpoint, a diffusers folder, 'toy' (the embedded toy "
                             "model) or 'toy-flux' (its Flux-architecture twin)"
                             + ("" if required else "; the base model the patches were made for"))
    parser.add_argument("--device", type=checks.device, default="auto",
                        help="cuda, cpu, cuda:1 ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights and compute precision (default: auto = bf16 on a GPU, fp32 on a CPU)")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="override for v-prediction SD2 checkpoints whose file does not say so (default: from "
                             "the file)")
    flux = parser.add_argument_group("Flux transformer files (a diffusers Flux folder holds these itself)")
    flux.add_argument("--clip-l", default=None, help="CLIP-L text encoder: clip_l.safetensors or a transformers folder")
    flux.add_argument("--t5", default=None, help="T5-XXL text encoder: t5xxl_fp16.safetensors (fp8 copies too) or a "
                                                 "transformers folder")
    flux.add_argument("--t5-tokenizer", default=None,
                      help="a folder with T5's tokenizer (a diffusers Flux repository's tokenizer_2/, or ComfyUI's "
                           "comfy/text_encoders/t5_tokenizer/); no weights file carries it")
    flux.add_argument("--fp8", action="store_true",
                      help="store the transformer's block weights in fp8 (e4m3), cast to --dtype one layer at a time: "
                           "Flux.1's 12B weights in 11 GiB instead of 22 (with --gradient-checkpointing, --lora-rank "
                           "16 and --offload-text-encoder a run fits a 24 GB card)")


def _patch_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the patch file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    storage = parser.add_mutually_exclusive_group()
    storage.add_argument("--rank", type=checks.positive_int, default=None,
                         help="store low rank of exactly this rank (default: the rank that keeps --energy)")
    storage.add_argument("--full-rank", action="store_true",
                         help="store the exact delta (.diff keys; larger) instead of low rank")
    parser.add_argument("--energy", type=checks.fraction, default=0.999,
                        help="low-rank storage keeps this fraction of each delta's energy (default: 0.999)")


def _concept_args(parser: argparse.ArgumentParser, target_default: str | None = None,
                  anchor_default: str | None = None) -> None:
    required = target_default is None
    parser.add_argument("--target", required=required, default=target_default,
                        help="the concept to remove, e.g. 'Grumpy Cat' or 'Van Gogh'"
                             + ("" if required else f" (default: {target_default})"))
    parser.add_argument("--anchor", required=required, default=anchor_default,
                        help="what it should become instead, a broader concept, e.g. 'cat' or 'painting'"
                             + ("" if required else f" (default: {anchor_default})"))


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    from ..methods.ablation.objectives import OBJECTIVE_HELP
    from ..methods.ablation.recipes import CONCEPT_TYPE_HELP, CONCEPT_TYPES
    from ..methods.ablation.settings import PRESET_HELP, PRESET_NAMES
    from ..methods.prompts import KINDS
    from ..models.layers import GROUP_HELP

    p = sub.add_parser("ablate", help="remove a concept and write a patch", description="Remove a concept from a "
                       "model and write the change as a patch. Settings left out suit the model (the toy model "
                       "gets its own).")
    _model_args(p)
    p.add_argument("--method", choices=["trained", "closed-form"], default="trained",
                   help="trained: the paper's fine-tuning (about a minute on a GPU); closed-form: one solve of the "
                        "K/V weights for any number of targets (seconds; no images) (default: trained)")
    p.add_argument("--target", action="append", default=None,
                   help="the concept to remove, e.g. 'Grumpy Cat' or 'Van Gogh'; repeat for several (erased together)")
    p.add_argument("--anchor", action="append", default=None,
                   help="what it should become instead, e.g. 'cat' or 'painting': one for all targets or one per "
                        "--target")
    p.add_argument("--concepts", default=None,
                   help="a text file with one 'target, anchor' (or 'target -> anchor') per line, for mass erasure "
                        "(default: none)")
    p.add_argument("--base-patch", default=None,
                   help="an earlier patch to build on: the run starts from the model with it applied and the new "
                        "patch holds both changes (default: none)")
    p.add_argument("--concept-type", choices=CONCEPT_TYPES, default=None,
                   help="the recipe for this kind of concept (default: none; the options below apply). "
                        + "; ".join(f"{k}: {v}" for k, v in CONCEPT_TYPE_HELP.items()))
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="object: swap the word in object prompts; style: '..., in the style of X'; memorization: "
                        "the target is a whole prompt (default: from --concept-type, else object; on the toy model, "
                        "style for its artists)")
    p.add_argument("--negative-prompt", default=None,
                   help="negative prompt while anchor images are drawn (default: none; the target words for "
                        "--concept-type inappropriate)")
    p.add_argument("--group", choices=list(GROUP_HELP), default=None,
                   help="parameters to train (default: kv; embedding on Flux). "
                        + "; ".join(f"{k}: {v}" for k, v in GROUP_HELP.items()))
    p.add_argument("--objective", choices=list(OBJECTIVE_HELP), default=None,
                   help="loss (default: model). " + "; ".join(f"{k}: {v}" for k, v in OBJECTIVE_HELP.items()))
    p.add_argument("--regularize", action="store_true",
                   help="also keep the anchor's own prompts unchanged; for overlapping pairs such as 'grumpy cat' -> "
                        "'cat' (default: off)")
    p.add_argument("--preset", choices=list(PRESET_NAMES), default="default", help=f"{PRESET_HELP} (default: default)")
    p.add_argument("--steps", type=checks.positive_int, help="training steps; " + _preset_default("steps"))
    p.add_argument("--batch-size", type=checks.positive_int,
                   help="anchor images per training step; " + _preset_default("batch_size"))
    p.add_argument("--lr", type=checks.positive_float, help="learning rate; " + _preset_default("learning_rate"))
    p.add_argument("--lora-rank", type=checks.non_negative_int, default=None,
                   help="train LoRA adapters of this rank instead of full-rank deltas (default: 0 = full rank)")
    p.add_argument("--anchor-images", type=checks.positive_int,
                   help="anchor images drawn from the model before training; " + _preset_default("anchor_images"))
    p.add_argument("--sampler-steps", type=checks.positive_int,
                   help="solver steps per anchor image; " + _preset_default("sampler_steps"))
    p.add_argument("--guidance", type=checks.non_negative_float,
                   help="classifier-free guidance scale of anchor sampling; " + _preset_default("guidance"))
    p.add_argument("--preserved-rows", type=checks.non_negative_int, default=None,
                   help="rows of each training step that hold another concept's prompt at the frozen model's "
                        "prediction (two passes each); keeps neighbours on models with a bidirectional text encoder "
                        "(default: 0 on SD, the preset's on Flux)")
    p.add_argument("--misspellings", type=checks.non_negative_int, default=None,
                   help="also train on this many misspellings of the target (default: 0)")
    p.add_argument("--anchor-prompts",
                   help="a text file with one anchor prompt per line, each containing the anchor (default: the "
                        "built-in prompt bank; the toy model's own captions on the toy model)")
    p.add_argument("--latent-size", type=checks.positive_int,
                   help="anchor image size in latent pixels; smaller is faster (default: the model's own, 64 for "
                        "SD1.5 = 512 px)")
    p.add_argument("--seed", type=checks.seed, default=0,
                   help="seed of prompts, anchor images and training (default: 0)")
    p.add_argument("--robust", type=checks.non_negative_int, default=0, metavar="ROUNDS",
                   help="robust erasure: ROUNDS times, attack the patch (soft-prompt inversion and token search on "
                        "the run's own prompts) and erase what the attack found too, keeping every other concept; "
                        "trained: adversarial training of all attention projections unless --group is given; "
                        "closed form: RECE-style re-solves. Each round costs about one more run (default: 0 = off)")
    _add_memory_options(p)
    _add_closed_form_options(p)
    _patch_output_args(p)


def _add_memory_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("memory (trained method; for small GPUs)")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute the UNet's transformer blocks in the backward pass instead of keeping their "
                            "activations: about a third of the training activations (an eighth on SDXL) for about "
                            "one more forward pass per step (default: off)")
    group.add_argument("--offload-text-encoder", action="store_true",
                       help="keep the text encoder(s) on the CPU while the UNet trains (default: off)")


def _add_closed_form_options(p: argparse.ArgumentParser) -> None:
    from ..methods.closed_form.settings import MODE_HELP, MODES

    group = p.add_argument_group("closed form (--method closed-form)")
    group.add_argument("--mode", choices=list(MODES), default=None,
                       help="how preserved concepts are kept (default: least-squares). "
                            + "; ".join(f"{k}: {v}" for k, v in MODE_HELP.items()))
    group.add_argument("--preserve", action="append", default=None,
                       help="a concept to keep unchanged; repeat for several (default: a built-in bank of everyday "
                            "objects and styles, plus the anchors)")
    group.add_argument("--preserve-weight", type=checks.non_negative_float, default=None,
                       help="least squares: weight of keeping the preserved concepts against erasing (default: 0.5)")
    group.add_argument("--preserve-focus", type=checks.non_negative_int, default=None,
                       help="solve again N times, each time weighing more the preserved prompts' tokens the last "
                            "solve moved most (default: 0). --robust 3 --preserve-focus 4 kept more neighbours "
                            "and resisted the soft-prompt attack better than --robust 2 on the toy world: see "
                            "docs/robustness.md")
    group.add_argument("--no-builtin-bank", dest="builtin_bank", action="store_false",
                       help="keep only the anchors and --preserve, not the built-in bank of everyday concepts (200 "
                            "prompts fewer to encode: minutes on Flux's T5 on a CPU)")


def _add_apply(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="render prompts before and after applying a patch")
    _model_args(p)
    p.add_argument("--patch", required=True, help="the patch file (.safetensors)")
    p.add_argument("--strength", type=checks.finite_float, default=1.0,
                   help="multiplier of the patch's change (default: 1.0)")
    p.add_argument("--prompt", required=True, action="append", help="a prompt to render; repeat for several")
    p.add_argument("--out", required=True, help="the image file to write (.png or .jpg)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    p.add_argument("--images", type=checks.positive_int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--sampler-steps", type=checks.positive_int, default=20, help="solver steps (default: 20)")
    p.add_argument("--guidance", type=checks.non_negative_float, default=6.0,
                   help="classifier-free guidance scale (default: 6.0)")
    p.add_argument("--latent-size", type=checks.positive_int, default=None,
                   help="image size in latent pixels (default: the model's own)")
    p.add_argument("--seed", type=checks.seed, default=0, help="noise seed (default: 0)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from ..methods.prompts import KINDS

    p = sub.add_parser("eval", help="measure a patch: classifier figures on the toy world, model-side gaps anywhere")
    _model_args(p)
    p.add_argument("--patch", required=True, help="the patch file (.safetensors)")
    _concept_args(p)
    p.add_argument("--kind", choices=KINDS, default="object",
                   help="how target prompts are phrased on real models (default: object)")
    p.add_argument("--strength", type=checks.finite_float, default=1.0,
                   help="multiplier of the patch's change (default: 1.0)")
    p.add_argument("--per-set", type=checks.positive_int, default=None,
                   help="images per prompt set; more for tighter spreads, at a cost printed before it starts "
                        "(default: 48 on the toy world, 16 with --clip)")
    p.add_argument("--grid", default=None, help="also write a before/after grid image here (toy world; default: none)")
    p.add_argument("--overwrite", action="store_true", help="replace --grid if it exists (default: refuse)")
    p.add_argument("--seed", type=checks.seed, default=0, help="noise seed (default: 0)")
    p.add_argument("--attack", action="append", default=None,
                   choices=["variants", "soft-prompt", "token-search", "all"],
                   help="also attack the erasure, on the unpatched and the patched model (toy world, or any model "
                        "with --clip: CLIP judges the samples); repeat for several. "
                        "variants: misspellings, other phrasings, compositions; soft-prompt: textual inversion of one "
                        "token (Circumventing Concept Erasure); token-search: gradient-ranked token swaps over the "
                        "vocabulary (UnlearnDiffAtk/P4D); all: every one (default: none)")
    p.add_argument("--attack-budget", choices=["full", "small"], default="full",
                   help="full: the stated budgets of the results table (minutes on a CPU); small: a quick look "
                        "(seconds; figures are rougher) (default: full)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_clip_options(p)


def _add_clip_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("CLIP figures (any model: clip_accuracy, clip_score, neighbour_kid)")
    group.add_argument("--clip", default=None, metavar="PATH",
                       help="a CLIP model you downloaded: a transformers folder (e.g. `huggingface-cli download "
                            "openai/clip-vit-large-patch14 --local-dir PATH`), or an open_clip weights file with "
                            "--clip-arch; nothing is fetched (default: none; real models get model-side gaps only)")
    group.add_argument("--clip-arch", default=None, metavar="NAME",
                       help="the open_clip architecture of a --clip weights file, e.g. ViT-H-14 (needs the optional "
                            "open_clip_torch) (default: none)")
    group.add_argument("--neighbours", nargs="+", default=None, metavar="CONCEPT",
                       help="concepts that should not change, e.g. 'Claude Monet' 'Pablo Picasso' (default: a built-in "
                            "list: other artists for --kind style, other members of the anchor's class otherwise)")
    group.add_argument("--sampler-steps", type=checks.positive_int, default=25, help="solver steps (default: 25)")
    group.add_argument("--guidance", type=checks.non_negative_float, default=6.0,
                       help="classifier-free guidance scale (default: 6.0)")
    group.add_argument("--batch-size", type=checks.positive_int, default=4,
                       help="images sampled and decoded at once (default: 4)")
    group.add_argument("--latent-size", type=checks.positive_int, default=None,
                       help="image size in latent pixels; smaller is faster (default: the model's own)")


def _add_small_commands(sub: argparse._SubParsersAction) -> None:
    from ..models.layers import GROUP_HELP

    p = sub.add_parser("inspect", help="show a patch's metadata, keys, rank and size")
    p.add_argument("file", help="the patch file (.safetensors)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--keys", action="store_true", help="also list every layer key")

    p = sub.add_parser("merge", help="merge patches into one (weighted sum, or closed-form fusion)")
    p.add_argument("files", nargs="+", help="the patch files to merge")
    p.add_argument("--weights", type=checks.finite_float, nargs="+", default=None,
                   help="one weight per patch (default: 1 for each)")
    p.add_argument("--method", choices=["weighted-sum", "fusion"], default="weighted-sum",
                   help="weighted-sum: add the changes (they can interfere); fusion: solve for one change that does "
                        "what each patch does on its own concepts (MACE; needs --model) (default: weighted-sum)")
    _model_args(p, required=False)
    _patch_output_args(p)

    p = sub.add_parser("convert", help="make a patch from a concept-ablation delta.bin or a fine-tuned checkpoint")
    _model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--delta-bin", help="official concept-ablation delta.bin (read with weights_only=True)")
    source.add_argument("--finetuned", help="an erasure-fine-tuned single-file .safetensors of the same base model")
    p.add_argument("--group", choices=["kv", "attn", "full"], default="kv",
                   help="layers to extract from --finetuned (default: kv)")
    _patch_output_args(p)

    p = sub.add_parser("demo", help="ablate a concept from the embedded toy model, evaluate it, draw the grid")
    p.add_argument("--out", default="demo_output",
                   help="folder for the patch, the table and the grid (default: demo_output)")
    _concept_args(p, "grumpy cat", "cat")
    p.add_argument("--model", choices=["toy", "toy-flux"], default="toy",
                   help="toy: the SD-architecture toy model; toy-flux: the Flux-architecture one (default: toy)")
    p.add_argument("--group", choices=list(GROUP_HELP), default=None,
                   help="parameters to train (default: the model's: kv, embedding on Flux)")
    p.add_argument("--objective", choices=["mixed", "model", "noise"], default=None,
                   help="mixed: frozen anchor prediction on the least noisy rows, true noise on the others; model: "
                        "target -> frozen anchor prediction; noise: target -> true noise (default: the default "
                        "preset's, mixed)")
    p.add_argument("--seed", type=checks.seed, default=0, help="seed of the run (default: 0)")

    p = sub.add_parser("bench", help="time an ablation on a random-weight model of the real shape")
    p.add_argument("--arch", choices=["sd15", "sd2", "sdxl", "toy", "flux"], required=True,
                   help="model shape to build (toy: the embedded toy model; flux: Flux.1 dev counted on the meta "
                        "device: FLOPs, UNet evaluations and a 24 GB memory plan, nothing run)")
    p.add_argument("--device", type=checks.device, default="auto", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision (default: bf16; fp32 for the toy model on a CPU)")
    p.add_argument("--steps", type=checks.positive_int, default=None,
                   help="training steps (default: the default preset's)")
    p.add_argument("--anchor-images", type=checks.positive_int, default=None,
                   help="anchor images (default: the default preset's)")
    p.add_argument("--sampler-steps", type=checks.positive_int, default=None,
                   help="solver steps per anchor image (default: the default preset's)")
    p.add_argument("--batch-size", type=checks.positive_int, default=None,
                   help="training batch (default: the default preset's)")
    p.add_argument("--method", choices=["trained", "closed-form"], default="trained",
                   help="which method to time (default: trained)")
    p.add_argument("--concepts", type=checks.positive_int, nargs="+", default=[1, 100],
                   help="closed form: numbers of concepts erased at once (default: 1 100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--quick", action="store_true",
                   help="every phase with a few steps on small latents (minutes on a CPU); the default preset's "
                        "evaluations and FLOPs are still reported, computed from the measured ones")
    p.add_argument("--compare-default", action="store_true",
                   help="also run the thorough preset (the earlier default, about 4x the UNet evaluations) in the "
                        "same invocation and report the default's speed-up over it")
    p.add_argument("--latent-size", type=checks.positive_int, default=None,
                   help="latent size of the run (default: the model's; 16 with --quick)")
    _add_memory_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m ablation_core", description=DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does (default: warnings)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    _add_ablate(sub)
    _add_apply(sub)
    _add_eval(sub)
    _add_small_commands(sub)
    return parser
