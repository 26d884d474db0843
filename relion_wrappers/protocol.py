"""The RELION External-job protocol: command-line parsing, exit files, abort polling.

RELION (3.1, 4.0, 5.0) runs an External job from the project directory as::

    <exe> --o External/jobNNN/ [--in_parts F] [--in_mics F] [--in_movies F]
          [--in_coords F] [--in_3dref F] [--in_mask F]
          [--<label> <value>] ... --j <threads> [other args]
          [--pipeline_control External/jobNNN/]

with stdout/stderr redirected to ``<outdir>run.out`` / ``run.err``. The job's
state is known to RELION only through files in the output folder:
``RELION_JOB_EXIT_SUCCESS``, ``RELION_JOB_EXIT_FAILURE`` and
``RELION_JOB_EXIT_ABORTED`` (written by the job), ``RELION_JOB_ABORT_NOW``
(written by the GUI when the user presses "Abort"). A job that exits without
writing an exit file stays "Running" in RELION forever.

RELION builds the command line by plain string concatenation, then runs it
through a shell, so a parameter value with spaces arrives as several tokens and
an empty value arrives as a bare flag. :func:`parse_relion_args` undoes that as
well as it can: a flag followed by non-flag tokens takes them all, joined by one
space; a flag directly followed by another flag (or the end) has the value "".

A job that succeeds tells RELION its outputs in ``<outdir>RELION_OUTPUT_NODES.star``
(nodes.py), written before ``RELION_JOB_EXIT_SUCCESS``: one row per file, its
project-relative name and node type; every file listed must exist. A node may
be in a subfolder of the job: RELION 3.1.3 registers
``External/jobNNN/class001/map.mrc`` like any other (in default_pipeline.star
and as ``.Nodes/6/External/jobNNN/class001/map.mrc``). The cryoSPIN job
(external_job.py) registers particles.star (particles), map.mrc (map),
half1_map.mrc (half map; RELION finds half 2 by its name) and logfile.pdf; with
the job parameter ``classes`` K > 1 (``--classes K``), instead of the top-level
maps, ``classNNN/map.mrc`` and ``classNNN/half1_map.mrc`` of every class that has
maps (1-based, 3 digits, as rlnClassNumber), with the one particles.star
(rlnClassNumber 1..K) and logfile.pdf.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

EXIT_SUCCESS = "RELION_JOB_EXIT_SUCCESS"
EXIT_FAILURE = "RELION_JOB_EXIT_FAILURE"
EXIT_ABORTED = "RELION_JOB_EXIT_ABORTED"
ABORT_NOW = "RELION_JOB_ABORT_NOW"
EXIT_FILES = (EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED)

# flags RELION itself puts on the command line (everything else is a job parameter)
INPUT_FLAGS = ("in_parts", "in_mics", "in_movies", "in_coords", "in_3dref", "in_mask")
RELION_FLAGS = ("o", "j", "pipeline_control") + INPUT_FLAGS


class ProtocolError(Exception):
    """A command line or job setting that cannot be used (the job fails with this message)."""


def _is_flag(token: str) -> bool:
    # "--name"; a bare "--" or a negative number ("-5", "--" never starts one) is a value
    return token.startswith("--") and len(token) > 2


@dataclass
class RelionArgs:
    """A parsed External-job command line."""

    outdir: str | None = None           # "--o", always ending in "/" when set
    threads: int = 1                    # "--j"
    inputs: dict[str, str] = field(default_factory=dict)   # in_parts, in_3dref, ... -> path
    params: dict[str, str] = field(default_factory=dict)   # GUI label -> value ("" for a bare flag)
    order: list[str] = field(default_factory=list)         # every flag name, in order


def parse_relion_args(argv: Sequence[str]) -> RelionArgs:
    """Parse an External-job command line (see the module docstring).

    Raises ProtocolError for a stray leading value, a repeated flag, or a
    non-integer ``--j``.
    """
    pairs: list[tuple[str, list[str]]] = []
    for tok in argv:
        if _is_flag(tok):
            pairs.append((tok[2:], []))
        elif not pairs:
            raise ProtocolError(f"unexpected argument '{tok}' before the first --flag")
        else:
            pairs[-1][1].append(tok)
    out = RelionArgs()
    seen: set[str] = set()
    for name, vals in pairs:
        value = " ".join(vals)
        if name in seen:
            raise ProtocolError(f"--{name} given more than once")
        seen.add(name)
        out.order.append(name)
        if name == "o":
            if not value:
                raise ProtocolError("--o needs the job's output folder")
            out.outdir = value if value.endswith("/") else value + "/"
        elif name == "j":
            try:
                out.threads = int(value) if value else 1
            except ValueError:
                raise ProtocolError(f"--j: '{value}' is not a number of threads") from None
            if out.threads < 1:
                raise ProtocolError(f"--j: '{value}' is not a number of threads")
        elif name == "pipeline_control":
            pass  # RELION adds it when the command contains "relion_"; nothing to do
        elif name in INPUT_FLAGS:
            out.inputs[name] = value
        else:
            out.params[name] = value
    return out


# ---------------------------------------------------------------- exit files

def _touch(path: Path) -> None:
    with open(path, "a"):
        pass
    os.utime(path, None)


def clear_stale_exit_files(outdir: str | os.PathLike, started_after: float | None = None) -> list[str]:
    """Remove exit files left by an earlier run in ``outdir``; returns the names removed.

    A ``RELION_JOB_ABORT_NOW`` is kept when it is newer than ``started_after``
    (an abort pressed while this job was queued), otherwise removed as well.
    """
    outdir = Path(outdir)
    removed = []
    for name in EXIT_FILES + (ABORT_NOW,):
        p = outdir / name
        try:
            if name == ABORT_NOW and started_after is not None and p.stat().st_mtime >= started_after:
                continue
            p.unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def write_exit_file(outdir: str | os.PathLike, name: str) -> Path:
    """Create exit file ``name`` (one of EXIT_FILES) in ``outdir``, removing the other two."""
    if name not in EXIT_FILES:
        raise ValueError(name)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for other in EXIT_FILES:
        if other != name:
            try:
                (outdir / other).unlink()
            except FileNotFoundError:
                pass
    p = outdir / name
    _touch(p)
    return p


def abort_requested(outdir: str | os.PathLike) -> bool:
    return (Path(outdir) / ABORT_NOW).exists()


# ---------------------------------------------------------------- child process

@dataclass
class ChildResult:
    status: str          # "success" | "failure" | "aborted"
    returncode: int | None
    seconds: float
    killed: bool = False  # needed SIGKILL after the grace period


def run_child(
    cmd: Sequence[str],
    outdir: str | os.PathLike,
    *,
    poll: float = 0.5,
    grace: float = 10.0,
    stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
    env: dict | None = None,
) -> ChildResult:
    """Run ``cmd`` (argument list, no shell) and watch ``outdir`` for RELION_JOB_ABORT_NOW.

    Every ``poll`` seconds: if the child exited, return; if the abort file
    appeared (or ``stop()`` is true), send SIGTERM to the child, wait up to
    ``grace`` seconds, then SIGKILL its whole process group. stdout/stderr are
    inherited (RELION sends them to run.out / run.err).
    """
    log = log or (lambda msg: None)
    t0 = time.monotonic()
    proc = subprocess.Popen(list(cmd), start_new_session=True, env=env)
    aborting = False
    deadline = None
    killed = False
    try:
        while True:
            try:
                rc = proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                pass
            if not aborting and (abort_requested(outdir) or (stop is not None and stop())):
                aborting = True
                log(f"abort requested: sending SIGTERM to the child (pid {proc.pid})")
                _signal(proc, signal.SIGTERM, group=False)
                deadline = time.monotonic() + grace
            elif aborting and time.monotonic() >= deadline and not killed:
                log(f"child still running {grace:.0f} s after SIGTERM: sending SIGKILL")
                _signal(proc, signal.SIGKILL, group=True)
                killed = True
    except BaseException:
        # the wrapper itself is going down: do not leave the child behind
        _signal(proc, signal.SIGKILL, group=True)
        proc.wait()
        raise
    if aborting:
        _signal(proc, signal.SIGKILL, group=True)  # reap any helpers left in the group
    status = "aborted" if aborting else ("success" if rc == 0 else "failure")
    return ChildResult(status, rc, time.monotonic() - t0, killed)


def _signal(proc: subprocess.Popen, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass
