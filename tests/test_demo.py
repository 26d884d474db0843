"""cryospin demo: the whole pipeline on a dataset made in code (tiny with --quick)."""

from __future__ import annotations

import json
import os
import time

import pytest

from cryospin_relion import cli


def test_demo_dataset_only(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.run(["demo", "--o", str(out), "--quick", "--skip-abinit", "--n", "40"]) == 0
    for f in ("synthetic_model.pdb", "sim/particles.star", "sim/particles.mrcs", "sim/ground_truth.mrc",
              "compare.json", "demo_summary.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "demo_summary.json").read_text())
    assert s["dataset"]["n"] == 40 and s["dataset"]["box"] == 32
    # the truth against itself: FSC at Nyquist, same hand, no rotation
    assert s["target_met"] and s["mirror"] is False and s["correlation"] > 0.999
    assert "demo result" in capsys.readouterr().out


def test_demo_quick_runs_whole_pipeline(tmp_path):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    assert cli.run(["demo", "--o", str(out), "--quick"]) == 0
    dt = time.perf_counter() - t0
    for f in ("sim/particles.star", "sim/ground_truth.mrc", "abinit/map.mrc", "abinit/particles.star",
              "compare.json", "demo_summary.json"):
        assert (out / f).is_file(), f
    s = json.loads((out / "demo_summary.json").read_text())
    for k in ("fsc_0.5_A", "fsc_0.143_A", "target_fsc_0.5_A", "target_met", "mirror", "pose_error_deg", "seconds"):
        assert k in s, k
    assert s["abinit"]["ran"] and s["quick"]
    assert dt < 90, dt


def test_demo_bad_box(tmp_path, capsys):
    assert cli.run(["demo", "--o", str(tmp_path / "d"), "--box", "33"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--box" in err[0]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CRYOSPIN_FULL_DEMO") != "1",
                    reason="benchmark, not a test: the full demo takes minutes (set CRYOSPIN_FULL_DEMO=1)")
def test_full_demo_meets_target(tmp_path):
    out = tmp_path / "demo"
    assert cli.run(["demo", "--o", str(out)]) == 0
    s = json.loads((out / "demo_summary.json").read_text())
    assert s["target_met"], s
    assert s["seconds"]["total_s"] < 600, s["seconds"]
