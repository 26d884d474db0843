"""Orientation diagnostics (issue #14): cryoEF efficiency, directional (conical) FSC, the run's summary/warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from cryospin_relion.evaluate.orientation import (DirectionalResolution, as_view_directions, directional_fsc,
                                                  directional_resolution, fibonacci_sphere, orientation_efficiency,
                                                  orientation_summary, sampling_psf)
from cryospin_relion.geometry.rotations import random_rotations, view_directions
from cryospin_relion.lifecycle.outputs import FinalResult, add_orientation_summary, orientation_diagnostics
from cryospin_relion.report import plots


def _uniform(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _cap(n: int, deg: float, seed: int = 1) -> np.ndarray:
    """n directions uniform within ``deg`` of +z (top views)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(np.cos(np.radians(deg)), 1.0, n)
    phi = rng.uniform(0, 2 * np.pi, n)
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], 1)


def _preferred(n: int = 2000) -> np.ndarray:
    """95 % top views (within 10 deg of z), 5 % uniform."""
    return np.concatenate([_cap(int(0.95 * n), 10.0), _uniform(n - int(0.95 * n), seed=3)])


# -- efficiency ----------------------------------------------------------------------


def test_fibonacci_sphere_unit_and_balanced():
    u = fibonacci_sphere(200)
    assert u.shape == (200, 3)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-12)
    assert np.abs(u.mean(0)).max() < 0.02


def test_uniform_views_efficiency_near_one():
    assert orientation_efficiency(_uniform(5000)) > 0.95
    R = random_rotations(2000, torch.Generator().manual_seed(0))  # (N, 3, 3) RELION matrices accepted
    assert orientation_efficiency(R) > 0.9
    assert orientation_efficiency(R) == pytest.approx(orientation_efficiency(view_directions(R).numpy()))


def test_single_view_and_preferred_views_have_low_efficiency():
    assert orientation_efficiency(np.tile([0.0, 0.0, 1.0], (500, 1))) < 0.05
    assert orientation_efficiency(_cap(2000, 15.0)) < 0.05
    assert orientation_efficiency(_preferred()) < 0.5
    # side views only (all around the equator) still sample every Fourier direction: high
    side = _uniform(4000)
    side = side[np.abs(side[:, 2]) < 0.15]
    assert orientation_efficiency(side) > 0.8


def test_efficiency_ignores_sign_and_range():
    d = _preferred()
    assert orientation_efficiency(-d) == pytest.approx(orientation_efficiency(d))
    for e in (orientation_efficiency(d), orientation_efficiency(_uniform(300))):
        assert 0.0 <= e <= 1.0


def test_sampling_psf_normalised_for_uniform_views():
    _, psf = sampling_psf(_uniform(20000))
    assert psf.mean() == pytest.approx(1.0, abs=0.03)
    _, psf1 = sampling_psf(np.tile([0.0, 0.0, 1.0], (10, 1)))
    u = fibonacci_sphere(500)
    assert np.all(psf1[np.abs(u[:, 2]) > 0.2] == 0.0)  # directions off the single central section


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        as_view_directions(np.zeros((4, 2)))
    with pytest.raises(ValueError):
        directional_fsc(np.zeros((4, 4, 4)), np.zeros((4, 4, 6)))


# -- directional resolution -----------------------------------------------------------


def _half_maps(n: int = 64, r0: float = 12.0, extra_z: float = 1.0, cone_deg: float = 25.0, seed: int = 0):
    """White signal + noise growing as (|k| / r0)^2 (isotropic crossing of 0.143 at ~1.57 r0); the noise
    is ``extra_z`` times larger in the double cone of ``cone_deg`` around z (x, y, z = map axes 2, 1, 0)."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, n, n))
    g = np.fft.fftfreq(n) * n
    kz, ky, kx = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(kx**2 + ky**2 + kz**2)
    filt = (r / r0) ** 2
    filt = np.where(np.abs(kz) > np.cos(np.radians(cone_deg)) * np.maximum(r, 1e-9), filt * extra_z, filt)
    return [signal + np.fft.ifftn(np.fft.fftn(rng.normal(size=(n, n, n))) * filt).real for _ in range(2)]


def test_directional_resolution_isotropic_is_near_uniform():
    h1, h2 = _half_maps()
    dr = directional_resolution(h1, h2, apix=2.0)
    assert isinstance(dr, DirectionalResolution) and dr.resolution_A.shape == (60,)
    expected = 64 * 2.0 / (12.0 * 6 ** 0.25)  # FSC = SNR / (1 + SNR) = 0.143 at SNR = 1/6
    assert dr.median_A == pytest.approx(expected, rel=0.1)
    assert dr.worst_A / dr.best_A < 1.5
    s = dr.summary()
    assert s["best"] <= s["median"] <= s["worst"] and s["spread"] == pytest.approx(s["worst"] - s["best"])
    # torch input gives the same numbers
    dr_t = directional_resolution(torch.from_numpy(h1), torch.from_numpy(h2), apix=2.0)
    np.testing.assert_allclose(dr_t.resolution_A, dr.resolution_A)


def test_directional_resolution_sees_anisotropic_noise():
    h1, h2 = _half_maps(extra_z=3.0)
    dr = directional_resolution(h1, h2, apix=2.0)
    z = np.abs(dr.directions[:, 2])
    near_z, equator = dr.resolution_A[z > 0.9].mean(), dr.resolution_A[z < 0.3].mean()
    assert near_z > 1.5 * equator
    assert dr.worst_A / dr.best_A > 1.8
    # an explicit direction along z (x, y, z order) against one along x
    dz = directional_resolution(h1, h2, 2.0, np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert dz.resolution_A[0] > 1.5 * dz.resolution_A[1]


# -- the run: summary, warning, report page ---------------------------------------------


def _result(R, h1, h2, log) -> FinalResult:
    eff, directional = orientation_diagnostics(R, h1, h2, 2.0, log)
    return FinalResult(5.0, 2.0, 32, np.ones(17), np.zeros((32, 32, 32)), R, eff, directional)


def test_summary_warns_on_preferred_orientation(caplog):
    log = logging.getLogger("test_orientation")
    h1, h2 = _half_maps(n=32, r0=6.0)
    with caplog.at_level(logging.INFO, logger="test_orientation"):
        bad = _result(_preferred(), h1, h2, log)
        summary = {"warnings": ["an earlier warning"]}
        add_orientation_summary(summary, bad, log)
    assert summary["orientation_efficiency"] < 0.5
    assert set(summary["directional_resolution_A"]) == {"best", "worst", "median", "spread"}
    assert len(summary["warnings"]) == 2 and "preferred orientation" in summary["warnings"][1]
    assert any(r.getMessage().startswith("warning: preferred orientation") for r in caplog.records)

    good = _result(_uniform(3000), h1, h2, log)
    summary = {}
    add_orientation_summary(summary, good, log)
    assert summary["orientation_efficiency"] > 0.8 and "warnings" not in summary


def test_orientation_summary_without_data():
    out, warned = orientation_summary(None, None)
    assert out == {} and warned == []


def test_plot_orientation_page():
    h1, h2 = _half_maps(n=32, r0=6.0)
    dr = directional_resolution(h1, h2, 2.0, n_directions=20)
    fig = plots.plot_orientation(0.3, dr.directions, dr.resolution_A, cone_half_angle_deg=20.0)
    assert "0.30" in fig._suptitle.get_text()
    fig = plots.plot_orientation(0.9)  # efficiency only
    assert fig._suptitle is not None


def test_symmetric_run_counts_the_expanded_views():
    # with --sym the maps are made of every pose A @ S: poses all in one asymmetric unit are not a preferred
    # orientation (measured on a D7 run: E_od 0.00 from its poses alone, 0.95 expanded)
    from cryospin_relion.geometry.symmetry import symmetry_operators

    S = symmetry_operators("D7")
    R = random_rotations(2000, torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    expanded = np.einsum("nij,gjk->ngik", R, S)  # (N, G, 3, 3)
    pick = (expanded[:, :, 2] @ np.array([0.3, 0.2, 0.93])).argmax(1)  # the copy whose view is nearest one axis
    R_unit = expanded[np.arange(len(R)), pick]
    log = logging.getLogger("test_orientation")
    alone, _ = orientation_diagnostics(R_unit, None, None, 2.0, log)
    sym, _ = orientation_diagnostics(R_unit, None, None, 2.0, log, operators=S)
    assert alone < 0.3 and sym > 0.9, (alone, sym)
    assert orientation_diagnostics(R_unit, None, None, 2.0, log, max_views=500)[0] < 0.3  # a subsample
