"""Contour levels that enclose the molecule's expected volume (pure functions; maps (n, n, n)).

Two rules, used for the ChimeraX script written next to the maps:

- with a molecular weight: the level at which the voxels at or above it fill the molecule's
  volume, ``mw * DALTON_VOLUME_A3`` (``level_for_volume``);
- without one (``map_level``): Otsu's threshold of the voxel values (the level that best splits
  them into two classes, background and molecule, by maximising the between-class variance),
  raised if needed to the background's median + 3 sigma, the background being the voxels outside
  the sphere inscribed in the box (sigma from their median absolute deviation). For a clean map
  Otsu's level sits half-way up the molecule's edge, so it encloses about the molecule's volume;
  the noise floor keeps it out of the noise of an unfiltered half map.
"""

from __future__ import annotations

import math

import numpy as np

# Protein volume per dalton: the mean partial specific volume of proteins, 0.73 cm^3/g (density
# 1.37 g/cm^3, i.e. 0.81 Da/A^3; Harpaz, Gerstein & Chothia, Structure 1994; Fischer, Polikarpov
# & Craievich, Protein Sci. 2004), is 0.73 cm^3/g * 1.6605e-24 g/Da = 1.21e-24 cm^3 = 1.21 A^3 per Da.
DALTON_VOLUME_A3 = 1.21
NOISE_SIGMAS = 3.0  # the map rule's noise floor: background median + this many sigma


def expected_volume_A3(mw_kda: float) -> float:
    """The volume (A^3) of a protein of ``mw_kda`` kDa."""
    return float(mw_kda) * 1000.0 * DALTON_VOLUME_A3


def enclosed_volume_A3(vol: np.ndarray, voxel_size: float, level: float) -> float:
    """The volume (A^3) of the voxels at or above ``level``."""
    return float(np.count_nonzero(np.asarray(vol) >= level)) * float(voxel_size) ** 3


def level_for_volume(vol: np.ndarray, voxel_size: float, volume_A3: float) -> float:
    """The level at which the voxels at or above it fill ``volume_A3`` (to one voxel): half-way between
    the k-th and (k+1)-th largest values, k = volume / voxel volume, kept in [1, number of voxels - 1]."""
    v = np.asarray(vol, dtype=np.float64).ravel()
    k = int(round(volume_A3 / float(voxel_size) ** 3))
    k = min(max(k, 1), v.size - 1)
    part = np.partition(v, (v.size - k - 1, v.size - k))
    lo, hi = part[v.size - k - 1], part[v.size - k]  # the (k+1)-th and k-th largest
    return float(0.5 * (lo + hi)) if hi > lo else float(hi)


def otsu_level(vol: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the values of ``vol`` (histogram of ``bins`` bins between min and max)."""
    v = np.asarray(vol, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return hi
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts)[:-1].astype(np.float64)  # class 0 = bins 0..i, class 1 = the rest
    w1 = v.size - w0
    s0 = np.cumsum(counts * centres)[:-1]
    m0 = s0 / np.maximum(w0, 1)
    m1 = (float(np.sum(counts * centres)) - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def background_floor(vol: np.ndarray, sigmas: float = NOISE_SIGMAS) -> float:
    """Median + ``sigmas`` sigma of the voxels outside the sphere inscribed in the box (radius n / 2
    about voxel n // 2), sigma = 1.4826 * median absolute deviation (robust to a few molecule voxels)."""
    v = np.asarray(vol, dtype=np.float64)
    n = v.shape[-1]
    r = np.arange(n) - n // 2
    r2 = r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2
    bg = v[r2 > (n / 2) ** 2]
    if bg.size == 0:
        return -math.inf
    med = float(np.median(bg))
    return med + sigmas * 1.4826 * float(np.median(np.abs(bg - med)))


def map_level(vol: np.ndarray) -> float:
    """The map-derived level (no molecular weight): max(Otsu's threshold, background floor)."""
    return max(otsu_level(vol), background_floor(vol))


def contour_level(vol: np.ndarray, voxel_size: float, mw_kda: float | None = None) -> tuple[float, str]:
    """The contour level of ``vol`` and the rule that gave it: the level enclosing the volume of
    ``mw_kda`` kDa of protein when given, else ``map_level``."""
    if mw_kda:
        v = expected_volume_A3(mw_kda)
        return level_for_volume(vol, voxel_size, v), (f"encloses the volume of {mw_kda:g} kDa of protein "
                                                      f"({v:.4g} A^3 at {DALTON_VOLUME_A3} A^3/Da)")
    return map_level(vol), f"Otsu's threshold of the map, at least the background median + {NOISE_SIGMAS:g} sigma"
