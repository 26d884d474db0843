"""cryospin compare: map alignment over rotation + mirror, FSC after alignment, pose errors up to a global rotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryospin_relion import cli
from cryospin_relion.evaluate.align import align_maps, transform_volume
from cryospin_relion.evaluate.pose_error import pose_errors
from cryospin_relion.evaluate.synthetic import synthetic_map
from cryospin_relion.geometry.hand import MIRROR, flip_poses_hand
from cryospin_relion.geometry.projection import project_spectrum
from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations, so3_exp
from cryospin_relion.geometry.slicing import volume_to_projector
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.read import read_particles, write_particles

BOX, APIX = 48, 2.5


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return synthetic_map(BOX, APIX, n_residues=300, seed=1)


def _rot(seed: int) -> np.ndarray:
    return random_rotations(1, torch.Generator().manual_seed(seed))[0].numpy()


def _deg(R1, R2) -> float:
    return float(geodesic_distance_deg(torch.as_tensor(R1), torch.as_tensor(R2)))


def _project(vol, A, trans=None):
    spec = volume_to_projector(torch.as_tensor(vol, dtype=torch.float32), pad=2)
    return project_spectrum(spec, torch.as_tensor(A, dtype=torch.float32), vol.shape[-1], translations_px=trans).numpy()


@pytest.mark.parametrize("mirror", [False, True])
def test_align_recovers_rotation_mirror_and_shift(truth, mirror):
    G, t = _rot(11 + mirror), np.array([1.7, -2.2, 0.6])
    mov = transform_volume(truth, G, t, mirror=mirror)  # mov = shift_t(rot_G(m(truth)))
    res = align_maps(mov, truth)
    assert res.mirror == mirror
    # transform(mov, R, s, mirror) = truth: R = G^T (same hand), M G^T M (mirror)
    expected = MIRROR @ G.T @ MIRROR if mirror else G.T
    assert _deg(res.rotation, expected) < 1.0
    aligned = transform_volume(mov, res.rotation, res.shift_px, res.mirror)
    from cryospin_relion.geometry.fsc import fsc

    curve = fsc(torch.as_tensor(aligned), torch.as_tensor(truth)).numpy()
    assert curve[1:int(0.9 * BOX / 2)].min() > 0.97, curve
    assert res.score > 0.98 and res.score_medium > res.score_other_hand + 0.1


def test_pose_error_zero_up_to_global_rotation_and_mirror():
    g = torch.Generator().manual_seed(5)
    A = random_rotations(400, g).numpy()
    H = _rot(7)
    r = pose_errors(A, A @ H)
    assert not r["mirror"] and r["rotation_error_deg"]["p90"] < 1e-4
    assert _deg(np.asarray(r["global_rotation"]), H) < 1e-4
    r = pose_errors(A, flip_poses_hand(A) @ H)
    assert r["mirror"] and r["rotation_error_deg"]["mean"] < 1e-4 and r["view_error_deg"]["mean"] < 1e-4
    # noisy poses with 25% garbage: the robust fit still finds H, the median error is the noise level
    noisy = A @ H
    w = torch.randn(400, 3, generator=g, dtype=torch.float64) * np.radians(2.0) / np.sqrt(3)
    noisy = so3_exp(w).numpy() @ noisy
    noisy[:100] = random_rotations(100, g).numpy()
    r = pose_errors(A, noisy)
    assert _deg(np.asarray(r["global_rotation"]), H) < 1.0
    assert 1.0 < r["rotation_error_deg"]["median"] < 3.5
    assert 0.7 < r["fraction_within_10deg"] < 0.8


def test_pose_and_map_relations_by_projection(truth):
    """V_est = shift_t(rot_G(flip(V))): its poses are M A M G^T with origins o + (A_est t)_xy."""
    g = torch.Generator().manual_seed(9)
    A = random_rotations(16, g).numpy()
    o_true = torch.randn(16, 2, generator=g).numpy() * 2  # origins in px
    G, t = _rot(3), np.array([1.0, -2.0, 1.5])
    for mirror in (False, True):
        v_est = transform_volume(truth, G, t, mirror=mirror)
        P = flip_poses_hand(A) if mirror else A
        A_est = P @ G.T
        o_est = o_true + np.einsum("nij,j->ni", A_est[:, :2, :], t)
        img_true = _project(truth, A, torch.as_tensor(-o_true, dtype=torch.float32))
        img_est = _project(v_est, A_est, torch.as_tensor(-o_est, dtype=torch.float32))
        cc = (img_true * img_est).sum() / np.sqrt((img_true**2).sum() * (img_est**2).sum())
        assert cc > 0.995, cc
        r = pose_errors(A, A_est, o_true * APIX, o_est * APIX)
        assert r["mirror"] == mirror and r["rotation_error_deg"]["mean"] < 1e-4
        assert r["shift_error_A"]["mean"] < 1e-6
        np.testing.assert_allclose(r["global_translation_A"], t * APIX, atol=1e-6)


def test_compare_command_maps_and_poses(tmp_path, truth, capsys):
    ref = tmp_path / "truth.mrc"
    write_mrc(ref, truth, APIX)
    sim = tmp_path / "sim"
    assert cli.run(["simulate", "--map", str(ref), "--o", str(sim), "--n", "60", "--box", str(BOX),
                    "--apix", str(APIX), "--snr", "inf", "--quiet"]) == 0
    G, t = _rot(21), np.array([-1.0, 0.5, 2.0])
    est_map = tmp_path / "est.mrc"
    write_mrc(est_map, transform_volume(truth, G, t, mirror=True), APIX)
    table = read_particles(sim / "particles.star")
    A_est = flip_poses_hand(table.rotations) @ G.T
    o_est = table.shifts_A + np.einsum("nij,j->ni", A_est[:, :2, :], t * APIX)
    write_particles(table.with_poses(A_est, o_est), tmp_path / "est.star")
    out_json = tmp_path / "cmp.json"
    rc = cli.run(["compare", "--map", str(est_map), "--ref", str(ref), "--poses", str(tmp_path / "est.star"),
                  "--true-poses", str(sim / "particles.star"), "--json", str(out_json),
                  "--o-aligned", str(tmp_path / "aligned.mrc")])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    res = json.loads(out_json.read_text())
    assert printed == res
    assert res["mirror"] is True
    assert _deg(np.asarray(res["rotation_matrix"]), MIRROR @ G.T @ MIRROR) < 1.0
    assert res["fsc_0.5_A"] < 1.1 * 2 * APIX and res["fsc_0.143_A"] < 1.05 * 2 * APIX
    p = res["poses"]
    assert p["mirror"] is True and p["matched_by"] == "image name"
    assert p["rotation_error_deg"]["mean"] < 1e-3 and p["shift_error_A"]["mean"] < 1e-3
    assert p["map_vs_pose_rotation_deg"] < 1.0 and p["same_hand_as_map"]
    assert (tmp_path / "aligned.mrc").is_file()


def test_compare_bad_inputs(tmp_path, capsys):
    a, b, c = tmp_path / "a.mrc", tmp_path / "b.mrc", tmp_path / "c.mrc"
    write_mrc(a, np.zeros((16, 16, 16), np.float32), 1.0)
    write_mrc(b, np.zeros((20, 20, 20), np.float32), 1.0)
    write_mrc(c, np.zeros((16, 16, 16), np.float32), None)
    assert cli.run(["compare", "--map", str(a), "--ref", str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a.mrc" in err[0] and "nx" in err[0]
    assert cli.run(["compare", "--map", str(c), "--ref", str(c)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c.mrc" in err[0] and "voxel size" in err[0]
    assert cli.run(["compare", "--map", str(tmp_path / "none.mrc"), "--ref", str(a)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.mrc" in err[0] and "not found" in err[0]
    assert cli.run(["compare", "--map", str(a), "--ref", str(a), "--poses", "x.star"]) == 2
    assert "--true-poses" in capsys.readouterr().err


def test_align_real_ribosome_odd_box(shared_data):
    """The 70S ribosome map (65^3, odd box): rotation + mirror + shift recovered to < 1 degree."""
    from cryospin_relion.io.mrc import read_mrc

    ref, _ = read_mrc(shared_data / "aspire" / "clean70SRibosome_vol_65p.mrc")
    G = _rot(8)
    mov = transform_volume(ref, G, [1.5, 0.3, -2.0], mirror=True)
    res = align_maps(mov, ref)
    assert res.mirror
    assert _deg(res.rotation, MIRROR @ G.T @ MIRROR) < 1.0
    assert res.shift_px.shape == (3,)  # the FSC below checks the shift
    from cryospin_relion.geometry.fsc import fsc

    al = transform_volume(mov, res.rotation, res.shift_px, res.mirror)
    curve = fsc(torch.as_tensor(al), torch.as_tensor(ref)).numpy()
    assert curve[1:29].min() > 0.95


def test_compare_resample_smaller_map(tmp_path, truth, capsys):
    """An ab-initio-like map at a smaller working box (larger pixels) is resampled onto the reference."""
    from cryospin_relion.evaluate.simulate import resample_volume

    ref = tmp_path / "truth.mrc"
    write_mrc(ref, truth, APIX)
    small, got = resample_volume(transform_volume(truth, _rot(4)), APIX, 32, APIX * 1.5)
    mov = tmp_path / "small.mrc"
    write_mrc(mov, small, got)
    assert cli.run(["compare", "--map", str(mov), "--ref", str(ref), "--quiet"]) == 2
    assert "--resample" in capsys.readouterr().err
    assert cli.run(["compare", "--map", str(mov), "--ref", str(ref), "--resample", "--json",
                    str(tmp_path / "c.json"), "--quiet"]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    assert _deg(np.asarray(res["rotation_matrix"]), _rot(4).T) < 1.0 and not res["mirror"]
    # information only up to the small map's Nyquist (2 * 1.5 * APIX)
    assert res["fsc_0.5_A"] < 1.15 * 3 * APIX


def test_align_noisy_lowpass_map(truth):
    """An ab-initio-like map (low-passed to ~10 A, noisy, rotated, mirrored) still aligns to < 1 degree."""
    from cryospin_relion.geometry.fourier import fft3_centered, ifft3_centered, radius_grid_3d

    s = radius_grid_3d(BOX, dtype=torch.float64) / (BOX * APIX)
    v = ifft3_centered(fft3_centered(torch.as_tensor(truth).double()) * torch.exp(-2 * (s * 10.0) ** 2))
    v = v.real.float().numpy()
    v = v + np.random.default_rng(0).normal(scale=0.5 * v.std(), size=v.shape).astype(np.float32)
    G = _rot(101)
    res = align_maps(transform_volume(v, G, [1.0, -2.0, 0.5], mirror=True), truth)
    assert res.mirror and res.score_medium > res.score_other_hand
    assert _deg(res.rotation, MIRROR @ G.T @ MIRROR) < 1.0
    assert 6 < res.band_limit < BOX / 2  # refined only where the maps agree
