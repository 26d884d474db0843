"""Rotations in RELION's convention, as pure torch functions.

Convention (docs/conventions.md): a pose is RELION's matrix ``A`` built from
Euler angles (rot, tilt, psi) in degrees, ZYZ. ``A`` maps volume coordinates to
image coordinates: a volume point r lands at image pixel (A r)[x, y] (x is the
MRC fast axis). It equals
``scipy.spatial.transform.Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T``.

cryoSPARC's ``alignments3D/pose`` is the rotation vector (radians) of ``A.T``.

All functions take tensors with arbitrary leading batch dimensions ``(..., )``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def euler_to_matrix(angles_deg: Tensor) -> Tensor:
    """RELION's A from Euler angles.

    Args:
        angles_deg: (..., 3) (rot, tilt, psi) in degrees.
    Returns:
        (..., 3, 3) rotation matrices A (volume -> image coordinates).
    """
    a = torch.deg2rad(angles_deg)
    ca, cb, cg = torch.cos(a[..., 0]), torch.cos(a[..., 1]), torch.cos(a[..., 2])
    sa, sb, sg = torch.sin(a[..., 0]), torch.sin(a[..., 1]), torch.sin(a[..., 2])
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    rows = [
        torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
        torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
        torch.stack([sc, ss, cb], -1),
    ]
    return torch.stack(rows, -2)


def matrix_to_euler(A: Tensor) -> Tensor:
    """Euler angles (rot, tilt, psi) in degrees from RELION's A (inverse of euler_to_matrix).

    tilt is in [0, 180]; rot and psi in (-180, 180]. At the gimbal lock (tilt 0
    or 180) rot is set to 0 and psi carries the in-plane angle.

    Args:
        A: (..., 3, 3)
    Returns:
        (..., 3) degrees.
    """
    cb = A[..., 2, 2].clamp(-1.0, 1.0)
    sb = torch.sqrt(A[..., 2, 0] ** 2 + A[..., 2, 1] ** 2)
    tilt = torch.atan2(sb, cb)
    lock = sb < 1e-6
    # generic case: A[2,0]=sb*ca, A[2,1]=sb*sa, A[0,2]=-cg*sb, A[1,2]=sg*sb
    rot = torch.atan2(A[..., 2, 1], A[..., 2, 0])
    psi = torch.atan2(A[..., 1, 2], -A[..., 0, 2])
    # gimbal lock: rot=0; A[0,0]=cg*cb, A[1,0]=-sg*cb ; use A[0,1]=sg (cb=+-1 -> cs=0)
    psi_lock = torch.atan2(A[..., 0, 1], A[..., 1, 1])
    rot = torch.where(lock, torch.zeros_like(rot), rot)
    psi = torch.where(lock, psi_lock, psi)
    return torch.rad2deg(torch.stack([rot, tilt, psi], -1))


def _skew(v: Tensor) -> Tensor:
    z = torch.zeros_like(v[..., 0])
    return torch.stack(
        [
            torch.stack([z, -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], z, -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], z], -1),
        ],
        -2,
    )


def so3_exp(rotvec: Tensor) -> Tensor:
    """Rotation matrix from a rotation vector (axis * angle in radians), Rodrigues.

    Differentiable everywhere, including at 0 (Taylor terms near the identity).

    Args:
        rotvec: (..., 3)
    Returns:
        (..., 3, 3) active rotation matrices R with R v = rotate v about the axis.
    """
    theta2 = (rotvec**2).sum(-1, keepdim=True)[..., None]  # (...,1,1)
    theta = torch.sqrt(theta2.clamp_min(1e-30))
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-30))
    K = _skew(rotvec)
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def so3_log(R: Tensor) -> Tensor:
    """Rotation vector (radians) of a rotation matrix (inverse of so3_exp).

    Stable near 0 and near pi (axis from the symmetric part).

    Args:
        R: (..., 3, 3)
    Returns:
        (..., 3)
    """
    tr = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    w = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    # atan2 keeps theta accurate at both ends, unlike acos
    theta = torch.atan2(w.norm(dim=-1) / 2.0, (tr - 1.0) / 2.0)
    small = theta < 1e-4
    factor = torch.where(small, 0.5 + theta**2 / 12.0, theta / (2.0 * torch.sin(theta).clamp_min(1e-12)))
    v = w * factor[..., None]
    # near pi w ~ 0: the symmetric part (R + R^T)/2 - cos(theta) I = (1 - cos(theta)) n n^T gives the axis
    near_pi = theta > math.pi - 1e-2
    if bool(near_pi.any()):
        eye = torch.eye(3, dtype=R.dtype, device=R.device)
        S = (R + R.transpose(-1, -2)) / 2.0 - torch.cos(theta)[..., None, None] * eye
        diag = torch.stack([S[..., 0, 0], S[..., 1, 1], S[..., 2, 2]], -1)
        k = diag.argmax(-1)
        col = torch.gather(S, -1, k[..., None, None].expand(*S.shape[:-1], 1))[..., 0]
        n = col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sgn = torch.sign((n * w).sum(-1, keepdim=True))
        sgn = torch.where(sgn == 0, torch.ones_like(sgn), sgn)
        v = torch.where(near_pi[..., None], n * sgn * theta[..., None], v)
    return v


def sixd_to_matrix(d6: Tensor) -> Tensor:
    """Gram-Schmidt of the 6D representation (Zhou et al. 2019) to a rotation matrix.

    Args:
        d6: (..., 6): two 3-vectors a1, a2 (the first two rows of the result).
    Returns:
        (..., 3, 3) with rows b1, b2, b3 = b1 x b2.
    """
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = torch.nn.functional.normalize(a1, dim=-1)
    b2 = torch.nn.functional.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], -2)


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> Tensor:
    """Uniformly random rotations on SO(3) (normalised Gaussian quaternions).

    Returns:
        (n, 3, 3)
    """
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    return quaternion_to_matrix(q)


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """(..., 4) unit quaternions (w, x, y, z) -> (..., 3, 3) active rotation matrices."""
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def geodesic_distance_deg(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle in degrees of R1^T R2, (..., 3, 3) x (..., 3, 3) -> (...)."""
    M = R1.transpose(-1, -2) @ R2
    tr = M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2]
    return torch.rad2deg(torch.acos(((tr - 1.0) / 2.0).clamp(-1.0, 1.0)))


def view_directions(A: Tensor) -> Tensor:
    """Unit viewing direction in volume coordinates: the volume axis that A maps to image z.

    (..., 3, 3) -> (..., 3): the third row of A.
    """
    return A[..., 2, :]


# -- numpy conveniences for the I/O edges ------------------------------------------


def euler_to_matrix_np(angles_deg: np.ndarray) -> np.ndarray:
    """numpy wrapper of euler_to_matrix, float64."""
    return euler_to_matrix(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64))).numpy()


def matrix_to_euler_np(A: np.ndarray) -> np.ndarray:
    """numpy wrapper of matrix_to_euler, float64."""
    return matrix_to_euler(torch.as_tensor(np.asarray(A, dtype=np.float64))).numpy()


def relion_to_cryosparc_pose(A: np.ndarray) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` (rotation vector, radians) from RELION A: log(A^T)."""
    A = torch.as_tensor(np.asarray(A, dtype=np.float64))
    return so3_log(A.transpose(-1, -2)).numpy()


def cryosparc_pose_to_relion(pose: np.ndarray) -> np.ndarray:
    """RELION A from cryoSPARC ``alignments3D/pose``: exp(pose)^T."""
    p = torch.as_tensor(np.asarray(pose, dtype=np.float64))
    return so3_exp(p).transpose(-1, -2).numpy()
