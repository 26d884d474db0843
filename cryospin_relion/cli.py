"""The ``cryospin`` entry point: one subcommand per module in ``commands/``.

Exit codes: 0 success, 2 bad input (one line per problem, no traceback),
1 internal failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cryospin_relion import __version__
from cryospin_relion.errors import InputError

# name -> module under cryospin_relion.commands; each has add_args(parser) and main(args)
COMMANDS = {
    "abinit": "abinit",
    "reconstruct": "reconstruct",
    "project": "project",
    "convert": "convert",
    "info": "info",
    "simulate": "simulate",
    "compare": "compare",
    "demo": "demo",
    "flip-hand": "flip_hand",
}


def _available(only: str | None = None) -> dict[str, object]:
    """Import the command modules (only ``only`` when given: torch-heavy imports cost seconds)."""
    mods = {}
    for name, modname in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mods[name] = importlib.import_module(f"cryospin_relion.commands.{modname}")
        except ModuleNotFoundError as e:  # a command not built yet
            if e.name != f"cryospin_relion.commands.{modname}":
                raise
    return mods


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryospin",
        description="cryoSPIN ab-initio cryo-EM reconstruction for RELION and cryoSPARC data.",
    )
    parser.add_argument("--version", action="version", version=f"cryospin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, mod in _available(only).items():
        doc = (mod.__doc__ or "").strip().splitlines()
        p = sub.add_parser(name, help=doc[0] if doc else None, description=(mod.__doc__ or "").strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(func=mod.main)
    return parser


def run(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # the first word names the command: import just that one (the full list is for --help)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except InputError as e:
        for line in str(e).splitlines():
            print(f"cryospin {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryospin {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
