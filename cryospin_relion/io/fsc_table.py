"""fsc.txt: a Fourier shell correlation curve as a text table.

Format (read back by ``read_fsc``): a header line '# shell resolution_A FSC', then one line per shell
``s resolution FSC`` (shell 0 = DC, resolution 'inf'; resolution = box * apix / s
in A, 4 decimals; FSC 6 decimals). Written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryospin_relion.geometry.fsc import shell_resolution
from cryospin_relion.io.atomic import write_text

__all__ = ["write_fsc", "read_fsc"]


def write_fsc(path: str | Path, curve: np.ndarray, box: int, apix: float) -> None:
    """Write the (box // 2 + 1,) FSC ``curve`` of maps of ``box`` voxels of ``apix`` A to ``path``."""
    res = shell_resolution(box, apix)
    lines = ["# shell resolution_A FSC"]
    for s, (r, c) in enumerate(zip(res, curve)):
        lines.append(f"{s:d} {'inf' if not np.isfinite(r) else f'{r:.4f}'} {float(c):.6f}")
    write_text(path, "\n".join(lines) + "\n")


def read_fsc(path: str | Path) -> tuple[np.ndarray, int, float]:
    """Read ``path`` written by :func:`write_fsc`: (curve (box // 2 + 1,), box, apix).

    Raises ValueError when the file is not such a table."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ValueError(f"expected 'shell resolution_A FSC', got {line!r}")
        rows.append((int(parts[0]), float(parts[1]), float(parts[2])))
    if len(rows) < 2 or [r[0] for r in rows] != list(range(len(rows))):
        raise ValueError("expected shells 0, 1, 2, ... (at least two)")
    box = 2 * (len(rows) - 1)
    apix = rows[1][1] / box  # resolution of shell 1 = box * apix
    if not (np.isfinite(apix) and apix > 0):
        raise ValueError(f"bad resolution of shell 1: {rows[1][1]}")
    return np.array([r[2] for r in rows], dtype=np.float64), box, float(apix)
