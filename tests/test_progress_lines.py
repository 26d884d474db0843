"""Progress as plain lines when the output is not a terminal (cryospin_relion/console.py, issue #14)."""

from __future__ import annotations

import io
import logging
import sys

from cryospin_relion import console
from cryospin_relion.console import LineBar, LineProgress, duration, interval_s, progress_bar
from cryospin_relion.lifecycle.console import TqdmProgress, run_progress


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_duration():
    assert [duration(s) for s in (0, 42.4, 185, 7620, -3)] == ["0s", "42s", "3m05s", "2h07m", "0s"]


def test_line_progress_one_line_per_interval_with_loss_rate_eta():
    clock, lines = Clock(), []
    p = LineProgress(lines.append, interval=60, clock=clock)
    p.start("epoch 2/10 stage 1 box 32", total=100, done=0)
    for _ in range(5):  # 10 s per batch: a line at 60 s (batch 6) and at 120 s (batch 12), none between
        clock.t += 10
        p.update(0.123456, 812.4)
    assert lines == []
    clock.t += 10
    p.update(0.123456, 812.4)
    assert lines == ["epoch 2/10 stage 1 box 32: batch 6/100 (6%) loss 0.12346, 812 img/s, ETA 15m40s"]
    for _ in range(5):
        clock.t += 10
        p.update(0.5, 800.0)
    assert len(lines) == 1
    clock.t += 10
    p.update(0.5, 800.0)
    assert lines[1] == "epoch 2/10 stage 1 box 32: batch 12/100 (12%) loss 0.5, 800 img/s, ETA 14m40s"
    p.close()
    assert len(lines) == 2 and all("\r" not in s for s in lines)


def test_line_progress_resumed_pass_eta_counts_this_pass_only_and_no_line_at_the_end():
    clock, lines = Clock(), []
    p = LineProgress(lines.append, interval=60, clock=clock)
    p.start("first poses", total=10, done=5)  # resumed at batch 5
    clock.t += 61
    p.update(None, None)  # batch 6: 61 s for one batch, 4 left
    assert lines == ["first poses: batch 6/10 (60%), ETA 4m04s"]
    for _ in range(4):  # the last batch never writes a line (the engine logs the epoch's line)
        clock.t += 61
        p.update(None, None)
    assert len(lines) == 4 and lines[-1].startswith("first poses: batch 9/10")


def test_line_progress_goes_through_the_logger():
    log = logging.getLogger("cryospin.test_progress_lines")
    log.propagate = False
    buf = io.StringIO()
    h = logging.StreamHandler(buf)
    h.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        p = LineProgress(log.info, interval=0)
        p.start("epoch 1/1 stage 1 box 8", 3, 0)
        for _ in range(3):
            p.update(1.0, 10.0)
        p.close()
    finally:
        log.removeHandler(h)
    assert buf.getvalue().count("\n") == 2 and "\r" not in buf.getvalue()


def test_line_bar_short_pass_is_silent_long_pass_has_lines_and_a_closing_line():
    clock, lines = Clock(), []
    with LineBar(1000, "caching images at 64 px", "img", lines.append, interval=60, clock=clock) as bar:
        for _ in range(10):
            clock.t += 1
            bar.update(100)
    assert lines == []
    clock, lines = Clock(), []
    with LineBar(1000, "backprojecting at 64 px", "img", lines.append, interval=60, clock=clock) as bar:
        for _ in range(10):
            clock.t += 30
            bar.update(100)
    assert lines == ["backprojecting at 64 px: 200/1000 img (20%), 3 img/s, ETA 4m00s",
                     "backprojecting at 64 px: 400/1000 img (40%), 3 img/s, ETA 3m00s",
                     "backprojecting at 64 px: 600/1000 img (60%), 3 img/s, ETA 2m00s",
                     "backprojecting at 64 px: 800/1000 img (80%), 3 img/s, ETA 1m00s",
                     "backprojecting at 64 px: 1000/1000 img in 5m00s"]


def test_interval_from_environment(monkeypatch):
    monkeypatch.delenv(console.INTERVAL_ENV, raising=False)
    assert interval_s() == 60
    for v, want in (("5", 5.0), ("0", 0.0), ("-1", 60.0), ("soon", 60.0)):
        monkeypatch.setenv(console.INTERVAL_ENV, v)
        assert interval_s() == want
        assert LineProgress().interval_s == want


def test_choice_by_terminal(monkeypatch, capsys):
    log = logging.getLogger("cryospin.test_progress_lines")
    # not a terminal (pytest's capture): lines, and nothing on stderr
    assert isinstance(run_progress(log), LineProgress)
    bar = progress_bar(10, "projecting", "img")
    assert isinstance(bar, LineBar)
    bar.update(10)
    bar.close()
    assert isinstance(progress_bar(10, "simulate", "img", lines=False), console._NoBar)
    assert isinstance(progress_bar(10, "x", enabled=False), console._NoBar)
    assert capsys.readouterr().err == ""
    # stderr a terminal, stdout a file: counting bars draw on stderr; the engine's progress stays in lines
    monkeypatch.setattr(sys, "stderr", Tty())
    assert isinstance(run_progress(log), LineProgress)
    from tqdm import tqdm

    bar = progress_bar(10, "projecting", "img")
    assert isinstance(bar, tqdm)
    bar.close()
    # both terminals: tqdm bars
    monkeypatch.setattr(sys, "stdout", Tty())
    assert isinstance(run_progress(log), TqdmProgress)


def test_build_cache_writes_lines_not_carriage_returns_when_not_a_terminal(tmp_path, capfd, monkeypatch):
    """The caching pass of a real stack, stdout/stderr not terminals: no bar, no CR, nothing on stderr;
    with a zero interval one line per chunk on stdout and a closing line."""
    from conftest import tiny_optics, tiny_particles, write_stack_file, write_star_file

    from cryospin_relion.data.stack import build_cache
    from cryospin_relion.io.read import read_particles

    write_stack_file(tmp_path / "a.mrcs", n=10, box=16)
    t = read_particles(write_star_file(tmp_path / "p.star", tiny_particles("a.mrcs", n=10), tiny_optics(box=16)))
    build_cache(t, tmp_path / "c1", 8, chunk=2, progress=True)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # a short pass writes nothing
    monkeypatch.setenv(console.INTERVAL_ENV, "0")
    build_cache(t, tmp_path / "c2", 8, chunk=2, progress=True)
    out, err = capfd.readouterr()
    assert err == "" and "\r" not in out
    lines = out.splitlines()
    assert lines[0].startswith("caching images at 8 px: 2/10 img (20%)") and len(lines) == 5
    assert lines[-1].startswith("caching images at 8 px: 10/10 img in ")
