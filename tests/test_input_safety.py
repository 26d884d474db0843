"""Input safety (issue #11, items 8-14): every bad input is one line naming the file and the field,
exit code 2, no traceback, nothing written; suspicious but usable inputs give a warning line."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile
from engine_synth import simulated_star

from cryospin_relion import cli

BOX = 16

OPTICS = """
# version 30001

data_optics

loop_
_rlnOpticsGroup #1
_rlnVoltage #2
_rlnSphericalAberration #3
_rlnAmplitudeContrast #4
_rlnImagePixelSize #5
_rlnImageSize #6
_rlnImageDimensionality #7
1 300 2.7 0.1 2.0 16 2
"""

PARTICLES_HEAD = """
# version 30001

data_particles

loop_
_rlnImageName #1
_rlnDefocusU #2
_rlnDefocusV #3
_rlnOpticsGroup #4
_rlnAngleRot #5
_rlnAngleTilt #6
"""


def _stack(path: Path, n: int = 6, box: int = BOX) -> Path:
    data = np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = 2.0
    return path


def _rows(n: int = 6, stack: str = "stack.mrcs", du: float = 12000.0, dv: float = 11000.0) -> str:
    return "".join(f"{i + 1:06d}@{stack} {du} {dv} 1 {10 * i} {20 + 5 * i}\n" for i in range(n))


def _run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.run([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return rc, cap.out, cap.err


def _error_lines(err: str, command: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(f"cryospin {command}: error:")]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _stack(tmp_path / "stack.mrcs")
    return tmp_path


# --- 8: duplicated STAR columns and optics groups -------------------------------------------------

def _commands(star: Path, out: Path) -> list[tuple[str, list]]:
    return [("info", ["info", "--i", star]),
            ("reconstruct", ["reconstruct", "--i", star, "--o", out / "r", "--quiet"]),
            ("abinit", ["abinit", "--i", star, "--o", out / "a", "--dry-run", "--quiet"])]


def test_duplicated_column_is_refused_in_every_command(project, capsys):
    head = PARTICLES_HEAD.replace("_rlnAngleTilt #6", "_rlnAngleTilt #6\n_rlnDefocusU #7")
    rows = "".join(ln + " 13000\n" for ln in _rows().splitlines())
    star = project / "dup.star"
    star.write_text(OPTICS + head + rows)
    for command, argv in _commands(star, project):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, (command, err)
        lines = _error_lines(err, command)
        assert len(lines) == 1, err
        for needle in ("dup.star", "data_particles", "rlnDefocusU", "twice"):
            assert needle in lines[0], (needle, lines[0])
    assert not (project / "r").exists() and not (project / "a" / "config.yaml").exists()


def test_optics_group_listed_twice_with_different_values_is_refused(project, capsys):
    star = project / "dupopt.star"
    star.write_text(OPTICS + "1 200 2.7 0.1 2.0 16 2\n" + PARTICLES_HEAD + _rows())
    for command, argv in _commands(star, project):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, (command, err)
        lines = _error_lines(err, command)
        assert len(lines) == 1, err
        for needle in ("dupopt.star", "data_optics", "rlnOpticsGroup", "group 1", "rlnVoltage"):
            assert needle in lines[0], (needle, lines[0])


def test_duplicated_column_and_optics_group_give_one_line_each(project, capsys):
    o = OPTICS.replace("_rlnImageDimensionality #7", "_rlnImageDimensionality #7\n_rlnVoltage #8")
    o = o.replace("16 2\n", "16 2 300\n") + "1 200 2.7 0.1 2.0 16 2 200\n"
    star = project / "both.star"
    star.write_text(o + PARTICLES_HEAD + _rows())
    rc, _, err = _run(capsys, "info", "--i", star)
    assert rc == 2
    lines = _error_lines(err, "info")
    assert len(lines) == 2, err
    assert "data_optics: rlnVoltage" in lines[0] and "group 1" in lines[1]


def test_an_identical_repeated_optics_row_is_read(project, capsys):
    star = project / "same.star"
    star.write_text(OPTICS + "1 300 2.7 0.1 2.0 16 2\n" + PARTICLES_HEAD + _rows())
    rc, out, err = _run(capsys, "info", "--i", star)
    assert rc == 0, err
    assert "optics groups : 1" in out


# --- 9: --device choices --------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["reconstruct", "project", "abinit"])
def test_device_is_one_of_the_choices(project, capsys, command):
    argv = {"reconstruct": ["--i", "p.star", "--o", "r"], "project": ["--map", "m.mrc", "--i", "p.star", "--o", "o.mrcs"],
            "abinit": ["--i", "p.star", "--o", "a"]}[command]
    with pytest.raises(SystemExit) as e:
        cli.run([command, *argv, "--device", "gpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "--device" in err and "invalid choice: 'gpu'" in err and "'cuda'" in err


# --- 10 and 11: reconstruct's half split and box ---------------------------------------------------

@pytest.mark.parametrize("n", [1, 3])
def test_reconstruct_refuses_fewer_than_two_particles_per_half(tmp_path, capsys, n):
    star = simulated_star(tmp_path, n, map_seed=0, sim_seed=1)
    capsys.readouterr()
    rc, out, err = _run(capsys, "reconstruct", "--i", star, "--o", tmp_path / "r", "--quiet")
    assert rc == 2, err
    lines = _error_lines(err, "reconstruct")
    assert len(lines) == 1, err
    assert str(star) in lines[0] and "half" in lines[0] and "at least 2" in lines[0], lines[0]
    assert "resolution" not in out
    assert not (tmp_path / "r").exists()


def test_reconstruct_names_rln_random_subset_when_the_file_splits_badly(tmp_path, capsys):
    star = simulated_star(tmp_path, 5, map_seed=0, sim_seed=1)
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"]["rlnRandomSubset"] = [1, 1, 1, 1, 2]
    starfile.write(blocks, star, overwrite=True)
    capsys.readouterr()
    rc, _, err = _run(capsys, "reconstruct", "--i", star, "--o", tmp_path / "r", "--quiet")
    assert rc == 2, err
    lines = _error_lines(err, "reconstruct")
    assert len(lines) == 1 and "rlnRandomSubset" in lines[0] and "half 2" in lines[0], err


def test_reconstruct_box_larger_than_the_images_is_said(tmp_path, capsys):
    star = simulated_star(tmp_path, 4, map_seed=0, sim_seed=1)
    capsys.readouterr()
    rc, _, err = _run(capsys, "reconstruct", "--i", star, "--o", tmp_path / "r", "--box", "32", "--quiet")
    assert rc == 2, err
    lines = _error_lines(err, "reconstruct")
    assert len(lines) == 1 and "--box 32" in lines[0] and "16 px" in lines[0], err
    assert not (tmp_path / "r").exists()


# --- 12: messages ---------------------------------------------------------------------------------

def test_missing_absolute_stack_lists_only_the_places_searched(project, capsys):
    gone = project / "elsewhere" / "gone.mrcs"
    star = project / "abs.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(stack=str(gone)))
    rc, _, err = _run(capsys, "abinit", "--i", star, "--o", project / "a", "--dry-run", "--quiet")
    assert rc == 2
    line = next(ln for ln in _error_lines(err, "abinit") if "gone.mrcs" in ln)
    assert "not found" in line and "working directory" not in line and "next to the file" not in line, line
    assert "--datadir" not in line, line
    rc, _, err = _run(capsys, "abinit", "--i", star, "--o", project / "a", "--dry-run", "--quiet",
                      "--datadir", project / "data")
    line = next(ln for ln in _error_lines(err, "abinit") if "gone.mrcs" in ln)
    assert "working directory" not in line and "--datadir" in line, line


def test_relative_missing_stack_still_lists_every_place(project, capsys):
    star = project / "rel.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(stack="Extract/gone.mrcs"))
    rc, _, err = _run(capsys, "abinit", "--i", star, "--o", project / "a", "--dry-run", "--quiet")
    line = next(ln for ln in _error_lines(err, "abinit") if "gone.mrcs" in ln)
    assert "working directory" in line and "next to the file" in line, line


def test_no_numpy_repr_in_a_not_a_number_message(project, capsys):
    star = project / "nan.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(du=float("nan")))
    rc, _, err = _run(capsys, "info", "--i", star)
    assert rc == 2
    lines = _error_lines(err, "info")
    assert len(lines) == 1 and "rlnDefocusU" in lines[0] and "row 1" in lines[0], err
    assert "np." not in err and "nan" in lines[0], err


# --- 13: a truncated stack is one problem ---------------------------------------------------------

@pytest.mark.parametrize("cut", ["data", "header"])
def test_truncated_stack_is_reported_once(project, capsys, cut):
    data = (project / "stack.mrcs").read_bytes()
    (project / "stack.mrcs").write_bytes(data[: len(data) - 100] if cut == "data" else data[:500])
    star = project / "p.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(6))
    rc, _, err = _run(capsys, "abinit", "--i", star, "--o", project / "a", "--dry-run", "--quiet")
    assert rc == 2
    lines = _error_lines(err, "abinit")
    assert len(lines) == 1, err
    assert "stack.mrcs" in lines[0]
    for command, argv in (("reconstruct", ["--o", project / "r", "--quiet"]), ("info", ["--check-images"])):
        rc, _, err = _run(capsys, command, "--i", star, *argv)
        assert rc == 2, (command, err)
        assert len(_error_lines(err, command)) == 1 and "stack.mrcs" in err, err


def test_check_particles_reports_a_truncated_stack_once(project):
    from cryospin_relion.validate import check_particles

    data = (project / "stack.mrcs").read_bytes()
    (project / "stack.mrcs").write_bytes(data[: len(data) - 100])
    star = project / "p.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(6))
    _, problems = check_particles(star)
    assert len(problems) == 1 and "truncated" in problems[0], problems


# --- 14: warnings ---------------------------------------------------------------------------------

def test_check_particles_warns_about_negative_defoci_and_stays_valid(project):
    from cryospin_relion.validate import check_particles, require_valid

    star = project / "neg.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(du=-12000.0, dv=-11000.0))
    table, problems = check_particles(star)
    assert list(problems) == []
    assert len(problems.warnings) == 1
    w = problems.warnings[0]
    assert "neg.star" in w and "rlnDefocusU" in w and "negative" in w, w
    assert require_valid(table, problems) is table
    star.write_text(OPTICS + PARTICLES_HEAD + _rows())
    assert check_particles(star)[1].warnings == []


def test_negative_defoci_are_warned_in_abinit_info_and_reconstruct(project, capsys):
    star = project / "neg.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(du=-12000.0, dv=-11000.0))
    rc, out, err = _run(capsys, "abinit", "--i", star, "--o", project / "a", "--dry-run")
    assert rc == 0, err
    assert "warning" in out and "negative" in out, out
    assert "negative" in (project / "a" / "run.log").read_text()
    rc, out, err = _run(capsys, "info", "--i", star)
    assert rc == 0 and "cryospin info: warning:" in err and "negative" in err, err
    rc, out, err = _run(capsys, "reconstruct", "--i", star, "--o", project / "r", "--quiet")
    assert rc == 0, err
    assert "cryospin reconstruct: warning:" in err and "negative" in err, err


def test_cs_negative_defoci_name_the_cs_field(project, capsys):
    from cryosparc.dataset import Dataset

    n = 4
    ds = Dataset.allocate(n, [("blob/path", "O"), ("blob/idx", "u4"), ("blob/shape", "u4", (2,)),
                              ("blob/psize_A", "f4"), ("blob/sign", "f4"), ("ctf/accel_kv", "f4"), ("ctf/cs_mm", "f4"),
                              ("ctf/amp_contrast", "f4"), ("ctf/df1_A", "f4"), ("ctf/df2_A", "f4"),
                              ("ctf/df_angle_rad", "f4"), ("ctf/phase_shift_rad", "f4")])
    ds["blob/path"] = ["stack.mrcs"] * n
    ds["blob/idx"] = np.arange(n)
    ds["blob/shape"] = [[BOX, BOX]] * n
    ds["blob/psize_A"], ds["blob/sign"] = 2.0, 1.0
    ds["ctf/accel_kv"], ds["ctf/cs_mm"], ds["ctf/amp_contrast"] = 300.0, 2.7, 0.1
    ds["ctf/df1_A"], ds["ctf/df2_A"] = -12000.0, -11000.0
    ds.save(str(project / "p.cs"))
    rc, _, err = _run(capsys, "info", "--i", project / "p.cs")
    assert rc == 0 and "ctf/df1_A" in err and "negative" in err, err


def test_check_particles_result_unpacks_into_require_valid(project):
    from cryospin_relion.errors import InputErrors
    from cryospin_relion.validate import check_particles, require_valid

    star = project / "one.star"
    star.write_text(OPTICS + PARTICLES_HEAD + _rows(1))
    with pytest.raises(InputErrors):
        require_valid(*check_particles(star))
