"""Map alignment over rotations, translations and the hand (mirror).

Transform convention. ``transform_volume(vol, R, t, mirror)`` returns

    out(r) = m(R^T (r - t)),   m = flip_volume_hand(vol) if mirror else vol   (geometry/hand.py)

with r measured from the centre voxel N // 2, r = (x, y, z) in voxels (x the
MRC fast axis): the density is (mirrored, then) rotated by R about the centre,
then moved by t. In Fourier space F_out(k) = exp(-2 pi i k.t) F_m(R^T k); it is
computed by trilinear interpolation of the x2 oversampled spectrum (with the
sinc^2 gridding pre-correction, as for central slices), so rotating does not
blur the map the way real-space interpolation would.

Poses. If V' = transform_volume(V, R) then the projection of V' at RELION pose
A' equals the projection of V at A' R (so poses of V' are A R^T). The mirror
(z flip about the centre) changes a pose A to M A M, M = diag(1, 1, -1), with
unchanged origins: ``flip_poses_hand``. Both facts are checked by projecting
in tests/test_flip_hand.py and tests/test_compare.py.

``align_maps(mov, ref)`` finds (R, t, mirror) maximising the correlation of
transform_volume(mov, R, t, mirror) with ref: a global search over a
quasi-uniform set of rotations (super-Fibonacci spiral) at a reduced box
(maps low-passed to ~1/4 of Nyquist), for both hands, with all translations at
once by FFT cross-correlation; then a local pattern search over so3_exp
perturbations at a medium and at the full box, with the translation peak
refined to sub-voxel precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import fft3_centered, fourier_crop_3d, ifft3_centered
from cryospin_relion.geometry.hand import flip_volume_hand
from cryospin_relion.geometry.rotations import (
    geodesic_distance_deg, rotation_angle_deg, so3_exp, super_fibonacci_rotations,
)
from cryospin_relion.geometry.sampling import sample_spectrum
from cryospin_relion.geometry.slicing import volume_to_projector

__all__ = ["transform_volume", "AlignResult", "align_maps"]


# -- volume transforms ---------------------------------------------------------------------------


def _freq_coords(n: int, dtype=torch.float32) -> Tensor:
    """(n, n, n, 3) centred integer frequency vectors (kx, ky, kz) on the (z, y, x) grid."""
    k = torch.arange(n, dtype=dtype) - n // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    return torch.stack([kx, ky, kz], -1)


def _ramp3(t: Tensor, n: int, dtype=torch.float64) -> Tensor:
    """exp(-2 pi i k.t) on the centred n^3 grid for a shift t = (tx, ty, tz) in voxels."""
    f = (torch.arange(n, dtype=dtype) - n // 2) / n
    t = t.to(dtype)
    ph = -2 * math.pi * (f[None, None, :] * t[0] + f[None, :, None] * t[1] + f[:, None, None] * t[2])
    return torch.polar(torch.ones_like(ph), ph)


def transform_volume(vol, rotation=None, shift=None, mirror: bool = False) -> np.ndarray:
    """out(r) = m(R^T (r - t)), m = flip_volume_hand(vol) if mirror (see module docstring).

    Args:
        vol: (n, n, n) real map.
        rotation: (3, 3) R (None: identity).
        shift: (3,) t = (x, y, z) in voxels (None: 0).
    """
    v = torch.as_tensor(np.asarray(vol, dtype=np.float32))
    if mirror:
        v = flip_volume_hand(v)
    n = v.shape[-1]
    if rotation is None:
        ft = fft3_centered(v.double())
    else:
        spec = volume_to_projector(v, pad=2)
        D = spec.shape[-1]
        k = _freq_coords(n, spec.real.dtype) * (D / n)  # padded-voxel units
        q = torch.einsum("zyxi,ij->zyxj", k, torch.as_tensor(np.asarray(rotation)).to(k.dtype))  # R^T k
        ft = sample_spectrum(spec, q).to(torch.complex128)
    if shift is not None:
        ft = ft * _ramp3(torch.as_tensor(np.asarray(shift, dtype=np.float64)), n)
    return ifft3_centered(ft).real.float().numpy()


# -- scoring ------------------------------------------------------------------------------------


class _Scorer:
    """Normalised correlation of rotated (and shifted) ``mov`` with ``ref`` at one box.

    Works on the frequencies 0.5 < |k| <= rmax only (DC excluded), on the kx >= 0 half
    (rfftn layout, kx > 0 terms weighted 2), so that a scatter goes straight into
    irfftn for all translations at once.
    Translations are given and returned in voxels of the FULL box (x, y, z).
    """

    def __init__(self, mov: Tensor, ref: Tensor, box: int, rmax: float | None = None):
        n = mov.shape[-1]
        self.n, self.box = n, box
        m = fourier_crop_3d(mov, box) if box != n else mov
        r = fourier_crop_3d(ref, box) if box != n else ref
        self.scale = n / box  # full-box voxels per working voxel
        self.spec = {False: volume_to_projector(m, 2), True: volume_to_projector(flip_volume_hand(m), 2)}
        D = self.spec[False].shape[-1]
        b = box
        # the kx >= 0 half of the spectrum in rfftn layout (real maps: F(-k) = conj F(k))
        fz = torch.fft.fftfreq(b) * b
        fx = torch.arange(b // 2 + 1, dtype=torch.float32)
        kz, ky, kx = torch.meshgrid(fz, fz, fx, indexing="ij")
        kf = torch.stack([kx, ky, kz], -1).reshape(-1, 3)
        rad = kf.norm(dim=-1)
        rmax = b / 2 - 0.5 if rmax is None else rmax
        self.idx = torch.nonzero((rad <= rmax) & (rad > 0.5))[:, 0]
        self.k = kf[self.idx]  # (M, 3) integer frequencies
        self.w = torch.where(self.k[:, 0] > 0, 2.0, 1.0)  # each kx > 0 term stands for itself and -k
        self.kq = self.k * (D / b)  # in padded-voxel units
        fr = torch.fft.rfftn(torch.fft.ifftshift(r.double(), dim=(0, 1, 2))).reshape(-1)[self.idx]
        self.fref = fr.to(torch.complex64)
        self.ref_norm = float((self.w.double() * fr.abs().pow(2)).sum().sqrt())

    def spectra(self, rotations: Tensor, mirror: bool) -> Tensor:
        """(B, M) F_m(R^T k) at the scored frequencies."""
        q = self.kq[None] @ rotations.to(torch.float32)  # (R^T k)_j = sum_i k_i R_ij
        return sample_spectrum(self.spec[mirror], q)

    def _norm(self, fm: Tensor) -> Tensor:
        p = torch.view_as_real(fm).pow(2).sum(-1) @ self.w
        return p.double().sqrt().clamp_min(1e-30) * self.ref_norm

    def all_shifts(self, rotations: Tensor, mirror: bool, chunk: int = 256) -> tuple[Tensor, Tensor]:
        """(B,) scores maximised over translations (FFT, sub-voxel parabolic peak) and (B, 3) translations."""
        b = self.box
        h = b // 2 + 1
        scores, shifts = [], []
        for a in range(0, rotations.shape[0], chunk):
            fm = self.spectra(rotations[a:a + chunk], mirror)
            x = fm.conj() * self.fref  # sum_k conj(Fm) Fref e^{2 pi i k t} = <shift_t(m), ref>
            half = torch.zeros(fm.shape[0], b * b * h, dtype=x.dtype)
            half[:, self.idx] = x
            cc = torch.fft.irfftn(half.reshape(-1, b, b, h), s=(b, b, b), dim=(-3, -2, -1)) * b**3
            best, idx = cc.reshape(cc.shape[0], -1).max(-1)
            iz, iy, ix = idx // (b * b), (idx // b) % b, idx % b
            t = torch.stack([ix, iy, iz], -1).to(torch.float64) + _subvoxel(cc, iz, iy, ix)
            t = (t + b / 2) % b - b / 2  # wrap to [-b/2, b/2)
            scores.append(best.double() / self._norm(fm))
            shifts.append(t * self.scale)
        return torch.cat(scores), torch.cat(shifts)

    def at_shift(self, rotations: Tensor, mirror: bool, t: Tensor) -> Tensor:
        """(B,) scores with the translation fixed at t (full-box voxels)."""
        fm = self.spectra(rotations, mirror)
        y = (self.fref * self.w) * torch.polar(torch.ones(1), 2 * math.pi * (self.k @ (t.float() / self.scale)) / self.box)
        return (fm.conj() * y).real.sum(-1).double() / self._norm(fm)

    def refine_shift(self, R: Tensor, mirror: bool, t: Tensor, iters: int = 3) -> tuple[float, Tensor]:
        """Best continuous translation near t for one rotation: (score, t)."""
        fm = self.spectra(R[None], mirror)
        x = fm.conj() * (self.fref * self.w)
        f, tb = _newton_shift(x, (t / self.scale)[None], self.k / self.box, iters)
        return float(f[0] / self._norm(fm)[0]), tb[0] * self.scale


def _newton_shift(x: Tensor, t: Tensor, kvec: Tensor, iters: int = 3) -> tuple[Tensor, Tensor]:
    """Maximise f(t) = Re sum_k x(k) exp(2 pi i k.t) near t by Newton steps (continuous translation).

    Args:
        x: (B, M) complex products conj(F_mov) F_ref; t: (B, 3) start (x, y, z) voxels;
        kvec: (M, 3) frequencies in cycles per voxel.
    Returns:
        ((B,) f at the optimum, (B, 3) t).
    """
    t = t.to(torch.float32).clone()
    two_pi = 2 * math.pi
    kk = (kvec[:, :, None] * kvec[:, None, :]).reshape(-1, 9)
    f = None
    for it in range(iters + 1):
        y = x * torch.polar(torch.ones(1), two_pi * (t @ kvec.T))  # (B, M)
        f = y.real.sum(-1)
        if it == iters:
            break
        g = -two_pi * (y.imag @ kvec)  # (B, 3)
        H = -(two_pi**2) * (y.real @ kk).reshape(-1, 3, 3)
        ok = torch.linalg.eigvalsh(H).max(-1).values < 0
        step = -torch.linalg.solve(torch.where(ok[:, None, None], H, -torch.eye(3).expand_as(H)), g)
        step = torch.where(ok[:, None], step, torch.zeros_like(step)).clamp(-0.5, 0.5)
        t = t + step
    return f.double(), t.double()


def _subvoxel(cc: Tensor, iz: Tensor, iy: Tensor, ix: Tensor) -> Tensor:
    """(B, 3) parabolic sub-voxel offsets (x, y, z) of the correlation peaks."""
    b = cc.shape[-1]
    ar = torch.arange(cc.shape[0])
    out = []
    for dims in ((0, 0, 1), (0, 1, 0), (1, 0, 0)):
        def at(d):
            return cc[ar, (iz + d * dims[0]) % b, (iy + d * dims[1]) % b, (ix + d * dims[2]) % b]
        cm, c0, cp = at(-1), at(0), at(1)
        den = cm - 2 * c0 + cp
        off = torch.where(den < 0, 0.5 * (cm - cp) / den.clamp_max(-1e-30), torch.zeros_like(den))
        out.append(off.clamp(-0.5, 0.5))
    return torch.stack(out, -1).double()


def _local_search(scorer: _Scorer, R0: Tensor, mirror: bool, step_deg: float, min_step_deg: float,
                  t0: Tensor | None = None, max_iter: int = 200,
                  diagonals: bool = True) -> tuple[Tensor, float, Tensor]:
    """Pattern search R = exp(w) R0 over the 6 axis moves +-step (+8 diagonals), halving the
    step when stuck. Candidates are scored at the current translation; the translation is
    re-optimised (Newton) for every accepted move. Returns (R, score, t)."""
    dirs = torch.cat([torch.eye(3), -torch.eye(3)]).double()
    if diagonals:
        diag = torch.tensor([[i, j, k] for i in (-1, 1) for j in (-1, 1) for k in (-1, 1)], dtype=torch.float64)
        dirs = torch.cat([dirs, diag / math.sqrt(3)])
    R = R0.double()
    if t0 is None:
        _, ts = scorer.all_shifts(R[None], mirror)
        t0 = ts[0]
    best, t = scorer.refine_shift(R, mirror, t0.double())
    step = math.radians(step_deg)
    it = 0
    while step >= math.radians(min_step_deg) and it < max_iter:
        it += 1
        cand = so3_exp(dirs * step) @ R
        sc = scorer.at_shift(cand, mirror, t)
        k = int(torch.argmax(sc))
        if float(sc[k]) > best + 1e-9:
            s_new, t_new = scorer.refine_shift(cand[k], mirror, t)
            R, best, t = cand[k], max(s_new, float(sc[k])), (t_new if s_new >= float(sc[k]) else t)
        else:
            step /= 2
    return R, best, t


# -- the alignment --------------------------------------------------------------------------------


@dataclass
class AlignResult:
    """transform_volume(mov, rotation, shift_px, mirror) ~ ref."""

    rotation: np.ndarray  # (3, 3) R
    shift_px: np.ndarray  # (3,) t (x, y, z) in voxels of the full box
    mirror: bool
    score: float  # normalised correlation at the full box (frequencies up to ``band_limit``)
    score_other_hand: float  # best correlation with the opposite hand, at the medium box
    score_medium: float = float("nan")  # best correlation with the chosen hand, at the medium box
    band_limit: float = float("nan")  # radius (full-box Fourier pixels) of the final refinement
    coarse_top: list = field(default_factory=list)

    @property
    def angle_deg(self) -> float:
        return float(rotation_angle_deg(torch.as_tensor(self.rotation)))


def align_maps(
    mov: np.ndarray,
    ref: np.ndarray,
    n_rotations: int = 4608,
    coarse_box: int | None = None,
    medium_box: int | None = None,
    try_mirror: bool = True,
    top_k: int = 2,
    seed_rotations: np.ndarray | None = None,
) -> AlignResult:
    """Find (R, t, mirror) so that transform_volume(mov, R, t, mirror) best matches ``ref``.

    Args:
        mov, ref: (n, n, n) maps on the same grid.
        n_rotations: size of the global rotation set (4608: ~9 degrees between neighbours).
        coarse_box: box of the global search (default n // 4, at least 16; the maps
            are Fourier-cropped to it, i.e. low-passed to ~1/4 Nyquist).
        medium_box: box of the first local refinement (default min(n, 32)).
        try_mirror: also search the mirrored map.
        top_k: candidates per hand refined locally.
    """
    torch_mov = torch.as_tensor(np.asarray(mov, dtype=np.float32))
    torch_ref = torch.as_tensor(np.asarray(ref, dtype=np.float32))
    n = torch_mov.shape[-1]
    # normalise: zero mean, unit norm (the score is normalised anyway; this keeps FFT values tame)
    torch_mov = (torch_mov - torch_mov.mean()) / torch_mov.std().clamp_min(1e-30)
    torch_ref = (torch_ref - torch_ref.mean()) / torch_ref.std().clamp_min(1e-30)
    cb = coarse_box or max(16, n // 4)
    cb = min(cb + (cb % 2), n)
    mb = medium_box or min(n, 32)
    mb = min(mb + (mb % 2), n)
    hands = [False, True] if try_mirror else [False]

    rots = super_fibonacci_rotations(n_rotations)
    if seed_rotations is not None:
        rots = torch.cat([torch.as_tensor(np.asarray(seed_rotations), dtype=torch.float64).reshape(-1, 3, 3), rots])
    coarse = _Scorer(torch_mov, torch_ref, cb)
    medium = _Scorer(torch_mov, torch_ref, mb) if mb != cb else coarse
    full = _Scorer(torch_mov, torch_ref, n) if n != mb else medium
    spacing = math.degrees((8 * math.pi**2 / n_rotations) ** (1 / 3))  # typical neighbour distance

    cands = []
    top = []
    for hand in hands:
        sc, sh = coarse.all_shifts(rots, hand)
        order = torch.argsort(sc, descending=True)
        picked: list[int] = []
        for i in order.tolist():  # non-maximum suppression: distinct candidates
            if all(float(geodesic_distance_deg(rots[i], rots[j])) > 2 * spacing for j in picked):
                picked.append(i)
            if len(picked) == top_k:
                break
        for i in picked:
            top.append({"mirror": hand, "score": float(sc[i])})
            R, s, t = _local_search(medium, rots[i], hand, step_deg=spacing / 2, min_step_deg=1.0, t0=sh[i])
            cands.append((s, hand, R, t))
    cands.sort(key=lambda c: -c[0])
    s_med, hand, R, t = cands[0]
    other = max((c[0] for c in cands if c[1] != hand), default=float("nan"))
    # final refinement at the full box, over the frequencies where the two maps agree
    # (FSC >= 0.143 after the medium-box alignment): noise-only shells would add variance
    from cryospin_relion.geometry.fsc import fsc

    trial = transform_volume(torch_mov.numpy(), R.numpy(), t.numpy(), hand)
    curve = fsc(torch.as_tensor(trial), torch_ref).numpy()
    below = np.nonzero(curve[1:] < 0.143)[0]
    rmax = float(n / 2 - 0.5) if len(below) == 0 else float(min(n / 2 - 0.5, max(4.0, below[0] + 1 + 2)))
    if rmax < n / 2 - 0.5:
        full = _Scorer(torch_mov, torch_ref, n, rmax=rmax)
    R, s, t = _local_search(full, R, hand, step_deg=1.0, min_step_deg=0.02, t0=t, diagonals=False)
    return AlignResult(rotation=R.numpy(), shift_px=t.numpy(), mirror=bool(hand), score=float(s),
                       score_other_hand=float(other), score_medium=float(s_med), band_limit=rmax, coarse_top=top)
