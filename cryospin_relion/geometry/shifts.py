"""In-plane translations as Fourier phase ramps (centred layout of fft2_centered)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import freq_1d
from cryospin_relion.geometry.slicing import centred_frequencies


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
    the Fourier shift theorem), so shifts never leave real arithmetic. The whole grid's
    ``hartley_shift_at``.
    """
    n = ht.shape[-1]
    freqs = centred_frequencies(n, n, ht.device, ht.dtype)
    out = hartley_shift_at(ht.flatten(-2), shifts_px, freqs, negated_index(n, ht.device))
    return out.reshape(ht.shape)


def hartley_shift_at(values: Tensor, shifts_px: Tensor, freqs: Tensor, negated: Tensor) -> Tensor:
    """``hartley_shift`` of Hartley coefficients given at P frequencies only.

    Args:
        values: (B, P) H(k) at the frequencies ``freqs``.
        shifts_px: (B, 2) (x, y) translations in pixels.
        freqs: (P, 2) (fx, fy) in cycles per pixel.
        negated: (P,) the position of -k among the P frequencies, for each k (the set must hold -k with k).
    Returns:
        (B, P) H'(k) = H(k) cos(phi) - H(-k) sin(phi), phi = -2 pi k.s.
    """
    ph = torch.matmul(shifts_px.to(values.dtype), freqs.to(values.dtype).T).mul_(-2.0 * math.pi)  # (B, P)
    return values * torch.cos(ph) - values.index_select(-1, negated) * torch.sin(ph)


def negated_index(n: int, device=None) -> Tensor:
    """(n * n,) the flat index of -k for each k of a centred n x n grid (fourier.fft2_centered layout); for even
    n the Nyquist row and column map to themselves (their -k is outside the grid: it aliases to itself)."""
    i = torch.arange(n, device=device)
    j = (n - i) % n if n % 2 == 0 else n - 1 - i  # index of -(i - n // 2) + n // 2
    return (j[:, None] * n + j[None, :]).reshape(-1)
