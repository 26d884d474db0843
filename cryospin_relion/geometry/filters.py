"""Filters and resampling of maps in Fourier space (pure functions; maps (n, n, n), centre n // 2).

Conventions as in geometry/fourier.py: the spectrum is centred (DC at index n // 2),
radii are in Fourier pixels of the box, a resolution in A is n * apix / radius.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cryospin_relion.geometry.fourier import fft3_centered, fourier_crop_3d, ifft3_centered, radius_grid_3d


def lowpass(vol: np.ndarray, res_A: float, apix: float, width_shells: float = 2.0) -> np.ndarray:
    """Low-pass filter a map at ``res_A`` (never beyond Nyquist) with a raised-cosine edge that starts at
    the cut-off radius and is ``width_shells`` Fourier pixels wide. Returns float32."""
    n = vol.shape[-1]
    v = torch.as_tensor(vol, dtype=torch.float64)
    r = radius_grid_3d(n, dtype=torch.float64)
    cut = n * apix / max(res_A, 2 * apix)
    edge = ((r - cut) / width_shells).clamp(0, 1)
    filt = 0.5 * (1 + torch.cos(math.pi * edge))
    return ifft3_centered(fft3_centered(v) * filt).real.float().numpy()


def resample_box(vol: np.ndarray, box: int) -> np.ndarray:
    """A map (n, n, n) at box ``box`` by Fourier cropping or padding, i.e. the same physical extent at a
    pixel size scaled by n / box (identity when n == box; padding adds no information). Returns float32."""
    return fourier_crop_3d(torch.as_tensor(np.ascontiguousarray(vol)), box).numpy().astype(np.float32)
