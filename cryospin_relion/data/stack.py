"""Particle images: lazy reads from memory-mapped MRC stacks, and a preprocessed on-disk cache.

Sign convention: images handed out here have protein = positive density
(white), like RELION particles (extracted with ``--invert_contrast``) and RELION
projections. ``ParticleTable.sign`` carries cryoSPARC's ``blob/sign``: -1 means the
stored images have dark protein, so every image is multiplied by ``table.sign``
(STAR input: +1). ``invert=True`` flips once more, for stacks extracted without
contrast inversion. Cache = image * table.sign * (-1 if invert else 1), then
normalised (see ``normalize_background``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryospin_relion.errors import InputError
from cryospin_relion.geometry.fourier import fourier_crop_2d
from cryospin_relion.io.atomic import atomic_path, ensure_writable_dir
from cryospin_relion.io.mrc import open_stack
from cryospin_relion.io.particles import ParticleTable

__all__ = ["ImageSource", "CachedStack", "build_cache", "normalize_background", "CACHE_VERSION"]

CACHE_VERSION = 1  # bump when the preprocessing changes, to invalidate old caches
BACKGROUND_RADIUS = 0.8  # background = pixels farther than this * box/2 from the centre (box // 2)


class ImageSource:
    """Reads particle images of a ParticleTable on demand.

    Stacks are memory-mapped once and kept in a small LRU cache (open files are
    limited). ``images(rows)`` groups the requested rows by stack file.
    """

    def __init__(self, table: ParticleTable, max_open: int = 64):
        self.table = table
        self.max_open = max_open
        self._open: OrderedDict[str, np.ndarray] = OrderedDict()
        self.box = int(table.box) or self._stack(str(table.stack_paths[0]), 0).shape[-1]

    def __len__(self) -> int:
        return len(self.table)

    def __getstate__(self) -> dict:  # worker processes reopen their own memory maps
        return {**self.__dict__, "_open": OrderedDict()}

    def _stack(self, path: str, row: int) -> np.ndarray:
        mm = self._open.get(path)
        if mm is not None:
            self._open.move_to_end(path)
            return mm
        if not os.path.isfile(path):
            raise InputError(f"{self.table.source_file}: row {row + 1}: image stack '{path}' not found")
        mm = open_stack(path)
        self._open[path] = mm
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return mm

    def images(self, rows: np.ndarray) -> np.ndarray:
        """(k, box, box) float32 images of table rows ``rows`` (k,), times ``table.sign``.

        Raises InputError for a missing stack, an index past its end, a size
        other than the table's box, or NaN/inf pixels (naming stack and row).
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.box, self.box), dtype=np.float32)
        codes, uniq = pd.factorize(self.table.stack_paths[rows])
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        for sel in np.split(order, bounds):
            if not len(sel):
                continue
            path = str(uniq[codes[sel[0]]])
            mm = self._stack(path, int(rows[sel[0]]))
            idx = self.table.stack_indices[rows[sel]]
            if mm.shape[1:] != (self.box, self.box):
                raise InputError(f"{path}: nx/ny: images are {mm.shape[2]}x{mm.shape[1]}, expected "
                                 f"square {self.box}x{self.box} (row {rows[sel[0]] + 1} of {self.table.source_file})")
            past = idx >= mm.shape[0]
            if past.any():
                k = int(np.flatnonzero(past)[0])
                raise InputError(f"{path}: image {idx[k] + 1} past the end of the stack ({mm.shape[0]} images; "
                                 f"row {rows[sel[k]] + 1} of {self.table.source_file})")
            block = np.asarray(mm[idx], dtype=np.float32)
            bad = ~np.isfinite(block).all(axis=(1, 2))
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise InputError(f"{path}: image {idx[k] + 1}: NaN/inf pixel values "
                                 f"(particle row {rows[sel[k]] + 1} of {self.table.source_file})")
            out[sel] = block
        if self.table.sign != 1.0:
            out *= np.float32(self.table.sign)
        return out


def normalize_background(images: np.ndarray, radius: float = BACKGROUND_RADIUS) -> np.ndarray:
    """Subtract the background mean and divide by the background std, per image, in place.

    Background = pixels farther than ``radius * box / 2`` from the centre pixel
    (box // 2): the corners and a thin ring, where a centred particle rarely
    reaches, as in RELION's normalisation outside the particle diameter. An image
    whose background is (nearly) noise-free, std < 1e-3 of the whole image's
    (clean simulations, where cropping ringing is all the background holds), is
    only mean-subtracted, so clean data keep one common scale.

    Args:
        images: (k, box, box) float32.
    """
    box = images.shape[-1]
    c = np.arange(box) - box // 2
    mask = (c[:, None] ** 2 + c[None, :] ** 2) > (radius * box / 2) ** 2
    bg = images[:, mask]
    mean = bg.mean(axis=1, dtype=np.float64)
    std = bg.std(axis=1, dtype=np.float64)
    full = images.reshape(len(images), -1).std(axis=1, dtype=np.float64)
    std = np.where(std > 1e-3 * full + 1e-12, std, 1.0)
    images -= mean[:, None, None].astype(np.float32)
    images /= std[:, None, None].astype(np.float32)
    return images


@dataclass
class CachedStack:
    """Preprocessed images at the working box.

    images: (N, box, box) float32 read-only memmap, protein positive, normalised.
    apix: (N,) A per pixel at the working box (= original apix * original box / box).
    """

    images: np.ndarray
    apix: np.ndarray
    box: int
    path: Path

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _cache_key(table: ParticleTable, box: int, invert: bool) -> str:
    """Hash of everything that determines the cache content."""
    h = hashlib.sha256()
    src = Path(table.source_file)
    st = src.stat() if src.exists() else None
    codes, uniq = pd.factorize(table.stack_paths)
    stacks = []
    for p in uniq:
        try:
            s = os.stat(p)
            stacks.append((str(p), s.st_size, s.st_mtime_ns))
        except OSError:
            stacks.append((str(p), -1, -1))
    head = {"version": CACHE_VERSION, "source": str(src.resolve()), "size": st.st_size if st else -1,
            "mtime_ns": st.st_mtime_ns if st else -1, "box": int(box), "invert": bool(invert),
            "n": len(table), "orig_box": int(table.box), "sign": float(table.sign), "stacks": stacks}
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(np.ascontiguousarray(codes, dtype=np.int64))  # the buffer itself: no copy of N rows
    h.update(np.ascontiguousarray(table.stack_indices, dtype=np.int64))
    return h.hexdigest()


CHUNK_BYTES = 16 * 2**20  # input images per step of the cache build: its memory does not grow with N


def build_cache(table: ParticleTable, out_dir: str | os.PathLike, box: int, invert: bool = False,
                chunk: int | None = None, progress: bool = True) -> CachedStack:
    """Fourier-crop, sign-correct and normalise every particle image into ``out_dir/cache_{box}.npy``.

    The images are read, transformed and written ``chunk`` at a time (default: CHUNK_BYTES of input
    images, 256 at box 128) into a memory-mapped .npy, so the memory used is independent of the number
    of particles (bench/io_scale.py measures it); each image is processed on its own, so the result
    does not depend on ``chunk``.

    A JSON sidecar ``cache_{box}.json`` stores a hash of the inputs (source file
    path/size/mtime, stacks' sizes/mtimes, rows, box, invert, N); a rerun with the
    same inputs reuses the file. The .npy is written under a temporary name and
    renamed when complete, and the sidecar is written after it (and removed before
    a rebuild), so a killed run is never mistaken for a finished cache.
    """
    out_dir = Path(out_dir)
    npy, side = out_dir / f"cache_{box}.npy", out_dir / f"cache_{box}.json"
    ensure_writable_dir(npy)
    key = _cache_key(table, box, invert)
    n = len(table)
    orig_box = int(table.box)
    if side.is_file() and npy.is_file():
        try:
            meta = json.loads(side.read_text())
            if meta.get("key") == key:
                arr = np.load(npy, mmap_mode="r")
                if arr.shape == (n, box, box) and arr.dtype == np.float32:
                    return CachedStack(arr, np.asarray(_working_apix(table, box, meta.get("orig_box", orig_box))),
                                       box, npy)
        except (OSError, ValueError):
            pass  # unreadable sidecar or cache: rebuild
    side.unlink(missing_ok=True)
    src = ImageSource(table)
    orig_box = src.box
    chunk = chunk or max(1, CHUNK_BYTES // (4 * orig_box * orig_box))
    factor = np.float32(-1.0 if invert else 1.0)
    from cryospin_relion.console import progress_bar

    with atomic_path(npy) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, box, box))
        with progress_bar(n, f"caching images at {box} px", "img", enabled=progress) as bar:
            for a in range(0, n, chunk):
                rows = np.arange(a, min(a + chunk, n))
                imgs = src.images(rows)
                if box != orig_box:
                    imgs = fourier_crop_2d(torch.from_numpy(imgs), box).numpy().astype(np.float32, copy=False)
                imgs = normalize_background(np.ascontiguousarray(imgs) * factor)
                mm[a: a + len(rows)] = imgs
                bar.update(len(rows))
        mm.flush()
        del mm
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps({"key": key, "box": box, "orig_box": orig_box, "invert": bool(invert), "n": n,
                                   "source": str(table.source_file)}, indent=1))
    return CachedStack(np.load(npy, mmap_mode="r"), _working_apix(table, box, orig_box), box, npy)


def _working_apix(table: ParticleTable, box: int, orig_box: int) -> np.ndarray:
    """(N,) pixel size [A] at the working box."""
    return np.asarray(table.apix, dtype=np.float64) * orig_box / box
