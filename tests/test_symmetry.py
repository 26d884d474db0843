"""Point-group symmetry (geometry/symmetry.py, halfmaps --sym, evaluate/symmetry_align.py), no RELION needed.

The operator sets themselves are checked against RELION's own in
tests/relion/test_symmetry_relion.py; here: group facts, name parsing, that a
symmetrised reconstruction is invariant under the operators (and C1 is unchanged),
that moving poses with an alignment equals moving the map, and the axis search.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryospin_relion import cli
from cryospin_relion.config import AbinitConfig
from cryospin_relion.errors import InputError
from cryospin_relion.evaluate.align import transform_volume
from cryospin_relion.evaluate.symmetry_align import (
    SymmetryAlignment, align_symmetry, apply_alignment, operator_spread, rotate_poses, symmetrise_map, symmetry_score,
)
from cryospin_relion.geometry.fsc import fsc
from cryospin_relion.geometry.rotations import matrix_to_euler_np, random_rotations
from cryospin_relion.geometry.symmetry import (
    axis_rotation, frame_alternatives, group_order, parse_symmetry, symmetry_operators,
)
from cryospin_relion.halfmaps import reconstruct_halves
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.read import read_particles
from cryospin_relion.lifecycle.symmetry import SCORE_WARN_BELOW

BOX, APIX = 32, 4.0


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _min_fsc(a: np.ndarray, b: np.ndarray, fraction: float = 0.8) -> float:
    c = fsc(torch.as_tensor(a), torch.as_tensor(b)).numpy()
    return float(c[1 : int(fraction * (a.shape[-1] // 2)) + 1].min())


def atoms(n: int = BOX, natoms: int = 60, seed: int = 3) -> np.ndarray:
    """Asymmetric pseudo-atoms (Gaussians of 0.8 px) in a ball of radius 0.3 n: signal up to Nyquist."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1, 1, (8 * natoms, 3))
    pts = pts[(pts**2).sum(1) <= 1][:natoms] * 0.3 * n
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) - n // 2,) * 3, indexing="ij")
    vol = np.zeros((n, n, n))
    for (px, py, pz), a in zip(pts, rng.uniform(0.5, 1.5, len(pts))):
        vol += a * np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * 0.8**2))
    return vol.astype(np.float32)


# -- the groups ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,order", [("C1", 1), ("C4", 4), ("c7", 7), ("D7", 14), ("d2", 4), ("T", 12), ("O", 24),
                                        ("I", 60), ("I1", 60), ("I2", 60), ("i3", 60), ("I4", 60)])
def test_group_order_closure_and_rotations(name, order):
    ops = symmetry_operators(name)
    assert ops.shape == (order, 3, 3) and group_order(name) == order
    assert np.array_equal(ops[0], np.eye(3))
    assert np.allclose(ops @ ops.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(ops), 1.0)
    flat = ops.reshape(order, 9)

    def member(M):
        return np.abs(flat - M.reshape(1, 9)).max(1).min() < 1e-9

    assert all(member(a @ b) for a in ops for b in ops)  # closed under products
    assert all(member(a.T) for a in ops)  # and inverses
    assert len({tuple(np.round(m, 6)) for m in flat}) == order  # all distinct


def test_axes_are_relions():
    z, x = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    assert np.allclose(symmetry_operators("C4") @ z, z)  # Cn about z
    d7 = symmetry_operators("D7")
    assert any(np.allclose(S, axis_rotation(x, 2)) for S in d7)  # Dn: the 2-fold on x
    assert sum(np.allclose(S @ z, z) for S in d7) == 7
    assert any(np.allclose(S, axis_rotation(z, 3)) for S in symmetry_operators("T"))  # T: 3-fold on z
    for name in ("I", "I1", "I2"):  # I1, I2: 2-folds on x, y, z
        assert all(any(np.allclose(S, axis_rotation(a, 2)) for S in symmetry_operators(name)) for a in np.eye(3))
    for name in ("I3", "I4"):  # 5-fold on z
        assert any(np.allclose(S, axis_rotation(z, 5)) for S in symmetry_operators(name))
    assert np.array_equal(symmetry_operators("I"), symmetry_operators("I2"))
    assert not np.allclose(symmetry_operators("I1"), symmetry_operators("I2"))
    assert [len(frame_alternatives(g)) for g in ("D7", "T", "O", "I")] == [2, 2, 1, 1]


def test_names_parse_and_bad_names_name_the_flag(tmp_path):
    assert [parse_symmetry(s) for s in ("c1", " D7 ", "t", "o", "i", "I3")] == ["C1", "D7", "T", "O", "I2", "I3"]
    for bad in ("C0", "I5", "D", "C4v", "X", ""):
        with pytest.raises(InputError, match="--sym"):
            parse_symmetry(bad)
    with pytest.raises(InputError, match="--sym: Q2 is not a point group"):
        AbinitConfig().override(sym="Q2")
    assert AbinitConfig().override(sym="D7").run.sym == "D7"
    assert AbinitConfig().run.sym == "C1"
    out = tmp_path / "never"
    assert cli.run(["reconstruct", "--i", str(tmp_path / "none.star"), "--o", str(out), "--sym", "D0"]) == 2
    assert not out.exists()


# -- symmetrised reconstruction --------------------------------------------------------------------


@pytest.fixture(scope="module")
def projections(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """400 clean `cryospin project` images (box 32, 4 A/px, random poses and origins) of ``atoms()``."""
    d = tmp_path_factory.mktemp("symproj")
    vol = atoms()
    write_mrc(d / "atoms.mrc", vol, APIX)
    n = 400
    rng = np.random.default_rng(7)
    eul = matrix_to_euler_np(random_rotations(n, torch.Generator().manual_seed(7)).numpy())
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@none.mrcs" for i in range(n)],
                          "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
                          "rlnOriginXAngst": rng.uniform(-6, 6, n), "rlnOriginYAngst": rng.uniform(-6, 6, n),
                          "rlnRandomSubset": np.arange(n) % 2 + 1, "rlnOpticsGroup": 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["og1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [APIX], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    starfile.write({"optics": optics, "particles": parts}, d / "poses.star", overwrite=True)
    assert cli.run(["project", "--map", str(d / "atoms.mrc"), "--i", str(d / "poses.star"),
                    "--o", str(d / "proj.mrcs"), "--quiet"]) == 0
    return d / "proj.star", vol


def _images(star: Path) -> tuple:
    table = read_particles(star, no_ctf=True)
    imgs = mrcfile.read(star.parent / "proj.mrcs").astype(np.float32)
    return table, imgs


def test_symmetrised_maps_are_invariant_and_c1_is_unchanged(projections):
    table, imgs = _images(projections[0])
    plain = reconstruct_halves(imgs, table, use_ctf=False, progress=False, threads=1)
    ident = reconstruct_halves(imgs, table, use_ctf=False, progress=False, threads=1, symmetry=np.eye(3)[None])
    for a, b in zip(plain[:4], ident[:4]):
        assert np.array_equal(a, b)  # C1 (the identity alone) is bit-identical
    sym = reconstruct_halves(imgs, table, use_ctf=False, progress=False, threads=1,
                             symmetry=symmetry_operators("D7"))
    gens = [axis_rotation((0, 0, 1), 7), axis_rotation((1, 0, 0), 2)]  # invariance under these: under all of D7
    for m in (sym.map, sym.half1, sym.half2):
        worst = min(_corr(transform_volume(m, S), m) for S in gens)
        assert worst > 0.99, worst
    c1_worst = min(_corr(transform_volume(plain.map, S), plain.map) for S in gens)
    assert c1_worst < 0.8, c1_worst  # the test map is not D7-symmetric to begin with
    # the symmetrised reconstruction is the symmetrised truth (up to what 400 x 14 views resolve)
    assert _min_fsc(sym.map, symmetrise_map(projections[1], "D7"), 0.6) > 0.9


def test_backprojection_of_row_shares_reduced_is_the_whole(projections):
    # data-parallel final maps (lifecycle/outputs.py): each rank inserts its rows, the accumulators are summed
    table, imgs = _images(projections[0])
    whole = reconstruct_halves(imgs, table, use_ctf=False, progress=False, threads=1)
    n = len(table)
    first: list = []
    reconstruct_halves(imgs, table, use_ctf=False, progress=False, threads=1, rows=np.arange(n // 3),
                       reduce=lambda acc: first.append((acc.num.clone(), acc.weight.clone())))

    def add_first(acc, it=iter(first)):
        num, weight = next(it)
        acc.num += num
        acc.weight += weight

    summed = reconstruct_halves(imgs, table, use_ctf=False, progress=False, threads=1,
                                rows=np.arange(n // 3, n), reduce=add_first)
    for a, b in zip(whole[:4], summed[:4]):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))


def test_rotated_poses_reconstruct_the_rotated_map(projections):
    """rotate_poses(A, o, al) with the aligned map: reconstructing with the moved poses = moving the map."""
    table, imgs = _images(projections[0])
    Q = random_rotations(1, torch.Generator().manual_seed(11))[0].numpy()
    c = np.array([1.0, -1.5, 0.5])
    al = SymmetryAlignment("C1", Q, -Q @ c, c, 1.0, 1.0)
    R2, o2 = rotate_poses(table.rotations, table.shifts_A, al, APIX)
    moved = reconstruct_halves(imgs, table, rotations=R2, shifts_A=o2, use_ctf=False, progress=False, threads=1)
    expect = apply_alignment(projections[1], al)
    assert _min_fsc(moved.map, expect) > 0.95
    wrong = reconstruct_halves(imgs, table, rotations=table.rotations @ Q, shifts_A=o2, use_ctf=False,
                               progress=False, threads=1)  # the other side: not the same map
    assert _min_fsc(wrong.map, expect) < 0.5


def test_axis_search_finds_the_frame_and_scores_symmetry(projections):
    truth = symmetrise_map(projections[1], "T")
    R = random_rotations(1, torch.Generator().manual_seed(1))[0].numpy()
    mov = transform_volume(truth, R, np.array([1.5, -2.0, 0.7]))
    al = align_symmetry(mov, "T")
    back = apply_alignment(mov, al)
    # T has two frames (frame_alternatives): the search may end in either
    assert max(_min_fsc(transform_volume(back, X), truth, 0.5) for X in frame_alternatives("T")) > 0.95
    assert al.score > 0.8 and symmetry_score(truth, "T") > 0.9
    assert symmetry_score(mov, "T") < SCORE_WARN_BELOW  # before alignment
    for g in ("C4", "D7", "T", "I"):  # the asymmetric map: far under the warning threshold
        assert symmetry_score(projections[1], g) < 0.5 * SCORE_WARN_BELOW, g
    c1 = align_symmetry(mov, "C1")
    assert c1.score == 1.0 and np.array_equal(c1.rotation, np.eye(3))


# -- abinit --sym ------------------------------------------------------------------------------------


def test_final_outputs_with_sym(tmp_path):
    """lifecycle: write_final_outputs(sym="D7") with a decoder map that is D7-symmetric in a turned frame:
    poses and decoder_map.mrc end in RELION's frame, the half maps are symmetric and made with the written
    poses, the summary has the score and no warning (an asymmetric map's warning: the test below)."""
    import logging

    from engine_synth import simulated_star
    from cryospin_relion.lifecycle.outputs import FinalResult, add_orientation_summary, write_final_outputs

    sim = simulated_star(tmp_path / "sim", n=96, map_seed=1, sim_seed=2)  # for its poses and CTFs
    blob = mrcfile.read(tmp_path / "sim" / "blob.mrc")
    sym_blob = symmetrise_map(blob, "D7")
    Q0 = random_rotations(1, torch.Generator().manual_seed(5))[0].numpy()
    decoder = transform_volume(sym_blob, Q0)  # D7-symmetric, in a turned frame: images of it
    write_mrc(tmp_path / "turned.mrc", decoder, 6.0)
    assert cli.run(["project", "--map", str(tmp_path / "turned.mrc"), "--i", str(sim), "--o",
                    str(tmp_path / "sim" / "turned.mrcs"), "--ctf", "--quiet"]) == 0
    star = tmp_path / "sim" / "turned.star"
    table = read_particles(star)
    imgs = mrcfile.read(star.parent / "turned.mrcs").astype(np.float32)
    apix = np.full(len(table), float(table.apix[0]))
    poses = (table.rotations, -table.shifts_A / apix[:, None])
    out = tmp_path / "out"
    out.mkdir()
    log = logging.getLogger("test_symmetry")
    res = write_final_outputs(out, table, imgs, apix, poses, decoder, flip_hand=False, seed=0, use_ctf=True,
                              write_cs=False, device="cpu", progress=False, log=log, sym="D7")
    summary = add_orientation_summary({}, res, log)
    assert summary["symmetry"] == "D7"
    assert not any("--sym" in w for w in summary.get("warnings", [])), summary  # neither symmetry warning
    assert summary["symmetry_score"] > 0.6  # box 16: the rotated copies lose a little at every shell
    dec = mrcfile.read(out / "decoder_map.mrc")
    assert _corr(symmetrise_map(dec, "D7"), dec) > 0.99  # in RELION's D7 frame
    back = max(_corr(transform_volume(dec, X), sym_blob) for X in frame_alternatives("D7"))
    assert back > 0.99 and back > _corr(decoder, sym_blob) + 0.03  # (a smooth box-16 map: 0.95 when turned)
    half = mrcfile.read(out / "half1_map.mrc")
    assert _corr(symmetrise_map(half, "D7"), half) > 0.99
    written = read_particles(out / "particles.star", datadir=str(star.parent))
    assert np.allclose(written.rotations, res.symmetry.rotations, atol=1e-5)
    again = reconstruct_halves(imgs, written, progress=False, threads=1, symmetry=symmetry_operators("D7"))
    assert _corr(again.half1, half) > 0.99


def test_symmetry_warning_and_summary():
    from cryospin_relion.lifecycle.symmetry import SymmetryFrame

    def frame(score):
        al = SymmetryAlignment("D7", np.eye(3), np.zeros(3), np.zeros(3), score, score)
        return SymmetryFrame("D7", symmetry_operators("D7"), np.zeros((0, 3, 3)), np.zeros((0, 2)),
                             np.zeros((4, 4, 4)), al)

    low, high = frame(0.05), frame(0.9)
    assert high.warning() is None and "not D7-symmetric" in low.warning() and "--sym D7" in low.warning()
    assert low.summary()["symmetry_score"] == 0.05 and low.summary()["symmetry"] == "D7"
    # a good mean score with operators that disagree (part of the group fits): the other warning
    part = SymmetryFrame("D7", symmetry_operators("D7"), np.zeros((0, 3, 3)), np.zeros((0, 2)),
                         np.zeros((4, 4, 4)), SymmetryAlignment("D7", np.eye(3), np.zeros(3), np.zeros(3), 0.45,
                                                                0.45, 0.3))
    assert "some operators of D7 fit" in part.warning() and part.summary()["symmetry_operator_spread"] == 0.3


def test_operator_spread_tells_a_wrong_group_that_the_mean_score_passes(projections):
    # the blind spot of the mean score: C4 asked of a D7 map (its two-fold fits, its four-fold does not)
    from cryospin_relion.lifecycle.symmetry import SPREAD_WARN_BELOW

    d7 = symmetrise_map(projections[1], "D7")
    right, wrong = align_symmetry(d7, "D7"), align_symmetry(d7, "C4")
    print(f"D7 map: under D7 score {right.score:.3f} spread {right.spread:.3f}; "
          f"under C4 score {wrong.score:.3f} spread {wrong.spread:.3f}")
    assert right.spread > 0.9 and right.score > 0.9
    assert wrong.spread < SPREAD_WARN_BELOW
    assert operator_spread(apply_alignment(d7, right), "D7") == pytest.approx(right.spread, abs=0.05)


