"""Trilinear sampling of a centred volume at arbitrary points: the one wrapper of ``grid_sample``.

Convention: a volume is (C, D, D, D) in (z, y, x) order; a point is (x, y, z) in
voxels relative to the centre voxel D // 2 (so the origin of a centred spectrum
is the point 0). Points outside the grid read 0. Differentiable with respect to
both the volume and the points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_trilinear", "sample_spectrum", "sample_grid", "sample_spectrum_grid", "grid_coordinates"]

# fewer points than this per chunk are not worth a worker
_MIN_CHUNK_POINTS = 4096


def sample_trilinear(volume: Tensor, points_vox: Tensor, threads: int | None = None) -> Tensor:
    """Trilinear samples of a (C, D, D, D) volume at (..., 3) points (x, y, z) -> (C, ...).

    Args:
        volume: (C, D, D, D) real.
        points_vox: (..., 3) positions in voxels relative to the centre voxel D // 2.
        threads: as ``sample_grid``.
    Returns:
        (C, ...) in the volume's dtype.
    """
    return sample_grid(volume, _normalised(points_vox, volume.shape[-1]), threads)


def _normalised(points_vox: Tensor, D: int) -> Tensor:
    """``grid_coordinates`` of points (..., 3) in voxels from the centre; in place after the first op: one
    temporary, not three (points can be ~10^8 bytes)."""
    return (points_vox + D // 2).mul_(2.0 / (D - 1)).sub_(1.0)


def grid_coordinates(D: int) -> tuple[float, float]:
    """(scale, offset): grid_sample's normalised coordinate of a point p voxels from the centre voxel D // 2 of
    a D-voxel axis is p * scale + offset (align_corners=True: -1 and +1 are the centres of voxels 0 and D - 1)."""
    s = 2.0 / (D - 1)
    return s, (D // 2) * s - 1.0


def sample_grid(volume: Tensor, coords: Tensor, threads: int | None = None) -> Tensor:
    """Trilinear samples of a (C, D, D, D) volume at (..., 3) points (x, y, z) in grid_sample's normalised
    coordinates (``grid_coordinates``) -> (C, ...). Points outside the grid read 0.

    Args:
        threads: CPU workers (default torch.get_num_threads(); 1 on a GPU). On CPU,
            grid_sample parallelises over its batch dimension only, so the points are
            split into that many chunks, which form the batch dimension. The values do
            not depend on it.
    """
    C, D = volume.shape[0], volume.shape[-1]
    shape = coords.shape[:-1]
    g = coords.reshape(-1, 3).to(volume.dtype)
    P = g.shape[0]
    if threads is None:
        threads = torch.get_num_threads() if volume.device.type == "cpu" else 1
    chunks = max(1, min(threads, P // _MIN_CHUNK_POINTS))
    per = -(-P // chunks)
    if per * chunks != P:
        g = torch.cat([g, g.new_zeros(per * chunks - P, 3)])
    out = F.grid_sample(volume.unsqueeze(0).expand(chunks, *volume.shape), g.reshape(chunks, 1, 1, per, 3),
                        mode="bilinear", padding_mode="zeros", align_corners=True)  # (chunks, C, 1, 1, per)
    out = out.reshape(chunks, C, per).transpose(0, 1).reshape(C, chunks * per)
    return out[:, :P].reshape(C, *shape)


def sample_spectrum(spectrum: Tensor, points_vox: Tensor, threads: int | None = None) -> Tensor:
    """``sample_trilinear`` of a (D, D, D) complex (Fourier) or real (Hartley) spectrum -> (...), same kind.

    A complex spectrum is sampled as its real and imaginary parts (two channels)."""
    return sample_spectrum_grid(spectrum, _normalised(points_vox, spectrum.shape[-1]), threads)


def sample_spectrum_grid(spectrum: Tensor, coords: Tensor, threads: int | None = None) -> Tensor:
    """``sample_spectrum`` at points in grid_sample's normalised coordinates (``grid_coordinates``)."""
    if spectrum.is_complex():
        out = sample_grid(torch.view_as_real(spectrum).permute(3, 0, 1, 2), coords, threads)
        return torch.complex(out[0], out[1])
    return sample_grid(spectrum.unsqueeze(0), coords, threads)[0]
