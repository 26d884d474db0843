"""The volume decoder: an explicit 3D grid of Hartley coefficients at the working box.

The grid ``V`` (n, n, n), centred like ``fourier.ht3_centered``, is scaled so that
its central sections are the (2D, 1/n-normalised) Hartley transforms of the
particle projections:  slice_A(V)(k) = HT2(projection)(k) / n,  with slices taken by
differentiable trilinear interpolation (``geometry.slicing.extract_slices`` on the
real Hartley grid, no padding: the grid *is* the model).

Parametrisation (``volume_param``):
  - ``linear``:  V = s(r) * P        (P an nn.Parameter, zero at start)
  - ``expmant``: V = s(r) * M * exp(E)   (mantissa M and exponent E, the reference's
    value parametrisation; E starts at 0, M at 0)
s(r) is a fixed radial preconditioner (the RMS of the images' Hartley coefficients
in shell r, measured on the data at the start), so that the parameters are O(1) at
all frequencies and one Adam learning rate suits low and high frequencies alike.
A radial mask keeps only |k| <= mask_radius * n / 2.

The real-space map is the inverse Hartley transform (even n keeps the 3D FFTs fast).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cryospin_relion.geometry.fourier import iht3_centered, radius_grid_2d, radius_grid_3d
from cryospin_relion.geometry.slicing import extract_slices


def radial_profile_2d(ht: Tensor) -> Tensor:
    """RMS of centred 2D spectra (B, n, n) per integer shell 0 .. n // 2 + 1 -> (n // 2 + 2,)."""
    n = ht.shape[-1]
    shell = torch.round(radius_grid_2d(n, device=ht.device, dtype=torch.float64)).long().clamp(max=n // 2 + 1)
    p = (ht.to(torch.float64) ** 2).mean(0).flatten()
    s = torch.zeros(n // 2 + 2, dtype=torch.float64, device=ht.device).index_add_(0, shell.flatten(), p)
    c = torch.zeros_like(s).index_add_(0, shell.flatten(), torch.ones_like(p))
    return torch.sqrt(s / c.clamp_min(1)).to(torch.float32)


class HartleyVolume(nn.Module):
    """Explicit Hartley-space volume (the decoder shared by both stages)."""

    def __init__(self, box: int, param: str = "linear", mask_radius: float = 1.0, radial_scale: Tensor | None = None):
        super().__init__()
        if box % 2:
            raise ValueError("the working box must be even")
        self.box = box
        self.param = param
        r = radius_grid_3d(box)
        mask = r <= mask_radius * box / 2
        self.register_buffer("mask", mask)
        if radial_scale is None:
            radial_scale = torch.ones(box // 2 + 2)
        self.register_buffer("scale", self._scale_grid(radial_scale))
        if param == "linear":
            self.values = nn.Parameter(torch.zeros(box, box, box))
        elif param == "expmant":
            self.mantissa = nn.Parameter(torch.zeros(box, box, box))
            self.exponent = nn.Parameter(torch.zeros(box, box, box))
        else:
            raise ValueError(f"unknown volume parametrisation {param!r}")

    def _scale_grid(self, radial: Tensor) -> Tensor:
        n = self.box
        r = radius_grid_3d(n, dtype=torch.float64)
        # linear interpolation of the shell profile at fractional radius
        r = r.clamp(max=len(radial) - 1.001)
        i0 = torch.floor(r).long()
        f = (r - i0).to(torch.float32)
        radial = radial.to(torch.float32)
        return radial[i0] * (1 - f) + radial[i0 + 1] * f

    def set_radial_scale(self, radial: Tensor) -> None:
        self.scale.copy_(self._scale_grid(radial.cpu()).to(self.scale.device))

    def grid(self) -> Tensor:
        """(n, n, n) Hartley coefficients (differentiable w.r.t. the parameters)."""
        if self.param == "linear":
            v = self.values
        else:
            v = self.mantissa * torch.exp(self.exponent)
        return v * self.scale * self.mask

    def slices(self, rotations: Tensor, crop: int | None = None, grid: Tensor | None = None) -> Tensor:
        """Hartley central sections (B, c, c) at RELION poses (B, 3, 3), c = crop or n."""
        g = self.grid() if grid is None else grid
        return extract_slices(g, rotations.to(g.dtype), self.box, crop=crop)

    @torch.no_grad()
    def real_map(self) -> Tensor:
        """(n, n, n) float32 real-space map (z, y, x), centre n // 2."""
        return (iht3_centered(self.grid().to(torch.float64)) * self.box).to(torch.float32)
