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


def so3_exp(rotvec: Tensor) -> Tensor:
    """Rotation matrix from a rotation vector (axis * angle in radians).

    Differentiable everywhere, including at 0 (roma's quaternion route).

    Args:
        rotvec: (..., 3)
    Returns:
        (..., 3, 3) active rotation matrices R with R v = rotate v about the axis.
    """
    import roma  # lazy: importing roma pulls in torch._dynamo (~1 s)

    return roma.rotvec_to_rotmat(rotvec)


def so3_log(R: Tensor) -> Tensor:
    """Rotation vector (radians, angle in [0, pi]) of a rotation matrix; inverse of so3_exp.

    Args:
        R: (..., 3, 3)
    Returns:
        (..., 3)
    """
    import roma  # lazy: importing roma pulls in torch._dynamo (~1 s)

    return roma.rotmat_to_rotvec(R)


def sixd_to_matrix(d6: Tensor) -> Tensor:
    """Gram-Schmidt of the 6D representation (Zhou et al. 2019) to a rotation matrix.

    Args:
        d6: (..., 6): two 3-vectors a1, a2 (the first two rows of the result).
    Returns:
        (..., 3, 3) with rows b1, b2, b3 = b1 x b2.
    """
    import roma

    cols = d6.reshape(*d6.shape[:-1], 2, 3).transpose(-1, -2)  # (..., 3, 2) columns a1, a2
    return roma.special_gramschmidt(cols).transpose(-1, -2)


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


def super_fibonacci_rotations(n: int, dtype=torch.float64) -> Tensor:
    """(n, 3, 3) quasi-uniform rotations: the super-Fibonacci spiral of unit quaternions (Alexa, CVPR 2022).

    Computed in float64 whatever ``dtype`` is, so every precision gets the same set."""
    s = torch.arange(n, dtype=torch.float64) + 0.5
    t = s / n
    r, rr = torch.sqrt(t), torch.sqrt(1.0 - t)
    a = 2 * math.pi * s / math.sqrt(2.0)
    b = 2 * math.pi * s / 1.533751168755204288118041  # psi: the real root of psi^4 = psi + 4
    q = torch.stack([r * torch.sin(a), r * torch.cos(a), rr * torch.sin(b), rr * torch.cos(b)], -1)
    return quaternion_to_matrix(q).to(dtype)


def geodesic_distance_deg(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle in degrees of R1^T R2, (..., 3, 3) x (..., 3, 3) -> (...): the geodesic distance on SO(3)."""
    M = R1.transpose(-1, -2) @ R2
    tr = M[..., 0, 0] + M[..., 1, 1] + M[..., 2, 2]
    return torch.rad2deg(torch.acos(((tr - 1.0) / 2.0).clamp(-1.0, 1.0)))


def project_to_so3(S: Tensor) -> Tensor:
    """The rotation H (3, 3) maximising tr(H^T S) for a (3, 3) matrix S, e.g. a sum or mean of rotations (their
    chordal mean): H = U diag(1, 1, det(U V^T)) V^T from the SVD S = U Sigma V^T."""
    U, _, Vh = torch.linalg.svd(S)
    d = torch.ones(3, dtype=S.dtype, device=S.device)
    d[-1] = torch.sign(torch.det(U @ Vh))
    return U @ torch.diag(d) @ Vh


def rotation_angle_deg(R: Tensor) -> Tensor:
    """Rotation angle in degrees of R, (..., 3, 3) -> (...): its geodesic distance from the identity."""
    return geodesic_distance_deg(torch.eye(3, dtype=R.dtype, device=R.device), R)


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
