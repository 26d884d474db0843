"""``abinit --sym``: the C1 result brought into RELION's frame of a point group, for the final maps.

The engine always works in C1. At the end of the run (``outputs.write_final_outputs``)
the halves are first backprojected in C1; ``to_symmetry_frame`` finds the
rotation that puts that C1 map into the group's frame (evaluate/symmetry_align.py,
as relion_align_symmetry does; scored only up to the shell where the C1 half-map
FSC falls under 0.143), rotates the final poses and the decoder map with it (so
particles.star / .cs are in that frame and RELION can continue with --sym) and
returns the operators with which the half maps are backprojected again
(halfmaps.py: every image at every A @ S).

The symmetry score (mean correlation of the aligned C1 map with its copies under
the operators, whitened) is logged and goes in the summary; under
``SCORE_WARN_BELOW`` the map is not symmetric under the group and a warning says
so (the maps are still made with the symmetry, as asked). The C1 reconstruction
scores better than the decoder map and the FSC band matters (bench/symmetry.py,
D7 data, a short run at 14.5 A, box 32: C1 map 0.46 with the band / 0.29 without;
decoder map 0.32 / 0.20; the same run on asymmetric data: 0.09 and 0.13).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from cryospin_relion.evaluate.symmetry_align import SymmetryAlignment, align_symmetry, apply_alignment, rotate_poses
from cryospin_relion.geometry.rotations import rotation_angle_deg
from cryospin_relion.geometry.symmetry import parse_symmetry, symmetry_operators

# symmetry score under which the map is called not symmetric under the group. Measured
# (bench/symmetry.py, tests/test_symmetry.py): asymmetric maps 0.0-0.13 under C4, D7, T, O and I
# (after the search); symmetric ones 0.8-1.0 when clean, 0.46-0.73 from noisy C1 reconstructions.
SCORE_WARN_BELOW = 0.25


@dataclass(frozen=True)
class SymmetryFrame:
    """The poses and the decoder map in the frame of ``sym``, and what was measured."""

    sym: str
    operators: np.ndarray  # (G, 3, 3)
    rotations: np.ndarray  # (N, 3, 3) RELION A in the frame
    shifts_A: np.ndarray  # (N, 2) RELION origins in A in the frame
    decoder: np.ndarray  # (n, n, n) decoder map in the frame
    alignment: SymmetryAlignment

    @property
    def score(self) -> float:
        return self.alignment.score

    def summary(self) -> dict:
        """Entries for the run's JSON summary."""
        return {"symmetry": self.sym, "symmetry_score": round(float(self.score), 4),
                "symmetry_rotation": np.round(self.alignment.rotation, 6).tolist(),
                "symmetry_shift_px": np.round(self.alignment.shift_px, 4).tolist()}

    def warning(self) -> str | None:
        if self.score >= SCORE_WARN_BELOW:
            return None
        return (f"--sym {self.sym}: the C1 map is not {self.sym}-symmetric (symmetry score {self.score:.2f}, "
                f"under {SCORE_WARN_BELOW}; symmetric maps score about 0.45 or more): the symmetrised maps average "
                f"mismatched copies; check the point group, or run with --sym C1")


def fsc_shell(curve: np.ndarray, level: float = 0.143) -> float:
    """The last shell before the FSC first falls under ``level`` (at least 3; the last shell if it never does)."""
    below = np.nonzero(np.asarray(curve)[1:] < level)[0]
    return float(max(3, below[0]) if len(below) else len(curve) - 1)


def to_symmetry_frame(sym: str, rotations: np.ndarray, shifts_A: np.ndarray, c1_map: np.ndarray, c1_fsc: np.ndarray,
                      decoder: np.ndarray, apix: float, log: logging.Logger) -> SymmetryFrame | None:
    """Align ``c1_map`` (voxel size ``apix``) to the frame of ``sym``; move the poses and ``decoder`` with it.

    Args:
        rotations: (N, 3, 3) final RELION A; shifts_A: (N, 2) final origins in A.
        c1_map: (n, n, n) C1 reconstruction with those poses; c1_fsc: (n // 2 + 1,) its half-map FSC.
        decoder: (n, n, n) the learned map, on the same grid.
    Returns:
        None for C1 (nothing changes), else the SymmetryFrame.
    """
    name = parse_symmetry(sym)
    if name == "C1":
        return None
    ops = symmetry_operators(name)
    shell = fsc_shell(c1_fsc)
    log.info(f"symmetry {name} ({len(ops)} operators): searching the rotation of the C1 map into RELION's {name} "
             f"frame (scored to Fourier shell {shell:.0f}, the C1 half-map FSC 0.143)")
    al = align_symmetry(c1_map, name, max_shell=shell)
    R, o = rotate_poses(rotations, shifts_A, al, apix)
    frame = SymmetryFrame(name, ops, R, o, apply_alignment(decoder, al), al)
    angle = float(rotation_angle_deg(torch.as_tensor(al.rotation)))
    log.info(f"symmetry {name}: score {al.score:.3f} (1 = symmetric; {SCORE_WARN_BELOW} warns), rotation "
             f"{angle:.1f} deg, centre of mass moved by {np.linalg.norm(al.centre_px):.2f} px")
    return frame
