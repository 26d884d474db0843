"""Orientation diagnostics: the cryoEF view-distribution efficiency and a directional (conical) FSC.

Two numbers say whether a set of particle views can give a map of the same resolution in every
direction:

- ``orientation_efficiency`` (E_od of cryoEF; Naydenova & Russo, "Measuring the effects of particle
  orientation to improve the efficiency of electron cryomicroscopy", Nat. Commun. 8, 629 (2017)):
  from the view directions alone. 1 for uniform views, 0 when some Fourier direction is never
  sampled (a single view); the paper calls values above ~0.8 good and below ~0.5 a problem.
- ``directional_resolution``: the FSC of the two half maps restricted to cones around a set of
  directions (as 3DFSC, Tan et al., Nat. Methods 14, 793 (2017)), giving the 0.143 resolution in
  each direction; measured from the maps, so it also sees alignment errors.

Conventions (docs/conventions.md): poses are RELION matrices ``A``; the view direction of a
particle is the third row of ``A`` (volume coordinates x, y, z); its projection samples the
central section of Fourier space perpendicular to that direction. Maps are (z, y, x) with the
Fourier origin at index ``n // 2``; directions here are always (x, y, z) vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cryospin_relion.geometry.fourier import fft3_centered
from cryospin_relion.geometry.fsc import fsc, resolution_at
from cryospin_relion.geometry.rotations import view_directions

__all__ = [
    "EFFICIENCY_WARN_BELOW",
    "DirectionalResolution",
    "as_view_directions",
    "directional_fsc",
    "directional_resolution",
    "fibonacci_sphere",
    "orientation_efficiency",
    "orientation_summary",
    "sampling_psf",
]

#: below this efficiency the run prints a warning (Naydenova & Russo: E_od < 0.5 is a problem)
EFFICIENCY_WARN_BELOW = 0.5


def fibonacci_sphere(n: int) -> np.ndarray:
    """(n, 3) near-uniform unit vectors (x, y, z): the Fibonacci (golden-angle) spiral on the sphere."""
    if n < 1:
        raise ValueError(f"fibonacci_sphere: n must be >= 1, got {n}")
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = math.pi * (3.0 - math.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def as_view_directions(poses) -> np.ndarray:
    """(N, 3) unit view directions from (N, 3, 3) RELION matrices (third row) or (N, 3) directions."""
    p = poses.detach().cpu().numpy() if isinstance(poses, torch.Tensor) else np.asarray(poses)
    p = p.astype(np.float64)
    if p.ndim == 3 and p.shape[1:] == (3, 3):
        d = view_directions(p)
    elif p.ndim == 2 and p.shape[1] == 3:
        d = p
    else:
        raise ValueError(f"expected (N, 3, 3) RELION matrices or (N, 3) view directions, got shape {p.shape}")
    d = d[np.all(np.isfinite(d), axis=1)]
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    d = d[norm[:, 0] > 0] / norm[norm[:, 0] > 0]
    return d


def sampling_psf(poses, directions: np.ndarray | None = None, *, n_directions: int = 500,
                 section_half_width_deg: float = 5.0, chunk: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Fourier-space sampling of each direction by the particles' central sections, and its square root.

    A particle seen along ``d`` samples the central section ``{k : k . d = 0}``; with the finite
    thickness of a section (the Fourier transform of a particle of diameter D is smooth over 1/D) a
    section at radius |k| covers the directions u with ``|u . d| < sin(w)``, w an angular half-width
    (``section_half_width_deg``; w = asin(1 / (D |k|)) for a section of half-thickness 1/D at
    radius |k|). The transfer function of direction u is

        T(u) = (1 / N) sum_i max(0, 1 - |u . d_i| / sin(w)) / (sin(w) / 2)   (a triangular section profile)

    normalised so that T = 1 for uniform views (then |u . d| is uniform on [0, 1], and the
    profile's mean over it is sin(w) / 2). The point-spread function
    value of direction u is ``PSF(u) = sqrt(T(u))``: the amplitude signal-to-noise ratio of the
    average of the T(u) contributions grows as their square root (cryoEF's PSF is the transform
    of the square root of the transfer function).

    Args:
        poses: (N, 3, 3) RELION matrices or (N, 3) view directions.
        directions: (M, 3) unit Fourier directions (x, y, z); default a Fibonacci sphere of
            ``n_directions`` points.
        section_half_width_deg: w above, degrees (0 < w <= 90).
        chunk: particles per block (memory: M * chunk floats).

    Returns:
        (directions (M, 3), psf (M,)): psf >= 0, mean about 1 for uniform views.
    """
    d = as_view_directions(poses)
    if len(d) == 0:
        raise ValueError("sampling_psf: no finite view direction")
    if not 0.0 < section_half_width_deg <= 90.0:
        raise ValueError(f"section_half_width_deg must be in (0, 90], got {section_half_width_deg}")
    u = fibonacci_sphere(n_directions) if directions is None else np.asarray(directions, dtype=np.float64)
    s = math.sin(math.radians(section_half_width_deg))
    t = np.zeros(len(u), dtype=np.float64)
    for i in range(0, len(d), chunk):
        c = np.abs(u @ d[i:i + chunk].T)  # (M, chunk) |cos| between Fourier direction and view
        t += np.clip(1.0 - c / s, 0.0, None).sum(axis=1)
    # for uniform views |u . d| is uniform on [0, 1]: E[max(0, 1 - x / s)] = s / 2
    t /= len(d) * s / 2.0
    return u, np.sqrt(t)


def orientation_efficiency(poses, *, n_directions: int = 500, section_half_width_deg: float = 5.0) -> float:
    """cryoEF's view-distribution efficiency E_od of a set of particle views.

    E_od = H(PSF) / A(PSF), the harmonic mean over Fourier directions u (a Fibonacci sphere of
    ``n_directions`` points) of the point-spread function values ``PSF(u) = sqrt(T(u))``
    (``sampling_psf``: T(u) = how much the particles' central sections sample direction u)
    divided by their arithmetic mean:

        E_od = [ (1/M) sum_u 1 / PSF(u) ]^-1 / [ (1/M) sum_u PSF(u) ]

    Range [0, 1] (harmonic mean <= arithmetic mean). 1 exactly when every direction is sampled
    equally (uniform views give ~0.99 with a finite set); 0 when some direction is never sampled
    (a single view; views within 60 deg of one axis leave the directions near that axis unsampled:
    E_od = 0).
    Naydenova & Russo (Nat. Commun. 2017) read E_od >= 0.8 as good and < 0.5 as a preferred
    orientation that costs resolution (the effective number of particles falls with E_od).

    Args:
        poses: (N, 3, 3) RELION matrices ``A`` (view = third row) or (N, 3) view directions;
            the sign of a direction does not matter (Friedel symmetry).
        n_directions: Fourier directions on the sphere.
        section_half_width_deg: angular half-width of a central section (see ``sampling_psf``).

    Returns:
        float in [0, 1].
    """
    _, psf = sampling_psf(poses, n_directions=n_directions, section_half_width_deg=section_half_width_deg)
    arith = float(psf.mean())
    if arith <= 0.0 or np.any(psf <= 0.0):
        return 0.0
    harm = 1.0 / float(np.mean(1.0 / psf))
    return float(min(max(harm / arith, 0.0), 1.0))


@dataclass
class DirectionalResolution:
    """The half-map FSC in cones around ``directions`` and its 0.143 resolution in each."""

    directions: np.ndarray  # (M, 3) unit vectors (x, y, z)
    fsc: np.ndarray  # (M, n // 2 + 1) conical FSC per shell
    resolution_A: np.ndarray  # (M,) 0.143 resolution per direction, A
    cone_half_angle_deg: float

    @property
    def best_A(self) -> float:
        return float(np.min(self.resolution_A))

    @property
    def worst_A(self) -> float:
        return float(np.max(self.resolution_A))

    @property
    def median_A(self) -> float:
        return float(np.median(self.resolution_A))

    @property
    def spread_A(self) -> float:
        """worst - best, A."""
        return self.worst_A - self.best_A

    def summary(self) -> dict[str, float]:
        return {"best": self.best_A, "worst": self.worst_A, "median": self.median_A, "spread": self.spread_A}


def directional_fsc(half1, half2, directions: np.ndarray | None = None, *, n_directions: int = 60,
                    cone_half_angle_deg: float = 20.0, min_voxels: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """FSC of two real maps (n, n, n) (z, y, x) in cones around directions (3DFSC's conical FSC).

    For a direction u the cone holds the Fourier voxels k with ``|k . u| >= |k| cos(a)`` (both
    u and -u: Friedel mates), a = ``cone_half_angle_deg``; its FSC in integer shell s is

        FSC_u(s) = Re sum F1 F2* / sqrt(sum |F1|^2 sum |F2|^2)   over voxels of the cone in shell s.

    A shell whose cone holds fewer than ``min_voxels`` voxels (the lowest shells) takes the FSC of
    the whole shell, so that a direction's curve does not fall at a near-empty shell.

    Args:
        half1, half2: (n, n, n) numpy arrays or tensors.
        directions: (M, 3) unit vectors (x, y, z); default a Fibonacci sphere of ``n_directions``.

    Returns:
        (directions (M, 3), fsc (M, n // 2 + 1)); shell 0 (the DC term) is 1 by convention.
    """
    v1 = torch.as_tensor(np.asarray(half1) if not isinstance(half1, torch.Tensor) else half1).detach().cpu()
    v2 = torch.as_tensor(np.asarray(half2) if not isinstance(half2, torch.Tensor) else half2).detach().cpu()
    if v1.shape != v2.shape or v1.ndim != 3 or len(set(v1.shape)) != 1:
        raise ValueError(f"directional_fsc: expected two (n, n, n) maps, got {tuple(v1.shape)} and {tuple(v2.shape)}")
    n = int(v1.shape[-1])
    f1 = fft3_centered(v1.to(torch.float64)).numpy().ravel()
    f2 = fft3_centered(v2.to(torch.float64)).numpy().ravel()
    g = np.arange(n, dtype=np.float64) - n // 2
    kz, ky, kx = np.meshgrid(g, g, g, indexing="ij")
    k = np.stack([kx.ravel(), ky.ravel(), kz.ravel()], axis=1)  # (x, y, z) frequency vectors
    r = np.linalg.norm(k, axis=1)
    shell = np.round(r).astype(np.int64)
    nshell = n // 2 + 1
    keep = (shell < nshell) & (shell > 0)
    k, r, shell = k[keep], r[keep], shell[keep]
    cross, p1, p2 = (f1[keep] * f2[keep].conj()).real, np.abs(f1[keep]) ** 2, np.abs(f2[keep]) ** 2
    khat = k / r[:, None]
    u = fibonacci_sphere(n_directions) if directions is None else np.asarray(directions, dtype=np.float64)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    cos_a = math.cos(math.radians(cone_half_angle_deg))
    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.where(den > 0, num / np.maximum(den, 1e-300), 0.0)

    total = fsc(v1, v2).numpy()  # the whole shell: where a cone holds fewer than min_voxels voxels (low shells)
    out = np.ones((len(u), nshell), dtype=np.float64)
    for j, uj in enumerate(u):
        m = np.abs(khat @ uj) >= cos_a
        sh = shell[m]
        c = ratio(np.bincount(sh, cross[m], nshell),
                  np.sqrt(np.bincount(sh, p1[m], nshell) * np.bincount(sh, p2[m], nshell)))
        c = np.where(np.bincount(sh, minlength=nshell) >= min_voxels, c, total)
        out[j, 1:] = c[1:]
    return u, out


def directional_resolution(half1, half2, apix: float, directions: np.ndarray | None = None, *,
                           n_directions: int = 60, cone_half_angle_deg: float = 20.0,
                           threshold: float = 0.143, min_voxels: int = 10) -> DirectionalResolution:
    """Per-direction resolution (A) where the conical FSC (``directional_fsc``) first drops below
    ``threshold`` (0.143 for half maps), with best / worst / median / spread as properties.
    A direction whose FSC never drops reads Nyquist (2 * apix)."""
    u, curves = directional_fsc(half1, half2, directions, n_directions=n_directions,
                                cone_half_angle_deg=cone_half_angle_deg, min_voxels=min_voxels)
    n = (curves.shape[1] - 1) * 2
    res = np.array([resolution_at(c, n, apix, threshold) for c in curves], dtype=np.float64)
    return DirectionalResolution(u, curves, res, float(cone_half_angle_deg))


def orientation_summary(efficiency: float | None, directional: DirectionalResolution | None,
                        warnings: list[str] | None = None) -> tuple[dict, list[str]]:
    """Summary entries for a run and the warning lines to log (also appended to ``warnings``).

    Returns ({"orientation_efficiency": E, "directional_resolution_A": {best, worst, median, spread}},
    warnings): one warning when E < EFFICIENCY_WARN_BELOW.
    """
    warnings = [] if warnings is None else warnings
    out: dict = {}
    if efficiency is not None:
        out["orientation_efficiency"] = float(efficiency)
        if efficiency < EFFICIENCY_WARN_BELOW:
            warnings.append(
                f"preferred orientation: view-distribution efficiency {efficiency:.2f} < {EFFICIENCY_WARN_BELOW} "
                f"(cryoEF E_od; 1 = uniform views): the map's resolution will differ between directions; "
                f"see docs/troubleshooting.md")
    if directional is not None:
        out["directional_resolution_A"] = directional.summary()
    return out, warnings
