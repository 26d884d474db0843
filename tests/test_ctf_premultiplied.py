"""CTF-premultiplied (rlnCtfDataAreCtfPremultiplied 1) and phase-flipped images.

A premultiplied image carries CTF^2 times the projection; backprojection adds it
as it is against the weight CTF^2, and the forward model multiplies the
projection by CTF^2. Test data: a simulated set, and the same set with every
image multiplied by its CTF in Fourier space (what RELION's extraction with
--premultiply_ctf does), flagged in data_optics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryospin_relion import cli
from cryospin_relion.geometry.ctf import CTF, backprojection_factor, ctf_2d, projection_factor
from cryospin_relion.geometry.fourier import fft2_centered, ifft2_centered
from cryospin_relion.geometry.fsc import fsc
from cryospin_relion.io.mrc import read_mrc
from cryospin_relion.io.star import read_star, write_star

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402

LABEL = "rlnCtfDataAreCtfPremultiplied"


def _ctf_images(star: Path, of_ctf=lambda c: c) -> np.ndarray:
    """The set's images multiplied in Fourier space by ``of_ctf(CTF)`` (default: the CTF itself, i.e.
    premultiplied; ``torch.sign``: phase-flipped), with the package's own ctf_2d and centred FFTs."""
    t = read_star(star)
    with mrcfile.open(t.stack_paths[0], permissive=True) as m:
        imgs = torch.as_tensor(np.asarray(m.data, dtype=np.float64)[t.stack_indices])
    c = ctf_2d(t.box, torch.as_tensor(t.apix), CTF.from_arrays(t.ctf, dtype=torch.float64), dtype=torch.float64)
    return ifft2_centered(fft2_centered(imgs) * of_ctf(c)).real.float().numpy()


def _write_variant(star: Path, folder: Path, images: np.ndarray, flag: int | None, where: str = "optics") -> Path:
    """A copy of ``star`` whose images are ``images`` (a new stack), with rlnCtfDataAreCtfPremultiplied = flag
    in data_optics (``where="optics"``) or as a particle column (a RELION 3.0-style file), or absent (None)."""
    folder.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(folder / "images.mrcs", overwrite=True) as m:
        m.set_data(images.astype(np.float32))
        m.set_image_stack()
        m.voxel_size = float(read_star(star).apix[0])
    blocks = starfile.read(star, always_dict=True)
    parts, optics = blocks["particles"].copy(), blocks["optics"].copy()
    parts["rlnImageName"] = [f"{i + 1:06d}@{folder / 'images.mrcs'}" for i in range(len(parts))]
    if flag is not None and where == "optics":
        optics[LABEL] = flag
    elif flag is not None:
        parts[LABEL] = flag
    out = folder / "particles.star"
    starfile.write({"optics": optics, "particles": parts}, out, overwrite=True)
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """(plain STAR, premultiplied STAR, the same premultiplied images without the flag, folder)."""
    d = tmp_path_factory.mktemp("premult")
    plain = simulated_star(d, n=400, map_seed=1, sim_seed=2)
    pre_imgs = _ctf_images(plain)
    pre = _write_variant(plain, d / "pre", pre_imgs, 1)
    unflagged = _write_variant(plain, d / "unflagged", pre_imgs, None)
    return plain, pre, unflagged, d


def _reconstruct(star: Path, out: Path, *extra: str) -> np.ndarray:
    assert cli.run(["reconstruct", "--i", str(star), "--o", str(out), "--quiet", "--j", "2", *extra]) == 0
    return read_mrc(out / "map.mrc")[0]


def _fsc_to(a: np.ndarray, b: np.ndarray, frac: float = 0.8) -> np.ndarray:
    """FSC of shells 1 .. frac * Nyquist."""
    curve = fsc(torch.as_tensor(a), torch.as_tensor(b)).numpy()
    return curve[1: int(frac * (a.shape[-1] // 2)) + 1]


def test_factor_per_image_state():
    n = 3
    ctf = CTF(defocus_u=torch.full((n,), 15000.0), defocus_v=torch.full((n,), 14000.0),
              defocus_angle=torch.full((n,), 30.0), voltage=torch.full((n,), 300.0), cs=torch.full((n,), 2.7),
              amp_contrast=torch.full((n,), 0.1), premultiplied=torch.tensor([False, True, False]))
    c = ctf_2d(16, torch.full((n,), 3.0), ctf)
    m, b = projection_factor(c, ctf), backprojection_factor(c, ctf)
    torch.testing.assert_close(m[0], c[0])
    torch.testing.assert_close(m[1], c[1] ** 2)
    torch.testing.assert_close(b[1], torch.ones_like(c[1]))
    torch.testing.assert_close(m * b, c * c)  # every state adds c^2 * projection against the weight c^2
    flipped = CTF(**dict(ctf.items()), phase_flipped=True)
    torch.testing.assert_close(projection_factor(c, flipped), c.abs())
    torch.testing.assert_close(backprojection_factor(c, flipped), c.abs())
    # the state travels with slicing and device/dtype moves
    sub = ctf[torch.tensor([1, 2])].to("cpu", torch.float64)
    assert sub.premultiplied.tolist() == [True, False] and sub.defocus_u.dtype == torch.float64
    assert flipped[:2].phase_flipped


def test_star_reads_and_passes_the_label(sets, tmp_path):
    plain, pre, _, d = sets
    assert not read_star(plain).ctf.premultiplied.any()
    t = read_star(pre)
    assert t.ctf.premultiplied.all() and not t.ctf.phase_flipped
    assert t.subset_rows(np.arange(5)).ctf.premultiplied.shape == (5,)
    assert t.with_poses(t.rotations, t.shifts_A).ctf.premultiplied.all()
    out = tmp_path / "w.star"
    write_star(t, out)
    assert starfile.read(out)["optics"][LABEL].tolist() == [1]
    assert read_star(out).ctf.premultiplied.all()
    # a RELION 3.0-style particle column is read, and written back in data_optics (RELION 3.1 reads it there)
    img = read_star(pre)
    with mrcfile.open(img.stack_paths[0]) as m:
        images = np.asarray(m.data)
    col = _write_variant(plain, tmp_path / "col", images, 1, where="particles")
    tc = read_star(col)
    assert tc.ctf.premultiplied.all()
    write_star(tc, tmp_path / "col_w.star")
    back = starfile.read(tmp_path / "col_w.star")
    assert back["optics"][LABEL].tolist() == [1] and LABEL not in back["particles"].columns


def test_reconstruct_premultiplied_equals_plain(sets, tmp_path, capsys):
    plain, pre, unflagged, _ = sets
    m_plain = _reconstruct(plain, tmp_path / "plain")
    m_pre = _reconstruct(pre, tmp_path / "pre")
    assert "400 CTF-premultiplied images" in capsys.readouterr().out
    m_old = _reconstruct(unflagged, tmp_path / "old")  # the flag ignored: the old behaviour
    f_pre, f_old = _fsc_to(m_plain, m_pre), _fsc_to(m_plain, m_old)
    print(f"FSC plain vs premultiplied (shells 1..0.8 Nyquist): {np.round(f_pre, 4).tolist()}")
    print(f"FSC plain vs premultiplied read as plain (old behaviour): {np.round(f_old, 4).tolist()}")
    assert f_pre.min() >= 0.95
    assert f_old.min() < 0.95  # the test can fail: ignoring the flag gives a different map


def test_reconstruct_phase_flipped_equals_plain(sets, tmp_path):
    plain, _, _, d = sets
    flipped = _write_variant(plain, d / "flipped", _ctf_images(plain, torch.sign), None)
    m_plain = _reconstruct(plain, tmp_path / "plain")
    m_flip = _reconstruct(flipped, tmp_path / "flip", "--ctf-phase-flipped")
    m_old = _reconstruct(flipped, tmp_path / "flip_old")
    f_flip, f_old = _fsc_to(m_plain, m_flip), _fsc_to(m_plain, m_old)
    print(f"FSC plain vs phase-flipped: {np.round(f_flip, 4).tolist()}; without the flag: "
          f"{np.round(f_old, 4).tolist()}")
    assert f_flip.min() >= 0.95
    assert f_old.min() < 0.95



@pytest.mark.slow
def test_abinit_premultiplied_as_good_as_plain(tmp_path):
    """Ab initio is stochastic, so the two runs are compared with the truth (aligned over rotations and the
    mirror), not with each other. Measured: correlation with the truth 0.82 plain, 0.76 premultiplied, 0.57
    with the flag ignored (the old behaviour, which this margin rejects)."""
    from cryospin_relion.evaluate.align import align_maps

    plain = simulated_star(tmp_path, n=160, map_seed=1, sim_seed=2)
    pre = _write_variant(plain, tmp_path / "pre", _ctf_images(plain), 1)
    truth = read_mrc(tmp_path / "sim" / "ground_truth.mrc")[0]
    score = {}
    for name, star in (("plain", plain), ("premultiplied", pre)):
        out = tmp_path / f"abinit_{name}"
        assert cli.run(["abinit", "--i", str(star), "--o", str(out), "--quiet", "--j", "2", "--seed", "3",
                        "--heads", "2", "--epochs-amortized", "2", "--epochs-autodecode", "1",
                        "--batch-size", "32"]) == 0
        score[name] = align_maps(read_mrc(out / "map.mrc")[0], truth).score
    print(f"abinit map vs truth (aligned correlation): {score}")
    assert score["premultiplied"] >= score["plain"] - 0.1
