"""logfile.pdf during a run (lifecycle/live_report.py) and ``cryospin report DIR``."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryospin_relion import cli
from cryospin_relion.lifecycle import live_report
from cryospin_relion.report import PDF_NAME, PNG_NAMES

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    return simulated_star(tmp_path_factory.mktemp("sim"), n=160, map_seed=1, sim_seed=2)


def _is_pdf(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"%PDF") and data.rstrip().endswith(b"%%EOF")


def test_report_interval_env(monkeypatch):
    monkeypatch.delenv(live_report.INTERVAL_ENV, raising=False)
    assert live_report.report_interval() == live_report.REPORT_INTERVAL_S
    monkeypatch.setenv(live_report.INTERVAL_ENV, "0")
    assert live_report.report_interval() == 0.0
    monkeypatch.setenv(live_report.INTERVAL_ENV, "soon")
    assert live_report.report_interval() == live_report.REPORT_INTERVAL_S


def test_live_report_failure_never_raises(tmp_path, caplog):
    class Broken:
        def decoder_map(self):
            raise RuntimeError("no volume")

    rep = live_report.LiveReport(tmp_path, 3.0, logging.getLogger("test_live_report"), interval=1000)
    assert not rep.due()  # the interval counts from the start of the run: a short run makes its final report only
    rep.last -= 1001
    assert rep.due()
    with caplog.at_level(logging.INFO, logger="test_live_report"):
        rep.epoch_end(Broken(), {"loss": [1.0]}, "running")
        rep.write(Broken(), {"loss": [1.0]}, "running")
    assert not rep.due()  # the interval counts from the last try
    rep.interval, rep.seconds[-1], rep.last = 1.0, 0.5, time.perf_counter() - 2.0
    assert not rep.due()  # at least 10x the last report's time (5 s) must pass
    rep.last -= 4.0
    assert rep.due()
    assert sum("report not written" in r.getMessage() for r in caplog.records) == 1  # logged once
    assert not (tmp_path / PDF_NAME).exists()


def test_pdf_during_run_and_report_command(tmp_path, star, capsys):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "cryospin_relion.cli", "abinit", "--i", str(star), "--o", str(out), "--quiet",
            "--heads", "2", "--epochs-amortized", "2", "--epochs-autodecode", "30", "--batch-size", "16", "--j", "1"]
    env = dict(os.environ, **{live_report.INTERVAL_ENV: "0"})
    proc = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    t0 = time.time()
    # the report follows the first epoch's checkpoint: wait for it while the run goes on
    while not (out / PDF_NAME).exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    assert (out / PDF_NAME).is_file() and not (out / "map.mrc").exists()  # written mid-run
    for key in ("loss", "view_directions", "central_slices"):
        assert (out / PNG_NAMES[key]).is_file(), key
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    assert rc == 143, proc.communicate()
    assert _is_pdf(out / PDF_NAME)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]

    # cryospin report on a stopped run: history.json, no maps yet
    (out / PDF_NAME).unlink()
    assert cli.run(["report", str(out)]) == 0
    assert _is_pdf(out / PDF_NAME)

    # finish the run (short), then rebuild its report from the files
    assert cli.run(["abinit", "--i", str(star), "--o", str(out), "--continue", "--quiet",
                    "--epochs-autodecode", "1"]) == 0
    h = json.loads((out / "history.json").read_text())
    assert h["final_resolution_A"] > 0
    names = [PDF_NAME, *(PNG_NAMES[k] for k in ("fsc", "loss", "view_directions", "central_slices",
                                                      "scores"))]  # scores: particles.star's score columns
    for n in names:
        (out / n).unlink()
    capsys.readouterr()
    assert cli.run(["report", str(out)]) == 0
    for n in names:
        assert (out / n).is_file(), n
    assert _is_pdf(out / PDF_NAME)
    assert "logfile.pdf" in capsys.readouterr().out


def test_report_bad_folder_exit_2(tmp_path, capsys):
    assert cli.run(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.run(["report", str(tmp_path / "empty")]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "history.json").write_text("{not json")
    assert cli.run(["report", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("cryospin report: error:") for line in err)
    assert not (tmp_path / "empty" / PDF_NAME).exists()
