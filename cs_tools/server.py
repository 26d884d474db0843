"""Every call to a cryoSPARC server, and nothing else (thin wrappers over cryosparc-tools).

Works with cryosparc-tools 4.x and 5.x: the ``CryoSPARC`` constructor is called
with keywords only, filtered by its signature (5.x has ``base_url`` and a
deprecated ``license``; 4.x has ``license``, ``host``, ``base_port``).

NOT TESTED AGAINST A LIVE SERVER (none was available): see docs/cryosparc.md.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from pathlib import PurePosixPath
from typing import Any, Iterator

from cryosparc.dataset import Dataset

from cs_tools.convert import INPUT_SLOTS, VOLUME_SLOTS

PARTICLES_INPUT = "particles"
PARTICLES_OUTPUT = "particles"
VOLUME_OUTPUT = "volume"
VOLUME_SLOT_DTYPE = "volume_blob"  # dtype of the map / map_half_A / map_half_B slots of volume outputs


def tools_major() -> int:
    """Major version of the installed cryosparc-tools (4 or 5)."""
    import cryosparc

    try:
        return int(str(cryosparc.__version__).split(".")[0])
    except ValueError:
        return 5


def slot(name: str, dtype: str | None = None, required: bool = True) -> dict:
    """A slot spec in the form the installed cryosparc-tools takes: 5.x {name, dtype, required};
    4.x {prefix, dtype, required} (5.x warns on 'prefix')."""
    key = "name" if tools_major() >= 5 else "prefix"
    return {key: name, "dtype": dtype or name, "required": required}


def input_slots() -> list[dict]:
    """blob and ctf required, alignments3D optional (convert.INPUT_SLOTS, '?' = optional)."""
    return [slot(s.lstrip("?"), required=not s.startswith("?")) for s in INPUT_SLOTS]


def _cryosparc_class():
    from cryosparc.tools import CryoSPARC

    return CryoSPARC


def constructor_keywords() -> set[str]:
    """Keyword arguments the installed ``CryoSPARC(...)`` accepts."""
    return set(inspect.signature(_cryosparc_class().__init__).parameters) - {"self"}


def has_saved_session(base_url: str, email: str | None) -> bool:
    """True when cryosparc-tools 5.x has a stored login (``python -m cryosparc.tools login``)
    for ``base_url``; reads a local file only, no network."""
    try:
        from cryosparc.auth import InstanceAuthSessions
    except ImportError:  # 4.x
        return False
    try:
        return InstanceAuthSessions.load().find(base_url, email) is not None
    except Exception:
        return False


def connect(conn: dict[str, Any]) -> Any:
    """``CryoSPARC(...)`` from a dict with keys base_url, host, base_port, email, password,
    license, timeout (None values are left out)."""
    cls = _cryosparc_class()
    accepted = constructor_keywords()
    kw = {k: v for k, v in conn.items() if v is not None and v != "" and k in accepted}
    if "base_url" in kw and ("host" in kw or "base_port" in kw):
        kw.pop("host", None)
        kw.pop("base_port", None)
    if "base_url" not in accepted and conn.get("base_url") and not conn.get("host"):
        from urllib.parse import urlparse  # 4.x: split the URL into host and port

        u = urlparse(conn["base_url"])
        kw["host"], kw["base_port"] = u.hostname, u.port or 39000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 5.x: license argument deprecated
        warnings.simplefilter("ignore", UserWarning)  # one warning per retried request; the error says it
        if "base_url" in accepted and "base_url" not in kw:
            kw["base_url"] = None  # keep 5.x from reading CRYOSPARC_BASE_URL captured at import time
        return cls(**kw)


def find_project(cs: Any, project_uid: str) -> Any:
    return cs.find_project(project_uid)


def project_dir(project: Any) -> str:
    """The project folder as the server sees it (5.x: property; 4.x: method)."""
    d = project.dir
    if callable(d) and not isinstance(d, PurePosixPath):
        d = d()
    return str(d)


def create_job(project: Any, workspace_uid: str, title: str, desc: str = "") -> Any:
    return project.create_external_job(workspace_uid, title=title, desc=desc)


def job_uid(job: Any) -> str:
    return str(job.uid)


def connect_particles(job: Any, source_job: str, source_output: str) -> None:
    """Particle input (blob and ctf required, alignments3D optional), connected to J.output."""
    job.add_input("particle", PARTICLES_INPUT, min=1, max=1, slots=input_slots(), title="Particles")
    job.connect(PARTICLES_INPUT, source_job, source_output)


def load_particles(job: Any) -> Dataset:
    return job.load_input(PARTICLES_INPUT)


@contextlib.contextmanager
def running(job: Any) -> Iterator[Any]:
    """``with job.run():`` marks the job running, then completed, or failed with the traceback."""
    with job.run():
        yield job


def fail(job: Any, message: str) -> None:
    """Best effort: mark a job that never started as failed (``job.stop(error=...)``)."""
    with contextlib.suppress(Exception):
        job.stop(error=message)


def log(job: Any, text: str, level: str = "text") -> None:
    job.log(text, level=level)


def download(project: Any, rel_path: str, target: str | os.PathLike) -> None:
    """Copy a project file (e.g. a particle stack) to this machine."""
    project.download_file(rel_path, str(target))


def upload(job: Any, name: str, local_path: str | os.PathLike) -> str:
    """Upload a file into the job folder; returns its project-relative path ``J42/name``."""
    try:
        job.upload(name, str(local_path), overwrite=True)
    except TypeError:  # 4.x: no overwrite argument
        job.upload(name, str(local_path))
    return str(PurePosixPath(job_uid(job)) / name)


def add_volume_output(job: Any, name: str = VOLUME_OUTPUT, title: str | None = None) -> Dataset:
    """Add a volume output ``name`` (slots map, map_half_A, map_half_B); returns a 1-row allocation.

    An External job may have several outputs of one type, told apart by name (letters, digits, ``_``):
    ``volume`` for one class, ``volume_class_0``, ``volume_class_1``, ... for K classes."""
    slots = [slot(s, VOLUME_SLOT_DTYPE) for s in VOLUME_SLOTS]
    return job.add_output("volume", name, slots=slots, title=title or "cryoSPIN map", alloc=1)


def add_particles_output(job: Any, like: Dataset, name: str = PARTICLES_OUTPUT, title: str | None = None) -> Dataset:
    """Add a particle output ``name`` (new alignments3D, rest passed through from the input);
    returns an allocation with the uids of ``like`` (for K classes: ``particles_class_<k>``, that class's rows)."""
    return job.add_output("particle", name, slots=[slot("alignments3D")], passthrough=PARTICLES_INPUT,
                          title=title or "Particles with cryoSPIN poses", alloc=like)


def save_output(job: Any, name: str, ds: Dataset) -> None:
    job.save_output(name, ds)
