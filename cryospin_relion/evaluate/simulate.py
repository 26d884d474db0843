"""Synthetic particle datasets: a map (or an atomic model) -> RELION particles with CTF, shifts and noise.

Forward model (the project's, equal to RELION's ``relion_project``)::

    image_i = IFFT( CTF_i * ramp(-origin_i) * slice_{A_i}( FFT(map) ) ) + noise_i

- A_i uniformly random on SO(3) (RELION matrix A, volume -> image coordinates);
- origin_i (rlnOriginX/YAngst) Gaussian, ``shift_std`` pixels per axis;
- CTF: mean defocus uniform in [defocus_min, defocus_max] A, astigmatism
  |dU - dV| uniform in [0, astigmatism] A (dU >= dV), angle uniform in [0, 180)
  degrees; 300 kV, Cs 2.7 mm, Q0 0.1, no B-factor by default;
- noise: white Gaussian with variance var(clean) / SNR, where var(clean) is the
  variance of all pixels of all noise-free (CTF-modulated, shifted) images
  (the whole box, not only the particle). With noise, images and the ground
  truth map are divided together by the noise sigma, so the noise has std 1
  (as in RELION-normalised particles) and ``images = project(ground_truth) + N(0, 1)``.

Images are protein-positive (white protein), as RELION extracts particles: the
CTF is +Q0 at zero frequency and the map's density is positive.

Randomness: poses, CTFs and shifts come from ``seed``; the noise has its own
stream (``seed`` too), so the same seed with and without noise gives the same
clean images.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cryospin_relion.errors import InputError
from cryospin_relion.geometry.ctf import CTF, ctf_2d
from cryospin_relion.geometry.fourier import fourier_crop_3d
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.rotations import random_rotations
from cryospin_relion.geometry.slicing import volume_to_projector
from cryospin_relion.io.particles import CTFParams, ParticleTable, balanced_halves

__all__ = [
    "SimulationConfig", "center_crop_pad_3d", "resample_volume", "load_map", "model_to_map",
    "structure_to_map", "random_ctf", "simulate_images", "write_dataset",
]


@dataclass
class SimulationConfig:
    """Parameters of a simulated dataset (units: A, pixels, kV, mm)."""

    n: int = 1000
    snr: float = 0.1  # inf (or <= 0 is rejected) -> no noise
    defocus_min: float = 10000.0
    defocus_max: float = 25000.0
    astigmatism: float = 500.0  # max |dU - dV| in A
    shift_std: float = 2.0  # pixels, per axis
    voltage: float = 300.0
    cs: float = 2.7
    amp_contrast: float = 0.1
    bfactor: float = 0.0
    ctf: bool = True
    seed: int = 0

    @property
    def noise(self) -> bool:
        return math.isfinite(self.snr)


# -- maps ----------------------------------------------------------------------------------------


def center_crop_pad_3d(vol: np.ndarray, box: int) -> np.ndarray:
    """Crop or zero-pad a (n, n, n) volume to (box,)*3 keeping voxel n // 2 at box // 2."""
    n = vol.shape[-1]
    if n == box:
        return vol
    out = np.zeros((box, box, box), dtype=vol.dtype)
    src0 = max(0, n // 2 - box // 2)
    dst0 = max(0, box // 2 - n // 2)
    m = min(n - src0, box - dst0)
    out[dst0:dst0 + m, dst0:dst0 + m, dst0:dst0 + m] = vol[src0:src0 + m, src0:src0 + m, src0:src0 + m]
    return out


def resample_volume(vol: np.ndarray, voxel: float, box: int, apix: float) -> tuple[np.ndarray, float]:
    """Resample a cubic map of voxel size ``voxel`` to a (box,)^3 map at ``apix`` (Fourier crop/pad).

    The input is zero-padded (centre kept) to a size n' for which n' * voxel / apix
    is an integer within 1e-3, Fourier cropped/padded to that size and then cropped
    or padded in real space to ``box``. The centre voxel n // 2 stays the centre.

    Returns:
        (volume float32, the pixel size actually obtained).
    """
    n = vol.shape[-1]
    ratio = voxel / apix
    if abs(ratio - 1.0) < 1e-6:
        return center_crop_pad_3d(vol.astype(np.float32), box), float(voxel)
    best = None
    for npad in range(n, n + 65):
        m = npad * ratio
        err = abs(m - round(m)) / max(round(m), 1)
        if best is None or err < best[1] - 1e-12:
            best = (npad, err)
        if err < 1e-3:
            break
    npad = best[0]
    m = max(2, int(round(npad * ratio)))
    # crop first in real space when the padded input would be much larger than needed
    v = torch.as_tensor(center_crop_pad_3d(vol.astype(np.float32), npad), dtype=torch.float32)
    out = fourier_crop_3d(v, m).numpy()
    return center_crop_pad_3d(out.astype(np.float32), box), float(npad * voxel / m)


def load_map(path: str | os.PathLike, box: int, apix: float, map_apix: float | None = None) -> np.ndarray:
    """A map file resampled to ``box`` at ``apix``.

    Raises InputError (file + field) when the file is missing, not a cubic 3D map,
    or its voxel size is unset and ``map_apix`` not given.
    """
    from cryospin_relion.io.mrc import read_mrc

    vol, voxel = read_mrc(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"{path}: nx/ny/nz: need a cubic 3D map, got shape {tuple(vol.shape)[::-1]} (x, y, z)")
    if map_apix:
        voxel = float(map_apix)
    if not voxel:
        raise InputError(f"{path}: voxel size: unset in the MRC header (cella = 0); pass --map-apix")
    if not np.isfinite(vol).all():
        raise InputError(f"{path}: data: map has non-finite values")
    out, got = resample_volume(vol, voxel, box, apix)
    if abs(got - apix) / apix > 2e-3:
        import warnings

        warnings.warn(f"{path}: resampled to {got:.4f} A/px instead of {apix} (no exact size ratio)",
                      RuntimeWarning, stacklevel=2)
    return out


def _deblur_crop_origin0(fine: np.ndarray, new: int, blur: float, spacing_new: float) -> np.ndarray:
    """Fourier crop of a periodic grid whose index 0 is the origin (not centred),
    with the Gaussian ``blur`` (B, A^2) added during density calculation removed."""
    m = fine.shape[0]
    ft = torch.fft.fftshift(torch.fft.fftn(torch.as_tensor(fine, dtype=torch.float64)))
    a = m // 2 - new // 2
    ft = ft[a:a + new, a:a + new, a:a + new]
    f = (torch.arange(new, dtype=torch.float64) - new // 2) / (new * spacing_new)  # 1/A
    s2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2
    ft = ft * torch.exp(blur * s2 / 4.0)
    out = torch.fft.ifftn(torch.fft.ifftshift(ft)).real * (new**3) / (m**3)
    return out.numpy()


def structure_to_map(st, box: int, apix: float, oversample: int | None = None) -> np.ndarray:
    """Electron-scattering density (gemmi.DensityCalculatorE) of a gemmi.Structure in a (box,)^3 map.

    The model's centre of mass goes to voxel box // 2. The density is computed
    on a grid ``oversample`` times finer than ``apix`` (with a Gaussian blur so the
    atoms are well sampled), Fourier-cropped to ``apix`` and de-blurred, in a
    cubic cell big enough for the whole model (periodic wrap-around is avoided),
    then cropped to ``box``. Waters are removed; all other atoms (with their
    B-factors and occupancies) contribute.
    """
    import gemmi

    st = st.clone()
    st.remove_waters()
    st.remove_empty_chains()
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError("model: atoms: the structure has no atoms")
    model = st[0]
    for m in range(len(st) - 1, 0, -1):  # first model only (NMR ensembles)
        del st[m]
    com = model.calculate_center_of_mass()
    xyz = np.array([[a.pos.x, a.pos.y, a.pos.z] for r in model for res in r for a in res])
    radius = float(np.sqrt(((xyz - np.array([com.x, com.y, com.z])) ** 2).sum(-1)).max())
    big = max(box, int(math.ceil((2 * radius + 10.0) / apix)))
    if (big - box) % 2:
        big += 1
    if oversample is None:
        oversample = 3 if big <= 128 else 2
    while big * oversample > 400 and oversample > 1:
        oversample -= 1
    fine_n = big * oversample
    length = big * apix
    spacing = apix / oversample
    c = (big // 2) * apix
    shift = gemmi.Position(c - com.x, c - com.y, c - com.z)
    for ch in model:
        for res in ch:
            for a in res:
                a.pos = a.pos + shift
    st.cell = gemmi.UnitCell(length, length, length, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    calc = gemmi.DensityCalculatorE()
    blur = 110.0 * spacing**2 if oversample > 1 else 30.0 * spacing**2
    calc.blur = blur
    calc.set_grid_cell_and_spacegroup(st)
    calc.grid.set_size(fine_n, fine_n, fine_n)
    calc.put_model_density_on_grid(model)
    arr = np.array(calc.grid, copy=True)  # [x, y, z]
    arr = np.ascontiguousarray(arr.transpose(2, 1, 0))  # (z, y, x)
    vol = _deblur_crop_origin0(arr, big, blur, apix) if oversample > 1 or blur else arr
    return center_crop_pad_3d(vol.astype(np.float32), box)


def model_to_map(path: str | os.PathLike, box: int, apix: float) -> np.ndarray:
    """Density map (box,)^3 at ``apix`` of an atomic model file (.pdb, .cif, .ent, ...)."""
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        st = gemmi.read_structure(str(path))
    except Exception as e:  # gemmi raises RuntimeError/ValueError on bad files
        raise InputError(f"{path}: atoms: unreadable atomic model ({' '.join(str(e).split())[:200]})") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"{path}: atoms: no atoms in the model")
    try:
        return structure_to_map(st, box, apix)
    except InputError as e:
        raise InputError(f"{path}: {str(e).split(': ', 1)[-1]}") from None


# -- particles -----------------------------------------------------------------------------------


def random_ctf(cfg: SimulationConfig, rng: np.random.Generator) -> CTFParams:
    """Per-particle CTF parameters (RELION units) for ``cfg.n`` particles."""
    n = cfg.n
    mean = rng.uniform(cfg.defocus_min, cfg.defocus_max, n)
    astig = rng.uniform(0.0, cfg.astigmatism, n)
    full = lambda v: np.full(n, float(v))  # noqa: E731
    return CTFParams(
        defocus_u=mean + astig / 2, defocus_v=mean - astig / 2, defocus_angle=rng.uniform(0.0, 180.0, n),
        voltage=full(cfg.voltage), cs=full(cfg.cs), amp_contrast=full(cfg.amp_contrast),
        phase_shift=full(0.0), bfactor=full(cfg.bfactor), scale=full(1.0),
    )


@dataclass
class Simulated:
    """Poses and CTFs of a simulated dataset; images are in the ``out`` array given to simulate_images."""

    rotations: np.ndarray  # (N, 3, 3) RELION A
    shifts_A: np.ndarray  # (N, 2) RELION origins in A
    ctf: CTFParams | None
    signal_var: float  # variance of the clean images (before scaling)
    noise_sigma: float  # noise std before scaling (0 without noise)
    scale: float  # images and ground truth were divided by this (noise_sigma, or 1)


def simulate_images(
    volume: np.ndarray,
    apix: float,
    cfg: SimulationConfig,
    out: np.ndarray | None = None,
    batch: int = 512,
    progress: bool = False,
) -> tuple[np.ndarray, Simulated]:
    """Simulate ``cfg.n`` particle images of ``volume`` (box^3, centre box // 2).

    Args:
        out: (N, box, box) float32 array to fill (e.g. a memory-mapped stack); allocated if None.
    Returns:
        (images, Simulated). With noise, images are divided by the noise sigma
        (so the noise has std 1); divide the ground truth by ``Simulated.scale`` too.
    """
    box = volume.shape[-1]
    n = cfg.n
    if cfg.noise and not cfg.snr > 0:
        raise InputError(f"--snr: must be > 0 (got {cfg.snr}); use inf for no noise")
    if out is None:
        out = np.empty((n, box, box), dtype=np.float32)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    rot = random_rotations(n, gen, dtype=torch.float64).numpy()
    origin_px = rng.normal(0.0, cfg.shift_std, (n, 2)) if cfg.shift_std > 0 else np.zeros((n, 2))
    shifts_A = origin_px * apix
    ctf = random_ctf(cfg, rng) if cfg.ctf else None

    spec = volume_to_projector(torch.as_tensor(volume, dtype=torch.float32), pad=2)
    ctf_t = None if ctf is None else CTF.from_arrays(ctf)
    s1 = s2 = 0.0
    from cryospin_relion.console import progress_bar

    bar = progress_bar(n, "simulate", "img", enabled=progress, leave=False, lines=False)  # stdout: the summary
    with torch.no_grad():
        for a in range(0, n, batch):
            b = min(n, a + batch)
            rots = torch.as_tensor(rot[a:b], dtype=torch.float32)
            trans = torch.as_tensor(-origin_px[a:b], dtype=torch.float32)
            c = None if ctf_t is None else ctf_2d(box, torch.full((b - a,), float(apix)), ctf_t[a:b])
            img = project_spectrum(spec, rots, box, translations_px=trans, ctf=c)
            d = img.double()
            s1 += float(d.sum())
            s2 += float((d * d).sum())
            out[a:b] = img.numpy()
            bar.update(b - a)
    bar.close()
    npx = float(n) * box * box
    mean = s1 / npx
    signal_var = max(s2 / npx - mean * mean, 0.0)
    sigma, scale = 0.0, 1.0
    if cfg.noise:
        if signal_var <= 0:
            raise InputError("map: data: the projections are empty (zero signal); cannot set an SNR")
        sigma = math.sqrt(signal_var / cfg.snr)
        scale = sigma
        ngen = torch.Generator().manual_seed(int(cfg.seed) + 7919)
        for a in range(0, n, batch):
            b = min(n, a + batch)
            noise = torch.randn(b - a, box, box, generator=ngen, dtype=torch.float32).numpy()
            out[a:b] = out[a:b] / np.float32(scale) + noise
    return out, Simulated(rot, shifts_A, ctf, signal_var, sigma, scale)


def write_dataset(
    out_dir: str | os.PathLike,
    volume: np.ndarray,
    apix: float,
    cfg: SimulationConfig,
    progress: bool = False,
    stack_name: str = "particles.mrcs",
) -> dict:
    """Simulate and write ``out_dir``/particles.star, particles.mrcs and ground_truth.mrc.

    Files are written in a hidden temporary folder inside ``out_dir`` and renamed
    into place at the end, so a failed run leaves no partial outputs.
    rlnImageName is ``N@particles.mrcs``, relative to the STAR file's folder
    (the reader resolves a relative name against the working directory first, as
    RELION does, then against the STAR's folder; run RELION from ``out_dir`` or
    rely on that fallback).

    Returns:
        summary dict (paths, n, box, apix, snr, signal_var, noise_sigma, scale, seconds).
    """
    import time

    import mrcfile

    from cryospin_relion.io.mrc import write_mrc
    from cryospin_relion.io.star import write_star

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out_dir}: --o: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"{out_dir}: --o: output folder is not writable")
    box = volume.shape[-1]
    tmp = out_dir / f".simulate-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with mrcfile.new_mmap(tmp / stack_name, shape=(cfg.n, box, box), mrc_mode=2, overwrite=True) as m:
            m.set_image_stack()
            m.voxel_size = float(apix)
            _, sim = simulate_images(volume, apix, cfg, out=m.data, progress=progress)
            m.update_header_stats()
        truth = (volume / np.float32(sim.scale)).astype(np.float32)
        write_mrc(tmp / "ground_truth.mrc", truth, apix)
        table = ParticleTable(
            source_file=str(out_dir / "particles.star"), source_format="star31",
            stack_paths=np.full(cfg.n, stack_name, dtype=object), stack_indices=np.arange(cfg.n, dtype=np.int64),
            box=int(box), apix=np.full(cfg.n, float(apix)), ctf=sim.ctf, rotations=sim.rotations,
            shifts_A=sim.shifts_A, subset=balanced_halves(cfg.n, cfg.seed), optics_group=np.ones(cfg.n, np.int64),
            extra={"stack_names": np.full(cfg.n, stack_name, dtype=object)},
        )
        write_star(table, tmp / "particles.star")
        for name in (stack_name, "ground_truth.mrc", "particles.star"):  # the STAR last: it points to the rest
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "star": str(out_dir / "particles.star"), "stack": str(out_dir / stack_name),
        "ground_truth": str(out_dir / "ground_truth.mrc"), "n": cfg.n, "box": int(box), "apix": float(apix),
        "snr": cfg.snr if cfg.noise else None, "ctf": cfg.ctf, "signal_var": sim.signal_var,
        "noise_sigma": sim.noise_sigma, "scale": sim.scale, "seconds": round(time.perf_counter() - t0, 2),
    }
