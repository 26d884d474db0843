"""fsc.txt: a Fourier shell correlation curve as a text table.

Format: a header line '# shell resolution_A FSC', then one line per shell
``s resolution FSC`` (shell 0 = DC, resolution 'inf'; resolution = box * apix / s
in A, 4 decimals; FSC 6 decimals). Written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cryospin_relion.geometry.fsc import shell_resolution
from cryospin_relion.io.atomic import atomic_path

__all__ = ["write_fsc"]


def write_fsc(path: str | Path, curve: np.ndarray, box: int, apix: float) -> None:
    """Write the (box // 2 + 1,) FSC ``curve`` of maps of ``box`` voxels of ``apix`` A to ``path``."""
    res = shell_resolution(box, apix)
    lines = ["# shell resolution_A FSC"]
    for s, (r, c) in enumerate(zip(res, curve)):
        lines.append(f"{s:d} {'inf' if not np.isfinite(r) else f'{r:.4f}'} {float(c):.6f}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
