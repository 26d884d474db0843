"""`cryospin select`: rows by confidence (and class), every table and column kept, .star and .cs, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryospin_relion import cli

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402

N = 40


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """particles.star / particles.cs with per-particle scores and an rlnClassNumber column (STAR)."""
    from cryospin_relion.io.read import read_particles, write_particles

    base = tmp_path_factory.mktemp("select")
    star = simulated_star(base, n=N, map_seed=1, sim_seed=2)
    t = read_particles(star)
    rng = np.random.default_rng(0)
    conf = np.round(rng.uniform(0, 1, N), 4)
    t = t.with_scores(conf, rng.uniform(0.5, 1.0, N))
    out_star, out_cs = base / "sim" / "scored.star", base / "sim" / "scored.cs"
    write_particles(t, out_star)
    write_particles(t, out_cs)
    blocks = starfile.read(out_star, always_dict=True)
    blocks["particles"]["rlnClassNumber"] = np.arange(N) % 3 + 1
    starfile.write(blocks, out_star, overwrite=True)
    return {"star": out_star, "cs": out_cs, "conf": conf, "cls": np.arange(N) % 3 + 1}


def test_select_star_keeps_tables_and_columns(scored, tmp_path):
    out = tmp_path / "good.star"
    assert cli.run(["select", "--i", str(scored["star"]), "--o", str(out), "--min-score", "0.5"]) == 0
    a = starfile.read(scored["star"], always_dict=True)
    b = starfile.read(out, always_dict=True)
    assert list(a) == list(b)  # same blocks, same order
    assert a["optics"].equals(b["optics"])
    keep = scored["conf"] >= 0.5
    assert list(b["particles"].columns) == list(a["particles"].columns)
    assert b["particles"]["rlnImageName"].tolist() == a["particles"]["rlnImageName"][keep].tolist()
    pd_a = a["particles"][keep].reset_index(drop=True)
    for c in pd_a.columns:  # values survive the rewrite (10 significant digits)
        if pd_a[c].dtype.kind == "f":
            np.testing.assert_allclose(b["particles"][c], pd_a[c], rtol=1e-9)
        else:
            assert b["particles"][c].tolist() == pd_a[c].tolist()
    # and the project's reader reads it (stacks resolved next to the file)
    from cryospin_relion.io.read import read_particles

    assert len(read_particles(out, check_stacks=False)) == keep.sum()


def test_select_classes(scored, tmp_path):
    out = tmp_path / "c.star"
    assert cli.run(["select", "--i", str(scored["star"]), "--o", str(out), "--min-score", "0.2",
                    "--classes", "1,3"]) == 0
    keep = (scored["conf"] >= 0.2) & np.isin(scored["cls"], [1, 3])
    assert len(starfile.read(out, always_dict=True)["particles"]) == keep.sum()


def test_select_keeps_a_label_value_block(scored, tmp_path):
    blocks = starfile.read(scored["star"], always_dict=True)
    src = tmp_path / "with_general.star"
    starfile.write({"general": {"rlnFinalResolution": 12.5, "rlnComment": "two words"}, **blocks}, src)
    out = tmp_path / "g.star"
    assert cli.run(["select", "--i", str(src), "--o", str(out), "--min-score", "0.7"]) == 0
    b = starfile.read(out, always_dict=True)
    assert list(b) == ["general", "optics", "particles"]
    assert b["general"] == {"rlnFinalResolution": 12.5, "rlnComment": "two words"}
    assert len(b["particles"]) == (scored["conf"] >= 0.7).sum()


def test_select_cs(scored, tmp_path):
    from cryosparc.dataset import Dataset

    out = tmp_path / "good.cs"
    assert cli.run(["select", "--i", str(scored["cs"]), "--o", str(out), "--min-score", "0.5"]) == 0
    a, b = Dataset.load(scored["cs"]), Dataset.load(out)
    keep = scored["conf"] >= 0.5
    assert b.fields() == a.fields() and len(b) == keep.sum()
    np.testing.assert_array_equal(b["uid"], a["uid"][keep])
    np.testing.assert_array_equal(b["alignments3D/pose"], a["alignments3D/pose"][keep])


def _err(capsys) -> list[str]:
    return [x for x in capsys.readouterr().err.splitlines() if x]


def test_select_bad_input(scored, tmp_path, capsys):
    star, cs = str(scored["star"]), str(scored["cs"])
    cases = [
        (["--i", star, "--o", star, "--min-score", "0.5"], "would replace the input"),
        (["--i", star, "--o", str(tmp_path / "x.cs"), "--min-score", "0.5"], "--o: must be a .star"),
        (["--i", str(tmp_path / "none.star"), "--o", str(tmp_path / "y.star"), "--min-score", "0.5"], "not found"),
        (["--i", star, "--o", str(tmp_path / "y.star"), "--min-score", "nan"], "--min-score"),
        (["--i", star, "--o", str(tmp_path / "y.star"), "--min-score", "2"], "no particle kept"),
        (["--i", star, "--o", str(tmp_path / "y.star"), "--min-score", "0", "--classes", "a,b"], "--classes"),
        (["--i", cs, "--o", str(tmp_path / "y.cs"), "--min-score", "0", "--classes", "1"], "alignments3D/class"),
    ]
    for argv, msg in cases:
        assert cli.run(["select", *argv]) == 2, argv
        err = _err(capsys)
        assert len(err) == 1 and msg in err[0], (argv, err)
    assert not (tmp_path / "y.star").exists() and not (tmp_path / "y.cs").exists()
    # a STAR without the score column, and --classes without rlnClassNumber
    plain = tmp_path / "plain.star"
    blocks = starfile.read(star, always_dict=True)
    blocks["particles"] = blocks["particles"].drop(columns=["rlnMaxValueProbDistribution", "rlnClassNumber"])
    starfile.write(blocks, plain)
    assert cli.run(["select", "--i", str(plain), "--o", str(tmp_path / "z.star"), "--min-score", "0"]) == 2
    assert "rlnMaxValueProbDistribution: column missing" in _err(capsys)[0]
    blocks["particles"]["rlnMaxValueProbDistribution"] = 1.0
    starfile.write(blocks, plain, overwrite=True)
    assert cli.run(["select", "--i", str(plain), "--o", str(tmp_path / "z.star"), "--min-score", "0",
                    "--classes", "2"]) == 2
    assert "rlnClassNumber: column missing" in _err(capsys)[0]
    assert not (tmp_path / "z.star").exists()


@pytest.mark.relion
def test_select_matches_relion_star_handler(scored, tmp_path):
    ours = tmp_path / "good.star"
    assert cli.run(["select", "--i", str(scored["star"]), "--o", str(ours), "--min-score", "0.4"]) == 0
    theirs = tmp_path / "relion.star"
    subprocess.run(["relion_star_handler", "--i", str(scored["star"]), "--o", str(theirs), "--select",
                    "rlnMaxValueProbDistribution", "--minval", "0.4"], check=True, capture_output=True)
    names = starfile.read(theirs, always_dict=True)["particles"]["rlnImageName"].tolist()
    ours_names = starfile.read(ours, always_dict=True)["particles"]["rlnImageName"].tolist()
    assert ours_names == names and len(names) == (scored["conf"] >= 0.4).sum()
    # RELION reads our output too (our own rlnCryospinLoss label included) and keeps every row
    again = tmp_path / "again.star"
    subprocess.run(["relion_star_handler", "--i", str(ours), "--o", str(again)], check=True, capture_output=True)
    assert starfile.read(again, always_dict=True)["particles"]["rlnImageName"].tolist() == ours_names
