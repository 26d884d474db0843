"""In-memory synthetic datasets of a blob map, for the engine's tests and benchmarks (bench/abinit.py).

``simulate_blobs`` projects an asymmetric map of Gaussian blobs (``blob_volume``)
with the geometry functions directly (``projection.project_spectrum`` +
``ctf.ctf_2d`` + white Gaussian noise), in float64, with a torch generator: no
files, no STAR. ``backproject_fsc`` reconstructs from given poses and scores the
map against the truth. To score estimated poses, first bring them into the
truth's frame with ``pose_error.align_pose_sets(...).to_truth_frame``.
(File-based datasets of any map, as `cryospin simulate` writes them, are
``evaluate.simulate``.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_relion.geometry.backproject import Accumulator, insert_images, volume_from_accumulator
from cryospin_relion.geometry.ctf import CTF, ctf_2d
from cryospin_relion.geometry.fsc import fsc, resolution_at
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.rotations import random_rotations
from cryospin_relion.geometry.slicing import volume_to_projector

__all__ = ["blob_volume", "simulate_blobs", "backproject_fsc"]


def blob_volume(n: int, seed: int = 0, nblobs: int = 20) -> Tensor:
    """An asymmetric (n, n, n) float64 map of Gaussian blobs inside radius ~0.3 n, positive, max 1."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(n, dtype=torch.float64) - n // 2
    z, y, x = torch.meshgrid(r, r, r, indexing="ij")
    vol = torch.zeros(n, n, n, dtype=torch.float64)
    for _ in range(nblobs):
        c = (torch.rand(3, generator=g, dtype=torch.float64) * 2 - 1) * 0.22 * n
        s = (0.035 + 0.04 * torch.rand(1, generator=g, dtype=torch.float64)) * n
        a = 0.5 + torch.rand(1, generator=g, dtype=torch.float64)
        vol += a * torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s**2))
    return vol / vol.max()


def _random_ctf(N: int, g: torch.Generator) -> CTF:
    """(N,) float64 CTFs: defocus U in [1, 2.5] um, V up to 500 A less, any angle; 300 kV, Cs 2.7 mm, Q0 0.1."""
    du = 10000 + 15000 * torch.rand(N, generator=g, dtype=torch.float64)
    full = lambda v: torch.full((N,), v, dtype=torch.float64)  # noqa: E731
    return CTF(
        defocus_u=du,
        defocus_v=du - 500 * torch.rand(N, generator=g, dtype=torch.float64),
        defocus_angle=180 * torch.rand(N, generator=g, dtype=torch.float64),
        voltage=full(300.0), cs=full(2.7), amp_contrast=full(0.1),
        phase_shift=full(0.0), bfactor=full(0.0), scale=full(1.0),
    )


def simulate_blobs(n: int = 32, N: int = 2000, apix: float = 4.0, snr: float = 0.3, max_shift_px: float = 2.0,
                   with_ctf: bool = True, seed: int = 0) -> dict:
    """N particles of ``blob_volume(n, seed)`` at uniform random poses, normalised to unit noise std, protein positive.

    Returns:
        dict: images (N, n, n) float32; apix (A); ctf (``CTF``, float64) or None; R (N, 3, 3) RELION A;
        t (N, 2) image translations in pixels (= -origin / apix), uniform in +-max_shift_px;
        vol (n, n, n) float32 truth; sigma (the noise std the images were divided by).
    """
    g = torch.Generator().manual_seed(seed + 1)
    vol = blob_volume(n, seed)
    R = random_rotations(N, g)
    t = (torch.rand(N, 2, generator=g, dtype=torch.float64) * 2 - 1) * max_shift_px
    ctf = _random_ctf(N, g) if with_ctf else None
    spec = volume_to_projector(vol, pad=2)
    clean = torch.empty(N, n, n, dtype=torch.float64)
    for a in range(0, N, 500):
        sl = slice(a, min(N, a + 500))
        c = None if ctf is None else ctf_2d(n, torch.full((sl.stop - sl.start,), apix, dtype=torch.float64), ctf[sl],
                                              dtype=torch.float64)
        clean[sl] = project_spectrum(spec, R[sl], n, t[sl], c)
    sigma = float(clean.var()) ** 0.5 / snr**0.5
    noisy = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return {"images": (noisy / sigma).float(), "apix": apix, "ctf": ctf, "R": R, "t": t, "vol": vol.float(),
            "sigma": sigma}


def with_junk(images: Tensor, fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A copy of ``images`` (N, n, n) in which a random ``fraction`` of them are pure white noise N(0, 1) (junk:
    empty ice, failed picks, at the noise level of ``simulate_blobs``), and the (N,) bool mask of those."""
    N = images.shape[0]
    junk = torch.zeros(N, dtype=torch.bool)
    junk[torch.randperm(N, generator=torch.Generator().manual_seed(seed))[: int(N * fraction)]] = True
    out = images.clone()
    out[junk] = torch.randn(int(junk.sum()), *images.shape[1:], generator=torch.Generator().manual_seed(seed + 5),
                            dtype=images.dtype)
    return out, junk


def backproject_fsc(images, R, t, apix: float, ctf: CTF | None, vol_true: Tensor, chunk: int = 500) -> dict:
    """Reconstruct from given poses (in the truth's frame) and the FSC against the true map.

    Args:
        images: (N, n, n); R: (N, 3, 3) RELION A; t: (N, 2) translations in pixels; apix: A.
    Returns:
        dict: map (n, n, n) float32, fsc (n // 2 + 1,), res05 and res0143 (A at FSC 0.5 / 0.143).
    """
    n = images.shape[-1]
    acc = Accumulator.zeros(n, 2)
    N = images.shape[0]
    for a in range(0, N, chunk):
        s = slice(a, min(N, a + chunk))
        ap = torch.full((s.stop - s.start,), float(apix), dtype=torch.float64)
        insert_images(acc, torch.as_tensor(images[s]).double(), torch.as_tensor(R[s]).double(),
                      torch.as_tensor(t[s]).double(), ap, None if ctf is None else ctf[s])
    vol = volume_from_accumulator(acc)
    c = fsc(vol, vol_true)
    return {"map": vol, "fsc": c, "res05": resolution_at(c, n, apix, 0.5), "res0143": resolution_at(c, n, apix, 0.143)}
