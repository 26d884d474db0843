"""Half-map reconstruction from known poses: two half maps, the full map and their FSC.

No file I/O here: the caller hands in the particle table, something that reads
images, and (optionally) poses that replace the table's. Used by ``cryospin
reconstruct`` and, for its final maps, by the ab-initio engine.

Conventions are RELION's (see ``io/particles.py``): rotations are RELION's A,
shifts are origins in A (the image is the centred projection shifted by *minus*
the origin), halves are rlnRandomSubset 1 / 2. Images come protein-positive
(``data.stack.ImageSource`` multiplies by the table's sign); they are not
normalised, as in relion_reconstruct.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Union

import numpy as np
import torch

from cryospin_relion.device import resolve_device
from cryospin_relion.errors import InputError
from cryospin_relion.geometry.backproject import (Accumulator, insert_images, symmetrise_accumulator,
                                                   volume_from_accumulator)
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.fourier import fourier_crop_2d
from cryospin_relion.geometry.fsc import fsc, resolution_at
from cryospin_relion.geometry.shifts import origin_to_translation
from cryospin_relion.io.particles import ParticleTable

__all__ = ["HalfMaps", "reconstruct_halves", "output_apix", "soft_mask_outside"]


class _HasImages(Protocol):
    def images(self, rows: np.ndarray) -> np.ndarray: ...


ImageGetter = Union[_HasImages, Callable[[np.ndarray], np.ndarray]]


class HalfMaps(NamedTuple):
    """Result of ``reconstruct_halves``; maps are (n, n, n) float32 in MRC order (z, y, x).

    map: from all particles; half1 / half2: from subsets 1 / 2;
    fsc: (n // 2 + 1,) FSC between the half maps per Fourier shell (shell 0 = DC);
    resolution: A where the FSC first drops below 0.143 (2 * apix if it never does).
    """

    map: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    fsc: np.ndarray
    resolution: float


def output_apix(table: ParticleTable, box: int, image_box: int | None = None) -> float:
    """Voxel size [A] of a reconstruction at ``box`` from the table's images.

    Args:
        table: particles; ``table.apix`` is the pixel size at ``table.box``.
        box: output box.
        image_box: box of the images, used only when ``table.box`` is unknown (0).
    Raises:
        InputError when the particles do not share one pixel size (0.1 % tolerance).
    """
    apix = np.asarray(table.apix, dtype=np.float64)
    if len(apix) == 0:
        raise InputError(f"{table.source_file}: no particles")
    from cryospin_relion.validate import pixel_size_problem

    problem = pixel_size_problem(table)
    if problem:
        raise InputError(problem)
    ref = table.box or image_box
    if not ref:
        raise InputError(f"{table.source_file}: rlnImageSize: image size unknown")
    return float(np.median(apix)) * ref / box


def soft_mask_outside(vol: np.ndarray, radius: float | None = None, width: float = 3.0) -> np.ndarray:
    """Replace the map outside a sphere by its mean there, with a raised-cosine edge.

    What relion_reconstruct (and RELION's refinement) does to every reconstruction
    to suppress the noise and aliasing in the corners: voxels at distance r from
    the centre (n // 2) keep their value for r < radius, are blended towards the
    background value over radius <= r <= radius + width, and set to it beyond;
    the background value is the mean outside ``radius`` weighted by the blend.

    Args:
        vol: (n, n, n) map.
        radius: in voxels, default n / 2.
        width: edge width in voxels (RELION's default 3).
    Returns:
        (n, n, n) float32 masked copy.
    """
    n = vol.shape[-1]
    radius = n / 2.0 if radius is None else float(radius)
    c = np.arange(n, dtype=np.float64) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    blend = np.where(r < radius, 0.0, np.where(r > radius + width, 1.0,
                                               0.5 + 0.5 * np.cos(np.pi * (radius + width - r) / width)))
    total = blend.sum()
    if total == 0:
        return np.asarray(vol, dtype=np.float32).copy()
    v = np.asarray(vol, dtype=np.float64)
    bg = float((blend * v).sum() / total)
    return ((1.0 - blend) * v + blend * bg).astype(np.float32)


def _getter(images: ImageGetter) -> Callable[[np.ndarray], np.ndarray]:
    if hasattr(images, "images"):
        return images.images  # data.stack.ImageSource
    if hasattr(images, "__getitem__") and not callable(images):  # an array or memmap (N, n, n)
        return lambda rows: np.asarray(images[rows], dtype=np.float32)
    return images


def reconstruct_halves(
    images: ImageGetter,
    table: ParticleTable,
    box: int | None = None,
    rotations: np.ndarray | None = None,
    shifts_A: np.ndarray | None = None,
    halves: np.ndarray | None = None,
    use_ctf: bool = True,
    tau: float = 1e-3,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    pad: int = 2,
    seed: int = 0,
    mask_outside: bool = True,
    progress: bool = True,
    symmetry: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    reduce: Callable[[Accumulator], None] | None = None,
) -> HalfMaps:
    """Direct Fourier reconstruction of the two half sets and of all particles.

    Args:
        images: ``ImageSource``-like object with ``.images(rows)``, a callable
            ``rows (k,) -> (k, m, m) float32``, or an (N, m, m) array/memmap. The
            image box m may differ from ``table.box`` (e.g. a cache at a working box):
            the pixel size is taken as table.apix * table.box / m.
        table: the particles (CTF, pixel size, default poses and halves).
        box: output box n <= m; images are Fourier-cropped to it (pixel size
            grows by m / n). Default m.
        rotations: (N, 3, 3) RELION A; default table.rotations.
        shifts_A: (N, 2) RELION origins in A; default table.shifts_A.
        halves: (N,) 1 / 2; default ``table.halves(seed)`` (the table's
            rlnRandomSubset, else a seeded balanced split).
        use_ctf: correct for the table's CTF (ignored when table.ctf is None).
        tau: Wiener constant relative to the mean weight (``backproject.volume_from_accumulator``).
        batch_size: images read and inserted at a time (default: ~32 M pixels' worth,
            e.g. 8192 at box 64, 512 at box 256).
        device: 'cpu', 'cuda' or 'auto' (``device.resolve_device``).
        threads: CPU threads for the insertion (default torch.get_num_threads()).
        pad: Fourier oversampling of the accumulators (2 as in RELION).
        seed: seed of the half split when neither ``halves`` nor the table give one.
        mask_outside: apply ``soft_mask_outside`` (radius n/2, 3 px edge) to every
            map before the FSC, as relion_reconstruct does; with it our maps agree
            with relion_reconstruct --ctf to FSC > 0.99 on noisy data.
        progress: show progress (a tqdm bar at a terminal, plain lines otherwise; cryospin_relion/console.py).
        symmetry: (G, 3, 3) point-group operators S (``geometry.symmetry.symmetry_operators``): every
            image counts once at each pose A @ S (the poses that give the same image of a map
            with V(S r) = V(r)), so all maps come out symmetric (``symmetrise_accumulator``: the
            C1 sums resampled once per operator). None or the identity alone: C1,
            the same sums as without it.
        rows: insert only these particles (indices, increasing; default all): a data-parallel rank's
            share (engine/distributed.py).
        reduce: called on each half's accumulator before the maps are made, e.g. to sum the ranks'
            shares (``World.sum_`` of ``num`` and ``weight``); every rank then makes the same maps.
    Returns:
        HalfMaps(map, half1, half2, fsc, resolution); voxel size = ``output_apix``.
    """
    n_part = len(table)
    rot = table.rotations if rotations is None else rotations
    sh = table.shifts_A if shifts_A is None else shifts_A
    if rot is None:
        raise InputError(f"{table.source_file}: rlnAngleRot: no poses (angles) to reconstruct with")
    rot = np.asarray(rot, dtype=np.float64).reshape(n_part, 3, 3)
    sh = np.zeros((n_part, 2)) if sh is None else np.asarray(sh, dtype=np.float64).reshape(n_part, 2)
    if n_part == 0:
        raise InputError(f"{table.source_file}: no particles")
    sub = table.halves(seed) if halves is None else np.asarray(halves, dtype=np.int64).reshape(n_part)
    if not np.isin(sub, (1, 2)).all():
        raise InputError(f"{table.source_file}: rlnRandomSubset: halves must be 1 or 2")
    get = _getter(images)
    dev = resolve_device(device)

    first = get(np.arange(1))
    m = int(first.shape[-1])
    n = int(box or m)
    if n > m:
        raise InputError(f"{table.source_file}: --box {n} is larger than the images ({m} px)")
    apix_out = output_apix(table, n, m)
    scale = m / n  # pixel size growth from Fourier cropping
    apix_all = np.asarray(table.apix, dtype=np.float64) * (table.box or m) / m * scale  # (N,) at box n
    ctf = CTF.from_arrays(table.ctf, dtype=torch.float64) if (use_ctf and table.ctf is not None) else None

    if batch_size is None:
        batch_size = int(min(8192, max(64, (1 << 25) // (m * m))))
    sym = None  # C1: the poses as they are
    if symmetry is not None:
        sym = torch.as_tensor(np.asarray(symmetry, dtype=np.float64)).reshape(-1, 3, 3)
        if sym.shape[0] == 1 and torch.equal(sym[0], torch.eye(3, dtype=torch.float64)):
            sym = None
    accs = {1: Accumulator.zeros(n, pad, device=dev), 2: Accumulator.zeros(n, pad, device=dev)}
    from cryospin_relion.console import progress_bar

    todo = np.arange(n_part) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    with progress_bar(len(todo), f"backprojecting at {n} px", "img", enabled=progress) as bar:
        for a in range(0, len(todo), batch_size):
            rows = todo[a:a + batch_size]
            imgs = torch.from_numpy(np.ascontiguousarray(get(rows), dtype=np.float32))
            if imgs.shape[-1] != m or imgs.shape[-2] != m:
                raise InputError(f"{table.source_file}: image size {tuple(imgs.shape[-2:])} differs from the "
                                 f"first image ({m} px)")
            if n != m:
                imgs = fourier_crop_2d(imgs, n)
            imgs = imgs.to(dev, non_blocking=True)  # a blocking copy to CUDA would wait for the last batch
            for h in (1, 2):
                sel = np.flatnonzero(sub[rows] == h)
                if len(sel) == 0:
                    continue
                r = rows[sel]
                ap = torch.as_tensor(apix_all[r], dtype=torch.float64)
                t = origin_to_translation(torch.as_tensor(sh[r], dtype=torch.float64), ap)
                A = torch.as_tensor(rot[r], dtype=torch.float64)
                insert_images(accs[h], imgs[torch.as_tensor(sel, device=dev)], A, t, ap,
                              None if ctf is None else ctf[torch.as_tensor(r)], threads=threads)
            bar.update(len(rows))
    if reduce is not None:
        reduce(accs[1])
        reduce(accs[2])
    if sym is not None:  # every image at every A @ S: the C1 sums resampled once per operator
        for h in (1, 2):
            symmetrise_accumulator(accs[h], sym.to(dev), threads)

    finish = soft_mask_outside if mask_outside else (lambda v: v)
    half1 = finish(volume_from_accumulator(accs[1], tau).cpu().numpy())
    half2 = finish(volume_from_accumulator(accs[2], tau).cpu().numpy())
    accs[1] += accs[2]
    del accs[2]
    full = finish(volume_from_accumulator(accs[1], tau).cpu().numpy())
    curve = fsc(torch.from_numpy(half1), torch.from_numpy(half2)).numpy()
    res = resolution_at(curve, n, apix_out, 0.143)
    return HalfMaps(full, half1, half2, curve, float(res))
