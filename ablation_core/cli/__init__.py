"""``python -m ablation_core``: the command line. Errors are one line and exit code 2; an interrupt writes nothing."""

from __future__ import annotations

import logging
import sys

from ..errors import AblationError, printable


def main(argv: list[str] | None = None) -> int:
    from .commands import COMMANDS
    from .parser import build_parser

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except AblationError as err:
        print(f"error: {printable(str(err))}", file=sys.stderr)  # one line, even for a path with a newline
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


__all__ = ["main"]
