"""``python -m ablation_core.toy train|concepts``: reproduce the shipped toy weights, or list the concepts."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablation_core.toy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    concepts = sub.add_parser("concepts", help="list the toy concepts with kind, suggested anchor and neighbours")
    concepts.add_argument("--json", action="store_true", help="print JSON (the format scripts read)")
    train = sub.add_parser("train", help="train classifier and model, write the weights folder")
    train.add_argument("--out", default=None, help="weights folder (default: the package's shipped folder)")
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    train.add_argument("--arch", choices=("sd", "flux"), default="sd",
                       help="sd: the SD-architecture toy model (and the classifier); flux: toy-flux, read by the "
                            "shipped classifier (default: sd)")
    measure = sub.add_parser("measure", help="re-measure prompt following of a weights folder by sampling")
    measure.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    measure.add_argument("--guidance", type=float, default=None)
    measure.add_argument("--sampler-steps", type=int, default=None)
    measure.add_argument("--samples-per-pair", type=int, default=None)
    measure.add_argument("--seed", type=int, default=1234, help="noise seed of the samples")
    measure.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    measure.add_argument("--write", action="store_true", help="store the figures in the folder's toy_world.json")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from .train import ToyRecipe
        from .train_flux import ToyFluxRecipe

        defaults = ToyFluxRecipe() if "flux" in argv else ToyRecipe()
        for field, value in vars(defaults).items():
            train.add_argument("--" + field.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)

    if args.command == "concepts":
        from .concepts import CONCEPTS

        if args.json:
            print(json.dumps([c.as_json() for c in CONCEPTS], indent=1))
        else:
            for c in CONCEPTS:
                print(f"{c.name:12s} {c.kind:9s} anchor={c.anchor:10s} neighbours={', '.join(c.neighbours)}")
        return 0

    import torch

    from .model import WEIGHTS_DIR
    from .train import measure_weights, train_toy_world

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.command == "measure":
        following = measure_weights(args.weights or WEIGHTS_DIR, guidance=args.guidance, seed=args.seed,
                                    sampler_steps=args.sampler_steps, samples_per_pair=args.samples_per_pair,
                                    write=args.write, command="python -m ablation_core.toy " + " ".join(argv))
        print(json.dumps(following, indent=1))
        return 0
    recipe = type(defaults)(**{f: getattr(args, f) for f in vars(defaults)})
    command = "python -m ablation_core.toy " + " ".join(argv)
    if args.arch == "flux":
        from ..resources import TOY_FLUX_WEIGHTS_DIR
        from .train_flux import train_toy_flux

        info = train_toy_flux(recipe, args.out or TOY_FLUX_WEIGHTS_DIR, command=command)
        print(json.dumps({k: info[k] for k in ("prompt_following_base_cfg", "prompt_following", "training_seconds")},
                         indent=1))
        return 0
    info = train_toy_world(recipe, args.out or WEIGHTS_DIR, command=command)
    print(json.dumps({k: info[k] for k in ("classifier_held_out_accuracy", "prompt_following", "training_seconds")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
