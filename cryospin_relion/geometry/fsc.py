"""Fourier shell correlation and the resolution where it crosses a threshold."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cryospin_relion.geometry.fourier import fft3_centered, radius_grid_3d


def fsc(vol1: Tensor, vol2: Tensor) -> Tensor:
    """FSC of two real maps (n, n, n) in integer shells 0 .. n // 2 (shell i = radius i Fourier pixels).

    Returns:
        (n // 2 + 1,) float64 correlations; shell 0 is the DC term.
    """
    n = vol1.shape[-1]
    f1 = fft3_centered(vol1.to(torch.float64))
    f2 = fft3_centered(vol2.to(torch.float64))
    shell = torch.round(radius_grid_3d(n, device=vol1.device, dtype=torch.float64)).long().flatten()
    nshell = n // 2 + 1
    keep = shell < nshell
    shell = shell[keep]

    def ssum(x: Tensor) -> Tensor:
        return torch.zeros(nshell, dtype=torch.float64, device=x.device).index_add_(0, shell, x.flatten()[keep])

    num = ssum((f1 * f2.conj()).real)
    den = torch.sqrt(ssum(f1.abs() ** 2) * ssum(f2.abs() ** 2)).clamp_min(1e-30)
    return (num / den).cpu()


def shell_resolution(n: int, apix: float) -> np.ndarray:
    """Resolution in A of each shell (shell 0 -> inf)."""
    s = np.arange(n // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, n * apix / np.maximum(s, 1e-12), np.inf)


def resolution_at(curve: Tensor | np.ndarray, n: int, apix: float, threshold: float = 0.143) -> float:
    """Resolution in A where the FSC first drops below ``threshold``.

    Interpolates linearly between the last shell above and the first below
    (in spatial frequency). If it never drops, returns the Nyquist resolution 2 * apix.
    """
    c = np.asarray(curve, dtype=np.float64)
    below = np.nonzero(c[1:] < threshold)[0]
    if len(below) == 0:
        return 2.0 * apix
    i = int(below[0]) + 1  # first shell below
    if i == 1:
        return float(shell_resolution(n, apix)[1])
    c0, c1 = c[i - 1], c[i]
    s = (i - 1) + (c0 - threshold) / (c0 - c1)  # fractional shell
    return float(n * apix / s)
