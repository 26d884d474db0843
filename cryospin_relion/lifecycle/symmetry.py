"""``abinit --sym``: the C1 result brought into RELION's frame of a point group, for the final maps.

With ``--sym-mode align`` (the default) the engine works in C1. At the end of the run (``outputs.write_final_outputs``)
the halves are first backprojected in C1; ``to_symmetry_frame`` finds the
rotation that puts that C1 map into the group's frame (evaluate/symmetry_align.py,
as relion_align_symmetry does; scored only up to the shell where the C1 half-map
FSC falls under 0.143), rotates the final poses and the decoder map with it (so
particles.star / .cs are in that frame and RELION can continue with --sym) and
returns the operators with which the half maps are backprojected again
(halfmaps.py: every image at every A @ S, by resampling the Fourier sums once per operator).

``--sym-mode impose`` (``volume_constraint``, ``imposed_frame``) instead keeps the engine's
volume symmetric in RELION's frame from the first step (model/volume.py ``SymmetricUpdates``:
after every optimiser step, stage 1 and 2, the change of the Hartley grid is replaced by its
average over the operators; +74 ms per step at box 32 for D7), so nothing is searched at the
end. It is not the default: measured (bench/symmetry.py, 1,500 D7 particles, box 32, SNR 0.5,
default schedule) align reaches 10.43 A at FSC 0.5 against the truth (1.13x the known-pose
symmetric reconstruction, 9.26 A; 10.39 A in RELION's frame without alignment), final loss
0.7855, uniform views (efficiency 1.00); impose ends in a worse minimum, 44.95 A and 27.86 A
(seeds 0 and 1), loss 0.7957 / 0.7950, the views collapsed towards the 7-fold axis (efficiency
0.00), and 1.3x the training time. From the true poses the constraint does what it should
(stage 2 alone: decoder 10.27 A in RELION's frame against 12.34 A in C1): the ab-initio search
in a symmetric volume is what fails. Its only check (the C1 backprojection with the final
poses, scored in the run's frame) cannot tell asymmetric data: 0.70 on D7 data, 0.76 on
asymmetric data.

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

from cryospin_relion.evaluate.symmetry_align import (SymmetryAlignment, align_symmetry, apply_alignment,
                                                      operator_spread, rotate_poses, symmetry_score)
from cryospin_relion.geometry.rotations import rotation_angle_deg
from cryospin_relion.geometry.symmetry import parse_symmetry, symmetry_operators
from cryospin_relion.model.volume import SymmetricUpdates

# symmetry score under which the map is called not symmetric under the group. Measured
# (bench/symmetry.py, tests/test_symmetry.py): asymmetric maps 0.0-0.13 under C4, D7, T, O and I
# (after the search); symmetric ones 0.8-1.0 when clean, 0.46-0.73 from noisy C1 reconstructions.
SCORE_WARN_BELOW = 0.25
# worst operator's correlation over the best one's (SymmetryAlignment.spread) under which the group is called
# partly wrong. Measured (after the axis search, scored to 0.7 Nyquist): the right group 0.70 (a noisy C1
# ab-initio map of D7 data, 14 A), 0.90 (I), 0.99 (D7, clean); a wrong one 0.09 (I asked of an O map),
# 0.16 (D14 of D7), 0.31 (C4 of D7; its mean score 0.43 passes SCORE_WARN_BELOW), 0.48 (O of a T map).
SPREAD_WARN_BELOW = 0.6


@dataclass(frozen=True)
class SymmetryFrame:
    """The poses and the decoder map in the frame of ``sym``, and what was measured."""

    sym: str
    operators: np.ndarray  # (G, 3, 3)
    rotations: np.ndarray  # (N, 3, 3) RELION A in the frame
    shifts_A: np.ndarray  # (N, 2) RELION origins in A in the frame
    decoder: np.ndarray  # (n, n, n) decoder map in the frame
    alignment: SymmetryAlignment  # impose: the identity, scored on the C1 map with no search
    mode: str = "align"  # --sym-mode

    @property
    def score(self) -> float:
        return self.alignment.score

    def summary(self) -> dict:
        """Entries for the run's JSON summary."""
        return {"symmetry": self.sym, "symmetry_mode": self.mode, "symmetry_score": round(float(self.score), 4),
                "symmetry_operator_spread": round(float(self.alignment.spread), 4),
                "symmetry_rotation": np.round(self.alignment.rotation, 6).tolist(),
                "symmetry_shift_px": np.round(self.alignment.shift_px, 4).tolist()}

    def warning(self) -> str | None:
        if self.score >= SCORE_WARN_BELOW:
            if self.alignment.spread >= SPREAD_WARN_BELOW:
                return None
            return (f"--sym {self.sym}: some operators of {self.sym} fit the C1 map and others do not (worst "
                    f"operator's correlation {self.alignment.spread:.2f} of the best one's, under "
                    f"{SPREAD_WARN_BELOW}): the particle may have another point group (e.g. a subgroup or a "
                    f"different n); check it, or run with --sym C1")
        if self.mode == "impose":
            return (f"--sym {self.sym}: the C1 backprojection with the final poses is not {self.sym}-symmetric in "
                    f"RELION's frame (symmetry score {self.score:.2f}, under {SCORE_WARN_BELOW}; symmetric data "
                    f"score about 0.45 or more): the map was kept {self.sym}-symmetric but the images do not "
                    f"agree; check the point group, or run with --sym C1")
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
    log.info(f"symmetry {name}: score {al.score:.3f} (1 = symmetric; {SCORE_WARN_BELOW} warns), worst/best "
             f"operator {al.spread:.2f} ({SPREAD_WARN_BELOW} warns), rotation "
             f"{angle:.1f} deg, centre of mass moved by {np.linalg.norm(al.centre_px):.2f} px")
    return frame


def volume_constraint(sym: str, mode: str) -> SymmetricUpdates | None:
    """The engine's volume constraint for ``--sym-mode impose`` (the volume kept ``sym``-symmetric in
    RELION's frame from the first step); None for C1 or ``align`` (the engine works in C1)."""
    name = parse_symmetry(sym)
    if name == "C1" or mode != "impose":
        return None
    return SymmetricUpdates(torch.as_tensor(symmetry_operators(name), dtype=torch.float32))


def imposed_frame(sym: str, rotations: np.ndarray, shifts_A: np.ndarray, c1_map: np.ndarray, c1_fsc: np.ndarray,
                  decoder: np.ndarray, log: logging.Logger) -> SymmetryFrame | None:
    """``--sym-mode impose``: poses and maps are already in RELION's frame of ``sym``; nothing moves.

    The decoder map is symmetric by construction, so its score says nothing; the check is the C1
    backprojection with the final poses (``c1_map``, its half-map FSC ``c1_fsc``), scored in the run's
    frame with no search (``symmetry_score``, up to the C1 FSC 0.143 shell). Measured, it is a weak check:
    the poses were fitted to a symmetric map, and asymmetric data score as high (0.76) as D7 data (0.70).
    Returns:
        None for C1, else the SymmetryFrame (identity alignment, that score).
    """
    name = parse_symmetry(sym)
    if name == "C1":
        return None
    shell = fsc_shell(c1_fsc)
    score = symmetry_score(c1_map, name, max_shell=shell)
    al = SymmetryAlignment(name, np.eye(3), np.zeros(3), np.zeros(3), score, score,
                           operator_spread(c1_map, name, max_shell=shell))
    log.info(f"symmetry {name} (imposed during the run): the C1 backprojection with the final poses scores "
             f"{score:.3f} in RELION's frame, no search (1 = symmetric; {SCORE_WARN_BELOW} warns; scored to Fourier "
             f"shell {shell:.0f}, the C1 half-map FSC 0.143). The poses were fitted to a symmetric map, so this "
             f"hardly tells asymmetric data (bench/symmetry.py: 0.70 on D7 data, 0.76 on asymmetric data); "
             f"--sym-mode align checks on a C1 run")
    return SymmetryFrame(name, symmetry_operators(name), np.asarray(rotations), np.asarray(shifts_A),
                         np.asarray(decoder), al, mode="impose")
