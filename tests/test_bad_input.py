"""Bad input: exit code 2, a one-line message naming file and field, nothing written."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
from conftest import tiny_optics, tiny_particles, write_stack_file, write_star_file
from cryosparc.dataset import Dataset

from cryospin_relion.cli import run


def _fails(capsys, argv: list[str], *needles: str, out: Path | None = None) -> str:
    rc = run(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    for s in needles:
        assert s in lines[0], (s, lines[0])
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.glob(f".{out.stem}*")] if out.parent.exists() else True
    return lines[0]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """tmp project folder as the working directory, with a 4-image stack Extract/a.mrcs."""
    monkeypatch.chdir(tmp_path)
    write_stack_file(tmp_path / "Extract" / "a.mrcs", n=4)
    return tmp_path


def test_missing_stack(project, capsys):
    star = write_star_file(project / "p.star", tiny_particles("Extract/gone.mrcs"), tiny_optics())
    out = project / "o.star"
    _fails(capsys, ["convert", "--i", str(star), "--o", str(out), "--check-stacks"],
           "p.star", "row 1", "rlnImageName", "Extract/gone.mrcs", out=out)
    assert run(["convert", "--i", str(star), "--o", str(out)]) == 0  # convert needs no images by default
    capsys.readouterr()
    assert run(["info", "--i", str(star)]) == 0
    assert "1 missing" in capsys.readouterr().out


def test_index_past_end_of_stack(project, capsys):
    cols = tiny_particles("Extract/a.mrcs", n=4)
    cols["rlnImageName"][2] = "000009@Extract/a.mrcs"
    star = write_star_file(project / "p.star", cols, tiny_optics())
    out = project / "o.star"
    _fails(capsys, ["convert", "--i", str(star), "--o", str(out), "--check-stacks"],
           "p.star", "row 3", "rlnImageName", "past the end", out=out)


def test_star_without_image_names(project, capsys):
    cols = tiny_particles("Extract/a.mrcs")
    del cols["rlnImageName"]
    star = write_star_file(project / "p.star", cols, tiny_optics())
    _fails(capsys, ["convert", "--i", str(star), "--o", str(project / "o.cs")], "p.star", "rlnImageName",
           out=project / "o.cs")


def test_no_ctf_columns_only_with_no_ctf(project, capsys):
    star = write_star_file(project / "p.star", tiny_particles("Extract/a.mrcs", ctf=False), tiny_optics())
    out = project / "o.star"
    _fails(capsys, ["convert", "--i", str(star), "--o", str(out)], "p.star", "rlnDefocusU", "--no-ctf", out=out)
    assert run(["convert", "--i", str(star), "--o", str(out), "--no-ctf"]) == 0


def test_optics_groups_with_different_boxes(project, capsys):
    cols = tiny_particles("Extract/a.mrcs")
    cols["rlnOpticsGroup"] = [1, 1, 2, 2]
    star = write_star_file(project / "p.star", cols, tiny_optics(groups=2, boxes=[16, 32]))
    _fails(capsys, ["info", "--i", str(star)], "p.star", "rlnImageSize", "group 1: 16", "group 2: 32")


def test_pixel_size_missing_everywhere(project, capsys):
    opt = tiny_optics()
    del opt["rlnImagePixelSize"]
    star = write_star_file(project / "p.star", tiny_particles("Extract/a.mrcs"), opt)
    out = project / "o.star"
    _fails(capsys, ["convert", "--i", str(star), "--o", str(out)], "p.star", "rlnImagePixelSize",
           "missing everywhere", out=out)
    assert run(["convert", "--i", str(star), "--o", str(out), "--angpix", "1.5"]) == 0


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_image_names_particle(project, capsys):
    imgs = np.ones((4, 16, 16), np.float32)
    imgs[2, 3, 4] = np.nan
    with mrcfile.new(project / "Extract" / "nan.mrcs", overwrite=True) as m:
        m.set_data(imgs)
    star = write_star_file(project / "p.star", tiny_particles("Extract/nan.mrcs"), tiny_optics())
    _fails(capsys, ["info", "--i", str(star), "--check-images"], "nan.mrcs", "image 3", "NaN", "row 3", "p.star")


def test_non_square_images(project, capsys):
    write_stack_file(project / "Extract" / "rect.mrcs", n=4, box=16, ny=12)
    star = write_star_file(project / "p.star", tiny_particles("Extract/rect.mrcs"), tiny_optics())
    out = project / "o.cs"
    _fails(capsys, ["convert", "--i", str(star), "--o", str(out), "--check-stacks"], "rect.mrcs", "nx/ny",
           "non-square", out=out)


def test_cs_non_square_shape(project, capsys):
    ds = Dataset.allocate(2, [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)),
                              ("blob/psize_A", "f4")])
    ds["blob/path"] = np.array(["Extract/a.mrcs"] * 2, dtype=object)
    ds["blob/shape"] = np.array([[16, 12], [16, 12]], dtype=np.uint32)
    ds["blob/psize_A"] = 1.0
    ds.save(project / "rect.cs")
    _fails(capsys, ["convert", "--i", str(project / "rect.cs"), "--o", str(project / "o.star"), "--no-ctf"],
           "rect.cs", "blob/shape", "non-square", out=project / "o.star")


def test_cs_without_blob_path(project, capsys):
    ds = Dataset.allocate(3, [("blob/idx", "u4"), ("blob/psize_A", "f4")])
    ds.save(project / "nopath.cs")
    _fails(capsys, ["convert", "--i", str(project / "nopath.cs"), "--o", str(project / "o.star")],
           "nopath.cs", "blob/path", out=project / "o.star")


def test_empty_cs(project, capsys):
    ds = Dataset.allocate(0, [("blob/path", "O"), ("blob/idx", "u4")])
    ds.save(project / "empty.cs")
    _fails(capsys, ["info", "--i", str(project / "empty.cs")], "empty.cs", "no particles")


def test_empty_cs_real(shared_data, tmp_path, capsys):
    out = tmp_path / "o.star"
    _fails(capsys, ["convert", "--i", str(shared_data / "cryosparc-tools" / "4k_dataset.cs"), "--o", str(out)],
           "4k_dataset.cs", "no particles", out=out)


def test_output_folder_not_writable(project, capsys):
    star = write_star_file(project / "p.star", tiny_particles("Extract/a.mrcs"), tiny_optics())
    (project / "afile").write_text("not a folder")
    out = project / "afile" / "o.star"
    _fails(capsys, ["convert", "--i", str(star), "--o", str(out)], "o.star", "output folder")
    assert (project / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("text", ["data_\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n1@a.mrcs\n",
                                  "\x00\x01\x02garbage\xff\xfe", "this is not a star file\n"])
def test_garbled_star(project, capsys, text):
    bad = project / "bad.star"
    bad.write_bytes(text.encode("latin-1"))
    out = project / "o.cs"
    _fails(capsys, ["convert", "--i", str(bad), "--o", str(out)], "bad.star", out=out)


def test_not_a_particle_star(shared_data, tmp_path, capsys):
    out = tmp_path / "o.cs"
    _fails(capsys, ["convert", "--i", str(shared_data / "aspire" / "sample_data_model.star"), "--o", str(out)],
           "sample_data_model.star", "rlnImageName", out=out)


def test_missing_input_and_unknown_type(project, capsys):
    _fails(capsys, ["info", "--i", str(project / "nothere.star")], "nothere.star", "not found")
    (project / "p.txt").write_text("x")
    _fails(capsys, ["info", "--i", str(project / "p.txt")], "p.txt", ".star or .cs")
    star = write_star_file(project / "p.star", tiny_particles("Extract/a.mrcs"), tiny_optics())
    _fails(capsys, ["convert", "--i", str(star), "--o", str(project / "o.txt")], "o.txt", out=project / "o.txt")
