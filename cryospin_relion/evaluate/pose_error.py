"""Pose errors of an ab-initio run against the true poses, up to one global rotation and the hand.

An ab-initio map is the truth in an arbitrary orientation and hand, so its poses
relate to the true ones by

    A_est_i = P(A_true_i) H,   P(A) = A (same hand) or M A M (mirrored), M = diag(1, 1, -1)

for one global rotation H: if V_est = transform_volume(V_true, R) then
A_est = A_true R^T (align.py), and the mirrored map has poses M A M
(``geometry.hand.flip_poses_hand``). ``align_pose_sets`` fits H robustly for both
hands (candidate H_i = P(A_true_i)^T A_est_i from a sample of particles, scored by
the median error, then refined by the SVD solution of
max_H sum tr(H^T P(A_true_i)^T A_est_i) over the inliers) and gives the
per-particle geodesic rotation error; ``pose_errors`` summarises it, with the
angle between viewing directions (third rows of the matrices).

With shifts (origins in A, or image translations in pixels: any one kind for
both sets), the estimated ones satisfy s_est - s_true = (A_est u)[x, y] for one
global 3D translation u of the map; u is fitted by least squares on the
particles whose rotation is right, and the residual is the shift error.
``PoseAlignment.to_truth_frame`` maps estimated poses and shifts into the frame
of the true ones (e.g. to backproject with them against the true map).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cryospin_relion.geometry.hand import MIRROR
from cryospin_relion.geometry.rotations import geodesic_distance_deg, project_to_so3

__all__ = ["PoseAlignment", "align_pose_sets", "fit_global_rotation", "pose_errors", "match_particles"]


def fit_global_rotation(A_true: np.ndarray, A_est: np.ndarray, n_candidates: int = 256, seed: int = 0,
                        inlier_deg: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """Robust H with A_est_i ~ A_true_i H.

    Returns:
        (H (3, 3), per-particle geodesic errors in degrees after the fit).
    """
    At = torch.as_tensor(np.asarray(A_true, dtype=np.float64))
    Ae = torch.as_tensor(np.asarray(A_est, dtype=np.float64))
    n = At.shape[0]
    g = np.random.default_rng(seed)
    cand_idx = g.choice(n, size=min(n, n_candidates), replace=False)
    eval_idx = g.choice(n, size=min(n, 2000), replace=False)
    H = At[cand_idx].transpose(-1, -2) @ Ae[cand_idx]  # (C, 3, 3)
    err = geodesic_distance_deg(At[eval_idx][None] @ H[:, None], Ae[eval_idx][None])  # (C, E)
    med = err.median(-1).values
    Hb = H[int(torch.argmin(med))]
    for _ in range(5):
        e = geodesic_distance_deg(At @ Hb, Ae)
        thr = max(inlier_deg, float(e.median()) if float(e.median()) < 45 else inlier_deg)
        inl = e <= thr
        if int(inl.sum()) < 3:
            break
        S = (At[inl].transpose(-1, -2) @ Ae[inl]).sum(0)
        Hb = project_to_so3(S)
    e = geodesic_distance_deg(At @ Hb, Ae)
    return Hb.numpy(), e.numpy()


def match_particles(true_keys: list[str], est_keys: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Indices (i_true, i_est) of particles present in both (matched by key), or None if keys are not unique."""
    if len(set(true_keys)) != len(true_keys) or len(set(est_keys)) != len(est_keys):
        return None
    pos = {k: i for i, k in enumerate(true_keys)}
    pairs = [(pos[k], j) for j, k in enumerate(est_keys) if k in pos]
    if not pairs:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a = np.array(pairs, dtype=np.int64)
    return a[:, 0], a[:, 1]


def _stats(x: np.ndarray) -> dict:
    return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p90": float(np.percentile(x, 90))}


@dataclass(frozen=True)
class PoseAlignment:
    """A_est_i ~ P(A_true_i) H and, with shifts, s_est_i - s_true_i ~ (A_est_i u)[x, y] (module docstring)."""

    mirror: bool  # P(A) = M A M (else A)
    rotation: np.ndarray  # (3, 3) H
    errors_deg: np.ndarray  # (N,) geodesic rotation error per particle after the fit
    shift: np.ndarray | None = None  # (3,) u, in the unit of the shifts; None without shifts
    shift_errors: np.ndarray | None = None  # (N,) |residual| of each particle's shift, same unit

    @property
    def median_deg(self) -> float:
        return float(np.median(self.errors_deg))

    def to_truth_frame(self, A_est: np.ndarray, shifts_est: np.ndarray | None = None):
        """Estimated poses (N, 3, 3) P(A_est H^T) and shifts (N, 2) s_est - (A_est u)[x, y] in the truth's frame.

        Returns (rotations, shifts); shifts is None when ``shifts_est`` is or no shift was fitted."""
        A_est = np.asarray(A_est, dtype=np.float64)
        R = A_est @ self.rotation.T
        if self.mirror:
            R = MIRROR @ R @ MIRROR
        if shifts_est is None or self.shift is None:
            return R, None
        return R, np.asarray(shifts_est, np.float64) - A_est[:, :2, :] @ self.shift


def align_pose_sets(A_true: np.ndarray, A_est: np.ndarray, shifts_true: np.ndarray | None = None,
                    shifts_est: np.ndarray | None = None, try_mirror: bool = True) -> PoseAlignment:
    """The best global alignment of two pose sets of the same particles (same order), mirror included.

    Args:
        A_true, A_est: (N, 3, 3) RELION matrices.
        shifts_true, shifts_est: (N, 2) RELION origins in A, or translations in pixels (optional).
        try_mirror: also try the mirrored hand; the hand with the lower median error wins.
    """
    A_true = np.asarray(A_true, dtype=np.float64)
    A_est = np.asarray(A_est, dtype=np.float64)
    best = None
    for mirror in ([False, True] if try_mirror else [False]):
        At = MIRROR @ A_true @ MIRROR if mirror else A_true
        H, e = fit_global_rotation(At, A_est)
        if best is None or np.median(e) < np.median(best[2]):
            best = (mirror, H, e)
    mirror, H, e = best
    if shifts_true is None or shifts_est is None:
        return PoseAlignment(bool(mirror), H, e)
    d = (np.asarray(shifts_est, np.float64) - np.asarray(shifts_true, np.float64)).reshape(-1)
    good = e <= max(20.0, float(np.median(e)))  # fit u on the particles whose rotation is right
    rows = A_est[:, :2, :]  # (N, 2, 3)
    if good.sum() >= 2:
        u, *_ = np.linalg.lstsq(rows[good].reshape(-1, 3), d.reshape(-1, 2)[good].reshape(-1), rcond=None)
    else:
        u = np.zeros(3)
    resid = d.reshape(-1, 2) - np.einsum("nij,j->ni", rows, u)
    return PoseAlignment(bool(mirror), H, e, u, np.linalg.norm(resid, axis=-1))


def pose_errors(A_true: np.ndarray, A_est: np.ndarray, shifts_true_A: np.ndarray | None = None,
                shifts_est_A: np.ndarray | None = None, try_mirror: bool = True) -> dict:
    """Rotation / view-direction (/ shift) errors after the best global alignment of the pose sets.

    Args:
        A_true, A_est: (N, 3, 3) RELION matrices of the same particles (same order).
        shifts_true_A, shifts_est_A: (N, 2) RELION origins in A (optional).
    Returns:
        dict: mirror, global_rotation H (A_est ~ P(A_true) H), rotation_error_deg
        {mean, median, p90}, view_error_deg {...}, fraction_within_5deg/10deg/20deg,
        and with shifts: global_translation_A, shift_error_A {...}.
    """
    A_true = np.asarray(A_true, dtype=np.float64)
    A_est = np.asarray(A_est, dtype=np.float64)
    al = align_pose_sets(A_true, A_est, shifts_true_A, shifts_est_A, try_mirror)
    e = al.errors_deg
    At = MIRROR @ A_true @ MIRROR if al.mirror else A_true
    v1, v2 = (At @ al.rotation)[:, 2, :], A_est[:, 2, :]
    view = np.rad2deg(np.arccos(np.clip((v1 * v2).sum(-1), -1, 1)))
    out = {
        "n": int(len(A_true)), "mirror": al.mirror, "global_rotation": al.rotation.tolist(),
        "rotation_error_deg": _stats(e), "view_error_deg": _stats(view),
        "fraction_within_5deg": float(np.mean(e <= 5)), "fraction_within_10deg": float(np.mean(e <= 10)),
        "fraction_within_20deg": float(np.mean(e <= 20)),
    }
    if al.shift is not None:
        out["global_translation_A"] = al.shift.tolist()
        out["shift_error_A"] = _stats(al.shift_errors)
    return out
