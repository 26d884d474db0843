"""Bring a C1 map into RELION's frame of a point group (as relion_align_symmetry does), and its poses with it.

``align_symmetry(vol, sym)`` centres the map on its centre of mass, then finds
the rotation Q for which the map rotated by Q best agrees with itself under the
group's operators S (``geometry.symmetry``, RELION's axes): it maximises

    score(Q) = mean over S != I of corr( W, W o S ),   W = the map rotated by Q,

the normalised correlation of the rotated map's spectrum with its S-rotated
copy, F(Q^T k) against F(Q^T S k), on the frequencies 0.5 < |k| <= 0.7 of the
scoring box's Nyquist (``BAND``; and, if given, up to ``max_shell``, e.g. the
map's FSC 0.143 shell), DC excluded, one of each +-k pair, whitened (each
Fourier shell weighted by 1 / its mean power, so that the low frequencies every
rotation of a compact map shares do not dominate). Search: a quasi-uniform set
of rotations (super-Fibonacci) at a coarse box (low-passed to ~1/4 Nyquist; the set is smaller for large groups, since
every optimum comes G times over), the best few refined by a local pattern
search over so3_exp perturbations there, the best of them again at a medium box.

The aligned map is ``transform_volume(vol, Q, t)`` (evaluate/align.py:
out(r) = vol(Q^T (r - t))), with t = -Q c, c the centre of mass measured from
voxel N // 2. Poses follow with ``rotate_poses``: a RELION pose A and origin o
of the input map become A' = A Q^T and o' = o + (A' t)[x, y] * apix, so the
aligned map projected at (A', o') gives the same particle image
(tests/test_symmetry.py reconstructs with the moved poses and compares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import fourier_crop_3d
from cryospin_relion.geometry.rotations import geodesic_distance_deg, so3_exp, super_fibonacci_rotations
from cryospin_relion.geometry.sampling import sample_spectrum
from cryospin_relion.geometry.slicing import volume_to_projector
from cryospin_relion.geometry.symmetry import parse_symmetry, symmetry_operators

__all__ = ["SymmetryAlignment", "align_symmetry", "symmetry_score", "operator_spread", "rotate_poses",
           "centre_of_mass", "apply_alignment", "symmetrise_map"]


@dataclass(frozen=True)
class SymmetryAlignment:
    """``transform_volume(vol, rotation, shift_px)`` is the map in RELION's frame of ``sym``.

    rotation: (3, 3) Q; shift_px: (3,) t (x, y, z) in voxels (t = -Q c);
    centre_px: (3,) c, the input's centre of mass from voxel N // 2;
    score: ``symmetry_score`` of the aligned map (1 = perfectly symmetric; C1: 1);
    score_coarse: best score of the global search (coarse box);
    spread: the worst operator's correlation over the best one's (``operator_scores``; 1 for C1): near 1
    when the whole group fits, low when only some of its operators do (e.g. C4 asked of a D7 map, whose
    two-fold fits but not its four-fold).
    """

    sym: str
    rotation: np.ndarray
    shift_px: np.ndarray
    centre_px: np.ndarray
    score: float
    score_coarse: float
    spread: float = 1.0


def centre_of_mass(vol: np.ndarray) -> np.ndarray:
    """(3,) (x, y, z) centre of mass in voxels from voxel N // 2, of the density above the map's mean."""
    v = torch.as_tensor(np.asarray(vol, dtype=np.float64))
    w = (v - v.mean()).clamp_min(0)
    n = v.shape[-1]
    c = torch.arange(n, dtype=torch.float64) - n // 2
    tot = w.sum().clamp_min(1e-30)
    return np.array([float((w.sum((0, 1)) * c).sum() / tot), float((w.sum((0, 2)) * c).sum() / tot),
                     float((w.sum((1, 2)) * c).sum() / tot)])


# scored frequencies: up to this fraction of the scoring box's Nyquist (the last shells of a rotated
# map carry the most interpolation error and, in ab-initio maps, mostly noise)
BAND = 0.7


class _SymScorer:
    """Mean normalised correlation of F(R^T k) with F(R^T S k) over the non-identity operators, at one box."""

    def __init__(self, vol: Tensor, box: int, ops: Tensor, band: float = BAND, max_shell: float | None = None):
        """max_shell: also at most this radius in Fourier pixels of the FULL box (e.g. the map's resolution)."""
        n = vol.shape[-1]
        v = fourier_crop_3d(vol, box) if box != n else vol
        self.spec = volume_to_projector(v.double(), 2).to(torch.complex64)
        D = self.spec.shape[-1]
        k = torch.arange(box, dtype=torch.float32) - box // 2
        kz, ky, kx = torch.meshgrid(k, k, k[box // 2:], indexing="ij")
        kf = torch.stack([kx, ky, kz], -1).reshape(-1, 3)
        rad = kf.norm(dim=-1)
        rmax = band * box / 2 if max_shell is None else min(band * box / 2, max_shell * box / n)
        keep = (rad > 0.5) & (rad <= max(rmax, 2.0))
        keep &= (kf[:, 0] > 0) | (kf[:, 1] > 0) | ((kf[:, 1] == 0) & (kf[:, 2] > 0))  # one of each +-k pair
        self.kq = kf[keep] * (D / box)  # padded-voxel units
        # whitened: every shell weighs the same (1 / its mean power), so the low frequencies that any
        # rotation of a compact map shares do not swamp the score
        shell = rad[keep].round().long()
        p = (self._sample(torch.eye(3)[None])[0].abs() ** 2).double()
        power = torch.zeros(int(shell.max()) + 1, dtype=torch.float64).index_add_(0, shell, p)
        count = torch.zeros_like(power).index_add_(0, shell, torch.ones_like(p))
        self.w = (count / power.clamp_min(1e-30))[shell].to(torch.float32)
        self.ops = ops[1:].to(torch.float32)  # the identity pairs a map with itself

    def _sample(self, R: Tensor) -> Tensor:
        return sample_spectrum(self.spec, self.kq[None] @ R.to(torch.float32))  # (B, M) F(R^T k)

    def scores(self, rotations: Tensor, chunk: int = 64) -> Tensor:
        """(B,) scores of rotations (B, 3, 3): the mean of ``operator_scores``."""
        if self.ops.shape[0] == 0:
            return torch.ones(rotations.shape[0], dtype=torch.float64)
        return torch.cat([self.operator_scores(rotations[a:a + chunk]).mean(-1)
                          for a in range(0, rotations.shape[0], chunk)])

    def operator_scores(self, rotations: Tensor) -> Tensor:
        """(B, G - 1) correlation of the map rotated by each rotation (B, 3, 3) with its copy under each
        non-identity operator."""
        G = self.ops.shape[0]
        R = rotations.to(torch.float32)
        f0 = self._sample(R)  # (b, M)
        fs = self._sample((self.ops[None] @ R[:, None]).reshape(-1, 3, 3)).reshape(R.shape[0], G, -1)
        num = (f0.conj()[:, None] * fs).real @ self.w
        den = torch.sqrt(((f0.abs() ** 2) @ self.w)[:, None] * ((fs.abs() ** 2) @ self.w)).clamp_min(1e-30)
        return (num / den).double()


def _local(scorer: _SymScorer, R0: Tensor, step_deg: float, min_step_deg: float, max_iter: int = 120,
           diagonals: bool = True) -> tuple[Tensor, float]:
    """Pattern search R = exp(w) R0 over +-step about x, y, z (and the 8 diagonals), halving the step when stuck."""
    dirs = torch.cat([torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)])
    if diagonals:
        diag = torch.tensor([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=torch.float64)
        dirs = torch.cat([dirs, diag / math.sqrt(3)])
    R = R0.double()
    best = float(scorer.scores(R[None])[0])
    step, it = math.radians(step_deg), 0
    while step >= math.radians(min_step_deg) and it < max_iter:
        it += 1
        cand = so3_exp(dirs * step) @ R
        sc = scorer.scores(cand)
        k = int(torch.argmax(sc))
        if float(sc[k]) > best + 1e-9:
            R, best = cand[k], float(sc[k])
        else:
            step /= 2
    return R, best


def align_symmetry(vol: np.ndarray, sym: str, n_rotations: int | None = None, coarse_box: int | None = None,
                   medium_box: int | None = None, top_k: int = 2, centre: bool = True,
                   max_shell: float | None = None) -> SymmetryAlignment:
    """Rotation (and centring) that brings ``vol`` into RELION's frame of ``sym`` (see the module docstring).

    Args:
        vol: (n, n, n) map, MRC order (z, y, x).
        sym: point-group name (``geometry.symmetry.parse_symmetry``).
        n_rotations: size of the global set (default clamp(24000 / G, 600, 4608)).
        coarse_box: box of the global search (default max(16, n // 4), at most n).
        medium_box: box of the final local refinement (default min(n, 48)).
        top_k: distinct global candidates refined locally.
        centre: move the centre of mass to voxel N // 2 first (else the map is taken as centred).
        max_shell: score only up to this Fourier radius (pixels of the n box), e.g. the shell where the
            map's half-map FSC falls under 0.143: shells of noise only would pull every score down.
    Returns:
        SymmetryAlignment; for C1 the identity with score 1 (and the centring, if asked).
    """
    name = parse_symmetry(sym)
    ops = torch.as_tensor(symmetry_operators(name))
    G = ops.shape[0]
    v = np.asarray(vol, dtype=np.float32)
    n = v.shape[-1]
    c = centre_of_mass(v) if centre else np.zeros(3)
    if G == 1:
        return SymmetryAlignment(name, np.eye(3), -c, c, 1.0, 1.0)
    from cryospin_relion.evaluate.align import transform_volume

    vc = transform_volume(v, None, -c) if centre else v
    t = torch.as_tensor(vc, dtype=torch.float64)
    t = (t - t.mean()) / t.std().clamp_min(1e-30)
    cb = min(n, coarse_box or max(16, n // 4))
    cb += cb % 2
    mb = min(n, medium_box or 48)
    mb += mb % 2
    nrot = n_rotations or int(min(4608, max(600, 24000 // G)))
    rots = super_fibonacci_rotations(nrot)
    coarse = _SymScorer(t, cb, ops, max_shell=max_shell)
    sc = coarse.scores(rots)
    # every optimum comes G times over (S Q for S in the group): keep candidates G-distinct
    spacing = math.degrees((8 * math.pi**2 / nrot) ** (1 / 3))
    picked: list[int] = []
    for i in torch.argsort(sc, descending=True).tolist():
        if all(float(geodesic_distance_deg(ops @ rots[i], rots[j]).min()) > 2 * spacing for j in picked):
            picked.append(i)
        if len(picked) == top_k:
            break
    best = max((_local(coarse, rots[i], spacing / 2, 2.0) for i in picked), key=lambda r: r[1])
    medium = _SymScorer(t, mb, ops, max_shell=max_shell) if mb != cb else coarse
    R, s = _local(medium, best[0], 1.0, 0.2, diagonals=False)
    Q = R.numpy()
    return SymmetryAlignment(name, Q, -Q @ c, c, float(s), float(sc.max()),
                             _spread(medium.operator_scores(R[None].to(torch.float32))[0]))


def _spread(per_op: Tensor) -> float:
    """Worst operator's correlation / best operator's (1 when there is no operator besides the identity)."""
    if per_op.numel() == 0:
        return 1.0
    best = float(per_op.max())
    return float(per_op.min()) / best if best > 0 else 0.0


def symmetry_score(vol: np.ndarray, sym: str, box: int | None = None, max_shell: float | None = None) -> float:
    """Mean correlation of the map with its copies under the non-identity operators of ``sym`` (1 for C1).

    Measured as in the search (module docstring) at ``box`` (default min(n, 48)),
    on the map as it is (no centring, no rotation).
    """
    return float(_map_scorer(vol, sym, box, max_shell).scores(torch.eye(3)[None])[0])


def _map_scorer(vol: np.ndarray, sym: str, box: int | None, max_shell: float | None) -> _SymScorer:
    """The scorer of the map as it is (normalised), at ``box`` (default min(n, 48))."""
    ops = torch.as_tensor(symmetry_operators(sym))
    v = torch.as_tensor(np.asarray(vol, dtype=np.float64))
    n = v.shape[-1]
    b = min(n, box or 48)
    b += b % 2
    v = (v - v.mean()) / v.std().clamp_min(1e-30)
    return _SymScorer(v, min(b, n), ops, max_shell=max_shell)


def operator_spread(vol: np.ndarray, sym: str, box: int | None = None, max_shell: float | None = None) -> float:
    """``SymmetryAlignment.spread`` of the map as it is (no centring, no rotation), scored as ``symmetry_score``."""
    return _spread(_map_scorer(vol, sym, box, max_shell).operator_scores(torch.eye(3)[None])[0])


def apply_alignment(vol: np.ndarray, al: SymmetryAlignment) -> np.ndarray:
    """The map in the symmetry frame: ``transform_volume(vol, al.rotation, al.shift_px)``."""
    from cryospin_relion.evaluate.align import transform_volume

    return transform_volume(vol, al.rotation, al.shift_px)


def symmetrise_map(vol: np.ndarray, sym: str) -> np.ndarray:
    """Average of the map over the group's operators: mean over S of V(S^T r), each copy rotated as by
    ``transform_volume`` (trilinear sampling of the x2 oversampled spectrum), from one spectrum; (n, n, n) float32."""
    from cryospin_relion.evaluate.align import _freq_coords
    from cryospin_relion.geometry.fourier import fft3_centered, ifft3_centered

    ops = torch.as_tensor(symmetry_operators(sym))
    v = torch.as_tensor(np.asarray(vol, dtype=np.float32))
    n = v.shape[-1]
    acc = fft3_centered(v.double())  # the identity: the map's own spectrum
    if len(ops) > 1:
        spec = volume_to_projector(v, pad=2)
        k = _freq_coords(n, spec.real.dtype) * (spec.shape[-1] / n)
        for S in ops[1:]:
            acc = acc + sample_spectrum(spec, k @ S.to(k.dtype)).to(torch.complex128)  # F(S^T k)
    return (ifft3_centered(acc / len(ops)).real).float().numpy()


def rotate_poses(rotations: np.ndarray, origins_A: np.ndarray, al: SymmetryAlignment,
                 apix: float) -> tuple[np.ndarray, np.ndarray]:
    """Poses of the input map -> poses of ``apply_alignment(vol, al)`` giving the same particle images.

    Args:
        rotations: (N, 3, 3) RELION A; origins_A: (N, 2) RELION origins in A;
        apix: voxel size of the map that was aligned (A), for the shift.
    Returns:
        (A Q^T, o + (A Q^T t)[:2] * apix).
    """
    Q = np.asarray(al.rotation, dtype=np.float64)
    A2 = np.asarray(rotations, dtype=np.float64) @ Q.T
    o2 = np.asarray(origins_A, dtype=np.float64) + (A2 @ np.asarray(al.shift_px, dtype=np.float64))[:, :2] * apix
    return A2, o2
