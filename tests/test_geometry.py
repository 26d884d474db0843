"""geometry/: rotations, CTF, shifts, Hartley, slicing, cropping, FSC and backprojection (fast, no RELION)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryospin_relion.geometry import backproject as bp
from cryospin_relion.geometry.ctf import CTF, ctf_2d, ctf_from_freqs
from cryospin_relion.geometry.fourier import (
    fft2_centered, fft_to_hartley, fourier_crop_2d, ht2_centered, ifft2_centered,
)
from cryospin_relion.geometry.fsc import fsc, resolution_at
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.rotations import (
    cryosparc_pose_to_relion, euler_to_matrix_np, geodesic_distance_deg, matrix_to_euler, project_to_so3,
    random_rotations,
    relion_to_cryosparc_pose, rotation_angle_deg, sixd_to_matrix, so3_exp, so3_log, super_fibonacci_rotations,
)
from cryospin_relion.geometry.shifts import hartley_shift, origin_to_translation, phase_ramp
from cryospin_relion.geometry.slicing import extract_slices, volume_to_projector

F64 = torch.float64


def atoms(n: int, natoms: int = 60, sigma: float = 0.8, seed: int = 0) -> torch.Tensor:
    """Asymmetric pseudo-atomic map (n, n, n) float64 with signal up to Nyquist."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1, 1, (4 * natoms, 3))
    pts = pts[(pts**2).sum(1) <= 1][:natoms] * 0.3 * n * np.array([1.0, 0.8, 0.6])
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    v = sum(np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sigma**2)) for p in pts)
    return torch.as_tensor(v, dtype=F64)


def ctf_params(b: int, seed: int = 0, **over) -> CTF:
    rng = np.random.default_rng(seed)
    p = dict(defocus_u=rng.uniform(8000, 25000, b), defocus_v=rng.uniform(8000, 25000, b),
             defocus_angle=rng.uniform(-180, 180, b), voltage=np.full(b, 300.0), cs=np.full(b, 2.7),
             amp_contrast=np.full(b, 0.1), phase_shift=rng.uniform(0, 90, b), bfactor=rng.uniform(0, 100, b),
             scale=rng.uniform(0.5, 1.0, b))
    p.update({k: np.full(b, v, dtype=np.float64) for k, v in over.items()})
    return CTF(**{k: torch.as_tensor(v, dtype=F64) for k, v in p.items()})


# -- rotations -------------------------------------------------------------------------------------


def test_euler_to_matrix_matches_scipy_and_cryosparc_pose():
    rng = np.random.default_rng(0)
    eul = np.stack([rng.uniform(-180, 180, 50), rng.uniform(1, 179, 50), rng.uniform(-180, 180, 50)], 1)
    A = euler_to_matrix_np(eul)
    for e, a in zip(eul, A):
        r = Rotation.from_euler("ZYZ", e, degrees=True)
        np.testing.assert_allclose(a, r.as_matrix().T, atol=1e-12)
        np.testing.assert_allclose(relion_to_cryosparc_pose(a), r.as_rotvec(), atol=1e-9)
        np.testing.assert_allclose(cryosparc_pose_to_relion(r.as_rotvec()), a, atol=1e-12)
    back = matrix_to_euler(torch.as_tensor(A)).numpy()
    np.testing.assert_allclose(euler_to_matrix_np(back), A, atol=1e-10)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-5, 0.3, 2.0, math.pi - 1e-3, math.pi - 1e-7])
def test_so3_exp_log_round_trip(angle):
    axes = torch.nn.functional.normalize(torch.randn(20, 3, generator=torch.Generator().manual_seed(1), dtype=F64), dim=-1)
    v = axes * angle
    R = so3_exp(v)
    np.testing.assert_allclose(R.numpy(), Rotation.from_rotvec(v.numpy()).as_matrix(), atol=1e-12)
    np.testing.assert_allclose((R @ R.transpose(-1, -2)).numpy(), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    w = so3_log(R)
    np.testing.assert_allclose(so3_exp(w).numpy(), R.numpy(), atol=1e-9)  # exact pi is ambiguous in sign
    if angle < math.pi - 1e-4:
        np.testing.assert_allclose(w.numpy(), v.numpy(), atol=1e-9)
    R2 = random_rotations(20, torch.Generator().manual_seed(2))
    np.testing.assert_allclose(so3_exp(so3_log(R2)).numpy(), R2.numpy(), atol=1e-12)


def test_super_fibonacci_is_uniform_and_one_set_in_every_dtype():
    R = super_fibonacci_rotations(2000)
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=R.dtype).expand(2000, 3, 3), atol=1e-10)
    assert torch.equal(super_fibonacci_rotations(2000, dtype=torch.float32), R.float())
    # every random rotation has a grid neighbour within ~1.2x the typical spacing
    probe = random_rotations(200, torch.Generator().manual_seed(0))
    d = geodesic_distance_deg(probe[:, None], R[None]).min(1).values
    spacing = np.degrees((8 * np.pi**2 / 2000) ** (1 / 3))
    assert float(d.max()) < 1.2 * spacing


def test_rotation_angle_is_the_geodesic_distance_from_the_identity():
    w = torch.randn(50, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    w = w / w.norm(dim=-1, keepdim=True) * torch.linspace(0.1, 3.0, 50, dtype=F64)[:, None]  # angles in (0, pi)
    np.testing.assert_allclose(rotation_angle_deg(so3_exp(w)).numpy(), np.degrees(w.norm(dim=-1).numpy()), atol=1e-9)
    R1, R2 = random_rotations(2, torch.Generator().manual_seed(5))
    assert float(geodesic_distance_deg(R1, R2)) == pytest.approx(float(rotation_angle_deg(R1.T @ R2)), abs=1e-9)


def test_sixd_to_matrix_gives_rotations():
    d6 = torch.randn(100, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    R = sixd_to_matrix(d6)
    np.testing.assert_allclose((R @ R.transpose(-1, -2)).numpy(), np.broadcast_to(np.eye(3), R.shape), atol=1e-12)
    np.testing.assert_allclose(torch.linalg.det(R).numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(R[:, 0].numpy(), torch.nn.functional.normalize(d6[:, :3], dim=-1).numpy(), atol=1e-12)


# -- CTF ---------------------------------------------------------------------------------------------


def relion_ctf_numpy(sx, sy, du, dv, angle_deg, kv, cs_mm, q0, phase_deg=0.0, bfac=0.0, scale=1.0):
    """RELION's CTF::getCTF written out in numpy (s in 1/A, defoci in A)."""
    v = kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1 + v * 0.978466e-6))
    u2 = sx**2 + sy**2
    ang = np.arctan2(sy, sx) - np.deg2rad(angle_deg)
    deltaf = -(du + dv) / 2 - (du - dv) / 2 * np.cos(2 * ang)
    arg = np.pi * lam * deltaf * u2 + np.pi / 2 * cs_mm * 1e7 * lam**3 * u2**2
    arg = arg - np.deg2rad(phase_deg) - np.arctan(q0 / np.sqrt(1 - q0**2))
    return -np.sin(arg) * np.exp(-bfac / 4 * u2) * scale


def test_ctf_matches_relion_formula():
    box, apix = 64, 1.5
    p = dict(defocus_u=15000.0, defocus_v=11000.0, defocus_angle=30.0, voltage=200.0, cs=2.0, amp_contrast=0.07,
             phase_shift=40.0, bfactor=60.0, scale=0.8)
    c = ctf_2d(box, torch.tensor([apix], dtype=F64), CTF(**{k: torch.tensor([v], dtype=F64) for k, v in p.items()}),
               dtype=F64)[0].numpy()
    for x, y in [(3, 0), (0, 5), (7, 4), (-9, 11), (20, -13), (-31, -2), (31, 31)]:
        ref = relion_ctf_numpy(x / (box * apix), y / (box * apix), p["defocus_u"], p["defocus_v"], p["defocus_angle"],
                               p["voltage"], p["cs"], p["amp_contrast"], p["phase_shift"], p["bfactor"], p["scale"])
        assert c[box // 2 + y, box // 2 + x] == pytest.approx(ref, abs=1e-10), (x, y)


def test_ctf_astigmatism_direction_and_zero_frequency():
    box, apix, s = 128, 1.0, 0.05
    base = dict(voltage=300.0, cs=2.7, amp_contrast=0.1, phase_shift=0.0, bfactor=0.0, scale=1.0)
    ang = 30.0
    fx, fy = s * math.cos(math.radians(ang)), s * math.sin(math.radians(ang))
    t = lambda d: CTF(**{k: torch.tensor([v], dtype=F64) for k, v in d.items()})  # noqa: E731
    astig = ctf_from_freqs(torch.tensor([[fx]], dtype=F64), torch.tensor([[fy]], dtype=F64),
                           t(dict(base, defocus_u=20000.0, defocus_v=10000.0, defocus_angle=ang)))
    iso_u = ctf_from_freqs(torch.tensor([[s]], dtype=F64), torch.tensor([[0.0]], dtype=F64),
                           t(dict(base, defocus_u=20000.0, defocus_v=20000.0, defocus_angle=0.0)))
    assert astig.item() == pytest.approx(iso_u.item(), abs=1e-12)  # along the angle: defocus U
    perp = ctf_from_freqs(torch.tensor([[-fy]], dtype=F64), torch.tensor([[fx]], dtype=F64),
                          t(dict(base, defocus_u=20000.0, defocus_v=10000.0, defocus_angle=ang)))
    iso_v = ctf_from_freqs(torch.tensor([[s]], dtype=F64), torch.tensor([[0.0]], dtype=F64),
                           t(dict(base, defocus_u=10000.0, defocus_v=10000.0, defocus_angle=0.0)))
    assert perp.item() == pytest.approx(iso_v.item(), abs=1e-12)  # perpendicular: defocus V
    c = ctf_2d(box, torch.tensor([apix]), t(dict(base, defocus_u=20000.0, defocus_v=10000.0, defocus_angle=ang)),
               dtype=F64)
    assert c[0, box // 2, box // 2].item() == pytest.approx(0.1, abs=1e-12)  # s = 0: amplitude contrast


def test_backprojection_ctf_at_plane_points_matches_ctf_from_freqs():
    """backproject's CTF (float32 terms per plane) equals ctf.ctf_from_freqs (float64) at the inserted frequencies."""
    n, pad = 48, 2
    plane = bp._plane(n, pad * n, torch.device("cpu"))
    apix = torch.tensor([1.3, 2.1, 0.9], dtype=F64)
    p = ctf_params(3, seed=4)
    fast = bp._ctf_points(plane, apix, p).double()
    kx, ky = plane.k.double()
    ref = ctf_from_freqs(kx[None, None] / (apix[:, None, None] * n), ky[None, None] / (apix[:, None, None] * n), p)[:, 0]
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=2e-5)


# -- shifts and Hartley ------------------------------------------------------------------------------


def test_phase_ramp_moves_delta_by_minus_origin():
    box, apix = 32, 1.7
    img = torch.zeros(1, box, box, dtype=F64)
    img[0, box // 2, 10] = 1.0
    t = origin_to_translation(torch.tensor([[2.0 * apix, 0.0]], dtype=F64), torch.tensor([apix], dtype=F64))
    np.testing.assert_allclose(t.numpy(), [[-2.0, 0.0]])
    out = ifft2_centered(fft2_centered(img) * phase_ramp(t, box)).real[0]
    y, x = np.unravel_index(int(out.argmax()), out.shape)
    assert (y, x) == (box // 2, 8) and out.max().item() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("box", [32, 33])
def test_hartley_shift_equals_fourier_shift(box):
    g = torch.Generator().manual_seed(5)
    img = torch.randn(3, box, box, generator=g, dtype=F64)
    t = torch.randn(3, 2, generator=g, dtype=F64) * 4
    want = fft_to_hartley(fft2_centered(img) * phase_ramp(t, box))
    np.testing.assert_allclose(hartley_shift(ht2_centered(img), t).numpy(), want.numpy(), atol=1e-9)


def test_slice_of_hartley_spectrum_is_hartley_of_fourier_slice():
    n = 24
    spec = volume_to_projector(atoms(n, 30))
    R = random_rotations(5, torch.Generator().manual_seed(6))
    four = extract_slices(spec, R, n)
    hart = extract_slices(fft_to_hartley(spec), R, n)
    np.testing.assert_allclose(hart.numpy(), fft_to_hartley(four).numpy(), atol=1e-9 * four.abs().max().item())
    # and, inside the Nyquist circle (where the slice is Hermitian), the Hartley transform of the projection
    img = ifft2_centered(four).real
    k = torch.arange(n) - n // 2
    disk = (k[:, None] ** 2 + k[None, :] ** 2) < (n // 2 - 1) ** 2
    np.testing.assert_allclose(hart[:, disk].numpy(), ht2_centered(img)[:, disk].numpy(),
                               atol=1e-6 * hart.abs().max().item())


def test_extract_slices_rotation_gradient_matches_finite_differences():
    n = 16
    spec = volume_to_projector(atoms(n, 20, sigma=1.2))
    R0 = random_rotations(2, torch.Generator().manual_seed(7))
    W = torch.randn(2, n, n, generator=torch.Generator().manual_seed(8), dtype=F64)

    def loss(w: torch.Tensor) -> torch.Tensor:
        s = extract_slices(spec, so3_exp(w) @ R0, n)
        return (s.real * W).sum() + (s.imag * W.flip(-1)).sum()

    w0 = torch.tensor([[0.01, -0.02, 0.015], [0.02, 0.01, -0.01]], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(loss(w0), w0)
    eps = 1e-6
    fd = torch.zeros_like(g)
    for i in range(2):
        for j in range(3):
            d = torch.zeros_like(w0)
            d[i, j] = eps
            fd[i, j] = (loss(w0.detach() + d) - loss(w0.detach() - d)) / (2 * eps)
    np.testing.assert_allclose(g.numpy(), fd.numpy(), rtol=1e-4, atol=1e-6 * fd.abs().max().item())


def test_extract_slices_independent_of_thread_chunks():
    n = 20
    spec = volume_to_projector(atoms(n, 20).float())
    R = random_rotations(7, torch.Generator().manual_seed(9)).float()
    a = extract_slices(spec, R, n, threads=1)
    for th in (2, 3, 7):
        np.testing.assert_allclose(extract_slices(spec, R, n, threads=th).numpy(), a.numpy(), atol=1e-6)


# -- cropping and FSC --------------------------------------------------------------------------------


@pytest.mark.parametrize("n, new", [(64, 32), (64, 48), (65, 33), (48, 31)])
def test_fourier_crop_2d_keeps_centre_and_mean(n, new):
    y, x = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    img = torch.as_tensor(np.exp(-(x**2 + y**2) / (2 * 3.0**2)) + 0.25, dtype=F64)[None]
    out = fourier_crop_2d(img, new)[0]
    assert out.shape == (new, new)
    assert np.unravel_index(int(out.argmax()), out.shape) == (new // 2, new // 2)
    assert out.mean().item() == pytest.approx(img.mean().item(), rel=1e-9)


def test_fsc_self_and_resolution_interpolation():
    v = atoms(32, 40)
    np.testing.assert_allclose(fsc(v, v).numpy(), 1.0, atol=1e-12)
    n, apix = 32, 2.0
    curve = np.array([1.0, 0.99, 0.9, 0.5, 0.1, 0.0, 0.3] + [0.0] * 10)
    s = 3 + (0.5 - 0.143) / (0.5 - 0.1)  # between shells 3 and 4
    assert resolution_at(curve, n, apix, 0.143) == pytest.approx(n * apix / s)
    assert resolution_at(np.ones(17), n, apix) == pytest.approx(2 * apix)


# -- backprojection ----------------------------------------------------------------------------------


def _projections(vol: torch.Tensor, N: int, seed: int, ctf: bool):
    n = vol.shape[-1]
    g = torch.Generator().manual_seed(seed)
    R = random_rotations(N, g)
    t = (torch.rand(N, 2, generator=g, dtype=F64) - 0.5) * 6
    apix = torch.full((N,), 2.0, dtype=F64)
    p = ctf_params(N, seed) if ctf else None
    c = ctf_2d(n, apix, p, dtype=F64) if ctf else None
    imgs = project_spectrum(volume_to_projector(vol), R, n, t, c)
    return imgs, R, t, apix, p


@pytest.mark.parametrize("n, ctf", [(32, False), (32, True), (33, True)], ids=["32-noctf", "32-ctf", "33-ctf"])
def test_backprojection_recovers_map_from_noiseless_projections(n, ctf):
    vol = atoms(n)
    imgs, R, t, apix, p = _projections(vol, 1500, 10, ctf)
    acc = bp.Accumulator.zeros(n)
    for a in range(0, len(imgs), 500):
        s = slice(a, a + 500)
        bp.insert_images(acc, imgs[s], R[s], t[s], apix[s], None if p is None else p[s])
    rec = bp.volume_from_accumulator(acc)
    curve = fsc(rec, vol).numpy()
    assert curve[1 : int(0.8 * n / 2) + 1].min() >= 0.99, np.round(curve, 4)
    scale = float((rec.double() * vol).sum() / (vol * vol).sum())
    assert scale == pytest.approx(1.0, abs=0.03)


def test_backprojection_independent_of_threads_and_batching():
    """Staged (float32, threaded) and direct (float64) insertion give the same completed spectra."""
    n = 32
    imgs, R, t, apix, p = _projections(atoms(n), 400, 11, ctf=True)
    results = []
    for threads, step in [(1, 400), (2, 400), (3, 400), (1, 10)]:  # step 10: below the staging threshold
        acc = bp.Accumulator.zeros(n)
        for a in range(0, 400, step):
            s = slice(a, a + step)
            bp.insert_images(acc, imgs[s], R[s], t[s], apix[s], p[s], threads=threads)
        results.append(bp.accumulator_spectra(acc))
    num0, w0 = results[0]
    for num, w in results[1:]:
        assert (num - num0).abs().max().item() <= 1e-5 * num0.abs().max().item()
        assert (w - w0).abs().max().item() <= 1e-5 * w0.abs().max().item()


def test_backprojection_padded_images_mode_matches_direct_insert():
    """pad_images=True (oversampled images): staged path equals the bounds-checked direct path."""
    n = 24
    imgs, R, t, apix, _ = _projections(atoms(n, 30), 300, 12, ctf=False)
    a1, a2 = bp.Accumulator.zeros(n), bp.Accumulator.zeros(n)
    bp.insert_images(a1, imgs, R, t, apix, None, pad_images=True)
    for a in range(0, 300, 5):
        bp.insert_images(a2, imgs[a : a + 5], R[a : a + 5], t[a : a + 5], apix[a : a + 5], None, pad_images=True)
    n1, w1 = bp.accumulator_spectra(a1)
    n2, w2 = bp.accumulator_spectra(a2)
    assert (n1 - n2).abs().max().item() <= 1e-5 * n2.abs().max().item()
    assert (w1 - w2).abs().max().item() <= 1e-5 * w2.abs().max().item()


def test_project_to_so3_is_the_chordal_mean_rotation():
    g = torch.Generator().manual_seed(3)
    R = random_rotations(1, g)[0]
    noisy = so3_exp(torch.randn(50, 3, generator=g, dtype=torch.float64) * 0.1) @ R
    H = project_to_so3(noisy.mean(0))
    assert torch.allclose(H.T @ H, torch.eye(3, dtype=H.dtype), atol=1e-12) and float(torch.det(H)) > 0
    assert float(geodesic_distance_deg(H, R)) < 3.0
    # a mirror-containing matrix still gives a proper rotation (det +1), not a reflection
    M = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64))
    assert float(torch.det(project_to_so3(R @ M))) > 0
