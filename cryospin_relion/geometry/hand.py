"""The hand flip: a map's mirror image along z, and the poses that project it the same way.

Convention: maps are (..., z, y, x) with the centre voxel N // 2; poses are
RELION's A (volume -> image coordinates, docs/conventions.md). The mirror is
M = diag(1, 1, -1) about the centre. Projections of ``flip_volume_hand(V)`` at
``flip_poses_hand(A)`` = M A M equal those of V at A, with unchanged origins
(checked by projecting in tests/test_flip_hand.py). Both work on numpy arrays
and on tensors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["MIRROR", "flip_volume_hand", "flip_poses_hand"]

MIRROR = np.diag([1.0, 1.0, -1.0])


def flip_volume_hand(vol):
    """Mirror a map along z about its centre voxel N // 2 (RELION / cryoSPARC "flip hand").

    Index i -> (2 (N // 2) - i) mod N along z, which is (N - i) mod N for even N
    (index 0, the unpaired edge plane, maps to itself) and N - 1 - i for odd N;
    the centre plane N // 2 stays in place. Numpy arrays or tensors (..., z, y, x).
    """
    n = vol.shape[-3]
    idx = (2 * (n // 2) - np.arange(n)) % n
    if isinstance(vol, Tensor):
        return vol.index_select(-3, torch.as_tensor(idx, device=vol.device))
    return np.ascontiguousarray(np.take(vol, idx, axis=-3))


def flip_poses_hand(rotations):
    """Poses of the hand-flipped map: A -> M A M, M = diag(1, 1, -1) (origins unchanged).

    In RELION Euler angles this is (rot, tilt, psi) -> (rot + 180, tilt, psi + 180).
    Numpy arrays (computed in float64) or tensors (their dtype), (..., 3, 3).
    """
    if isinstance(rotations, Tensor):
        m = torch.as_tensor(MIRROR, dtype=rotations.dtype, device=rotations.device)
        return m @ rotations @ m
    a = np.asarray(rotations, dtype=np.float64)
    return MIRROR @ a @ MIRROR
