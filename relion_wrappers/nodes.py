"""RELION_OUTPUT_NODES.star: the output nodes an External job registers in the pipeline.

RELION 3.1 identifies node types by integers (``_rlnPipeLineNodeType``), RELION
4.0 and 5.0 by labels (``_rlnPipeLineNodeTypeLabel``). The file written here
carries both columns; a RELION reads the one it knows. Measured with RELION
3.1.3: relion_pipeliner registers the nodes by their integer type and only
prints "WARNING: will ignore (but maintain) values for the unknown label:
rlnPipeLineNodeTypeLabel"; the job ends as succeeded.

The label set follows the project's ``default_pipeline.star``: integer types
(3.1) and ``# version 30001`` with labels (4.0) use the 4.0 labels, ``# version
50001`` (5.0) renamed the particle type to ``ParticleGroupMetadata.star.relion``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from cryospin_relion.io.atomic import atomic_path

__all__ = ["NODE_TYPES", "pipeline_version", "node_rows", "write_output_nodes", "read_output_nodes",
           "OUTPUT_NODES"]

OUTPUT_NODES = "RELION_OUTPUT_NODES.star"

# kind -> (RELION 3.1 integer, 4.0 label, 5.0 label)
NODE_TYPES: dict[str, tuple[int, str, str]] = {
    "particles": (3, "ParticlesData.star.relion", "ParticleGroupMetadata.star.relion"),
    "map": (6, "DensityMap.mrc", "DensityMap.mrc"),
    "halfmap": (10, "DensityMap.mrc.halfmap", "DensityMap.mrc.halfmap"),
    "logfile": (13, "LogFile.pdf", "LogFile.pdf"),
}


def pipeline_version(project_dir: str | os.PathLike = ".", pipeline: str = "default") -> str:
    """'3.1', '4.0' or '5.0' from ``<project_dir>/<pipeline>_pipeline.star``.

    '5.0' when the file says ``# version 50001`` (or higher); '4.0' when it uses
    type labels (``_rlnPipeLineProcessTypeLabel`` / ``_rlnPipeLineNodeTypeLabel``
    / ``_rlnPipeLineProcessStatusLabel``); '3.1' otherwise, also when the file is
    missing or unreadable (both columns are written in every case, so the guess
    only decides the particle label).
    """
    path = Path(project_dir) / f"{pipeline}_pipeline.star"
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "3.1"
    versions = [int(v) for v in re.findall(r"^#\s*version\s+(\d+)", text, flags=re.M)]
    if versions and max(versions) >= 50000:
        return "5.0"
    if re.search(r"^_rlnPipeLine(Process|Node)TypeLabel\b|^_rlnPipeLineProcessStatusLabel\b", text, flags=re.M):
        return "4.0"
    return "3.1"


def node_rows(nodes: Iterable[tuple[str, str]], version: str) -> list[tuple[str, int, str]]:
    """[(name, integer type, label)] for (project-relative path, kind) pairs."""
    rows = []
    for name, kind in nodes:
        if kind not in NODE_TYPES:
            raise ValueError(f"unknown node kind '{kind}' (known: {', '.join(NODE_TYPES)})")
        if not name or any(c.isspace() for c in name) or name.startswith("/"):
            raise ValueError(f"node name '{name}' must be a project-relative path without spaces")
        itype, l40, l50 = NODE_TYPES[kind]
        rows.append((name, itype, l50 if version == "5.0" else l40))
    return rows


def write_output_nodes(outdir: str | os.PathLike, nodes: Iterable[tuple[str, str]], version: str) -> Path:
    """Write ``<outdir>/RELION_OUTPUT_NODES.star`` atomically; returns its path.

    ``nodes``: (project-relative path, kind) with kind in NODE_TYPES.
    """
    rows = node_rows(nodes, version)
    star_version = "50001" if version == "5.0" else "30001"
    w = max([len(r[0]) for r in rows] + [10])
    lines = [
        "", f"# version {star_version}", "", "data_output_nodes", "", "loop_ ",
        "_rlnPipeLineNodeName #1 ", "_rlnPipeLineNodeType #2 ", "_rlnPipeLineNodeTypeLabel #3 ",
    ]
    lines += [f"{name:<{w}} {itype:>3d} {label} " for name, itype, label in rows]
    lines += [" ", ""]
    path = Path(outdir) / OUTPUT_NODES
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def read_output_nodes(path: str | os.PathLike) -> list[tuple[str, int, str]]:
    """Rows (name, integer type, label) of a file written by :func:`write_output_nodes`."""
    rows, cols, in_loop = [], [], False
    for line in Path(path).read_text().splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("loop_"):
            in_loop, cols = True, []
        elif in_loop and s.startswith("_"):
            cols.append(s.split()[0][1:])
        elif in_loop and cols:
            vals = dict(zip(cols, s.split()))
            rows.append((vals.get("rlnPipeLineNodeName", ""), int(vals.get("rlnPipeLineNodeType", -1)),
                         vals.get("rlnPipeLineNodeTypeLabel", "")))
    return rows
