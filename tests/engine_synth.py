"""Synthetic data and pose/map alignment for the engine tests and bench/abinit.py.

Data are made directly with the geometry functions (project_spectrum + ctf_2d +
Gaussian noise); ``align_poses`` finds the global rotation G (and mirror) with
R_est ~ R_true @ G, then the 3D offset of the map from the shifts.
"""

from __future__ import annotations

import numpy as np
import torch

from cryospin_relion.geometry.backproject import Accumulator, insert_images, reconstruct
from cryospin_relion.geometry.ctf import ctf_2d
from cryospin_relion.geometry.fsc import fsc, resolution_at
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations
from cryospin_relion.geometry.slicing import volume_to_projector

Q = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))


def blob_volume(n: int, seed: int = 0, nblobs: int = 20) -> torch.Tensor:
    """An asymmetric (n, n, n) map of Gaussian blobs inside radius ~0.3 n, positive, max 1."""
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


def random_ctf(N: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    du = 10000 + 15000 * torch.rand(N, generator=g, dtype=torch.float64)
    return {
        "defocus_u": du,
        "defocus_v": du - 500 * torch.rand(N, generator=g, dtype=torch.float64),
        "defocus_angle": 180 * torch.rand(N, generator=g, dtype=torch.float64),
        "voltage": torch.full((N,), 300.0, dtype=torch.float64),
        "cs": torch.full((N,), 2.7, dtype=torch.float64),
        "amp_contrast": torch.full((N,), 0.1, dtype=torch.float64),
        "phase_shift": torch.zeros(N, dtype=torch.float64),
        "bfactor": torch.zeros(N, dtype=torch.float64),
        "scale": torch.ones(N, dtype=torch.float64),
    }


def simulate(n: int = 32, N: int = 2000, apix: float = 4.0, snr: float = 0.3, max_shift_px: float = 2.0,
             with_ctf: bool = True, seed: int = 0) -> dict:
    """Particles (N, n, n) float32 normalised to unit noise std, protein positive."""
    g = torch.Generator().manual_seed(seed + 1)
    vol = blob_volume(n, seed)
    R = random_rotations(N, g)
    t = (torch.rand(N, 2, generator=g, dtype=torch.float64) * 2 - 1) * max_shift_px
    ctf = random_ctf(N, g) if with_ctf else None
    spec = volume_to_projector(vol, pad=2)
    clean = torch.empty(N, n, n, dtype=torch.float64)
    for a in range(0, N, 500):
        sl = slice(a, min(N, a + 500))
        c = None if ctf is None else ctf_2d(n, torch.full((sl.stop - sl.start,), apix, dtype=torch.float64),
                                              {k: v[sl] for k, v in ctf.items()}, dtype=torch.float64)
        clean[sl] = project_spectrum(spec, R[sl], n, t[sl], c)
    sigma = float(clean.var()) ** 0.5 / snr**0.5
    noisy = clean + sigma * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return {"images": (noisy / sigma).float(), "apix": apix, "ctf": ctf, "R": R, "t": t, "vol": vol.float(),
            "sigma": sigma}


def _polar(M: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(M)
    d = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.diag(torch.stack([torch.ones_like(d), torch.ones_like(d), d]))
    return U @ D @ Vh


def align_poses(R_est, R_true, t_est=None, t_true=None) -> dict:
    """Best global alignment R_est_i ~ F(R_true_i) @ G, F = identity or mirror (Q . Q).

    Returns dict(G, mirror, errors_deg (N,), median_deg, R_aligned (estimated poses in the
    truth frame), t_aligned (shifts corrected for the map's 3D offset d)).
    """
    R_est = torch.as_tensor(R_est, dtype=torch.float64)
    R_true = torch.as_tensor(R_true, dtype=torch.float64)
    best = None
    for mirror in (False, True):
        Rt = Q @ R_true @ Q if mirror else R_true
        keep = torch.ones(len(Rt), dtype=torch.bool)
        for _ in range(4):  # robust Procrustes: refit on inliers
            G = _polar((Rt[keep].transpose(-1, -2) @ R_est[keep]).sum(0))
            err = geodesic_distance_deg(Rt @ G, R_est)
            keep = err <= max(2 * float(err.median()), 5.0)
        med = float(err.median())
        if best is None or med < best["median_deg"]:
            best = {"G": G, "mirror": mirror, "errors_deg": err, "median_deg": med}
    G = best["G"]
    R_al = R_est @ G.T
    if best["mirror"]:
        R_al = Q @ R_al @ Q
    best["R_aligned"] = R_al
    if t_est is not None:
        t_est = torch.as_tensor(t_est, dtype=torch.float64)
        t_true = torch.as_tensor(t_true, dtype=torch.float64)
        P = R_al[:, :2, :]  # (N, 2, 3): t_est = t_true - P d
        keep = best["errors_deg"] < max(2 * best["median_deg"], 5.0)
        A = P[keep].reshape(-1, 3)
        b = (t_true - t_est)[keep].reshape(-1)
        d = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
        best["offset"] = d
        best["t_aligned"] = t_est + torch.einsum("nij,j->ni", P, d)
    return best


def backproject_fsc(images, R, t, apix, ctf, vol_true, chunk: int = 500) -> dict:
    """Reconstruct with given poses (truth frame) and FSC vs the true map."""
    n = images.shape[-1]
    acc = Accumulator.zeros(n, 2)
    N = images.shape[0]
    for a in range(0, N, chunk):
        s = slice(a, min(N, a + chunk))
        ap = torch.full((s.stop - s.start,), float(apix), dtype=torch.float64)
        insert_images(acc, torch.as_tensor(images[s]).double(), torch.as_tensor(R[s]).double(),
                      torch.as_tensor(t[s]).double(), ap, None if ctf is None else {k: v[s] for k, v in ctf.items()})
    vol = reconstruct(acc)
    c = fsc(vol, vol_true)
    return {"map": vol, "fsc": c, "res05": resolution_at(c, n, apix, 0.5), "res0143": resolution_at(c, n, apix, 0.143)}


def simulated_star(folder, n: int, map_seed: int, sim_seed: int):
    """A small `cryospin simulate` dataset (box 16, 6 A/px, SNR 1) of a blob map; returns its particles.star."""
    from pathlib import Path

    from cryospin_relion import cli
    from cryospin_relion.io.mrc import write_mrc

    folder = Path(folder)
    write_mrc(folder / "blob.mrc", blob_volume(16, seed=map_seed).float().numpy(), 6.0)
    rc = cli.run(["simulate", "--map", str(folder / "blob.mrc"), "--o", str(folder / "sim"), "--n", str(n),
                  "--box", "16", "--apix", "6", "--snr", "1", "--seed", str(sim_seed), "--quiet"])
    assert rc == 0
    return folder / "sim" / "particles.star"
