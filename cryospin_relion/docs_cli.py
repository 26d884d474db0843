"""Render docs/cli.md from the argument parsers, so the reference never drifts.

    python -m cryospin_relion.docs_cli > docs/cli.md

tests/test_docs_cli.py fails when docs/cli.md is out of date.
"""

from __future__ import annotations

import argparse
import importlib
import os

from cryospin_relion.cli import build_parser

# other console scripts installed by setup.cfg with an argparse parser: (name, module with build_parser()).
# cryospin_relion_external is not here: RELION builds its command line, and its --help is its docstring.
EXTRA_SCRIPTS = [
    ("cryospin-cryosparc", "cs_tools.external_job"),
]


def _help(parser: argparse.ArgumentParser) -> str:
    return parser.format_help().rstrip()


def render() -> str:
    """The whole reference as markdown, at a fixed width of 100 columns."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fix it
    try:
        return _render()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _render() -> str:
    parser = build_parser()
    out = [
        "# Command reference",
        "",
        "Generated from the argument parsers by `python -m cryospin_relion.docs_cli > docs/cli.md`;",
        "do not edit by hand. Exit codes everywhere: 0 success, 2 bad input (one line per problem,",
        "naming the file and the field), 1 internal failure, 130 interrupted.",
        "",
        "## cryospin",
        "",
        "```",
        _help(parser),
        "```",
    ]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        out += ["", f"## cryospin {name}", "", "```", _help(p), "```"]
    for script, modname in EXTRA_SCRIPTS:
        p = importlib.import_module(modname).build_parser()
        p.prog = script
        out += ["", f"## {script}", "", "```", _help(p), "```"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
