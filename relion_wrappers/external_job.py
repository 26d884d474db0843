"""``cryospin_relion_external``: run ``cryospin abinit`` as a RELION External job.

RELION runs it from the project directory as::

    cryospin_relion_external --o External/job012/ --in_parts Select/job011/particles.star \\
        --heads 4 --epochs_amortized 10 ... --j 8 [--pipeline_control External/job012/]

The job parameters (GUI "Params" tab rows, label = name, value = value) are
passed to ``cryospin abinit`` as ``--name value``; ``_`` and ``-`` are the same
in a name (``epochs_amortized`` -> ``--epochs-amortized``). Only options that
``cryospin abinit`` knows are accepted (the job fails with the list of valid
names otherwise); ``--i``, ``--o`` and ``--j`` are set by the wrapper. On/off
options (e.g. ``quiet``) take an empty value or yes/true/1 (on) or no/false/0
(off). The parameter ``gpus`` (default 1) runs the engine as that many
data-parallel ranks on this machine under torchrun (one per GPU; CPU processes
without GPUs). ``--in_3dref``, ``--in_mask`` and the other RELION inputs are accepted and
ignored (ab initio needs no reference).

The job folder then holds what ``cryospin abinit`` writes (map.mrc,
half1_map.mrc, half2_map.mrc, decoder_map.mrc, fsc.txt, particles.star,
logfile.pdf, run.log, config.yaml, checkpoint.pt) plus RELION_OUTPUT_NODES.star
and one of RELION_JOB_EXIT_SUCCESS / _FAILURE / _ABORTED. The map, half-map 1,
the particles and the PDF log are registered as output nodes. The parameter
``classes`` K (default 1) is passed as ``--classes K``; with K > 1 abinit writes
one folder per class (class001/map.mrc, half1_map.mrc, ...) instead of the
top-level maps, and every class's map and half-map 1 are registered, with the
one particles.star (rlnClassNumber 1..K) and the PDF log. When the folder
already holds a checkpoint.pt (a job run again with "Continue"), the run resumes
from it unless the parameter ``continue`` is ``no``.

Exit status: 0 succeeded, 2 bad input or settings, 3 aborted, 1 other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from cryospin_relion.cli import command_argv
from cryospin_relion.lifecycle.checkpoint import CHECKPOINT, checkpoint_exists
from relion_wrappers.nodes import OUTPUT_NODES, pipeline_version, write_output_nodes
from relion_wrappers.protocol import (
    EXIT_ABORTED, EXIT_FAILURE, EXIT_SUCCESS, ProtocolError, clear_stale_exit_files,
    parse_relion_args, run_child, write_exit_file,
)

PROG = "cryospin_relion_external"
RESERVED = {"i", "o", "j", "help", "h"}   # set by the wrapper, not by job parameters
TRUE_WORDS = {"", "yes", "true", "1", "on", "y"}
FALSE_WORDS = {"no", "false", "0", "off", "n"}

# abinit output -> (node kind, required for success)
OUTPUTS = (
    ("particles.star", "particles", True),
    ("map.mrc", "map", True),
    ("half1_map.mrc", "halfmap", False),
    ("logfile.pdf", "logfile", False),
)

# each class's outputs when abinit ran with --classes K > 1 (classNNN/ folders, 1-based, 3 digits); a class
# too small to backproject has no folder or no maps and is not registered
CLASS_OUTPUTS = (
    ("map.mrc", "map", True),
    ("half1_map.mrc", "halfmap", False),
)
CLASS_FOLDER = re.compile(r"^class(\d{3})$")

EXIT_CODES = {"success": 0, "failure": 1, "bad_input": 2, "aborted": 3}


class JobFailed(Exception):
    """The job cannot run or did not produce its outputs; ``code`` is the exit status."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", flush=True)


def _err(msg: str) -> None:
    for line in str(msg).splitlines() or [""]:
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


def abinit_options() -> dict[str, bool]:
    """Long options of ``cryospin abinit`` (name without ``--`` -> takes a value)."""
    from cryospin_relion.commands import abinit  # here, not at import: abinit's imports cost seconds

    p = argparse.ArgumentParser(prog="cryospin abinit", add_help=False)
    abinit.add_args(p)
    opts: dict[str, bool] = {}
    for action in p._actions:
        for s in action.option_strings:
            if s.startswith("--"):
                opts[s[2:]] = action.nargs != 0
    return opts


def _canonical(label: str, known: dict[str, bool]) -> str | None:
    name = label.lstrip("-")
    for cand in (name, name.replace("_", "-"), name.replace("-", "_")):
        if cand in known:
            return cand
    return None


def params_to_options(params: dict[str, str], known: dict[str, bool]) -> list[str]:
    """``--name value`` arguments for ``cryospin abinit`` from the job's parameters."""
    out: list[str] = []
    unknown, bad = [], []
    for label, value in params.items():
        name = _canonical(label, known)
        if name is None or name in RESERVED:
            unknown.append(label)
            continue
        if known[name]:
            if value == "":
                bad.append(f"parameter '{label}' needs a value")
            else:
                out += [f"--{name}", value]
        else:
            word = value.strip().lower()
            if word in TRUE_WORDS:
                out.append(f"--{name}")
            elif word not in FALSE_WORDS:
                bad.append(f"parameter '{label}' is on/off: give yes or no, not '{value}'")
    if unknown:
        valid = sorted(n.replace("-", "_") for n in known if n not in RESERVED)
        bad.insert(0, f"unknown job parameter(s): {', '.join(unknown)}; valid names: {', '.join(valid)}")
    if bad:
        raise JobFailed("\n".join(bad), code=2)
    return out


def build_command(argv: Sequence[str], known: dict[str, bool], base: Sequence[str]) -> tuple[str, list[str]]:
    """(output folder, child argument list) from the RELION command line ``argv``."""
    try:
        args = parse_relion_args(argv)
    except ProtocolError as e:
        raise JobFailed(str(e), code=2) from None
    if args.outdir is None:
        raise JobFailed("--o (the job's output folder) is missing", code=2)
    for name, value in args.inputs.items():
        if name != "in_parts":
            _say(f"note: --{name} {value} ignored (ab-initio reconstruction needs only particles)")
    parts = args.inputs.get("in_parts", "")
    if not parts:
        raise JobFailed("no input particles: set 'Input particles' on the Input tab (--in_parts)", code=2)
    if not Path(parts).is_file():
        raise JobFailed(f"--in_parts: '{parts}' not found (from project folder {os.getcwd()})", code=2)
    from cryospin_relion.io.overwrite import overwrite_problems

    own = [OUTPUT_NODES, EXIT_SUCCESS, EXIT_FAILURE, EXIT_ABORTED, "summary.json"]  # abinit checks its own files
    clash = overwrite_problems({"--o": [Path(args.outdir) / f for f in own]}, {"--in_parts": [parts]})
    if clash:
        raise JobFailed("\n".join(clash), code=2)
    params = dict(args.params)
    gpus = _count("gpus", params.pop("gpus", "1"))
    classes = _count("classes", params.pop("classes")) if "classes" in params else None  # None: abinit's default / YAML
    if gpus > 1:  # the engine as gpus data-parallel ranks under torchrun (engine/distributed.py)
        base = [base[0], "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), *base[1:]]
    resume = params.get("continue")
    options = params_to_options(params, known)
    if classes is not None and "classes" in known:
        options += ["--classes", str(classes)]
    elif classes is not None and classes > 1:  # an abinit from before --classes
        raise JobFailed(f"parameter 'classes' {classes}: this cryospin abinit has no --classes option", code=2)
    outdir = args.outdir
    if resume is None and "continue" in known and checkpoint_exists(Path(outdir) / CHECKPOINT):
        _say(f"note: {outdir}{CHECKPOINT} found: resuming from it (set the parameter continue = no to start over)")
        options.append("--continue")
    if "json-summary" in known and "json-summary" not in {o[2:] for o in options if o.startswith("--")}:
        options += ["--json-summary", outdir + "summary.json"]
    cmd = list(base) + ["--i", parts, "--o", outdir.rstrip("/"), "--j", str(args.threads)] + options
    return outdir, cmd


def _count(name: str, value: str) -> int:
    """A whole-number job parameter >= 1 (``gpus``: data-parallel ranks; ``classes``: class maps); empty = 1."""
    try:
        n = int(value.strip() or "1")
    except ValueError:
        n = 0
    if n < 1:
        raise JobFailed(f"parameter '{name}' must be a whole number >= 1, not '{value}'", code=2)
    return n


def _summary_classes(outdir: str) -> list[dict] | None:
    """The ``classes`` list of the run's summary.json (written by abinit when K > 1), else None (also when
    a top-level map.mrc is newer: the summary of an earlier run, this one's written elsewhere)."""
    summary, top = Path(outdir, "summary.json"), Path(outdir, "map.mrc")
    try:
        if top.is_file() and top.stat().st_mtime > summary.stat().st_mtime:
            return None
        listed = json.loads(summary.read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(listed, list) and all(isinstance(c, dict) and isinstance(c.get("class"), int) for c in listed)
    return listed if ok and len(listed) > 1 else None


def class_folders(outdir: str) -> tuple[list[str], list[str]]:
    """(``classNNN`` folders whose maps to register, 'classNNN (N particles)' of classes without maps).

    ([], []) for a one-class run. The run's summary.json names the classes and which have maps (a folder
    reused from an earlier run may hold other class folders); without it, every ``classNNN`` folder holding
    a map.mrc, unless a top-level map.mrc is newer than all of them (a later one-class run in the folder).
    """
    listed = _summary_classes(outdir)
    if listed is not None:
        with_maps = [f"class{c['class']:03d}" for c in listed if c.get("map")]
        without = [f"class{c['class']:03d} ({c.get('n_particles', '?')} particles)" for c in listed if not c.get("map")]
        return with_maps, without
    root = Path(outdir)
    found = sorted(d.name for d in root.iterdir() if CLASS_FOLDER.match(d.name) and (d / "map.mrc").is_file()) \
        if root.is_dir() else []
    top = root / "map.mrc"
    if found and top.is_file() and top.stat().st_mtime > max((root / d / "map.mrc").stat().st_mtime for d in found):
        return [], []
    return found, []


def output_files(outdir: str) -> tuple[list[tuple[str, str]], list[str]]:
    """([(path, node kind)] of the outputs present, [required file names missing]).

    One class: OUTPUTS. K classes: particles.star, then each class folder's CLASS_OUTPUTS, then logfile.pdf.
    """
    nodes, missing = [], []
    folders, without_maps = class_folders(outdir)
    for c in without_maps:
        _say(f"note: {c} has no maps (too few particles); not registered")
    if not folders and not without_maps:
        wanted = OUTPUTS
    else:
        wanted = [o for o in OUTPUTS if o[1] == "particles"]
        wanted += [(f"{d}/{fname}", kind, required) for d in folders for fname, kind, required in CLASS_OUTPUTS]
        wanted += [o for o in OUTPUTS if o[1] == "logfile"]
        if not folders:
            missing.append("any class map (classNNN/map.mrc)")
    for fname, kind, required in wanted:
        path = outdir + fname
        if Path(path).is_file():
            nodes.append((path, kind))
        elif required:
            missing.append(fname)
        else:
            _say(f"warning: {path} was not written; not registered as an output node")
    return nodes, missing


def register_outputs(outdir: str) -> list[tuple[str, str]]:
    """Write RELION_OUTPUT_NODES.star for the outputs present; JobFailed if a required one is missing."""
    # abinit writes the maps and half maps at the particles' box and pixel size, as refinement needs
    nodes, missing = output_files(outdir)
    if missing:
        raise JobFailed(f"cryospin abinit finished but did not write {', '.join(missing)} in {outdir}")
    rel = [(_project_relative(p), kind) for p, kind in nodes]
    if any(p is None for p, _ in rel):
        _say(f"warning: {outdir} is not a folder inside the current (project) folder without spaces; "
             f"{OUTPUT_NODES} not written")
        return nodes
    version = pipeline_version(".")
    write_output_nodes(outdir, rel, version)
    _say(f"registered {len(nodes)} output nodes for RELION {version} in {outdir}{OUTPUT_NODES}")
    return nodes


def _project_relative(path: str) -> str | None:
    """``path`` relative to the current folder (RELION's node names), or None when outside it / with spaces."""
    if os.path.isabs(path):
        rel = os.path.relpath(path, os.getcwd())
        if rel.startswith(".."):
            return None
        path = rel
    path = os.path.normpath(path)
    return None if path.startswith("..") or any(c.isspace() for c in path) else path


def _find_outdir(argv: Sequence[str]) -> str | None:
    """--o's value even from a command line that does not parse."""
    argv = list(argv)
    for k, tok in enumerate(argv[:-1]):
        if tok == "--o" and not argv[k + 1].startswith("--"):
            v = argv[k + 1]
            return v if v.endswith("/") else v + "/"
    return None


def run_job(
    argv: Sequence[str],
    *,
    base_command: Sequence[str] | None = None,
    known_options: dict[str, bool] | None = None,
    poll: float = 0.5,
    grace: float = 10.0,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Run one External job; returns the exit status. Always leaves an exit file in --o.

    ``base_command`` / ``known_options`` replace ``cryospin abinit`` and its
    option list (unit tests of the protocol use a stand-in child this way).
    """
    t0 = time.monotonic()
    outdir = _find_outdir(argv)
    if outdir is None:
        _err("--o (the job's output folder) is missing; no exit file can be written")
        return EXIT_CODES["bad_input"]
    status, code = "failure", EXIT_CODES["failure"]
    try:
        Path(outdir).mkdir(parents=True, exist_ok=True)
        note = Path(outdir) / "note.txt"
        removed = clear_stale_exit_files(outdir, note.stat().st_mtime if note.is_file() else None)
        if removed:
            _say(f"removed stale {', '.join(removed)} from {outdir}")
        _say(f"started in {os.getcwd()} with: {' '.join(argv)}")
        known = abinit_options() if known_options is None else dict(known_options)
        base = command_argv("abinit") if base_command is None else list(base_command)
        outdir, cmd = build_command(argv, known, base)
        _say("running: " + " ".join(cmd))
        res = run_child(cmd, outdir, poll=poll, grace=grace, stop=stop, log=_say)
        _say(f"child finished: {res.status} (exit {res.returncode}) after {res.seconds:.1f} s")
        if res.status == "aborted":
            status, code = "aborted", EXIT_CODES["aborted"]
        elif res.status == "failure":
            code = 2 if res.returncode == 2 else 1
            raise JobFailed(f"cryospin abinit failed with exit status {res.returncode} (its messages are above)",
                            code=code)
        else:
            register_outputs(outdir)
            status, code = "success", EXIT_CODES["success"]
    except JobFailed as e:
        _err(str(e))
        status, code = "failure", e.code
    except BaseException as e:  # noqa: BLE001 - any wrapper bug must still end the job as failed
        traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {e}")
        status, code = "failure", EXIT_CODES["failure"]
        if isinstance(e, KeyboardInterrupt):
            status, code = "aborted", EXIT_CODES["aborted"]
    finally:
        name = {"success": EXIT_SUCCESS, "aborted": EXIT_ABORTED}.get(status, EXIT_FAILURE)
        try:
            write_exit_file(outdir, name)
        except OSError as e:
            _err(f"cannot write {outdir}{name}: {e}")
            code = code or 1
    _say(f"job {status} after {time.monotonic() - t0:.1f} s: wrote {outdir}{name}")
    return code


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    stop_flag = {"set": False}

    def _on_signal(signum, frame):  # SIGTERM/SIGINT/SIGHUP to the wrapper: abort the job
        if not stop_flag["set"]:
            _say(f"received signal {signum}: aborting")
        stop_flag["set"] = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        try:
            signal.signal(sig, _on_signal)
        except (ValueError, OSError):  # not in the main thread
            pass
    sys.exit(run_job(argv, stop=lambda: stop_flag["set"]))


if __name__ == "__main__":
    main()
