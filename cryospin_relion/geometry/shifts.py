"""In-plane translations as Fourier phase ramps (centred layout of fft2_centered)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import freq_1d


def phase_ramp(shifts_px: Tensor, box: int) -> Tensor:
    """Phase factors that translate image content by ``shifts_px``.

    Multiplying a centred spectrum by this moves a feature at x to x + shift.

    Args:
        shifts_px: (B, 2) (x, y) translations in pixels.
        box: image side n.
    Returns:
        (B, n, n) complex exp(-2 pi i (fx sx + fy sy)).
    """
    f = freq_1d(box, device=shifts_px.device, dtype=shifts_px.dtype)
    ph = -2.0 * math.pi * (f[None, None, :] * shifts_px[:, 0, None, None] + f[None, :, None] * shifts_px[:, 1, None, None])
    return torch.polar(torch.ones_like(ph), ph)


def origin_to_translation(origin_A: Tensor, apix: Tensor) -> Tensor:
    """Image-content translation (pixels) of a RELION origin in A.

    RELION's particle image is the centred projection shifted by minus its origin
    (rlnOriginXAngst = +4 at 2 A/px moves a feature from x=10 to x=8).

    Args:
        origin_A: (B, 2) (rlnOriginXAngst, rlnOriginYAngst).
        apix: (B,) or scalar pixel size in A.
    Returns:
        (B, 2) translation in pixels = -origin / apix.
    """
    apix = torch.as_tensor(apix, dtype=origin_A.dtype, device=origin_A.device)
    if apix.ndim == 1:
        apix = apix[:, None]
    return -origin_A / apix


def hartley_shift(ht: Tensor, shifts_px: Tensor) -> Tensor:
    """Translate real images given by their centred Hartley transforms (B, n, n).

    H'(k) = H(k) cos(phi) - H(-k) sin(phi), phi = -2 pi k.s (the Hartley form of
    the Fourier shift theorem), so shifts never leave real arithmetic.
    """
    n = ht.shape[-1]
    f = freq_1d(n, device=ht.device, dtype=ht.dtype)
    ph = -2.0 * math.pi * (f[None, None, :] * shifts_px[:, 0, None, None] + f[None, :, None] * shifts_px[:, 1, None, None])
    return ht * torch.cos(ph) - flip_freq_2d(ht) * torch.sin(ph)


def flip_freq_2d(x: Tensor) -> Tensor:
    """x(-k) for a centred (..., n, n) spectrum; for even n the Nyquist row maps to itself."""
    n = x.shape[-1]
    y = torch.flip(x, dims=(-2, -1))
    if n % 2 == 0:
        y = torch.roll(y, shifts=(1, 1), dims=(-2, -1))
    return y
