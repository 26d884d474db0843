"""cryospin-cryosparc: run cryoSPIN ab-initio on a cryoSPARC particle output as an External job.

Creates an External job in PROJECT/WORKSPACE, connects the particle output
(blob and ctf required, alignments3D optional), runs ``cryospin abinit`` here on
the particle stacks (read from the project folder, or downloaded with
--download-stacks), then saves a ``volume`` output (map, map_half_A, map_half_B)
and a ``particles`` output with the new alignments3D (other slots pass through).
With --classes K > 1: per class (0-based, as alignments3D/class and cryoSPARC's own
ab-initio) a ``volume_class_<k>`` output (that class's map and half maps; none for a
class too small to have maps) and a ``particles_class_<k>`` output (that class's rows).

Connection: --base-url, or --host and --base-port; credentials --email and
--password (or, with cryosparc-tools 5.x, a session stored by
``python -m cryosparc.tools login``; --license for 4.x). Each falls back to the
environment: CRYOSPARC_BASE_URL, CRYOSPARC_MASTER_HOSTNAME, CRYOSPARC_BASE_PORT,
CRYOSPARC_EMAIL, CRYOSPARC_PASSWORD, CRYOSPARC_LICENSE_ID.

Options not listed below are passed to ``cryospin abinit`` unchanged.

Exit codes: 0 success, 2 bad input or missing connection settings (one line),
1 server or run failure (one line; the job is marked failed), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from cryospin_relion.errors import InputError

PROG = "cryospin-cryosparc"

ENV = {
    "base_url": "CRYOSPARC_BASE_URL",
    "host": "CRYOSPARC_MASTER_HOSTNAME",
    "base_port": "CRYOSPARC_BASE_PORT",
    "email": "CRYOSPARC_EMAIL",
    "password": "CRYOSPARC_PASSWORD",
    "license": "CRYOSPARC_LICENSE_ID",
}


class ConnectionSettingsError(InputError):
    """Connection settings missing: nothing was sent to any server."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(__doc__ or "").strip().splitlines()[0],
        epilog="Options not listed are passed to `cryospin abinit`. See docs/cryosparc.md.",
    )
    g = p.add_argument_group("cryoSPARC job")
    g.add_argument("--project", required=True, metavar="P", help="project uid, e.g. P3")
    g.add_argument("--workspace", required=True, metavar="W", help="workspace uid, e.g. W1")
    g.add_argument("--particles", required=True, metavar="JOB.OUTPUT",
                   help="particle output to connect, e.g. J12.particles_selected (J12 alone means J12.particles)")
    g.add_argument("--title", default="cryoSPIN ab-initio", help="External job title (default: %(default)s)")
    g.add_argument("--lane", default=None,
                   help="accepted for symmetry with other jobs; External jobs run where this command runs, "
                        "so it is only logged")
    g.add_argument("--gpus", type=int, default=1, metavar="G",
                   help="run cryospin abinit on G GPUs of this machine, one data-parallel rank each (torchrun; "
                        "G CPU processes without GPUs) (default: %(default)s)")
    g.add_argument("--workdir", default=None,
                   help="local folder for the exported particles and abinit outputs "
                        "(default: ./cryospin_<project>_<job>)")
    g.add_argument("--project-dir", default=None,
                   help="the project folder as seen from this machine (default: the server's path)")
    g.add_argument("--download-stacks", action="store_true",
                   help="download the particle stacks from the server when the project folder is not "
                        "visible here")
    c = p.add_argument_group("connection (each falls back to the CRYOSPARC_* environment variable)")
    c.add_argument("--base-url", default=None, help="e.g. http://localhost:39000 (CRYOSPARC_BASE_URL)")
    c.add_argument("--host", default=None, help="master hostname (CRYOSPARC_MASTER_HOSTNAME)")
    c.add_argument("--base-port", default=None, type=int, help="base port, default 39000 (CRYOSPARC_BASE_PORT)")
    c.add_argument("--email", default=None, help="user e-mail (CRYOSPARC_EMAIL)")
    c.add_argument("--password", default=None,
                   help="password (CRYOSPARC_PASSWORD; prefer the variable: arguments are visible to other users)")
    c.add_argument("--license", default=None, help="license id, needed by cryosparc-tools 4.x (CRYOSPARC_LICENSE_ID)")
    c.add_argument("--timeout", default=60, type=int, help="seconds per server request (default: %(default)s)")
    a = p.add_argument_group("passed to cryospin abinit")
    a.add_argument("--box", type=int, default=None, help="working box in pixels")
    a.add_argument("--heads", type=int, default=None, help="number of pose heads")
    a.add_argument("--epochs-amortized", type=int, default=None, help="epochs of the amortized phase")
    a.add_argument("--epochs-autodecode", type=int, default=None, help="epochs of the auto-decoding phase")
    a.add_argument("--seed", type=int, default=None, help="random seed")
    a.add_argument("--classes", type=int, default=None, metavar="K",
                   help="K classes (maps); K > 1 saves one volume and one particles output per class, "
                        "volume_class_0 / particles_class_0, ... (default: abinit's, 1)")
    return p


def abinit_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The options for ``cryospin abinit`` (named ones first, then the unknown ones as given)."""
    out: list[str] = []
    for name in ("box", "heads", "epochs_amortized", "epochs_autodecode", "seed", "classes"):
        v = getattr(args, name)
        if v is not None:
            out += [f"--{name.replace('_', '-')}", str(v)]
    return out + [e for e in extra if e != "--"]


def resolve_connection(args: argparse.Namespace, environ: Mapping[str, str] | None = None,
                       saved_session: Any = None) -> dict[str, Any]:
    """Connection settings from arguments, else the CRYOSPARC_* environment.

    Raises ConnectionSettingsError (one line) naming what is missing. ``saved_session``
    is a callable (base_url, email) -> bool telling whether cryosparc-tools 5.x
    holds a stored login (defaults to server.has_saved_session).
    """
    environ = os.environ if environ is None else environ
    conn: dict[str, Any] = {}
    for key, var in ENV.items():
        v = getattr(args, key, None)
        conn[key] = v if v not in (None, "") else (environ.get(var) or None)
    conn["timeout"] = getattr(args, "timeout", 60)
    if conn["base_port"] is not None:
        try:
            conn["base_port"] = int(conn["base_port"])
        except ValueError:
            raise ConnectionSettingsError(f"base port {conn['base_port']!r} is not a number "
                                          f"(--base-port / CRYOSPARC_BASE_PORT)") from None
    if conn["base_url"] and (getattr(args, "host", None) or getattr(args, "base_port", None)):
        conn["base_url"] = None  # explicit --host/--base-port win over CRYOSPARC_BASE_URL
    missing = []
    if not conn["base_url"] and not conn["host"]:
        missing.append("host (--host or CRYOSPARC_MASTER_HOSTNAME, or --base-url or CRYOSPARC_BASE_URL)")
    if conn["host"] and not conn["base_url"] and conn["base_port"] is None:
        conn["base_port"] = 39000
    url = conn["base_url"] or f"http://{conn['host']}:{conn['base_port']}"
    if saved_session is None:
        from cs_tools.server import has_saved_session as saved_session
    from cs_tools.server import constructor_keywords

    tools5 = "base_url" in constructor_keywords()
    have_login = bool(conn["email"] and conn["password"])
    if tools5:
        if not have_login and not conn["license"] and not (not missing and saved_session(url, conn["email"])):
            missing.append("credentials (--email and --password, or CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD, "
                           "or a login stored by `python -m cryosparc.tools login`)")
    else:
        if not conn["license"]:
            missing.append("license (--license or CRYOSPARC_LICENSE_ID)")
        if not have_login:
            missing.append("credentials (--email and --password, or CRYOSPARC_EMAIL and CRYOSPARC_PASSWORD)")
    if missing:
        raise ConnectionSettingsError("no cryoSPARC connection: missing " + "; ".join(missing))
    return conn


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:400] + " ...") if len(text) > 400 else (text or type(e).__name__)


def _first_line(e: BaseException) -> str:
    """First line of the message, with the first line of its cause (cryosparc-tools wraps errors)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    cause = e.__cause__ or e.__context__
    if cause is not None:
        more = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
        text += " " + (more[0] if more else type(cause).__name__)
    return text.rstrip(":") if text.endswith(":") else text


def prepare_stacks(ds, project_dir: str | None, workdir: Path, download: bool, server: ModuleType,
                   project: Any, log) -> Any:
    """The input Dataset with blob/path made absolute on this machine (downloading if asked)."""
    from cs_tools.convert import localize_blob_paths, stack_paths

    stacks = stack_paths(ds)
    if project_dir and all((Path(project_dir) / s).is_file() for s in stacks[:3]):
        missing = [s for s in stacks if not (Path(project_dir) / s).is_file()]
        if missing:
            raise InputError(f"{Path(project_dir) / missing[0]}: particle stack not found "
                             f"({len(missing)} of {len(stacks)} missing)")
        return localize_blob_paths(ds, project_dir)
    if not download:
        raise InputError(f"particle stacks not found under the project folder '{project_dir}' on this machine "
                         f"(e.g. {stacks[0]}): pass --project-dir or --download-stacks")
    local = workdir / "stacks"
    log(f"downloading {len(stacks)} particle stacks to {local}")
    for s in stacks:
        target = local / s
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            server.download(project, s, target)
    return localize_blob_paths(ds, local)


def save_volume(server: ModuleType, job: Any, ds, volumes: dict[str, Path], fsc: Path | None, log,
                name: str | None = None, title: str | None = None, prefix: str = "cryospin_") -> None:
    """Upload the maps ``volumes`` (slot -> MRC) (and ``fsc``) into the job folder as ``<prefix><file name>``
    and save one volume output row referencing them (``name`` None: the one-class output ``volume``)."""
    from cs_tools import convert

    box = int(ds["blob/shape"][0][-1]) if "blob/shape" in ds.fields() else None
    shapes, psize = {}, None
    for slot, path in volumes.items():
        shape, vs = convert.volume_info(path)
        if box:
            want = convert.expected_voxel_size(float(ds["blob/psize_A"][0]), box, shape[-1])
            shape, vs = convert.volume_info(path, want)
        shapes[slot], psize = shape, vs
    paths = {slot: server.upload(job, f"{prefix}{p.name}", p) for slot, p in volumes.items()}
    if fsc is not None:
        server.upload(job, f"{prefix}fsc.txt", fsc)
    if name is None:  # the one-class job's calls, as before
        alloc = server.add_volume_output(job)
        name = server.VOLUME_OUTPUT
    else:
        alloc = server.add_volume_output(job, name=name, title=title)
    vol = convert.volume_output(paths, shapes, psize, uid=int(alloc["uid"][0]))
    server.save_output(job, name, convert.fill_allocated(alloc, vol))
    log(f"saved {name} output: {', '.join(paths.values())} ({shapes['map'][-1]} px, {psize:.4f} A/px)")


def save_classes(server: ModuleType, job: Any, ds, out, built, log, listed: list[int] = ()) -> None:
    """A K-class run's outputs: per class (0-based k, folder class{k+1:03d}) ``volume_class_<k>`` (when the
    class has maps) and ``particles_class_<k>`` (its rows of ``built``, when it has any). ``listed``: the
    1-based classes of the run's summary, so that a class with neither is logged as well."""
    from cs_tools import convert

    cls = convert.particle_classes(built)
    maps = {c.number: c for c in out.classes}
    for number in sorted(set(maps) | set((cls + 1).tolist()) | set(listed)):
        k = number - 1
        vol_name, parts_name = convert.class_output_names(k)
        rows = np.flatnonzero(cls == k)
        folder = f"class{number:03d}"
        if number in maps:
            save_volume(server, job, ds, maps[number].volumes, maps[number].fsc, log, name=vol_name,
                        title=f"cryoSPIN class {k} map ({folder})", prefix=f"cryospin_{folder}_")
        else:
            log(f"{folder}: {len(rows)} particles, no maps (too few for two halves): no {vol_name} output",
                "warning")
        if not len(rows):
            log(f"{folder}: no particles: no {parts_name} output", "warning")
        else:
            part = built.take(rows)
            alloc = server.add_particles_output(job, part, name=parts_name,
                                                title=f"cryoSPIN class {k} particles ({folder})")
            server.save_output(job, parts_name, convert.fill_allocated(alloc, part))
            log(f"saved {parts_name} output: {len(rows)} particles")


def run_job(args: argparse.Namespace, extra: list[str], server: ModuleType | None = None,
            environ: Mapping[str, str] | None = None) -> int:
    """The whole External job; ``server`` is cs_tools.server (or a stand-in with the same functions)."""
    from cryospin_relion.io.cs import save_cs
    from cs_tools import convert

    if server is None:
        from cs_tools import server
    source_job, source_output = convert.parse_output_ref(args.particles)
    conn = resolve_connection(args, environ, saved_session=getattr(server, "has_saved_session", None))
    url = conn["base_url"] or f"http://{conn['host']}:{conn['base_port']}"
    try:
        cs = server.connect(conn)
    except Exception as e:  # network, authentication, version: one line, no traceback
        raise RuntimeError(f"cannot connect to cryoSPARC at {url}: {_first_line(e)}") from None
    project = server.find_project(cs, args.project)
    job = server.create_job(project, args.workspace, args.title)
    uid = server.job_uid(job)
    print(f"{PROG}: created External job {args.project} {uid} in {args.workspace}", file=sys.stderr)
    try:
        server.connect_particles(job, source_job, source_output)
    except Exception as e:
        msg = f"cannot connect {source_job}.{source_output} to {uid}: {_first_line(e)}"
        if hasattr(server, "fail"):
            server.fail(job, msg)
        raise RuntimeError(msg) from None

    def log(text: str, level: str = "text") -> None:
        print(f"[{uid}] {text}", file=sys.stderr)
        server.log(job, text, level)

    with server.running(job):
        if args.lane:
            log(f"--lane {args.lane}: External jobs run on this machine ({os.uname().nodename}); lane not used",
                "warning")
        ds = server.load_particles(job)
        convert.check_input_dataset(ds, f"{source_job}.{source_output}")
        log(f"loaded {len(ds)} particles from {source_job}.{source_output}")
        workdir = Path(args.workdir or f"cryospin_{args.project}_{uid}").resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        pdir = args.project_dir or server.project_dir(project)
        local = prepare_stacks(ds, pdir, workdir, args.download_stacks, server, project, log)
        in_cs = save_cs(local, workdir / "input_particles.cs")
        outdir = workdir / "abinit"
        summary = workdir / "summary.json"
        cmd = convert.abinit_command(in_cs, outdir, abinit_args(args, extra) + ["--json-summary", str(summary)],
                                     gpus=args.gpus)
        log("running: " + " ".join(cmd))
        convert.run_command(cmd, log=log, cwd=workdir, log_every=10.0)
        listed = []  # the summary's classes (K > 1), so that an empty class is reported too
        if summary.is_file():
            try:
                summ = json.loads(summary.read_text())
                log("summary: " + json.dumps(summ)[:2000])
                listed = [c["class"] for c in summ.get("classes") or [] if isinstance(c.get("class"), int)]
            except (ValueError, AttributeError, TypeError):
                pass
        out = convert.abinit_outputs(outdir)
        built = convert.result_particles(out, ds)
        save_cs(built, workdir / "particles_with_poses.cs")
        if out.classes is None:
            save_volume(server, job, ds, out.volumes, out.fsc, log)
            # particles output: new alignments3D, everything else passed through by cryoSPARC
            alloc = server.add_particles_output(job, built)
            server.save_output(job, server.PARTICLES_OUTPUT, convert.fill_allocated(alloc, built))
            log(f"saved particles output with alignments3D for {len(built)} particles")
        else:
            save_classes(server, job, ds, out, built, log, listed)
    print(f"{PROG}: done: {args.project} {uid}; local files in {workdir}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(argv))


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return run_job(args, extra)
    except InputError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # server errors, abinit failure: one line; the job (if any) is marked failed
        if os.environ.get("CRYOSPIN_DEBUG"):
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    main()
