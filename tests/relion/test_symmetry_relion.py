"""Point-group symmetry against RELION 3.1.3 (the oracle for names, axes and the side of the operators).

(a) our operators are RELION's (relion_refine --print_symmetry_ops), and a map
    symmetrised by relion_image_handler --sym is invariant under them;
(b) cryospin reconstruct --sym X and relion_reconstruct --ctf --sym X of the same
    relion_project STAR (500 CTF images of an asymmetric pseudo-atomic map, box 32)
    agree to FSC >= 0.95 up to 0.8 Nyquist for C4, D7, T, O and I; the same
    operators in a frame turned by 90 degrees about z do not;
(c) relion_align_symmetry and our axis search (evaluate/symmetry_align.py) bring a
    randomly rotated and shifted D7-symmetric map into the same frame (FSC >= 0.95
    up to 0.5 Nyquist between the two aligned maps, up to the frame's alternatives,
    geometry.symmetry.frame_alternatives: D7 has two). Measured also for O (one
    frame): 0.99 between the two, 0.991 ours vs the truth, 0.991 RELION's.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from cryospin_relion import cli
from cryospin_relion.evaluate.align import transform_volume
from cryospin_relion.evaluate.symmetry_align import align_symmetry, apply_alignment, symmetrise_map
from cryospin_relion.geometry.rotations import random_rotations
from cryospin_relion.geometry.symmetry import axis_rotation, frame_alternatives, symmetry_operators
from cryospin_relion.io.mrc import write_mrc
from relion_oracle import RELION_MISSING, atoms_map, fsc_curve, min_fsc_to, run_relion, write_pose_star

pytestmark = [pytest.mark.relion,
              pytest.mark.skipif(RELION_MISSING, reason="RELION binaries not on PATH (relion_project not found)")]

BOX, APIX = 32, 4.0
GROUPS = ("C4", "D7", "T", "O", "I")


def relion_operators(sym: str, cwd: Path) -> np.ndarray:
    """(G, 3, 3) matrices printed by relion_refine --sym X --print_symmetry_ops."""
    lines = run_relion(["relion_refine", "--sym", sym, "--print_symmetry_ops"], cwd=cwd).splitlines()
    mats = [[[float(v) for v in lines[i + k].split()] for k in (1, 2, 3)]
            for i, ln in enumerate(lines) if ln.strip().startswith("R(")]
    return np.array(mats)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """atoms.mrc (box 32, 4 A/px) and proj.star: 500 relion_project --ctf images of it."""
    d = tmp_path_factory.mktemp("sym")
    write_mrc(d / "atoms.mrc", atoms_map(BOX, natoms=60, sigma=0.8, seed=3), APIX)
    write_pose_star(d / "poses.star", 500, BOX, APIX, seed=5, ctf=True)
    run_relion(["relion_project", "--i", "atoms.mrc", "--o", "proj", "--ang", "poses.star", "--ctf"], cwd=d)
    return d


@pytest.mark.parametrize("sym", ("C4", "D7", "T", "O", "I", "I1", "I3", "I4"))
def test_operators_are_relions(sym, data):
    theirs, ours = relion_operators(sym, data), symmetry_operators(sym)
    assert theirs.shape == ours.shape
    d = np.abs(theirs[:, None] - ours[None]).max(axis=(2, 3))  # RELION prints 6 digits
    assert d.min(1).max() < 1e-4 and d.min(0).max() < 1e-4
    if sym in ("I1", "I3", "I4"):  # the map check once per kind of group is enough (I: I2)
        return
    run_relion(["relion_image_handler", "--i", "atoms.mrc", "--o", f"sym_{sym}.mrc", "--sym", sym], cwd=data)
    theirs_map = mrcfile.read(data / f"sym_{sym}.mrc")
    assert _corr(symmetrise_map(theirs_map, sym), theirs_map) > 0.999  # invariant under every operator


@pytest.mark.parametrize("sym", GROUPS)
def test_reconstruct_sym_agrees_with_relion_reconstruct(sym, data, tmp_path):
    run_relion(["relion_reconstruct", "--i", "proj.star", "--o", f"relion_{sym}.mrc", "--ctf", "--sym", sym], cwd=data)
    theirs = mrcfile.read(data / f"relion_{sym}.mrc")
    assert cli.run(["reconstruct", "--i", str(data / "proj.star"), "--o", str(tmp_path / "rec"), "--sym", sym.lower(),
                    "--quiet", "--j", "1"]) == 0
    ours = mrcfile.read(tmp_path / "rec" / "map.mrc")
    curve = fsc_curve(ours, theirs)
    print(f"\n{sym}: min FSC(cryospin --sym, relion_reconstruct --sym) to 0.8 Nyquist {min_fsc_to(curve, BOX):.4f}")
    assert min_fsc_to(curve, BOX) >= 0.95, np.round(curve, 3)
    if sym == "D7":
        for f in ("half1_map.mrc", "half2_map.mrc"):
            half = mrcfile.read(tmp_path / "rec" / f)
            assert _corr(symmetrise_map(half, sym), half) > 0.99
        # the same group in another frame (turned 90 degrees about z) is not what RELION means by D7
        from cryospin_relion.halfmaps import reconstruct_halves
        from cryospin_relion.io.read import read_particles

        X = axis_rotation((0, 0, 1), 4)
        table = read_particles(data / "proj.star")
        imgs = mrcfile.read(data / "proj.mrcs").astype(np.float32)
        other = reconstruct_halves(imgs, table, progress=False, threads=1,
                                   symmetry=X @ symmetry_operators("D7") @ X.T)
        assert min_fsc_to(fsc_curve(other.map, theirs), BOX) < 0.5


@pytest.mark.parametrize("sym", ("D7",))  # O also agrees (FSC 0.99) but RELION's default O search takes ~30 s
def test_axis_search_ends_in_relion_align_symmetry_frame(sym, data):
    run_relion(["relion_image_handler", "--i", "atoms.mrc", "--o", f"truth_{sym}.mrc", "--sym", sym], cwd=data)
    truth = mrcfile.read(data / f"truth_{sym}.mrc")
    R = random_rotations(1, torch.Generator().manual_seed(4))[0].numpy()
    mov = transform_volume(truth, R, np.array([1.5, -2.0, 0.7]))
    write_mrc(data / f"mov_{sym}.mrc", mov, APIX)
    al = align_symmetry(mov, sym)
    ours = apply_alignment(mov, al)
    alts = frame_alternatives(sym)

    def same_frame(a, b):
        return max(min_fsc_to(fsc_curve(transform_volume(a, X), b), BOX, 0.5) for X in alts)

    ours_truth = same_frame(ours, truth)
    # relion_align_symmetry draws its global orientations at random (no seed option) and now and then ends
    # a few degrees off (with its default 400 draws, twice in a row once: 0.93 and 0.90 against the truth,
    # ours 0.994): 2000 draws, and a second run then decides
    for attempt in (1, 2):
        run_relion(["relion_align_symmetry", "--i", f"mov_{sym}.mrc", "--o", f"aligned_{sym}.mrc", "--sym", sym,
                    "--box_size", str(BOX), "--nr_uniform", "2000"], cwd=data)
        theirs = mrcfile.read(data / f"aligned_{sym}.mrc")
        between, theirs_truth = same_frame(ours, theirs), same_frame(theirs, truth)
        print(f"\n{sym}: score {al.score:.3f}; min FSC to 0.5 Nyquist: ours vs relion_align_symmetry {between:.4f} "
              f"(RELION run {attempt}), vs the symmetric truth: ours {ours_truth:.4f}, RELION {theirs_truth:.4f}")
        if between >= 0.95:
            break
    assert between >= 0.95 and ours_truth >= 0.95
