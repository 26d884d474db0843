"""Centred FFT / Hartley helpers, frequency grids and Fourier cropping.

Fourier origin (docs/conventions.md): for a box of N pixels the real-space
centre is pixel N // 2 (RELION's origin, also for odd N), and in a centred
transform the zero frequency sits at index N // 2 as well. Frequencies are
``(i - N // 2) / N`` cycles per pixel; for even N index 0 is the unpaired
Nyquist term -1/2.

Arrays follow MRC order: 2D (..., y, x), 3D (..., z, y, x).
"""

from __future__ import annotations

import torch
from torch import Tensor


def fft2_centered(img: Tensor) -> Tensor:
    """Centred 2D FFT over the last two axes: real-space centre and DC both at N // 2."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(img, dim=(-2, -1))), dim=(-2, -1))


def ifft2_centered(ft: Tensor) -> Tensor:
    """Inverse of fft2_centered (complex result; take .real for real images)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(ft, dim=(-2, -1))), dim=(-2, -1))


def fft3_centered(vol: Tensor) -> Tensor:
    """Centred 3D FFT over the last three axes."""
    d = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol, dim=d), dim=d), dim=d)


def ifft3_centered(ft: Tensor) -> Tensor:
    """Inverse of fft3_centered (complex result)."""
    d = (-3, -2, -1)
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(ft, dim=d), dim=d), dim=d)


def fft_to_hartley(ft: Tensor) -> Tensor:
    """Hartley transform from a Fourier transform: H = Re(F) - Im(F)."""
    return ft.real - ft.imag


def ht2_centered(img: Tensor) -> Tensor:
    """Centred 2D Hartley transform (real), same layout as fft2_centered."""
    return fft_to_hartley(fft2_centered(img))


def ht3_centered(vol: Tensor) -> Tensor:
    """Centred 3D Hartley transform (real)."""
    return fft_to_hartley(fft3_centered(vol))


def iht3_centered(ht: Tensor) -> Tensor:
    """Inverse centred 3D Hartley transform: the Hartley transform is its own inverse up to 1/N^3."""
    n = ht.shape[-1] * ht.shape[-2] * ht.shape[-3]
    return ht3_centered(ht) / n


def iht2_centered(ht: Tensor) -> Tensor:
    """Inverse centred 2D Hartley transform."""
    n = ht.shape[-1] * ht.shape[-2]
    return ht2_centered(ht) / n


def freq_1d(n: int, device=None, dtype=torch.float32) -> Tensor:
    """Centred frequencies in cycles/pixel, (n,): (i - n // 2) / n."""
    return (torch.arange(n, device=device, dtype=dtype) - n // 2) / n


def freq_grid_2d(n: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """(fy, fx) each (n, n), cycles/pixel, centred layout (y, x)."""
    f = freq_1d(n, device, dtype)
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    return fy, fx


def radius_grid_2d(n: int, device=None, dtype=torch.float32) -> Tensor:
    """Radius in Fourier pixels (integer shells for rounding), (n, n), centred."""
    fy, fx = freq_grid_2d(n, device, dtype)
    return torch.sqrt(fx**2 + fy**2) * n


def radius_grid_3d(n: int, device=None, dtype=torch.float32) -> Tensor:
    """Radius in Fourier pixels, (n, n, n), centred (z, y, x)."""
    f = freq_1d(n, device, dtype) * n
    z, y, x = torch.meshgrid(f, f, f, indexing="ij")
    return torch.sqrt(x**2 + y**2 + z**2)


def crop_centered_2d(ft: Tensor, new: int) -> Tensor:
    """Keep the central new x new block of a centred 2D spectrum (..., n, n)."""
    n = ft.shape[-1]
    a = n // 2 - new // 2
    return ft[..., a : a + new, a : a + new]


def pad_centered_2d(ft: Tensor, new: int) -> Tensor:
    """Zero-pad a centred 2D spectrum (..., n, n) to (..., new, new), DC kept at new // 2."""
    n = ft.shape[-1]
    out = ft.new_zeros(*ft.shape[:-2], new, new)
    a = new // 2 - n // 2
    out[..., a : a + n, a : a + n] = ft
    return out


def fourier_crop_2d(img: Tensor, new_box: int) -> Tensor:
    """Downsample real images (..., n, n) to (..., new_box, new_box) by Fourier cropping.

    The pixel size grows by n / new_box; the image mean and the real-space centre
    (pixel n // 2 -> new_box // 2) are preserved. For new_box == n this is the
    identity; new_box > n pads (upsampling).
    """
    n = img.shape[-1]
    if new_box == n:
        return img
    ft = fft2_centered(img)
    ft = crop_centered_2d(ft, new_box) if new_box < n else pad_centered_2d(ft, new_box)
    out = ifft2_centered(ft).real
    return out * (new_box * new_box) / (n * n)


def fourier_crop_3d(vol: Tensor, new_box: int) -> Tensor:
    """Resample a volume (n, n, n) to (new_box,)*3 by Fourier cropping or padding."""
    n = vol.shape[-1]
    if new_box == n:
        return vol
    ft = fft3_centered(vol)
    if new_box < n:
        a = n // 2 - new_box // 2
        ft = ft[..., a : a + new_box, a : a + new_box, a : a + new_box]
    else:
        out = ft.new_zeros(*ft.shape[:-3], new_box, new_box, new_box)
        a = new_box // 2 - n // 2
        out[..., a : a + n, a : a + n, a : a + n] = ft
        ft = out
    return ifft3_centered(ft).real * (new_box**3) / (n**3)
