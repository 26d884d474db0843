"""Helpers for the tests that use RELION 3.1 as the oracle: test maps, pose STAR files, running RELION.

Used by test_relion_project.py and test_relion_reconstruct.py (imported by name:
pytest puts this folder on sys.path).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from cryospin_relion.geometry.fourier import fourier_crop_3d
from cryospin_relion.geometry.fsc import fsc
from cryospin_relion.geometry.rotations import matrix_to_euler_np, random_rotations
from cryospin_relion.io.mrc import read_mrc, write_stack

RELION_MISSING = shutil.which("relion_project") is None or shutil.which("relion_reconstruct") is None


def run_relion(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """Run a RELION program (argument list, no shell) in ``cwd``; returns stdout + stderr.

    Fails the test with the tail of the output on a non-zero exit or an 'ERROR' line.
    """
    p = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    out = p.stdout
    assert p.returncode == 0 and "ERROR" not in out, f"{' '.join(args)} failed (exit {p.returncode}):\n{out[-3000:]}"
    return out


def blobs_map(n: int = 64, seed: int = 3) -> np.ndarray:
    """A few asymmetric Gaussian blobs of different widths, (n, n, n) float32, centre n // 2."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) - n // 2,) * 3, indexing="ij")
    vol = np.zeros((n, n, n))
    for _ in range(7):
        c = rng.uniform(-n / 5, n / 5, 3)
        s = rng.uniform(1.5, 4.0)
        vol += rng.uniform(0.5, 1.5) * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def atoms_map(n: int = 64, natoms: int = 400, sigma: float = 0.8, seed: int = 0) -> np.ndarray:
    """Pseudo-atoms (Gaussians of ``sigma`` px) in an ellipsoid: asymmetric, with signal up to Nyquist."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1, 1, (4 * natoms, 3))
    pts = pts[(pts**2).sum(1) <= 1][:natoms] * 0.3 * n * np.array([1.0, 0.8, 0.6])
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) - n // 2,) * 3, indexing="ij")
    vol = np.zeros((n, n, n))
    for (px, py, pz), a in zip(pts, rng.uniform(0.5, 1.5, len(pts))):
        sl = tuple(slice(max(0, int(c) + n // 2 - 4), min(n, int(c) + n // 2 + 5)) for c in (pz, py, px))
        vol[sl] += a * np.exp(-((x[sl] - px) ** 2 + (y[sl] - py) ** 2 + (z[sl] - pz) ** 2) / (2 * sigma**2))
    return vol.astype(np.float32)


def ribosome_64(shared_data: Path) -> np.ndarray:
    """ASPIRE's 70S ribosome (65^3) Fourier-cropped to 64^3 by our fourier_crop_3d."""
    vol, _ = read_mrc(shared_data / "aspire" / "clean70SRibosome_vol_65p.mrc")
    return fourier_crop_3d(torch.as_tensor(vol, dtype=torch.float64), 64).numpy().astype(np.float32)


def write_pose_star(path: Path, n: int, box: int, apix: float, seed: int, *, ctf: bool = True,
                    max_shift_A: float = 6.0, style: str = "3.1", stack: str = "none.mrcs") -> pd.DataFrame:
    """A particle STAR with uniformly random angles, random origins, CTF and halves.

    style "3.1": data_optics + data_particles, origins rlnOriginX/YAngst [A].
    style "3.0": one data_images table, origins rlnOriginX/Y [px], pixel size from
    rlnDetectorPixelSize [um] * 1e4 / rlnMagnification, per-particle voltage etc.
    rlnImageName points at ``stack`` (next to the STAR); for style 3.0 a stack of
    zeros is written there, since RELION reads image sizes when it converts a 3.0
    STAR (and prints ERROR lines if the stack is missing). Returns the particle table.
    """
    rng = np.random.default_rng(seed)
    eul = matrix_to_euler_np(random_rotations(n, torch.Generator().manual_seed(seed)).numpy())
    d = {"rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
         "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2]}
    ox, oy = rng.uniform(-max_shift_A, max_shift_A, (2, n))
    if style == "3.1":
        d.update(rlnOriginXAngst=ox, rlnOriginYAngst=oy)
    else:
        d.update(rlnOriginX=ox / apix, rlnOriginY=oy / apix)
    if ctf:
        du = rng.uniform(8000, 25000, n)
        d.update(rlnDefocusU=du, rlnDefocusV=du * rng.uniform(0.85, 1.0, n), rlnDefocusAngle=rng.uniform(-180, 180, n),
                 rlnPhaseShift=rng.uniform(0, 30, n), rlnCtfBfactor=rng.uniform(0, 50, n))
    d["rlnRandomSubset"] = np.arange(n) % 2 + 1
    parts = pd.DataFrame(d)
    optics = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1}
    if style == "3.1":
        parts["rlnOpticsGroup"] = 1
        og = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           **{k: [v] for k, v in optics.items()}, "rlnImagePixelSize": [apix],
                           "rlnImageSize": [box], "rlnImageDimensionality": [2]})
        starfile.write({"optics": og, "particles": parts}, path, overwrite=True)
    else:
        for k, v in optics.items():
            parts[k] = v
        parts["rlnMagnification"] = 10000.0
        parts["rlnDetectorPixelSize"] = apix  # um: 1e4 * apix / 1e4 = apix A/px
        starfile.write({"images": parts}, path, overwrite=True)
        write_stack(Path(path).parent / stack, np.zeros((n, box, box), np.float32), apix)
    return parts


def correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) Pearson correlation of each image pair of two (N, n, n) stacks."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


def fsc_curve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC per integer shell 0 .. n // 2 of two (n, n, n) maps."""
    return fsc(torch.as_tensor(a), torch.as_tensor(b)).numpy()


def min_fsc_to(curve: np.ndarray, n: int, fraction: float = 0.8) -> float:
    """Lowest FSC over shells 1 .. fraction * Nyquist (shell n / 2)."""
    return float(curve[1 : int(fraction * (n // 2)) + 1].min())
