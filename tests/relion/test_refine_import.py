"""RELION 3D auto-refine starts from what ``cryospin abinit`` writes.

A tiny ab-initio run on particles made with relion_project, then
``mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves`` with our
particles.star and map.mrc; the refinement must get through its first iterations
without error (auto-refine ignores --iter, so it is stopped once iteration 1 is
written). Skipped when relion_refine_mpi / mpirun are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import pytest
import starfile

sys.path.insert(0, str(Path(__file__).parent))
from test_external_job import BOX, TINY, make_particles  # noqa: E402

HAVE_REFINE = all(shutil.which(x) for x in ("relion_refine_mpi", "relion_project", "mpirun"))
pytestmark = [
    pytest.mark.relion,
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_REFINE, reason="relion_refine_mpi, relion_project or mpirun not on PATH"),
]


def _resolution(outdir: Path) -> float:
    """Our FSC resolution (A) from summary.json when it has one, else 30."""
    try:
        summary = json.loads((outdir / "summary.json").read_text())
    except (OSError, ValueError):
        return 30.0
    for key in ("resolution", "resolution_A", "fsc_resolution", "resolution_0143"):
        v = summary.get(key) if isinstance(summary, dict) else None
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return 30.0


def _reap_group(pgid: int, timeout: float = 10.0) -> None:
    """Wait for the MPI ranks left in process group ``pgid`` to go; SIGKILL them after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.2)


@pytest.mark.parametrize("sym", ["C1", "D7"])
def test_refine3d_starts_from_our_outputs(tmp_path, sym):
    project = tmp_path / "project"
    project.mkdir()
    star = make_particles(project)
    out = "cryospin/run1"
    opts = [x for k, v in TINY.items() for x in (f"--{k.replace('_', '-')}", v)]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "cryospin_relion.cli", "abinit", "--i", star, "--o", out, "--j", "2",
                        "--quiet", "--json-summary", f"{out}/summary.json", "--sym", sym, *opts],
                       cwd=project, capture_output=True, text=True, timeout=300)
    t_abinit = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    d = project / out

    # the map's header must match the particles' optics group, or relion_refine refuses it
    blocks = starfile.read(d / "particles.star", always_dict=True)
    optics, parts = blocks["optics"], blocks["particles"]
    apix, box = float(optics["rlnImagePixelSize"].iloc[0]), int(optics["rlnImageSize"].iloc[0])
    assert box == BOX
    assert parts["rlnImageName"].str.contains("@Data/particles.mrcs").all()
    for name in ("map.mrc", "half1_map.mrc", "half2_map.mrc"):
        with mrcfile.open(d / name, permissive=True, header_only=True) as m:
            shape = (int(m.header.nz), int(m.header.ny), int(m.header.nx))
            assert shape == (box, box, box), (name, shape)
            assert abs(float(m.voxel_size.x) - apix) < 1e-3, (name, float(m.voxel_size.x), apix)

    ini_high = max(_resolution(d), 2.5 * apix)
    refine = project / "Refine3D" / "job002"
    refine.mkdir(parents=True)
    cmd = ["mpirun", "-n", "3"]
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["--allow-run-as-root"]
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd += ["--oversubscribe", "relion_refine_mpi", "--o", "Refine3D/job002/run", "--auto_refine",
            "--split_random_halves", "--i", f"{out}/particles.star", "--ref", f"{out}/map.mrc",
            "--ini_high", f"{ini_high:.1f}", "--firstiter_cc", "--ctf", "--particle_diameter", f"{0.8 * box * apix:.0f}",
            "--sym", sym, "--healpix_order", "1", "--auto_local_healpix_order", "3", "--offset_range", "3",
            "--offset_step", "1", "--pad", "1", "--j", "1", "--dont_combine_weights_via_disc", "--pool", "10"]
    log = open(refine / "run.out", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=project, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wanted = [refine / f"run_it001_{s}" for s in ("data.star", "half1_class001.mrc", "half2_class001.mrc",
                                                   "half1_model.star", "optimiser.star", "sampling.star")]
    try:
        while not all(p.exists() for p in wanted):
            assert proc.poll() is None, "relion_refine_mpi stopped:\n" + (refine / "run.out").read_text()[-3000:]
            assert time.monotonic() - t0 < 110, "no iteration 1 within 110 s"
            time.sleep(0.5)
        time.sleep(1.0)  # let iteration 1's files be completed
        t_refine = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _reap_group(proc.pid)
        log.close()
    text = (refine / "run.out").read_text()
    assert "ERROR" not in text, text[-3000:]
    data = starfile.read(refine / "run_it001_data.star", always_dict=True)
    assert len(data["particles"]) == len(parts)
    with mrcfile.open(refine / "run_it001_half1_class001.mrc", permissive=True, header_only=True) as m:
        assert int(m.header.nx) == box
    print(f"--sym {sym}: abinit {t_abinit:.1f} s; relion_refine_mpi to iteration 1: {t_refine:.1f} s")
