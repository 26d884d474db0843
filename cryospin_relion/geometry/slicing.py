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
from cryospin_relion.geometry.sampling import grid_coordinates, sample_spectrum_grid


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


def centred_frequencies(crop: int, box: int, device=None, dtype=torch.float32) -> Tensor:
    """(crop * crop, 2) frequencies (fx, fy) in cycles per pixel of a box-``box`` image, of the central
    crop x crop Fourier box in the layout of fourier.fft2_centered (row-major (y, x): flat index y * crop + x)."""
    k = (torch.arange(crop, device=device, dtype=dtype) - crop // 2) / box
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return torch.stack([kx.reshape(-1), ky.reshape(-1)], -1)


def slice_coordinates(rotations: Tensor, freqs: Tensor, padded: int) -> Tensor:
    """Where central sections' frequencies lie in a ``padded``-voxel spectrum, in grid_sample's normalised
    coordinates (``sampling.grid_coordinates``).

    Args:
        rotations: (B, 3, 3) RELION A.
        freqs: (P, 2) (fx, fy), cycles per image pixel.
        padded: side D of the (oversampled) volume spectrum (D voxels per cycle per pixel).
    Returns:
        (B, P, 3) the points A^T [fx, fy, 0] x D (x, y, z), normalised: one matrix product with the scale
        folded into A's rows, and one add.
    """
    scale, offset = grid_coordinates(padded)
    # K3_j = sum_i A_ij k_i over i in (x, y): row vectors k times A's first two rows
    return torch.matmul(freqs.to(rotations.dtype), rotations[:, :2, :] * (padded * scale)).add_(offset)


def slice_values(spectrum: Tensor, rotations: Tensor, freqs: Tensor, threads: int | None = None) -> Tensor:
    """Central sections of a centred 3D spectrum at the frequencies ``freqs`` only.

    Args:
        spectrum: (D, D, D) complex (Fourier) or real (Hartley) centred spectrum, D = pad * box.
        rotations: (B, 3, 3) RELION A (differentiable).
        freqs: (P, 2) (fx, fy) in cycles per pixel of the images (e.g. ``centred_frequencies``, or the
            frequencies inside a mask: the engine computes only those).
        threads: CPU workers of the interpolation (``sampling.sample_grid``).
    Returns:
        (B, P) complex or real values (a central section of a Hartley transform is the Hartley transform
        of the projection).
    """
    coords = slice_coordinates(rotations.to(spectrum.real.dtype), freqs, spectrum.shape[-1])
    return sample_spectrum_grid(spectrum, coords, threads or None)


def extract_slices(
    spectrum: Tensor, rotations: Tensor, box: int, threads: int | None = None, crop: int | None = None
) -> Tensor:
    """Central slices of a centred 3D spectrum at the given poses.

    Args:
        spectrum: (D, D, D) complex (Fourier) or real (Hartley) centred spectrum,
            D = pad * box.
        rotations: (B, 3, 3) RELION A (differentiable).
        box: output image side n.
        threads: CPU workers of the interpolation (``sampling.sample_grid``).
        crop: only the central crop x crop frequencies (same layout as
            fourier.crop_centered_2d of the full slice).
    Returns:
        (B, c, c) complex or real slices in the layout of fft2_centered
        (Hartley slices for a Hartley spectrum: a central section of a Hartley
        transform is the Hartley transform of the projection).
    """
    c = crop or box
    freqs = centred_frequencies(c, box, spectrum.device, spectrum.real.dtype)
    return slice_values(spectrum, rotations, freqs, threads).reshape(rotations.shape[0], c, c)
