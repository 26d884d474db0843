"""The package's floors (docs/architecture.md): a module imports only from its own floor or the ones below.

The floors are read from the table in docs/architecture.md, so the document and this check are one copy.
Every ``from cryospin_relion... import`` in the package (also the ones inside functions) is checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cryospin_relion"


def floors() -> dict[str, int]:
    """{top-level module or folder of the package: floor} from the architecture table."""
    out = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if m:
            for name in re.findall(r"`([^`]+)`", m.group(2)):
                out[name.rstrip("/").removesuffix(".py")] = int(m.group(1))
    return out


def _floor_of(module: str, table: dict[str, int]) -> int | None:
    parts = module.split(".")
    if parts[0] != "cryospin_relion" or len(parts) < 2 or parts[1] == "__init__":
        return None
    return table.get(parts[1], -1)


def test_every_module_has_a_floor_and_imports_only_downwards():
    table = floors()
    assert table.get("geometry") and table.get("engine"), table
    problems = []
    for f in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        mine = _floor_of(module, table)
        if mine == -1:
            problems.append(f"{module}: not in the floor table of docs/architecture.md")
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cryospin_relion."):
                theirs = _floor_of(node.module, table)
                if mine is not None and theirs is not None and theirs > mine:
                    problems.append(f"{module} (floor {mine}) imports {node.module} (floor {theirs}), "
                                    f"line {node.lineno}")
    assert not problems, "\n".join(problems)
