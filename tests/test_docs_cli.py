"""docs/cli.md must match the parsers (regenerate with python -m cryospin_relion.docs_cli)."""

from pathlib import Path

from cryospin_relion.docs_cli import render

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    doc = (ROOT / "docs" / "cli.md").read_text()
    assert doc == render(), "docs/cli.md is stale: run `python -m cryospin_relion.docs_cli > docs/cli.md`"


def test_every_command_is_documented():
    doc = (ROOT / "docs" / "cli.md").read_text()
    for name in ("abinit", "reconstruct", "project", "convert", "info", "simulate", "compare", "demo", "flip-hand",
                 "report", "select"):
        assert f"## cryospin {name}" in doc
