"""Differentiable central-slice extraction (Fourier slice theorem) by trilinear interpolation.

A particle's projection has the 2D transform P(k) = V(A^T [kx, ky, 0]), with A
RELION's matrix (volume -> image coordinates) and k in the centred layout of
``fourier.fft2_centered``. Volumes are oversampled by ``pad`` in Fourier space
(zero-padded in real space) so trilinear interpolation is accurate; the
interpolation's real-space sinc^2 falloff is pre-divided ("gridding correction").
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import fft3_centered
from cryospin_relion.geometry.sampling import sample_spectrum


def sinc2_window_3d(n: int, padded: int, device=None, dtype=torch.float32) -> Tensor:
    """Real-space response sinc^2(x / padded) sinc^2(y / padded) sinc^2(z / padded) of
    trilinear interpolation on a grid of ``padded`` samples, for a box of n (z, y, x)."""
    x = (torch.arange(n, device=device, dtype=dtype) - n // 2) / padded
    s = torch.special.sinc(x) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def pad_volume(vol: Tensor, padded: int) -> Tensor:
    """Zero-pad a real volume (n, n, n) to (padded,)*3, keeping the centre n//2 at padded//2."""
    n = vol.shape[-1]
    out = vol.new_zeros(padded, padded, padded)
    a = padded // 2 - n // 2
    out[a : a + n, a : a + n, a : a + n] = vol
    return out


def volume_to_projector(vol: Tensor, pad: int = 2) -> Tensor:
    """Prepare a real volume for slicing: gridding pre-correction, zero-pad, centred FFT.

    Args:
        vol: (n, n, n) real, MRC order (z, y, x), centre at n // 2.
        pad: oversampling factor (2 as in RELION).
    Returns:
        (pad*n,)*3 complex centred spectrum.
    """
    n = vol.shape[-1]
    padded = pad * n
    corr = vol / sinc2_window_3d(n, padded, vol.device, vol.dtype)
    return fft3_centered(pad_volume(corr, padded))


def slice_points(rotations: Tensor, box: int, padded: int, crop: int | None = None) -> Tensor:
    """Where the central slices' frequencies lie in the (oversampled) volume spectrum.

    Args:
        rotations: (B, 3, 3) RELION A.
        box: image side n (sets the frequency spacing: padded / n voxels per image pixel).
        padded: side of the (oversampled) volume spectrum.
        crop: return only the central crop x crop frequencies (coarse-to-fine work
            at a smaller Fourier box); default n.
    Returns:
        (B, c, c, 3) points A^T [kx, ky, 0] (x, y, z) in padded voxels from the centre
        (``sampling`` convention), c = crop or n.
    """
    dtype, device = rotations.dtype, rotations.device
    c = crop or box
    k = (torch.arange(c, device=device, dtype=dtype) - c // 2) * (padded / box)
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    k2 = torch.stack([kx, ky], -1)  # (n, n, 2) in padded-voxel units
    # K3 = A^T [kx, ky, 0]  ->  K3_j = sum_i A_ij k_i over i in (x, y)
    return torch.einsum("hwi,bij->bhwj", k2, rotations[:, :2, :])


def extract_slices(
    spectrum: Tensor, rotations: Tensor, box: int, threads: int | None = None, crop: int | None = None
) -> Tensor:
    """Central slices of a centred 3D spectrum at the given poses.

    Args:
        spectrum: (D, D, D) complex (Fourier) or real (Hartley) centred spectrum,
            D = pad * box.
        rotations: (B, 3, 3) RELION A (differentiable).
        box: output image side n.
        threads: CPU workers of the interpolation (``sampling.sample_trilinear``).
        crop: only the central crop x crop frequencies (same layout as
            fourier.crop_centered_2d of the full slice).
    Returns:
        (B, c, c) complex or real slices in the layout of fft2_centered
        (Hartley slices for a Hartley spectrum: a central section of a Hartley
        transform is the Hartley transform of the projection).
    """
    points = slice_points(rotations.to(spectrum.real.dtype), box, spectrum.shape[-1], crop)
    return sample_spectrum(spectrum, points, threads or None)
