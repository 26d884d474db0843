"""Direct Fourier reconstruction: CTF-weighted backprojection with Wiener normalisation.

Images are zero-padded by ``pad`` in real space (as RELION does), transformed
with rfft2 (the kx >= 0 half plane) and splatted trilinearly into a (D, D, D)
centred grid, D = pad * n, as numerator sum CTF * X and weight sum CTF^2. The
missing half space follows from Friedel symmetry. The volume is
IFFT(num / (weight + tau)), cropped to n and divided by the sinc^2 response of
trilinear splatting (gridding correction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cryospin_relion.geometry.ctf import ctf_from_freqs
from cryospin_relion.geometry.fourier import ifft3_centered
from cryospin_relion.geometry.slicing import sinc2_window_3d


@dataclass
class Accumulator:
    """Running sums on the (D, D, D) centred grid (flattened): num (D^3, 2) real/imag, weight (D^3,)."""

    num: Tensor
    weight: Tensor
    box: int
    pad: int

    @property
    def size(self) -> int:
        return self.box * self.pad

    @classmethod
    def zeros(cls, box: int, pad: int = 2, device=None, dtype=torch.float64) -> "Accumulator":
        D = box * pad
        return cls(torch.zeros(D**3, 2, device=device, dtype=dtype), torch.zeros(D**3, device=device, dtype=dtype), box, pad)

    def __iadd__(self, other: "Accumulator") -> "Accumulator":
        self.num += other.num
        self.weight += other.weight
        return self


def _rfft_padded(images: Tensor, D: int) -> Tensor:
    """(B, n, n) real -> (B, D, D//2+1) rfft2 of the centred zero-padded image, rows centred (ky)."""
    B, n = images.shape[0], images.shape[-1]
    pad = images.new_zeros(B, D, D)
    a = D // 2 - n // 2
    pad[:, a : a + n, a : a + n] = images
    ft = torch.fft.rfft2(torch.fft.ifftshift(pad, dim=(-2, -1)))
    return torch.fft.fftshift(ft, dim=-2)


def insert_images(
    acc: Accumulator,
    images: Tensor,
    rotations: Tensor,
    translations_px: Tensor | None,
    apix: Tensor,
    ctf_params: dict[str, Tensor] | None,
) -> None:
    """Backproject real images into ``acc`` (in place).

    Args:
        acc: accumulator for box n and padding pad.
        images: (B, n, n) real particle images.
        rotations: (B, 3, 3) RELION A.
        translations_px: (B, 2) translation that *produced* each image from the
            centred projection (= -origin / apix); it is undone here. None = 0.
        apix: (B,) pixel size in A (for the CTF).
        ctf_params: dict of (B,) tensors for ``ctf.ctf_from_freqs``, or None (no CTF).
    """
    D, n = acc.size, acc.box
    dtype = acc.num.dtype
    ft = _rfft_padded(images.to(dtype), D)  # (B, D, D//2+1)
    ky = (torch.arange(D, device=ft.device, dtype=dtype) - D // 2)
    kx = torch.arange(D // 2 + 1, device=ft.device, dtype=dtype)
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")  # padded-grid units; image freq = K / D cycles/px
    if translations_px is not None:
        # undo the translation t: multiply by exp(+2 pi i k.t)
        t = translations_px.to(dtype)
        ph = 2 * torch.pi * (KX[None] * t[:, 0, None, None] + KY[None] * t[:, 1, None, None]) / D
        ft = ft * torch.polar(torch.ones_like(ph), ph)
    if ctf_params is not None:
        inv = (1.0 / (apix.to(dtype) * D))[:, None, None]
        c = ctf_from_freqs(KX[None] * inv, KY[None] * inv, **{k: v.to(dtype) for k, v in ctf_params.items()})
    else:
        c = torch.ones_like(ft.real)
    # keep the inside of the Nyquist sphere; kx = 0 and kx = D/2 columns carry both k and -k: half weight
    r2 = KX**2 + KY**2
    keep = r2 <= (D // 2) ** 2
    half = torch.ones_like(KX)
    half[:, 0] = 0.5
    half[:, -1] = 0.5
    kx_k, ky_k, half_k = KX[keep], KY[keep], half[keep]
    vals = ft[:, keep] * c[:, keep]  # (B, P)
    wts = c[:, keep] ** 2 * half_k
    vals = vals * half_k
    k2 = torch.stack([kx_k, ky_k], -1)  # (P, 2)
    K3 = torch.einsum("pi,bij->bpj", k2, rotations[:, :2, :].to(dtype)) + D // 2  # (B, P, 3) x,y,z index
    _splat(acc, K3.reshape(-1, 3), torch.view_as_real(vals).reshape(-1, 2), wts.reshape(-1))


def _splat(acc: Accumulator, pos: Tensor, vals: Tensor, wts: Tensor) -> None:
    """Trilinear scatter-add of values (M, 2) and weights (M,) at grid positions (M, 3) (x, y, z)."""
    D = acc.size
    p0 = torch.floor(pos)
    f = pos - p0
    i0 = p0.long()
    for dz in (0, 1):
        wz = f[:, 2] if dz else 1 - f[:, 2]
        z = i0[:, 2] + dz
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1 - f[:, 1]
            y = i0[:, 1] + dy
            for dx in (0, 1):
                wx = f[:, 0] if dx else 1 - f[:, 0]
                x = i0[:, 0] + dx
                w = wx * wy * wz
                ok = (x >= 0) & (x < D) & (y >= 0) & (y < D) & (z >= 0) & (z < D)
                idx = ((z * D + y) * D + x)[ok]
                w = w[ok]
                acc.num.index_add_(0, idx, vals[ok] * w[:, None])
                acc.weight.index_add_(0, idx, wts[ok] * w)


def _flip3(x: Tensor) -> Tensor:
    """x(-K) on a centred even (D, D, D) grid."""
    return torch.roll(torch.flip(x, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))


def accumulator_spectra(acc: Accumulator) -> tuple[Tensor, Tensor]:
    """Friedel-completed (D, D, D) complex numerator and real weight."""
    D = acc.size
    num = torch.view_as_complex(acc.num.reshape(D, D, D, 2).contiguous())
    w = acc.weight.reshape(D, D, D)
    return num + _flip3(num).conj(), w + _flip3(w)


def reconstruct(acc: Accumulator, tau: float = 1e-3) -> Tensor:
    """Real-space map (n, n, n) from an accumulator.

    Args:
        acc: the sums.
        tau: Wiener constant, as a fraction of the mean weight inside the
            Nyquist sphere (regularises weakly sampled voxels).
    Returns:
        (n, n, n) float32 map, MRC order (z, y, x), centre at n // 2.
    """
    D, n = acc.size, acc.box
    num, w = accumulator_spectra(acc)
    r = torch.arange(D, device=w.device, dtype=w.dtype) - D // 2
    inside = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= (D // 2) ** 2
    t = tau * w[inside].mean().clamp_min(1e-30)
    spec = torch.where(inside, num / (w + t), torch.zeros_like(num))
    vol = ifft3_centered(spec).real
    a = D // 2 - n // 2
    vol = vol[a : a + n, a : a + n, a : a + n]
    return (vol / sinc2_window_3d(n, D, vol.device, vol.dtype)).to(torch.float32)
