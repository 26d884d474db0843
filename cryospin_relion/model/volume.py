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

from cryospin_relion.geometry.fourier import fft_to_hartley, iht3_centered, radius_grid_2d, radius_grid_3d
from cryospin_relion.geometry.sampling import sample_spectrum
from cryospin_relion.geometry.slicing import extract_slices, slice_values, volume_to_projector


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

    def slices(self, rotations: Tensor, crop: int | None = None, grid: Tensor | None = None,
               freqs: Tensor | None = None) -> Tensor:
        """Hartley central sections (B, c, c) at RELION poses (B, 3, 3), c = crop or n; with ``freqs`` (P, 2)
        ((fx, fy), cycles per pixel: e.g. ``forward.FrequencyMask.freqs``) only those, (B, P)."""
        g = self.grid() if grid is None else grid
        if freqs is not None:
            return slice_values(g, rotations.to(g.dtype), freqs)
        return extract_slices(g, rotations.to(g.dtype), self.box, crop=crop)

    @torch.no_grad()
    def real_map(self) -> Tensor:
        """(n, n, n) float32 real-space map (z, y, x), centre n // 2."""
        return (iht3_centered(self.grid().to(torch.float64)) * self.box).to(torch.float32)


def symmetrise_hartley(ht: Tensor, operators: Tensor, radius: float | None = None, pad: int = 2) -> Tensor:
    """Average of a centred Hartley grid over a point group: H_sym(k) = mean over S of H(S^T k).

    Rotating a real map about its centre voxel rotates its Fourier and Hartley transforms alike,
    so this is the transform of mean_S V(S^T r), a map with V(S r) = V(r) for every S
    (docs/conventions.md, "Point-group symmetry").

    Sampled as ``evaluate.symmetry_align.symmetrise_map`` does: the identity term is the grid itself,
    the others trilinear samples of the ``pad``-times oversampled, gridding-corrected transform
    (``slicing.volume_to_projector``), taken as a Hartley transform (one channel: interpolation is
    linear, so this equals interpolating F and then taking Re - Im). Why not trilinear on the grid
    itself: that multiplies the rotated copies by sinc^2(r / n) in real space (0.81 at r = n / 4).
    The average is not exactly idempotent (about 3% of the norm at box 32, D7): apply it to
    updates (``SymmetricUpdates``), not over and over to the same grid, where the gridding
    correction's error grows.

    Args:
        ht: (n, n, n) Hartley grid, centred (``fourier.ht3_centered`` layout, (z, y, x)).
        operators: (G, 3, 3) rotations S (``geometry.symmetry.symmetry_operators``), the identity first.
        radius: only frequencies |k| <= radius (Fourier pixels) are computed, the others are 0
            (the volume's mask: ``HartleyVolume.mask``); default all (rotated points outside the grid read 0).
        pad: oversampling of the sampled transform.
    Returns:
        (n, n, n) in ``ht``'s dtype and device; ``ht`` itself when G = 1.
    """
    G, n = operators.shape[0], ht.shape[-1]
    if G == 1:
        return ht
    work = torch.float64 if ht.dtype == torch.float64 else torch.float32
    h = ht.to(work)
    spec = fft_to_hartley(volume_to_projector(iht3_centered(h), pad))  # at pad * k: H of the n-box map at k
    k = torch.arange(n, device=ht.device, dtype=work) - n // 2
    kz, ky, kx = torch.meshgrid(k, k, k, indexing="ij")
    kv = torch.stack([kx, ky, kz], -1)  # (n, n, n, 3) (x, y, z)
    inside = kv.norm(dim=-1) <= (radius if radius is not None else float("inf"))
    pts = kv[inside] * pad  # (M, 3) padded voxels
    ops = operators[1:].to(device=ht.device, dtype=work)
    rot = sample_spectrum(spec, pts[None] @ ops)  # (G - 1, M): rows k^T S = (S^T k)^T
    out = torch.zeros_like(h)
    out[inside] = (h[inside] + rot.sum(0)) / G
    return out.to(ht.dtype)


def _write_grid(volume: HartleyVolume, g: Tensor) -> None:
    """Set ``volume``'s parameters so that its grid is ``g`` inside the mask (the radial scale and mask are
    rotation-invariant, so a symmetric ``g`` gives a symmetric grid): ``linear``: values = g / s;
    ``expmant``: the exponent kept, mantissa = g / (s exp(E)). Values outside the mask (unused) are kept."""
    keep = volume.mask & (volume.scale != 0)
    if volume.param == "linear":
        volume.values.copy_(torch.where(keep, g / torch.where(keep, volume.scale, 1.0), volume.values))
    else:
        den = torch.where(keep, volume.scale * torch.exp(volume.exponent), 1.0)
        volume.mantissa.copy_(torch.where(keep, g / den, volume.mantissa))


class SymmetricUpdates:
    """Keeps a ``HartleyVolume`` symmetric under a point group while it trains (``abinit --sym-mode impose``).

    ``start(volume)`` records the grid as it is (a fresh volume is zero, a restored one was kept
    symmetric); after each optimiser step ``self(volume)`` replaces the change since the last call by its
    average over the group: grid = previous + symmetrise_hartley(grid - previous). As the previous grid
    is symmetric, this is the projected step of projected Adam (the Adam moments see the raw gradients).
    Why the step and not the grid: ``symmetrise_hartley`` is not exactly idempotent, and applied to the
    same grid after every step its interpolation error compounds (box 32, D7: the norm grows 2.5x in 20
    applications); applied to steps, the grid is one average of the sum of the steps.
    """

    def __init__(self, operators: Tensor):
        self.operators = torch.as_tensor(operators)
        self._last: Tensor | None = None

    @torch.no_grad()
    def start(self, volume: HartleyVolume) -> None:
        self._last = volume.grid().detach().clone()
        self._radius = float(radius_grid_3d(volume.box, device=volume.mask.device)[volume.mask].max())

    @torch.no_grad()
    def __call__(self, volume: HartleyVolume) -> None:
        if self._last is None:  # no start: the whole grid is averaged once
            self.start(volume)
            self._last.zero_()
        g = volume.grid()
        ops = self.operators.to(device=g.device, dtype=g.dtype)
        _write_grid(volume, self._last + symmetrise_hartley(g - self._last, ops, radius=self._radius))
        self._last = volume.grid().detach().clone()
