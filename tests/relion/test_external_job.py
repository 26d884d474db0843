"""The RELION External-job wrapper (relion_wrappers): protocol units and real-RELION runs.

Unit tests drive ``run_job`` with a tiny stand-in child (through its Python
arguments, never an environment variable). The ``relion`` tests build a headless
RELION project, import a particle STAR with relion_pipeliner and run the real
``cryospin abinit`` through ``cryospin_relion_external`` as an External job;
they skip when relion_pipeliner is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mrcfile
import starfile
import numpy as np
import pytest

from relion_wrappers import external_job as ej
from relion_wrappers.nodes import NODE_TYPES, pipeline_version, read_output_nodes, write_output_nodes
from relion_wrappers.protocol import (
    ABORT_NOW, EXIT_ABORTED, EXIT_FAILURE, EXIT_SUCCESS, ProtocolError, clear_stale_exit_files,
    parse_relion_args,
)

# ------------------------------------------------------------------ unit tests


def test_parse_split_values_bare_flags_and_pipeline_control():
    argv = ("--o External/job002 --in_parts Import/job001/parts.star --in_3dref ref.mrc "
            "--heads 4 --config my cfg.yaml --empty --j 2 --pipeline_control External/job002/").split()
    a = parse_relion_args(argv)
    assert a.outdir == "External/job002/"
    assert a.threads == 2
    assert a.inputs == {"in_parts": "Import/job001/parts.star", "in_3dref": "ref.mrc"}
    assert a.params == {"heads": "4", "config": "my cfg.yaml", "empty": ""}


def test_parse_negative_numbers_are_values_and_errors():
    assert parse_relion_args(["--o", "x/", "--shift", "-3"]).params == {"shift": "-3"}
    for bad in (["stray", "--o", "x/"], ["--o", "x/", "--j", "two"], ["--o", "x/", "--a", "1", "--a", "2"],
                ["--o"]):
        with pytest.raises(ProtocolError):
            parse_relion_args(bad)


KNOWN = {"i": True, "o": True, "j": True, "heads": True, "epochs-amortized": True, "epochs-autodecode": True,
         "box": True, "config": True, "seed": True, "quiet": False, "continue": False}


def test_params_to_options_maps_names_and_flags():
    out = ej.params_to_options({"heads": "4", "epochs_amortized": "1", "--box": "24", "quiet": "",
                                "continue": "no"}, KNOWN)
    assert out == ["--heads", "4", "--epochs-amortized", "1", "--box", "24", "--quiet"]


def test_params_to_options_rejects_unknown_with_valid_names():
    with pytest.raises(ej.JobFailed) as e:
        ej.params_to_options({"hedas": "4", "o": "elsewhere"}, KNOWN)
    msg = str(e.value)
    assert "parameter(s): hedas, o;" in msg and "valid names:" in msg and "epochs_amortized" in msg
    assert e.value.code == 2
    with pytest.raises(ej.JobFailed, match="needs a value"):
        ej.params_to_options({"heads": ""}, KNOWN)
    with pytest.raises(ej.JobFailed, match="yes or no"):
        ej.params_to_options({"quiet": "maybe"}, KNOWN)


@pytest.mark.parametrize("text, version", [
    ("# version 30001\n\ndata_pipeline_processes\nloop_\n_rlnPipeLineProcessType #3\n", "3.1"),
    ("# version 30001\n\ndata_pipeline_processes\nloop_\n_rlnPipeLineProcessTypeLabel #3\n", "4.0"),
    ("# version 50001\n\ndata_pipeline_general\n_rlnPipeLineJobCounter 1\n", "5.0"),
    (None, "3.1"),
])
def test_pipeline_version(tmp_path, text, version):
    if text is not None:
        (tmp_path / "default_pipeline.star").write_text(text)
    assert pipeline_version(tmp_path) == version


def test_output_nodes_file_has_both_columns(tmp_path):
    nodes = [("External/job002/particles.star", "particles"), ("External/job002/map.mrc", "map"),
             ("External/job002/half1_map.mrc", "halfmap"), ("External/job002/logfile.pdf", "logfile")]
    p = write_output_nodes(tmp_path, nodes, "3.1")
    text = p.read_text()
    assert "data_output_nodes" in text and "_rlnPipeLineNodeType #2" in text
    assert read_output_nodes(p) == [
        ("External/job002/particles.star", 3, "ParticlesData.star.relion"),
        ("External/job002/map.mrc", 6, "DensityMap.mrc"),
        ("External/job002/half1_map.mrc", 10, "DensityMap.mrc.halfmap"),
        ("External/job002/logfile.pdf", 13, "LogFile.pdf")]
    rows = read_output_nodes(write_output_nodes(tmp_path, nodes, "5.0"))
    assert rows[0][2] == "ParticleGroupMetadata.star.relion" and rows[1][2] == "DensityMap.mrc"
    assert [f.name for f in tmp_path.iterdir()] == ["RELION_OUTPUT_NODES.star"]  # no temporary left
    assert set(NODE_TYPES) == {"particles", "map", "halfmap", "logfile"}


def test_clear_stale_keeps_fresh_abort(tmp_path):
    for n in (EXIT_SUCCESS, EXIT_FAILURE, ABORT_NOW):
        (tmp_path / n).touch()
    old = time.time() - 100
    os.utime(tmp_path / ABORT_NOW, (old, old))
    assert set(clear_stale_exit_files(tmp_path, started_after=time.time() - 10)) == {
        EXIT_SUCCESS, EXIT_FAILURE, ABORT_NOW}
    (tmp_path / ABORT_NOW).touch()
    assert clear_stale_exit_files(tmp_path, started_after=time.time() - 10) == []
    assert (tmp_path / ABORT_NOW).exists()


# A stand-in for ``cryospin abinit`` (unit tests of the protocol only): writes the
# outputs, fails with exit 2 when --heads is 0, sleeps until SIGTERM when --heads is 99.
STAND_IN = textwrap.dedent("""
    import signal, sys, time, pathlib
    a = sys.argv[1:]
    out = pathlib.Path(a[a.index("--o") + 1])
    heads = a[a.index("--heads") + 1] if "--heads" in a else "1"
    if heads == "0":
        print("cryospin abinit: error: bad heads", file=sys.stderr); sys.exit(2)
    if heads == "99":
        def term(*_):
            (out / "checkpoint.pt").write_text("ckpt"); sys.exit(143)
        signal.signal(signal.SIGTERM, term)
        time.sleep(60)
    if heads == "98":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
    for f in ("map.mrc", "half1_map.mrc", "half2_map.mrc", "particles.star", "logfile.pdf"):
        (out / f).write_text("x")
    (out / "argv.txt").write_text(" ".join(a))
""")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "parts.star").write_text("data_\n")
    (tmp_path / "child.py").write_text(STAND_IN)
    return tmp_path


def _run(heads, *extra, grace=10.0):
    argv = ["--o", "External/job002/", "--in_parts", "parts.star", "--in_3dref", "ref.mrc", "--heads", str(heads),
            *extra, "--j", "2", "--pipeline_control", "External/job002/"]
    return ej.run_job(argv, base_command=[sys.executable, "child.py"], known_options=KNOWN, poll=0.1, grace=grace)


def test_run_job_success_writes_nodes_and_exit_file(project, capsys):
    job = project / "External/job002"
    job.mkdir(parents=True)
    (job / EXIT_FAILURE).touch()  # stale, from an earlier run
    assert _run(3, "--epochs_amortized", "1") == 0
    assert (job / EXIT_SUCCESS).exists() and not (job / EXIT_FAILURE).exists()
    argv = (job / "argv.txt").read_text()
    assert argv == "--i parts.star --o External/job002 --j 2 --heads 3 --epochs-amortized 1"
    names = {r[0]: r[1] for r in read_output_nodes(job / "RELION_OUTPUT_NODES.star")}
    assert names == {"External/job002/particles.star": 3, "External/job002/map.mrc": 6,
                     "External/job002/half1_map.mrc": 10, "External/job002/logfile.pdf": 13}
    assert "--in_3dref ref.mrc ignored" in capsys.readouterr().out


def test_run_job_child_failure_and_bad_params(project, capsys):
    job = project / "External/job002"
    assert _run(0) == 2
    assert (job / EXIT_FAILURE).exists() and not (job / "RELION_OUTPUT_NODES.star").exists()
    assert "failed with exit status 2" in capsys.readouterr().err
    assert _run(3, "--nonsense", "1") == 2
    assert (job / EXIT_FAILURE).exists()
    assert "valid names:" in capsys.readouterr().err
    (project / "parts.star").unlink()
    assert _run(3) == 2 and "not found" in capsys.readouterr().err


def test_run_job_internal_error_still_writes_failure(project, monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("bug")
    monkeypatch.setattr(ej, "run_child", boom)
    assert _run(3) == 1
    assert (project / "External/job002" / EXIT_FAILURE).exists()
    assert "internal error: RuntimeError: bug" in capsys.readouterr().err


def test_run_job_abort_file_stops_child(project):
    import threading
    job = project / "External/job002"
    job.mkdir(parents=True)
    threading.Timer(1.0, lambda: (job / ABORT_NOW).touch()).start()
    t0 = time.monotonic()
    assert _run(99) == 3
    assert time.monotonic() - t0 < 5
    assert (job / EXIT_ABORTED).exists() and (job / "checkpoint.pt").exists()
    # "Continue" in the GUI reruns the same folder: the stale abort file goes, the run resumes
    (job / ABORT_NOW).unlink()
    assert _run(3) == 0
    assert "--continue" in (job / "argv.txt").read_text()
    assert not (job / EXIT_ABORTED).exists() and (job / EXIT_SUCCESS).exists()


def test_run_job_abort_kills_a_child_that_ignores_sigterm(project):
    import threading
    job = project / "External/job002"
    job.mkdir(parents=True)
    threading.Timer(0.5, lambda: (job / ABORT_NOW).touch()).start()
    t0 = time.monotonic()
    assert _run(98, grace=1.0) == 3
    assert time.monotonic() - t0 < 5
    assert (job / EXIT_ABORTED).exists()


# ------------------------------------------------------------------ real RELION

HAVE_RELION = shutil.which("relion_pipeliner") is not None and shutil.which("relion_project") is not None
needs_relion = [
    pytest.mark.relion,
    pytest.mark.skipif(not HAVE_RELION, reason="RELION binaries (relion_pipeliner, relion_project) not on PATH"),
]

STATUS_31 = {0: "Running", 1: "Scheduled", 2: "Succeeded", 3: "Failed", 4: "Aborted"}
BOX, APIX, N_PARTICLES = 24, 5.0, 200
TINY = {"box": "24", "heads": "2", "epochs_amortized": "1", "epochs_autodecode": "1", "seed": "1"}


def make_particles(project: Path, n: int = N_PARTICLES, box: int = BOX, apix: float = APIX, seed: int = 0) -> str:
    """A small CTF-modulated, noisy particle set made with relion_project; returns its project-relative STAR."""
    rng = np.random.default_rng(seed)
    g = np.mgrid[:box, :box, :box] - box // 2
    vol = np.zeros((box,) * 3, np.float32)
    for c in rng.normal(0, box / 8, (10, 3)):
        vol += np.exp(-((g[2] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[0] - c[2]) ** 2) / (2 * 1.5 ** 2))
    data = project / "Data"
    data.mkdir(exist_ok=True)
    with mrcfile.new(data / "truth.mrc", overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = apix
    rot, psi = rng.uniform(-180, 180, (2, n))
    tilt = np.degrees(np.arccos(rng.uniform(-1, 1, n)))
    dfu = rng.uniform(8000, 20000, n)
    lines = ["# version 30001", "", "data_optics", "", "loop_", "_rlnOpticsGroupName #1", "_rlnOpticsGroup #2",
             "_rlnVoltage #3", "_rlnSphericalAberration #4", "_rlnAmplitudeContrast #5", "_rlnImagePixelSize #6",
             "_rlnImageSize #7", "_rlnImageDimensionality #8", f"opticsGroup1 1 300 2.7 0.1 {apix} {box} 2", "",
             "# version 30001", "", "data_particles", "", "loop_", "_rlnAngleRot #1", "_rlnAngleTilt #2",
             "_rlnAnglePsi #3", "_rlnDefocusU #4", "_rlnDefocusV #5", "_rlnDefocusAngle #6", "_rlnOpticsGroup #7",
             "_rlnOriginXAngst #8", "_rlnOriginYAngst #9"]
    lines += [f"{rot[i]:.3f} {tilt[i]:.3f} {psi[i]:.3f} {dfu[i]:.1f} {dfu[i]:.1f} 0 1 0 0" for i in range(n)]
    (data / "angles.star").write_text("\n".join(lines) + "\n")
    subprocess.run(["relion_project", "--i", "truth.mrc", "--ang", "angles.star", "--o", "particles", "--ctf",
                    "--add_noise", "--white_noise", "0.3", "--angpix", str(apix)],
                   cwd=data, check=True, capture_output=True, timeout=120)
    star = (data / "particles.star").read_text()
    # project-relative image names, as an Extract job would write them
    (data / "particles.star").write_text(re.sub(r"@particles\.mrcs", "@Data/particles.mrcs", star))
    return "Data/particles.star"


def pipeliner(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["relion_pipeliner", *args], cwd=project, capture_output=True, text=True,
                          timeout=timeout)


def read_pipeline(project: Path) -> tuple[dict[str, int], dict[str, int]]:
    """({process name: 3.1 status}, {node name: 3.1 type}) from default_pipeline.star."""
    procs, nodes, block, cols = {}, {}, None, []
    for line in (project / "default_pipeline.star").read_text().splitlines():
        s = line.strip()
        if s.startswith("data_"):
            block, cols = s, []
        elif s.startswith("_"):
            cols.append(s.split()[0])
        elif s and not s.startswith(("#", "loop_")) and cols and len(s.split()) == len(cols):
            row = dict(zip(cols, s.split()))
            if block == "data_pipeline_processes":
                procs[row["_rlnPipeLineProcessName"]] = int(row["_rlnPipeLineProcessStatus"])
            elif block == "data_pipeline_nodes":
                nodes[row["_rlnPipeLineNodeName"]] = int(row["_rlnPipeLineNodeType"])
    return procs, nodes


def new_project(root: Path) -> Path:
    """A headless RELION 3.1 project with the particles imported as Import/job001/particles.star."""
    root.mkdir(parents=True, exist_ok=True)
    # relion_pipeliner needs the pipeline file to exist (else it fails and leaves .relion_lock behind)
    (root / "default_pipeline.star").write_text(
        "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n")
    star = make_particles(root)
    r = pipeliner(root, "--addJob", "Import", "--addJobOptions",
                  f"fn_in_other == {star};node_type == Particles STAR file (.star);do_other == Yes;do_raw == No")
    assert r.returncode == 0, r.stdout + r.stderr
    r = pipeliner(root, "--RunJobs", "Import/job001/", "--sec_wait_after", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    procs, nodes = read_pipeline(root)
    assert procs == {"Import/job001/": 2} and nodes == {"Import/job001/particles.star": 3}
    return root


def add_external(project: Path, params: dict[str, str], in_part: str = "Import/job001/particles.star") -> str:
    before = set(read_pipeline(project)[0])
    opts = [f"fn_exe == {ej.PROG}", f"in_part == {in_part}", "nr_threads == 2"]
    for k, (label, value) in enumerate(params.items(), start=1):
        opts += [f"param{k}_label == {label}", f"param{k}_value == {value}"]
    r = pipeliner(project, "--addJob", "External", "--addJobOptions", ";".join(opts))
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = set(read_pipeline(project)[0]) - before
    return job


def run_jobs(project: Path, job: str, timeout: float = 240) -> subprocess.CompletedProcess:
    r = pipeliner(project, "--RunJobs", job, "--sec_wait_after", "0", timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (project / ".relion_lock").exists()
    return r


@pytest.fixture(scope="module")
def relion_project(tmp_path_factory):
    if not HAVE_RELION:
        pytest.skip("needs RELION")
    if shutil.which(ej.PROG) is None:
        pytest.skip(f"console script {ej.PROG} not on PATH (pip install -e .)")
    return new_project(tmp_path_factory.mktemp("relion") / "project")


def relion_test(f):
    for m in needs_relion + [pytest.mark.slow]:
        f = m(f)
    return f


@relion_test
def test_relion_external_job_succeeds_and_registers_nodes(relion_project):
    """Working box 16 < particle box 24: the registered maps are at the particles' 24 px and 5 A/px."""
    project = relion_project
    job = add_external(project, dict(TINY, box="16"))
    t0 = time.monotonic()
    run_jobs(project, job)
    seconds = time.monotonic() - t0
    d = project / job
    procs, nodes = read_pipeline(project)
    assert procs[job] == 2, f"{STATUS_31.get(procs[job])}; run.err:\n{(d / 'run.err').read_text()}"
    assert (d / EXIT_SUCCESS).exists()
    registered = {"particles.star": 3, "map.mrc": 6, "half1_map.mrc": 10, "logfile.pdf": 13}
    assert {k: v for k, v in nodes.items() if k.startswith(job)} == {job + k: v for k, v in registered.items()}
    for name, kind in registered.items():
        assert (project / ".Nodes" / str(kind) / job / name).exists()
    # the command RELION ran, and the GUI parameters arriving at abinit
    note = (d / "note.txt").read_text()
    assert f"{ej.PROG} --o {job} --in_parts Import/job001/particles.star" in note
    out = (d / "run.out").read_text()
    assert "--epochs-amortized 1" in out and "--box 16" in out and "--j 2" in out
    for f in ("map.mrc", "half1_map.mrc", "half2_map.mrc", "particles.star", "logfile.pdf"):
        assert (d / f).is_file(), f
    # the learned volume is at the working box; the maps match the particles' optics group, as refine needs
    with mrcfile.open(d / "decoder_map.mrc", header_only=True) as m:
        assert int(m.header.nx) == 16 and abs(float(m.voxel_size.x) - APIX * BOX / 16) < 1e-3
    for f in ("map.mrc", "half1_map.mrc", "half2_map.mrc"):
        with mrcfile.open(d / f, header_only=True) as m:
            assert (int(m.header.nx), int(m.header.nz)) == (BOX, BOX) and abs(float(m.voxel_size.x) - APIX) < 1e-3
    optics = starfile.read(d / "particles.star")["optics"]
    assert (int(optics["rlnImageSize"][0]), float(optics["rlnImagePixelSize"][0])) == (BOX, APIX)
    # image names stay project-relative
    assert "@Data/particles.mrcs" in (d / "particles.star").read_text()
    assert "error" not in (d / "run.err").read_text().lower()
    _progress_files(d)
    print(f"External job {job}: {seconds:.1f} s")


def _progress_files(d: Path) -> tuple[str, str]:
    """(run.out, run.err) of a finished job, checked: no carriage return (no tqdm bar) in either, no line of
    more than a few hundred characters, and run.err holds no progress (empty, or warnings only)."""
    out, err = ((d / f).read_bytes().decode() for f in ("run.out", "run.err"))  # bytes: keep any \r
    assert "\r" not in out and "\r" not in err
    assert max(len(line) for line in out.splitlines()) < 2000
    assert not [line for line in err.splitlines() if "warning" not in line.lower()], err
    return out, err


@relion_test
def test_relion_external_job_progress_goes_to_run_out_as_lines(relion_project, monkeypatch):
    """Issue #14: progress in run.out as plain lines (one per epoch, and one per interval within an epoch),
    no tqdm carriage returns, nothing in run.err. run.out grows with epochs, not with batches."""
    project = relion_project
    monkeypatch.delenv("CRYOSPIN_PROGRESS_INTERVAL_S", raising=False)
    sizes = {}
    for bs in ("100", "10"):  # 2 and 20 batches an epoch
        job = add_external(project, dict(TINY, batch_size=bs))
        run_jobs(project, job)
        assert read_pipeline(project)[0][job] == 2
        out, err = _progress_files(project / job)
        assert not re.search(r": batch \d+/\d+", out)  # a short epoch writes only its epoch line
        epochs = re.findall(r"^epoch \d+ stage \d", out, re.M)
        assert len(epochs) >= 2, out
        sizes[bs] = (len(out), len(err), len(out.splitlines()), len(epochs))
    # ten times the batches, the same epoch lines; the files differ only by option values and a note or two
    # (e.g. a warning one run gives and the other not): a tqdm bar would add kilobytes per epoch
    (n10, _, l10, e10), (n100, _, l100, e100) = sizes["10"], sizes["100"]
    assert e10 == e100 and abs(l10 - l100) <= 3 and abs(n10 - n100) < 600, sizes
    # a zero interval: a line after every batch but the last of each epoch, in run.out and in run.log
    monkeypatch.setenv("CRYOSPIN_PROGRESS_INTERVAL_S", "0")
    job = add_external(project, dict(TINY, batch_size="10"))
    run_jobs(project, job)
    out, err = _progress_files(project / job)
    batch_lines = re.findall(r"^epoch \d+/\d+ stage \d box \d+: batch (\d+)/20 .*ETA", out, re.M)
    assert len(batch_lines) >= 2 * 19 and "19" in batch_lines and "20" not in batch_lines, out
    assert len(re.findall(r": batch \d+/20 ", (project / job / "run.log").read_text())) == len(batch_lines)
    print(f"run.out/run.err bytes, lines, epochs by batch size: {sizes}; "
          f"interval 0: run.out {len(out)} bytes, {len(batch_lines)} batch lines, run.err {len(err)} bytes")


@relion_test
def test_relion_external_job_bad_input_fails(relion_project):
    project = relion_project
    bad = project / "Data" / "bad.star"
    bad.write_text("# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n000001@Data/missing.mrcs\n")
    job = add_external(project, {"heads": "2"}, in_part="Data/bad.star")
    run_jobs(project, job)
    procs, nodes = read_pipeline(project)
    assert procs[job] == 3
    d = project / job
    assert (d / EXIT_FAILURE).exists() and not any(k.startswith(job) for k in nodes)
    assert "error" in (d / "run.err").read_text()
    # an unknown GUI parameter fails too, naming the valid ones
    job = add_external(project, {"heads": "2", "hedas": "3"})
    run_jobs(project, job)
    assert read_pipeline(project)[0][job] == 3
    assert "valid names:" in (project / job / "run.err").read_text()


@relion_test
def test_relion_external_job_abort(relion_project):
    project = relion_project
    params = dict(TINY, epochs_amortized="1000", epochs_autodecode="1000")
    job = add_external(project, params)
    d = project / job
    proc = subprocess.Popen(["relion_pipeliner", "--RunJobs", job, "--sec_wait_after", "0"], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((d / "run.out").exists() and "running: " in (d / "run.out").read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "job did not start"
            time.sleep(0.2)
        time.sleep(3)  # let abinit get going
        (d / ABORT_NOW).touch()
        t0 = time.monotonic()
        proc.wait(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (d / EXIT_ABORTED).exists()
    assert seconds < 15, seconds
    assert read_pipeline(project)[0][job] == 4
    assert not (project / ".relion_lock").exists()
    print(f"abort took {seconds:.1f} s")


def _blob(n: int, apix: float) -> np.ndarray:
    g = (np.mgrid[:n, :n, :n] - n // 2) * apix
    return np.exp(-((g[0] - 3) ** 2 + g[1] ** 2 + (g[2] + 3) ** 2) / (2 * 4.0 ** 2)).astype(np.float32)




def test_absolute_output_folder_gives_relative_node_names(project):
    job = project / "External/job002"
    argv = ["--o", f"{job}/", "--in_parts", str(project / "parts.star"), "--heads", "3", "--j", "1"]
    assert ej.run_job(argv, base_command=[sys.executable, "child.py"], known_options=KNOWN, poll=0.1) == 0
    names = [r[0] for r in read_output_nodes(job / "RELION_OUTPUT_NODES.star")]
    assert "External/job002/map.mrc" in names and all(not n.startswith("/") for n in names)


def test_relion5_project_gets_relion5_labels(project):
    (project / "default_pipeline.star").write_text("# version 50001\n\ndata_pipeline_general\n\n"
                                                   "_rlnPipeLineJobCounter 2\n")
    assert _run(3) == 0
    p = project / "External/job002/RELION_OUTPUT_NODES.star"
    assert "# version 50001" in p.read_text()
    labels = {r[0].split("/")[-1]: (r[1], r[2]) for r in read_output_nodes(p)}
    assert labels["particles.star"] == (3, "ParticleGroupMetadata.star.relion")
    assert labels["half1_map.mrc"] == (10, "DensityMap.mrc.halfmap")


# ------------------------------------------------------------------ K classes (issue 12)

# A stand-in for ``cryospin abinit --classes K`` (no training): the files a K-class run leaves, as the
# output layout of issue 12 says: classNNN/{map,half1_map,half2_map}.mrc (real MRC), one particles.star with
# rlnClassNumber 1..K, logfile.pdf, summary.json. Class ``--empty`` (1-based) gets no folder (too few
# particles); ``--stale-top`` also leaves an older top-level map.mrc of an earlier one-class run;
# ``--no-summary`` writes no summary.json.
CLASSES_CHILD = textwrap.dedent("""
    import json, os, sys, time, pathlib
    import numpy as np
    from cryospin_relion.io.mrc import write_mrc
    a = sys.argv[1:]
    out = pathlib.Path(a[a.index("--o") + 1])
    k = int(a[a.index("--classes") + 1]) if "--classes" in a else 1
    empty = int(a[a.index("--empty") + 1]) if "--empty" in a else 0
    out.mkdir(parents=True, exist_ok=True)
    if "--stale-top" in a:
        write_mrc(out / "map.mrc", np.zeros((8, 8, 8), np.float32), 3.0)
        os.utime(out / "map.mrc", (time.time() - 100, time.time() - 100))
    n = 12
    others = [c for c in range(1, k + 1) if c != empty]
    cls = [empty if (empty and i == 0) else others[i % len(others)] for i in range(n)]
    if k == 1:
        for f in ("map.mrc", "half1_map.mrc", "half2_map.mrc"):
            write_mrc(out / f, np.ones((8, 8, 8), np.float32), 3.0)
    for c in range(1, k + 1):
        if k > 1 and c != empty:
            d = out / f"class{c:03d}"
            d.mkdir(exist_ok=True)
            for f in ("map.mrc", "half1_map.mrc", "half2_map.mrc"):
                write_mrc(d / f, np.full((8, 8, 8), c, np.float32), 3.0)
    rows = [f"{i + 1:06d}@Data/stack.mrcs 0 0 0 1 {cls[i]}" for i in range(n)]
    (out / "particles.star").write_text("\\n".join([
        "# version 30001", "", "data_optics", "", "loop_", "_rlnOpticsGroupName #1", "_rlnOpticsGroup #2",
        "_rlnImagePixelSize #3", "_rlnImageSize #4", "opticsGroup1 1 3.0 8", "", "# version 30001", "",
        "data_particles", "", "loop_", "_rlnImageName #1", "_rlnAngleRot #2", "_rlnAngleTilt #3", "_rlnAnglePsi #4",
        "_rlnOpticsGroup #5", "_rlnClassNumber #6", *rows, ""]))
    (out / "logfile.pdf").write_bytes(b"%PDF-1.4\\n%%EOF\\n")
    summ = {"classes": [{"class": c, "n_particles": cls.count(c), "resolution_A": None if c == empty else 9.0,
                         "map": None if c == empty else f"class{c:03d}/map.mrc"} for c in range(1, k + 1)]}
    if "--no-summary" not in a:
        pathlib.Path(a[a.index("--json-summary") + 1]).write_text(json.dumps(summ))
""")

KNOWN_K = dict(KNOWN, classes=True, empty=True, **{"stale-top": False, "no-summary": False, "json-summary": True})


def _class_nodes(job: str, k: int, skip: tuple[int, ...] = ()) -> dict[str, int]:
    """The nodes a K-class job registers: particles (3), each class's map (6) and half map 1 (10), log (13)."""
    nodes = {f"{job}particles.star": 3, f"{job}logfile.pdf": 13}
    for c in range(1, k + 1):
        if c not in skip:
            nodes.update({f"{job}class{c:03d}/map.mrc": 6, f"{job}class{c:03d}/half1_map.mrc": 10})
    return nodes


def test_classes_parameter_is_passed_and_checked(project):
    (project / "child.py").write_text(CLASSES_CHILD)
    base = [sys.executable, "child.py"]
    argv = ["--o", "External/job002/", "--in_parts", "parts.star", "--classes", "3", "--heads", "2"]
    _, cmd = ej.build_command(argv, KNOWN_K, base)
    assert cmd[cmd.index("--classes") + 1] == "3" and cmd.count("--classes") == 1
    _, cmd = ej.build_command(argv[:4], KNOWN_K, base)
    assert "--classes" not in cmd  # not given: abinit's default (or the YAML config's) holds
    for bad in ("0", "two", "-1"):
        with pytest.raises(ej.JobFailed, match="'classes' must be a whole number >= 1") as e:
            ej.build_command(argv[:4] + ["--classes", bad], KNOWN_K, base)
        assert e.value.code == 2
    # an abinit without --classes: K = 1 runs as before, K > 1 is refused
    _, cmd = ej.build_command(argv[:4] + ["--classes", "1"], KNOWN, base)
    assert "--classes" not in cmd
    with pytest.raises(ej.JobFailed, match="has no --classes option"):
        ej.build_command(argv[:4] + ["--classes", "2"], KNOWN, base)


def test_k_classes_register_every_class_map_and_one_particles_node(project, capsys):
    (project / "child.py").write_text(CLASSES_CHILD)
    job = project / "External/job002"
    run = lambda *extra: ej.run_job(["--o", "External/job002/", "--in_parts", "parts.star", *extra, "--j", "1"],
                                    base_command=[sys.executable, "child.py"], known_options=KNOWN_K, poll=0.05)
    assert run("--classes", "3", "--empty", "2") == 0
    rows = read_output_nodes(job / "RELION_OUTPUT_NODES.star")
    assert {r[0]: r[1] for r in rows} == _class_nodes("External/job002/", 3, skip=(2,))
    assert [r[0] for r in rows][0] == "External/job002/particles.star"  # one particles node, first
    assert {r[2] for r in rows if r[1] == 6} == {"DensityMap.mrc"}
    out = capsys.readouterr().out
    assert "class002 (1 particles) has no maps" in out
    assert (job / EXIT_SUCCESS).exists()
    # K = 1 in the same folder later, its summary written elsewhere: the top-level map, newer than the
    # K = 3 run's summary.json and class maps, wins; no class node
    assert run("--classes", "1", "--no-summary") == 0
    assert {r[0] for r in read_output_nodes(job / "RELION_OUTPUT_NODES.star")} == {
        f"External/job002/{f}" for f in ("particles.star", "map.mrc", "half1_map.mrc", "logfile.pdf")}
    # and the reverse: class maps newer than a stale top-level map.mrc; summary.json names the classes
    # (class003/ of the first run stays in the folder and is not registered)
    assert run("--classes", "2", "--stale-top") == 0
    assert {r[0]: r[1] for r in read_output_nodes(job / "RELION_OUTPUT_NODES.star")} == _class_nodes(
        "External/job002/", 2)
    # without summary.json: the class folders with a map.mrc, newer than the top-level map
    shutil.rmtree(job / "class003")
    (job / "summary.json").unlink()
    assert run("--classes", "2", "--stale-top", "--no-summary") == 0
    assert {r[0]: r[1] for r in read_output_nodes(job / "RELION_OUTPUT_NODES.star")} == _class_nodes(
        "External/job002/", 2)
    # a class the summary gives a map that is not there fails the job
    (project / "child.py").write_text(CLASSES_CHILD + "\nimport shutil; shutil.rmtree(out / 'class002')\n")
    assert run("--classes", "2") == 1
    assert (job / EXIT_FAILURE).exists() and "did not write class002/map.mrc" in capsys.readouterr().err


def _external_script(project: Path, child: str, known: dict[str, bool]) -> Path:
    """An External-job executable running the real wrapper (run_job) with a stand-in abinit."""
    (project / "classes_child.py").write_text(child)
    exe = project / "cryospin_classes_job.py"
    exe.write_text(f"#!{sys.executable}\nimport sys\nfrom relion_wrappers import external_job as ej\n"
                   f"sys.exit(ej.run_job(sys.argv[1:], base_command=[{sys.executable!r}, 'classes_child.py'], "
                   f"known_options={known!r}, poll=0.1))\n")
    exe.chmod(0o755)
    return exe


@pytest.fixture(scope="module")
def bare_relion_project(tmp_path_factory):
    """A RELION 3.1 project with a (text-only) particle STAR imported as Import/job001/particles.star."""
    if not HAVE_RELION:
        pytest.skip("needs RELION")
    root = tmp_path_factory.mktemp("relion_k") / "project"
    root.mkdir()
    (root / "default_pipeline.star").write_text(
        "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n\n")
    (root / "Data").mkdir()
    (root / "Data/particles.star").write_text(
        "# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n"
        "_rlnImagePixelSize #3\n_rlnImageSize #4\n_rlnImageDimensionality #5\n_rlnVoltage #6\n"
        "_rlnSphericalAberration #7\n_rlnAmplitudeContrast #8\nopticsGroup1 1 3.0 8 2 300 2.7 0.1\n\n"
        "# version 30001\n\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnOpticsGroup #2\n"
        "000001@Data/stack.mrcs 1\n")
    r = pipeliner(root, "--addJob", "Import", "--addJobOptions",
                  "fn_in_other == Data/particles.star;node_type == Particles STAR file (.star);do_other == Yes;"
                  "do_raw == No")
    assert r.returncode == 0, r.stdout + r.stderr
    run_jobs(root, "Import/job001/")
    assert read_pipeline(root) == ({"Import/job001/": 2}, {"Import/job001/particles.star": 3})
    return root


@pytest.mark.relion
@pytest.mark.skipif(not HAVE_RELION, reason="RELION binaries (relion_pipeliner) not on PATH")
def test_relion_accepts_the_nodes_of_a_k_class_job(bare_relion_project):
    """RELION 3.1.3's relion_pipeliner runs an External job through the real wrapper (stand-in abinit writing
    the K = 3 layout, class 2 without maps): Succeeded, and every class map and half map registered in
    default_pipeline.star and under .Nodes/, with the one particles node and the log."""
    project = bare_relion_project
    exe = _external_script(project, CLASSES_CHILD, KNOWN_K)
    before = set(read_pipeline(project)[0])
    opts = [f"fn_exe == {exe}", "in_part == Import/job001/particles.star", "nr_threads == 1",
            "param1_label == classes", "param1_value == 3", "param2_label == empty", "param2_value == 2"]
    r = pipeliner(project, "--addJob", "External", "--addJobOptions", ";".join(opts))
    assert r.returncode == 0, r.stdout + r.stderr
    (job,) = set(read_pipeline(project)[0]) - before
    run_jobs(project, job)
    procs, nodes = read_pipeline(project)
    d = project / job
    assert procs[job] == 2, f"{STATUS_31.get(procs[job])}; run.err:\n{(d / 'run.err').read_text()}"
    want = _class_nodes(job, 3, skip=(2,))
    assert {k: v for k, v in nodes.items() if k.startswith(job)} == want
    for name, kind in want.items():
        assert (project / ".Nodes" / str(kind) / name).exists(), name
    assert "--classes 3" in (d / "run.out").read_text()


@relion_test
def test_relion_external_job_with_two_classes(relion_project):
    """The real ``cryospin abinit --classes 2`` through RELION: every class map that was written is registered
    (map 6, half map 10), one particles node whose rlnClassNumber are 1..2, no top-level map."""
    if "classes" not in ej.abinit_options():
        pytest.skip("cryospin abinit has no --classes yet")
    project = relion_project
    job = add_external(project, dict(TINY, box="16", classes="2"))
    run_jobs(project, job)
    procs, nodes = read_pipeline(project)
    d = project / job
    assert procs[job] == 2, f"{STATUS_31.get(procs[job])}; run.err:\n{(d / 'run.err').read_text()}"
    assert "--classes 2" in (d / "run.out").read_text()
    maps = [c for c in (1, 2) if (d / f"class{c:03d}" / "map.mrc").is_file()]
    assert maps and not (d / "map.mrc").exists()
    want = _class_nodes(job, 2, skip=tuple(c for c in (1, 2) if c not in maps))
    assert {k: v for k, v in nodes.items() if k.startswith(job)} == want
    classes = starfile.read(d / "particles.star")["particles"]["rlnClassNumber"].to_numpy()
    assert len(classes) == N_PARTICLES and set(classes.tolist()) <= {1, 2}
    for c in maps:
        with mrcfile.open(d / f"class{c:03d}" / "map.mrc", header_only=True) as m:
            assert int(m.header.nx) == BOX and abs(float(m.voxel_size.x) - APIX) < 1e-3
