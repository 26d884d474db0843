"""MRC maps and image stacks: permissive reading, memory-mapped stacks, atomic writing.

Array layout is MRC order: volumes (z, y, x), stacks (n, y, x); x is the fast axis.

Origin convention for maps we write: the header origin and nxstart/nystart/nzstart
are 0, which is what RELION writes; RELION (and this project) put the particle
centre at voxel N // 2 along each axis. ChimeraX uses the header origin, so a map
written with ``origin_centered=False`` appears with its corner at (0, 0, 0) A;
pass ``origin_centered=True`` to set origin = -(N // 2) * voxel so that voxel
N // 2 sits at (0, 0, 0) A in ChimeraX (RELION ignores the origin field either way).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from cryospin_relion.errors import InputError
from cryospin_relion.io.atomic import atomic_path

__all__ = ["read_mrc", "write_mrc", "write_stack", "open_stack", "stack_shape", "atomic_path"]


def _open_header(path: str | os.PathLike):
    """mrcfile header (permissive), RuntimeWarnings about id string / machine stamp silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                return m.header.copy()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: MRC header unreadable ({e})") from None


def stack_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """(n, ny, nx) of an MRC image stack (or single image, or volume read as a stack)."""
    h = _open_header(path)
    return int(h.nz), int(h.ny), int(h.nx)


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """Memory-map an MRC stack as an (n, ny, nx) array (dtype of the file, native or not).

    A single 2D image gives n = 1; a file whose header says volume (ispg 1,
    nz > 1) gives its nz sections as n images: for a stack only the byte layout
    matters. Convert slices with ``.astype(np.float32)``.
    """
    h = _open_header(path)
    try:
        dtype = mrcfile.utils.data_dtype_from_header(h)
    except ValueError as e:
        raise InputError(f"{path}: mode: unsupported MRC data mode ({e})") from None
    if dtype.kind == "c":
        raise InputError(f"{path}: mode: complex MRC data are not particle images")
    shape = (int(h.nz), int(h.ny), int(h.nx))
    if min(shape) < 1:
        raise InputError(f"{path}: nx/ny/nz: empty image dimensions {shape[::-1]}")
    offset = 1024 + int(h.nsymbt)
    need = offset + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < need:
        raise InputError(f"{path}: data: file truncated ({size} bytes, header needs {need})")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Read a whole MRC file permissively.

    Returns:
        data: float32 array, (z, y, x) for volumes, (y, x) for single images
            (stacks come back as (n, y, x)); non-standard mapc/mapr/maps axis
            orders are transposed to (z, y, x).
        voxel_size: A per voxel along x, or None when the header cell is 0 (unset).
    Header oddities (no "MAP " id, zero machine stamp, ...) give one warning, not an error.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with mrcfile.open(path, mode="r", permissive=True) as m:
                h = m.header
                data = None if m.data is None else np.array(m.data)
                vs = m.voxel_size
                order = (int(h.mapc), int(h.mapr), int(h.maps))
    except (OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: MRC unreadable ({e})") from None
    msgs = sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)})
    if msgs:
        warnings.warn(f"{path}: {'; '.join(msgs)}", RuntimeWarning, stacklevel=2)
    if data is None:
        raise InputError(f"{path}: data: MRC header does not describe readable data")
    if data.dtype.kind == "c":
        raise InputError(f"{path}: mode: complex MRC data not supported")
    if data.ndim == 3 and order != (1, 2, 3):
        if sorted(order) == [1, 2, 3]:
            # file axes (slowest..fastest) are (maps, mapr, mapc); we want (z=3, y=2, x=1)
            file_axes = [order[2], order[1], order[0]]
            data = np.transpose(data, [file_axes.index(a) for a in (3, 2, 1)])
            warnings.warn(f"{path}: mapc/mapr/maps = {order}: transposed to z, y, x", RuntimeWarning, stacklevel=2)
        else:
            warnings.warn(f"{path}: mapc/mapr/maps = {order} invalid: ignored", RuntimeWarning, stacklevel=2)
    voxel = float(vs.x) if vs is not None else 0.0
    if not np.isfinite(voxel) or voxel <= 0:
        voxel_out = None
    else:
        voxel_out = voxel
        if not np.allclose([vs.x, vs.y, vs.z][: data.ndim], voxel, rtol=1e-3) and data.ndim == 3:
            warnings.warn(f"{path}: anisotropic voxel size {tuple(vs.tolist())}: using x", RuntimeWarning, stacklevel=2)
    return np.ascontiguousarray(data, dtype=np.float32), voxel_out


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size: float | None,
              origin_centered: bool = False) -> None:
    """Write a 2D image or 3D map as float32 MRC, atomically.

    Args:
        data: (y, x) or (z, y, x).
        voxel_size: A per voxel (None or 0 leaves the cell unset).
        origin_centered: False (default) writes origin 0 like RELION (centre =
            voxel N // 2 by convention); True sets origin = -(N // 2) * voxel_size
            for viewers that honour the header origin (ChimeraX).
    """
    data = np.ascontiguousarray(data, dtype=np.float32)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(data)
            if data.ndim == 3:
                m.set_volume()
            if voxel_size:
                m.voxel_size = float(voxel_size)
            m.header.nxstart = m.header.nystart = m.header.nzstart = 0
            if origin_centered and voxel_size:
                n = data.shape[::-1]  # x, y, z
                m.header.origin = tuple(-(k // 2) * float(voxel_size) for k in n) + (0.0,) * (3 - len(n))
            else:
                m.header.origin = (0.0, 0.0, 0.0)
            m.update_header_stats()


def write_stack(path: str | os.PathLike, images: np.ndarray, voxel_size: float | None) -> None:
    """Write an (n, y, x) image stack (.mrcs, ispg 0) as float32, atomically."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(images)
            m.set_image_stack()
            if voxel_size:
                m.voxel_size = float(voxel_size)
            m.update_header_stats()
