"""The ``cryospin`` entry point: one subcommand per module in ``commands/``.

Command ``NAME`` is the module ``cryospin_relion.commands.<NAME with '-' -> '_'>``,
with ``add_args(parser)`` and ``main(args)``; its docstring is the help text.

Exit codes: 0 success, 2 bad input (one line per problem, no traceback),
1 internal failure, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from cryospin_relion import CITATION, __version__
from cryospin_relion.errors import InputError

# the commands, in the order ``cryospin --help`` lists them
COMMANDS = ("abinit", "reconstruct", "project", "convert", "info", "simulate", "compare", "demo", "flip-hand",
            "report", "select")


def command_argv(name: str, ranks: int = 1) -> list[str]:
    """argv that runs ``cryospin NAME`` in a fresh Python with this interpreter (no PATH lookup); with
    ``ranks`` > 1, as that many data-parallel processes on this machine under torchrun (one per GPU when
    there are GPUs: engine/distributed.py)."""
    if ranks > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                "-m", "cryospin_relion.cli", name]
    return [sys.executable, "-m", "cryospin_relion.cli", name]


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"cryospin_relion.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``cryospin`` parser with every command, or only ``only`` (the command modules are
    imported here, and the torch-heavy ones cost seconds: ``run`` imports just the one it runs)."""
    parser = argparse.ArgumentParser(
        prog="cryospin",
        description="cryoSPIN ab-initio cryo-EM reconstruction for RELION and cryoSPARC data.",
        epilog=f"cryospin {__version__}. Please cite: {CITATION}",
    )
    parser.add_argument("--version", action="version", version=f"cryospin {__version__}; please cite: {CITATION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS if only is None else (only,):
        mod = _module(name)
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
