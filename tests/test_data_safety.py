"""A user's files are sacred: no output replaces an input, a refused run writes nothing, bad values are refused,
a damaged checkpoint is reported (or skipped for the previous one), and messages name what the user typed."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cryospin_relion import cli

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402

QUICK = ["--quiet", "--heads", "2", "--epochs-amortized", "2", "--epochs-autodecode", "1", "--batch-size", "32",
         "--stage1-trials", "1", "--j", "1"]


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    return simulated_star(tmp_path_factory.mktemp("safety"), n=120, map_seed=2, sim_seed=3)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _copy_set(star: Path, dst: Path) -> Path:
    """The simulated set copied into ``dst`` (STAR, stack, truth): a user's folder."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in star.parent.iterdir():
        if p.is_file():
            shutil.copy2(p, dst / p.name)
    return dst / star.name


def _run(capsys, *argv) -> tuple[int, str]:
    rc = cli.run(list(argv))
    return rc, capsys.readouterr().err


# -- 1. no output replaces an input ------------------------------------------------------------------------

def test_abinit_into_the_input_folder_is_refused_and_nothing_changes(tmp_path, star, capsys):
    user = tmp_path / "run"
    inp = _copy_set(star, user)  # run/particles.star, run/particles.mrcs
    before = _digest(user)
    rc, err = _run(capsys, "abinit", "--i", str(inp), "--o", str(user), *QUICK)
    assert rc == 2
    assert f"{user / 'particles.star'}: --o: would replace the input {inp}" in err
    assert len(err.strip().splitlines()) == 1
    assert _digest(user) == before  # not one byte written, no run.log


def test_a_stack_with_an_output_name_is_protected(tmp_path, star, capsys):
    """A file that an input refers to (a stack called map.mrc in the output folder) is an input too."""
    user = tmp_path / "proj"
    inp = _copy_set(star, user)
    (user / "particles.mrcs").rename(user / "map.mrc")
    inp.write_text(inp.read_text().replace("@particles.mrcs", "@map.mrc"))
    before = _digest(user)
    rc, err = _run(capsys, "reconstruct", "--i", str(inp), "--o", str(user), "--quiet")
    assert rc == 2 and "would replace the input" in err and "image stack" in err
    rc, err = _run(capsys, "abinit", "--i", str(inp), "--o", str(user), *QUICK)
    assert rc == 2 and f"{user / 'map.mrc'}: --o: would replace" in err
    assert _digest(user) == before


def test_every_command_refuses_to_replace_its_input(tmp_path, star, capsys):
    user = tmp_path / "u"
    inp = _copy_set(star, user)
    truth = user / "ground_truth.mrc"
    before = _digest(user)
    cases = [
        ["convert", "--i", str(inp), "--o", str(inp)],
        ["flip-hand", "--i", str(truth), "--o", str(truth)],
        ["flip-hand", "--i", str(truth), "--o", str(tmp_path / "f.mrc"), "--poses", str(inp), "--o-poses", str(inp)],
        ["project", "--map", str(truth), "--i", str(inp), "--o", str(user / "particles.mrcs"), "--quiet"],
        ["simulate", "--map", str(truth), "--o", str(user), "--n", "10", "--box", "16", "--apix", "6", "--quiet"],
        ["compare", "--map", str(truth), "--ref", str(truth), "--o-aligned", str(truth), "--quiet"],
    ]
    for argv in cases:
        rc, err = _run(capsys, *argv)
        assert rc == 2 and "would replace the input" in err, (argv, err)
    assert _digest(user) == before


def test_the_config_file_is_an_input(tmp_path, star, capsys):
    out = tmp_path / "o"
    out.mkdir()
    cfg = out / "config.yaml"
    cfg.write_text("heads: 3\n")
    rc, err = _run(capsys, "abinit", "--i", str(star), "--o", str(out), "--config", str(cfg), "--dry-run", "--quiet")
    assert rc == 2 and "--config" in err and cfg.read_text() == "heads: 3\n"


def test_relion_job_refuses_an_input_it_would_replace(tmp_path, star):
    from relion_wrappers.external_job import JobFailed, build_command

    job = tmp_path / "External" / "job009"
    job.mkdir(parents=True)
    inp = job / "RELION_OUTPUT_NODES.star"
    shutil.copy(star, inp)
    with pytest.raises(JobFailed, match="would replace the input"):
        build_command(["--o", f"{job}/", "--in_parts", str(inp)], {"continue": False}, ["cryospin", "abinit"])


# -- 3, 4, 12. values: exact types, finite numbers, the flag in the message ------------------------------------

@pytest.mark.parametrize("argv, says", [
    (["--angpix", "nan"], "--angpix: nan is not a pixel size"),
    (["--angpix", "inf"], "--angpix: inf is not a pixel size"),
    (["--angpix", "0"], "--angpix: 0 is not a pixel size"),
    (["--angpix", "-1.5"], "--angpix: -1.5 is not a pixel size"),
    (["--max-shift", "nan"], "--max-shift: nan is not a finite number"),
    (["--j", "-1"], "--j: -1 must be >= 0"),
    (["--no-auto-switch", "--switch-threshold", "inf"], "--switch-threshold: inf is not a finite number"),
])
def test_bad_values_are_refused_naming_the_flag(tmp_path, star, capsys, argv, says):
    out = tmp_path / "o"
    rc, err = _run(capsys, "abinit", "--i", str(star), "--o", str(out), "--dry-run", "--quiet", *argv)
    assert rc == 2 and says in err, err
    assert "np.float" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_angpix_is_checked_by_every_reader(tmp_path, star, capsys):
    rc, err = _run(capsys, "reconstruct", "--i", str(star), "--o", str(tmp_path / "r"), "--angpix", "nan")
    assert rc == 2 and "--angpix" in err and not (tmp_path / "r").exists()
    rc, err = _run(capsys, "info", "--i", str(star), "--angpix", "-2")
    assert rc == 2 and "--angpix" in err


def test_a_yaml_list_for_an_on_off_option_is_refused(tmp_path, star, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("invert: [false]\n")
    rc, err = _run(capsys, "abinit", "--i", str(star), "--o", str(tmp_path / "o"), "--config", str(y), "--dry-run")
    assert rc == 2 and f"{y}: invert: [false] is not true or false" in err
    assert not (tmp_path / "o").exists()


# -- 5, 6. a refused run writes nothing; an unwritable folder is a message --------------------------------------

def test_a_refused_run_leaves_no_folder_and_a_users_folder_stays_empty(tmp_path, star, capsys):
    bad = tmp_path / "bad.star"
    bad.write_text(star.read_text().replace("particles.mrcs", "missing.mrcs"))
    out = tmp_path / "new"
    rc, _ = _run(capsys, "abinit", "--i", str(bad), "--o", str(out), *QUICK)
    assert rc == 2 and not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    rc, _ = _run(capsys, "abinit", "--i", str(bad), "--o", str(mine), *QUICK)
    assert rc == 2 and mine.is_dir() and list(mine.iterdir()) == []


def test_an_unwritable_output_folder_is_reported_not_a_traceback(tmp_path, star):
    out = tmp_path / "locked"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here")
    try:
        p = subprocess.run([sys.executable, "-m", "cryospin_relion.cli", "abinit", "--i", str(star), "--o", str(out),
                            "--dry-run", "--quiet"], capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)
    assert p.returncode == 2, p.stderr
    assert "output folder is not writable" in p.stderr and "Traceback" not in p.stderr
    assert list(out.iterdir()) == []


# -- 11. an explicit --box larger than the images is said -------------------------------------------------------

def test_a_box_larger_than_the_images_is_said(tmp_path, star, capsys):
    out = tmp_path / "o"
    rc, _ = _run(capsys, "abinit", "--i", str(star), "--o", str(out), "--box", "64", "--dry-run", "--quiet")
    assert rc == 0
    assert "warning: --box 64 is larger than the images (16 px): working box 16" in (out / "run.log").read_text()


# -- 7. damaged checkpoints ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(star, tmp_path_factory) -> Path:
    """A finished run's folder (each test continues a copy of it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    rc = cli.run(["abinit", "--i", str(star), "--o", str(out), *QUICK])
    assert rc == 0 and (out / "checkpoint.pt").is_file() and (out / "checkpoint.prev.pt").is_file()
    return out


def _finished_run(finished: Path, out: Path) -> None:
    shutil.copytree(finished, out)


def _epochs(path: Path) -> int:
    return len(torch.load(path, map_location="cpu", weights_only=True)["engine"]["history"]["epochs"])


@pytest.mark.parametrize("damage", ["text", "empty", "truncated"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, star, finished, capsys, damage):
    out = tmp_path / "run"
    _finished_run(finished, out)
    assert _epochs(out / "checkpoint.prev.pt") == _epochs(out / "checkpoint.pt") - 1
    ck = out / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes({"text": b"not a checkpoint\n", "empty": b"", "truncated": data[: len(data) // 2]}[damage])
    rc, err = _run(capsys, "abinit", "--i", str(star), "--o", str(out), *QUICK, "--continue")
    assert rc == 0, err
    log = (out / "run.log").read_text()
    assert "checkpoint.pt damaged" in log and "resuming from the previous checkpoint" in log
    # both damaged (or only a damaged one): one line that says so, exit 2
    for p in (out / "checkpoint.pt", out / "checkpoint.prev.pt"):
        p.write_bytes(b"")
    rc, err = _run(capsys, "abinit", "--i", str(star), "--o", str(out), *QUICK, "--continue")
    assert rc == 2 and "the checkpoint cannot be used" in err and "damaged" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_what_a_kill_during_the_checkpoint_write_leaves_is_resumable(tmp_path, star, finished, capsys):
    """save_checkpoint: tmp written -> newest becomes prev -> tmp becomes newest. A kill between the two renames
    leaves prev + a stale temporary file and no checkpoint.pt; --continue resumes from prev and finishes."""
    out = tmp_path / "run"
    _finished_run(finished, out)
    n_prev = _epochs(out / "checkpoint.prev.pt")
    (out / "checkpoint.pt").rename(out / ".checkpoint.123-0badc0de.tmp.pt")  # the new one, not yet in place
    rc, err = _run(capsys, "abinit", "--i", str(star), "--o", str(out), *QUICK, "--continue")
    assert rc == 0, err
    assert f"resuming at epoch {n_prev + 1}" in (out / "run.log").read_text()
    assert not list(out.glob(".*.tmp*"))  # the stale temporary file was removed
