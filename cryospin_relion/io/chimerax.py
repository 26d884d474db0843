"""A ChimeraX command script (``.cxc``) that opens maps at given contour levels, written atomically.

ChimeraX runs a command script with its current folder set to the script's folder, so the maps are
named relative to it: ``chimerax open_in_chimerax.cxc`` (or ``open /path/open_in_chimerax.cxc`` in
ChimeraX) works wherever the run folder is moved. The maps are opened as models #1, #2, ... (run it in
a fresh session). For each map the script sets

- ``voxelSize``: the voxel size in the map's header (A), so ChimeraX shows the right scale whatever
  the header's cell says;
- ``originIndex n//2,n//2,n//2``: the maps we write (io/mrc.py) have their header origin at 0, as
  RELION writes them, and RELION's particle centre is voxel n // 2; this puts that voxel at
  (0, 0, 0) A, so the map turns about its centre and maps of different boxes overlay;
- ``level``: the contour level computed by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryospin_relion.io.atomic import write_text


@dataclass(frozen=True)
class ScriptMap:
    """One map of the script: its file name (relative to the script), contour level, voxel size (A),
    box (voxels along each axis), whether it is shown, and a one-line note (the level's rule)."""

    name: str
    level: float
    voxel_size: float
    box: int
    show: bool = True
    note: str = ""


def chimerax_script(maps: list[ScriptMap], header: list[str] = ()) -> str:
    """The text of the script: ``header`` as comment lines, then per map ``open`` and ``volume``."""
    lines = [f"# {h}" if h else "#" for h in header]
    for i, m in enumerate(maps, start=1):
        if any(c.isspace() or c in "\"'#;" for c in m.name):
            raise ValueError(f"{m.name!r}: map names in the script must be plain file names")
        c = m.box // 2
        if m.note:
            lines.append(f"# #{i} {m.name}: level {m.note}")
        lines.append(f"open {m.name} id {i}")
        lines.append(f"volume #{i} level {m.level:.6g} voxelSize {m.voxel_size:.6g} originIndex {c},{c},{c} "
                     f"style surface {'show' if m.show else 'hide'}")
    lines.append("view")
    return "\n".join(lines) + "\n"


def write_chimerax_script(path: str | os.PathLike, maps: list[ScriptMap], header: list[str] = ()) -> None:
    """Write ``chimerax_script(maps, header)`` to ``path`` atomically."""
    write_text(path, chimerax_script(maps, header))
