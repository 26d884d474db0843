"""cs_tools: cryoSPARC Dataset conversions (on real .cs files) and the cryospin-cryosparc command.

No cryoSPARC server exists here: the server layer is replaced by an in-memory
stand-in (FakeServer) and the only network use is a refused connection to a
closed localhost port.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cryosparc.dataset import Dataset

from cryospin_relion.errors import InputError
from cryospin_relion.geometry.rotations import cryosparc_pose_to_relion, geodesic_distance_deg
from cryospin_relion.io.cs import save_cs
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.read import read_particles, write_particles
from cs_tools import convert
from cs_tools import external_job as ej

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def p12(shared_data):
    path = shared_data / "cryodrgn" / "cryosparc_P12_J24_001_particles.cs"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="module")
def empiar(shared_data):
    path = shared_data / "cryodrgn" / "empiar_10076_7.cs"
    if not path.is_file() or not (path.parent / "empiar_10076_7.mrc").is_file():
        pytest.skip(f"{path} (+ empiar_10076_7.mrc) not found")
    return path


def _new_poses(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    R = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)
    shifts = rng.uniform(-12, 12, size=(n, 2))
    halves = rng.integers(1, 3, size=n)
    return R, shifts, halves


def _s(v) -> str:
    return v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "O" or b.dtype.kind == "O":
        return [str(v) for v in a.ravel()] == [str(v) for v in b.ravel()]
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


# -- particles output ----------------------------------------------------------------------


def test_particles_output_keeps_every_field_and_has_cryosparc_dtypes(p12, shared_data, tmp_path):
    ds = Dataset.load(p12)
    R, sh, halves = _new_poses(len(ds))
    out = convert.particles_output(ds, R, sh, halves)
    assert len(out) == len(ds)
    assert set(ds.fields()) <= set(out.fields())
    changed = {f[0] for f in convert.ALIGN_FIELDS}
    for f in ds.fields():
        if f not in changed:
            assert _same(out[f], ds[f]), f
    # dtypes and shapes as in a real cryoSPARC file (4k_dataset.cs header)
    ref = dict((d[0], d[1:]) for d in Dataset.load(shared_data / "cryosparc-tools" / "4k_dataset.cs").descr())
    got = dict((d[0], d[1:]) for d in out.descr())
    for f in changed:
        assert got[f] == ref[f], (f, got[f], ref[f])
    assert out["alignments3D/pose"].shape == (len(ds), 3) and out["alignments3D/shift"].shape == (len(ds), 2)
    assert set(np.unique(out["alignments3D/split"]).tolist()) == {0, 1}
    # saved .cs loads with numpy.load and Dataset.load
    path = save_cs(out, tmp_path / "out.cs")
    arr = np.load(path)
    assert arr.dtype.names is not None and len(arr) == len(ds)
    np.testing.assert_array_equal(arr["alignments3D/pose"], out["alignments3D/pose"])
    back = Dataset.load(path)
    assert back.fields() == out.fields() and _same(back["uid"], ds["uid"])


def test_pose_formulas_match_the_star_of_the_same_table(p12, tmp_path):
    table = read_particles(p12, check_stacks=False)
    ds = table.raw
    R, sh, halves = _new_poses(len(table), seed=3)
    out = convert.particles_output(ds, R, sh, halves, psize_A=table.apix)
    star = tmp_path / "same.star"
    write_particles(table.with_poses(R, sh, halves), star)
    st = read_particles(star, check_stacks=False)
    # documented formulas: A = exp(pose)^T ; origin_A = shift_px * psize_A ; subset = split + 1
    A = cryosparc_pose_to_relion(out["alignments3D/pose"].astype(np.float64))
    import torch

    ang = geodesic_distance_deg(torch.as_tensor(A), torch.as_tensor(st.rotations)).numpy()
    assert ang.max() < 1e-4, ang.max()
    origin = out["alignments3D/shift"].astype(np.float64) * out["alignments3D/psize_A"][:, None]
    assert np.abs(origin - st.shifts_A).max() < 1e-4
    np.testing.assert_array_equal(out["alignments3D/split"].astype(int) + 1, st.subset)


def test_pose_formulas_against_scipy_and_raw_star_columns(p12, tmp_path):
    """Independent of the package's rotation code: scipy + the STAR's own Euler columns."""
    Rot = pytest.importorskip("scipy.spatial.transform").Rotation
    starfile = pytest.importorskip("starfile")
    table = read_particles(p12, check_stacks=False)
    R, sh, halves = _new_poses(len(table), seed=5)
    out = convert.particles_output(table.raw, R, sh, halves)
    star = tmp_path / "raw.star"
    write_particles(table.with_poses(R, sh, halves), star)
    df = starfile.read(star)["particles"]
    eul = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(float)
    A_star = Rot.from_euler("ZYZ", eul, degrees=True).as_matrix().transpose(0, 2, 1)
    A_cs = Rot.from_rotvec(out["alignments3D/pose"].astype(np.float64)).as_matrix().transpose(0, 2, 1)
    M = np.einsum("nji,njk->nik", A_star, A_cs)
    ang = np.degrees(np.arccos(np.clip((np.trace(M, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert ang.max() < 1e-4 * 5, ang.max()  # arccos near 1 loses digits: 5e-4 deg bound
    origin = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(float)
    np.testing.assert_allclose(out["alignments3D/shift"] * out["alignments3D/psize_A"][:, None], origin, atol=1e-4)


def test_unchanged_poses_round_trip_and_agree_with_io_write_cs(p12, tmp_path):
    table = read_particles(p12, check_stacks=False)
    ds = table.raw
    out = convert.particles_output(ds, table.rotations, table.shifts_A, table.halves())
    # same rotations (cryoSPARC also stores rotation vectors of norm > pi: compare matrices)
    A_out = cryosparc_pose_to_relion(out["alignments3D/pose"].astype(np.float64))
    A_in = cryosparc_pose_to_relion(ds["alignments3D/pose"].astype(np.float64))
    assert np.abs(A_out - A_in).max() < 1e-5
    np.testing.assert_allclose(out["alignments3D/shift"], ds["alignments3D/shift"], atol=1e-4)
    np.testing.assert_array_equal(out["alignments3D/split"], ds["alignments3D/split"])
    # the I/O writer (cryospin convert, abinit's particles.cs) gives the same fields
    R, sh, halves = _new_poses(len(table), seed=7)
    write_particles(table.with_poses(R, sh, halves), tmp_path / "io.cs")
    io = Dataset.load(tmp_path / "io.cs")
    mine = convert.particles_output(ds, R, sh, halves, psize_A=table.apix)
    for f, *_ in convert.ALIGN_FIELDS:
        np.testing.assert_allclose(io[f], mine[f], atol=1e-6, err_msg=f)


def test_particles_from_result_match_by_uid(p12, tmp_path):
    ds = Dataset.load(p12)
    R, sh, halves = _new_poses(len(ds), seed=11)
    want = convert.particles_output(ds, R, sh, halves)
    perm = np.random.default_rng(0).permutation(len(ds))
    shuffled = want.take(perm)
    got = convert.particles_output_from_result(ds, shuffled)
    for f in want.fields():
        assert _same(got[f], want[f]), f
    with pytest.raises(InputError, match="missing"):
        convert.particles_output_from_result(ds, want.take(np.arange(len(ds) - 3)))


def test_result_particles_from_star_only(p12, tmp_path):
    table = read_particles(p12, check_stacks=False)
    R, sh, halves = _new_poses(len(table), seed=13)
    outdir = tmp_path / "abinit"
    outdir.mkdir()
    for name in convert.VOLUME_SLOTS.values():
        write_mrc(outdir / name, np.zeros((4, 4, 4), np.float32), 2.0)
    write_particles(table.with_poses(R, sh, halves), outdir / "particles.star")
    got = convert.result_particles(convert.abinit_outputs(outdir), table.raw)
    A = cryosparc_pose_to_relion(got["alignments3D/pose"].astype(np.float64))
    assert np.abs(A - R).max() < 1e-5
    np.testing.assert_allclose(got["alignments3D/shift"] * got["alignments3D/psize_A"][:, None], sh, atol=1e-4)


def test_fill_allocated_like_a_server_allocation(p12, shared_data):
    ds = Dataset.load(p12)
    R, sh, halves = _new_poses(len(ds), seed=17)
    built = convert.particles_output(ds, R, sh, halves)
    template = [d for d in Dataset.load(shared_data / "cryosparc-tools" / "4k_dataset.cs").descr()
                if d[0].startswith("alignments3D/")]
    alloc = Dataset({"uid": built["uid"][::-1].copy()}).add_fields(template)
    filled = convert.fill_allocated(alloc, built)
    rows = np.arange(len(ds))[::-1]
    for f, *_ in convert.ALIGN_FIELDS:
        np.testing.assert_array_equal(filled[f], built[f][rows])
    assert (filled["alignments3D/class_posterior"] == 1).all() and (filled["alignments3D/class"] == 0).all()


# -- volumes -------------------------------------------------------------------------------


def test_volume_output_references_maps_and_psize(tmp_path):
    paths, shapes = {}, {}
    for slot, name in convert.VOLUME_SLOTS.items():
        write_mrc(tmp_path / name, np.random.default_rng(0).normal(size=(8, 8, 8)), 5.9)
        shapes[slot], vs = convert.volume_info(tmp_path / name, convert.expected_voxel_size(2.95, 16, 8))
        assert vs == pytest.approx(5.9, rel=1e-6)
        paths[slot] = f"J99/cryospin_{name}"
    ds = convert.volume_output(paths, shapes, 5.9, uid=42)
    save_cs(ds, tmp_path / "vol.cs")
    for loaded in (Dataset.load(tmp_path / "vol.cs"), np.load(tmp_path / "vol.cs")):
        assert len(loaded) == 1 and int(loaded["uid"][0]) == 42
        assert _s(loaded["map/path"][0]) == "J99/cryospin_map.mrc"
        assert _s(loaded["map_half_A/path"][0]) == "J99/cryospin_half1_map.mrc"
        assert _s(loaded["map_half_B/path"][0]) == "J99/cryospin_half2_map.mrc"
        assert list(loaded["map/shape"][0]) == [8, 8, 8]
        assert float(loaded["map_half_B/psize_A"][0]) == pytest.approx(5.9)


def test_volume_info_sets_unset_voxel_size_and_refuses_a_wrong_one(tmp_path):
    write_mrc(tmp_path / "v.mrc", np.ones((6, 6, 6)), None)
    shape, vs = convert.volume_info(tmp_path / "v.mrc", 1.31)
    assert shape == (6, 6, 6) and vs == pytest.approx(1.31)
    import mrcfile

    with mrcfile.open(tmp_path / "v.mrc", permissive=True) as m:
        assert float(m.voxel_size.x) == pytest.approx(1.31, rel=1e-5)
    with pytest.raises(InputError, match="expected"):
        convert.volume_info(tmp_path / "v.mrc", 2.0)


# -- paths ---------------------------------------------------------------------------------


def test_exported_paths_map_to_the_project_folder(shared_data, tmp_path):
    ds = Dataset.load(shared_data / "cryodrgn" / "cryosparc_J2_particles_exported.cs")
    assert str(ds["blob/path"][0]).startswith(">")
    stacks = convert.stack_paths(ds)
    assert stacks and all(not s.startswith(">") for s in stacks)
    loc = convert.localize_blob_paths(ds, tmp_path / "P7")
    assert all(str(p).startswith(str(tmp_path / "P7" / "J1")) for p in loc["blob/path"])
    assert _same(loc["blob/idx"], ds["blob/idx"]) and str(ds["blob/path"][0]).startswith(">")  # input untouched


def test_parse_output_ref():
    assert convert.parse_output_ref("J12.particles_selected") == ("J12", "particles_selected")
    assert convert.parse_output_ref("j5") == ("J5", "particles")
    with pytest.raises(InputError):
        convert.parse_output_ref("P3.J12")


# -- cryospin convert / abinit outputs load with numpy.load and Dataset.load ---------------


def test_cryospin_convert_output_loads(p12, shared_data, tmp_path):
    from cryospin_relion.cli import run

    star_in = shared_data / "cryodrgn" / "empiar_10076_7.star"
    for src, dst in ((p12, tmp_path / "p12.cs"), (star_in, tmp_path / "empiar.cs")):
        assert run(["convert", "--i", str(src), "--o", str(dst)]) == 0
        arr = np.load(dst)
        ds = Dataset.load(dst)
        assert len(arr) == len(ds) > 0 and "blob/path" in ds.fields()
    ds = Dataset.load(tmp_path / "p12.cs")
    assert set(Dataset.load(p12).fields()) <= set(ds.fields())
    assert ds["alignments3D/pose"].dtype == np.float32 and ds["alignments3D/pose"].shape[1:] == (3,)


@pytest.mark.slow
def test_cryospin_abinit_outputs_load(empiar, tmp_path):
    out = tmp_path / "abinit"
    cmd = convert.abinit_command(empiar, out, ["--box", "32", "--heads", "2", "--epochs-amortized", "1",
                                               "--epochs-autodecode", "1", "--seed", "0", "--quiet"])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=empiar.parent)
    assert r.returncode == 0, r.stderr[-2000:]
    outs = convert.abinit_outputs(out)
    assert outs.particles_cs is not None
    arr = np.load(outs.particles_cs)
    ds = Dataset.load(outs.particles_cs)
    assert len(arr) == len(ds) == 7
    built = convert.result_particles(outs, Dataset.load(empiar))
    assert set(Dataset.load(empiar).fields()) <= set(built.fields())
    for slot, path in outs.volumes.items():
        shape, vs = convert.volume_info(path)
        assert vs == pytest.approx(convert.expected_voxel_size(1.31, 320, shape[-1]), rel=2e-3), slot


# -- the command ---------------------------------------------------------------------------


def _script() -> list[str]:
    exe = shutil.which("cryospin-cryosparc")
    return [exe] if exe else [sys.executable, "-m", "cs_tools.external_job"]


def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRYOSPARC_")}
    env["HOME"] = str(tmp_path)  # no stored cryosparc-tools login
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    return env


def test_help_works():
    r = subprocess.run(_script() + ["--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for opt in ("--project", "--workspace", "--particles", "--lane", "--title", "--box", "--heads",
                "--epochs-amortized", "--epochs-autodecode", "--host", "--base-port", "--license", "--email"):
        assert opt in r.stdout


def test_missing_connection_settings_is_one_line_exit_2(tmp_path):
    r = subprocess.run(_script() + ["--project", "P3", "--workspace", "W1", "--particles", "J12.particles_selected"],
                       capture_output=True, text=True, timeout=120, env=_clean_env(tmp_path), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "host" in lines[0] and "CRYOSPARC_MASTER_HOSTNAME" in lines[0]
    assert "credentials" in lines[0] or "license" in lines[0]


def test_closed_port_is_one_line_exit_1(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(_script() + ["--project", "P3", "--workspace", "W1", "--particles", "J12", "--host",
                                    "127.0.0.1", "--base-port", str(port), "--email", "a@b.c", "--password", "x",
                                    "--license", "00000000-0000-0000-0000-000000000000", "--timeout", "5"],
                       capture_output=True, text=True, timeout=180, env=_clean_env(tmp_path), cwd=tmp_path)
    assert r.returncode in (1, 2), r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"127.0.0.1:{port}" in lines[0]


def test_connection_settings_from_environment_and_arguments(monkeypatch):
    from cs_tools import server

    p = ej.build_parser()
    a = p.parse_args(["--project", "P3", "--workspace", "W1", "--particles", "J12"])
    env = {"CRYOSPARC_MASTER_HOSTNAME": "em1", "CRYOSPARC_BASE_PORT": "61000", "CRYOSPARC_EMAIL": "u@x",
           "CRYOSPARC_PASSWORD": "pw", "CRYOSPARC_LICENSE_ID": "lic"}
    conn = ej.resolve_connection(a, env, saved_session=lambda *_: False)
    assert (conn["host"], conn["base_port"], conn["email"], conn["password"]) == ("em1", 61000, "u@x", "pw")
    a2 = p.parse_args(["--project", "P3", "--workspace", "W1", "--particles", "J12", "--host", "h2"])
    assert ej.resolve_connection(a2, {**env, "CRYOSPARC_BASE_URL": "http://x:1"}, lambda *_: False)["base_url"] is None
    # cryosparc-tools 5.x: a stored login replaces email/password
    conn = ej.resolve_connection(a2, {}, saved_session=lambda url, email: url == "http://h2:39000")
    assert conn["base_port"] == 39000
    # cryosparc-tools 4.x: license required as well
    monkeypatch.setattr(server, "constructor_keywords", lambda: {"license", "host", "base_port", "email", "password"})
    with pytest.raises(ej.ConnectionSettingsError, match="license"):
        ej.resolve_connection(a2, {"CRYOSPARC_EMAIL": "u", "CRYOSPARC_PASSWORD": "p"}, lambda *_: False)


def test_connect_passes_only_accepted_keywords(monkeypatch):
    from cs_tools import server

    seen = {}

    class Fake5:
        def __init__(self, base_url=None, *, host=None, base_port=None, email=None, password=None, license=None,
                     timeout=300):
            seen.update(base_url=base_url, host=host, base_port=base_port, email=email, license=license)

    monkeypatch.setattr(server, "_cryosparc_class", lambda: Fake5)
    server.connect({"base_url": None, "host": "h", "base_port": 39000, "email": "e", "password": "p",
                    "license": None, "timeout": 5})
    assert seen == dict(base_url=None, host="h", base_port=39000, email="e", license=None)

    class Fake4:
        def __init__(self, license=None, host="localhost", base_port=39000, email=None, password=None, timeout=300):
            seen.clear()
            seen.update(license=license, host=host, base_port=base_port)

    monkeypatch.setattr(server, "_cryosparc_class", lambda: Fake4)
    server.connect({"base_url": "http://em:61000", "host": None, "base_port": None, "email": "e", "password": "p",
                    "license": "L", "timeout": 5})
    assert seen == dict(license="L", host="em", base_port=61000)


# -- the whole job against an in-memory stand-in for the server -----------------------------

FAKE_ABINIT = textwrap.dedent('''
    import sys, numpy as np
    from pathlib import Path
    from cryosparc.dataset import Dataset
    from cryospin_relion.io.mrc import write_mrc
    from cryospin_relion.geometry.rotations import relion_to_cryosparc_pose
    args = sys.argv[1:]
    i, o = Path(args[args.index("--i") + 1]), Path(args[args.index("--o") + 1])
    print("fake abinit", " ".join(args), flush=True)
    if "--fail" in args:
        print("fake abinit: error: boom", flush=True); sys.exit(2)
    ds = Dataset.load(i)
    assert Path(str(ds["blob/path"][0])).is_file()
    o.mkdir(parents=True, exist_ok=True)
    n, box, ps = len(ds), int(ds["blob/shape"][0][-1]), float(ds["blob/psize_A"][0])
    k = int(args[args.index("--classes") + 1]) if "--classes" in args else 1
    # K >= 3: rows in classes 0, 1, 0, 1, ..., the last row in class 2, which then has no maps (too small);
    # classes 3.. are empty (listed in the summary only)
    cls = np.array([i % 2 for i in range(n - 1)] + [2]) if k > 1 else None
    folders = [o] if k == 1 else [o / "class001", o / "class002"]
    if k > 1:
        import json
        summary = Path(args[args.index("--json-summary") + 1])
        summary.write_text(json.dumps({"classes": [{"class": c, "n_particles": int((cls == c - 1).sum())}
                                                   for c in range(1, k + 1)]}))
    for c, d in enumerate(folders):
        d.mkdir(exist_ok=True)
        for name in ("map.mrc", "half1_map.mrc", "half2_map.mrc"):
            write_mrc(d / name, np.full((8, 8, 8), c, np.float32), ps * box / 8)
        (d / "fsc.txt").write_text(f"{c} 1\\n")
    ds.add_fields([("alignments3D/split", "u4"), ("alignments3D/shift", "f4", (2,)),
                   ("alignments3D/pose", "f4", (3,)), ("alignments3D/psize_A", "f4")])
    ds["alignments3D/pose"] = relion_to_cryosparc_pose(np.tile(np.eye(3), (n, 1, 1))).astype(np.float32)
    ds["alignments3D/shift"] = np.full((n, 2), 0.5, np.float32)
    ds["alignments3D/psize_A"] = np.full(n, ps, np.float32)
    ds["alignments3D/split"] = (np.arange(n) % 2).astype(np.uint32)
    if cls is not None:
        ds.add_fields([("alignments3D/class", "u4"), ("alignments3D/class_posterior", "f4"),
                       ("alignments3D/class_ess", "f4")])
        ds["alignments3D/class"] = cls.astype(np.uint32)
        ds["alignments3D/class_posterior"] = 1.0
        ds["alignments3D/class_ess"] = 1.0
    ds.take(np.arange(n)[::-1]).save(o / "particles.cs")
''')


class FakeJob:
    def __init__(self, uid, input_ds):
        self.uid, self.input_ds = uid, input_ds
        self.logs, self.uploads, self.outputs, self.saved = [], {}, {}, {}
        self.state = "building"


def make_fake_server(input_ds, project_dir, template):
    from contextlib import contextmanager

    from cs_tools import server as real

    job = FakeJob("J99", input_ds)
    calls = []

    @contextmanager
    def running(j):
        j.state = "running"
        try:
            yield j
        except Exception as e:
            j.state = f"failed: {e}"
            raise
        j.state = "completed"

    def add_particles_output(j, like, name=real.PARTICLES_OUTPUT, title=None):
        calls.append(("add_output", "particle", name))
        return Dataset({"uid": like["uid"]}).add_fields(template)

    def add_volume_output(j, name=real.VOLUME_OUTPUT, title=None):
        calls.append(("add_output", "volume", name))
        return Dataset.allocate(1, [(f"{s}/{k}", *t) for s in convert.VOLUME_SLOTS
                                    for k, *t in (("path", "O"), ("shape", "u4", (3,)), ("psize_A", "f4"))])

    fake = SimpleNamespace(
        VOLUME_OUTPUT=real.VOLUME_OUTPUT, PARTICLES_OUTPUT=real.PARTICLES_OUTPUT,
        has_saved_session=lambda *a: False,
        connect=lambda conn: calls.append(("connect", conn["host"])) or "cs",
        find_project=lambda cs, uid: calls.append(("project", uid)) or SimpleNamespace(uid=uid),
        project_dir=lambda p: str(project_dir),
        create_job=lambda p, w, t: calls.append(("create", w, t)) or job,
        job_uid=lambda j: j.uid,
        connect_particles=lambda j, sj, so: calls.append(("connect_input", sj, so)),
        load_particles=lambda j: j.input_ds,
        running=running,
        log=lambda j, text, level="text": j.logs.append((level, text)),
        download=lambda p, rel, target: None,
        upload=lambda j, name, local: j.uploads.setdefault(name, Path(local).read_bytes()) and f"{j.uid}/{name}",
        add_volume_output=add_volume_output,
        add_particles_output=add_particles_output,
        save_output=lambda j, name, ds: j.saved.__setitem__(name, ds),
    )
    return fake, job, calls


def _run_fake(empiar, shared_data, tmp_path, monkeypatch, extra=(), real_abinit=False):
    if not real_abinit:
        script = tmp_path / "fake_abinit.py"
        script.write_text(FAKE_ABINIT)
        monkeypatch.setattr(convert, "abinit_command",
                            lambda i, o, more=(), gpus=1: [sys.executable, str(script), "--i", str(i), "--o", str(o), *more])
    ds = Dataset.load(empiar)
    template = [d for d in Dataset.load(shared_data / "cryosparc-tools" / "4k_dataset.cs").descr()
                if d[0].startswith("alignments3D/")]
    fake, job, calls = make_fake_server(ds, empiar.parent, template)
    args, unknown = ej.build_parser().parse_known_args(
        ["--project", "P3", "--workspace", "W1", "--particles", "J12.particles_selected", "--host", "h",
         "--email", "e", "--password", "p", "--box", "8", "--lane", "gpu", "--workdir", str(tmp_path / "work"),
         *extra])
    return fake, job, calls, args, unknown, ds


def test_run_job_with_stand_in_server(empiar, shared_data, tmp_path, monkeypatch):
    fake, job, calls, args, unknown, ds = _run_fake(empiar, shared_data, tmp_path, monkeypatch)
    assert ej.run_job(args, unknown, server=fake, environ={}) == 0
    assert job.state == "completed"
    assert ("connect_input", "J12", "particles_selected") in calls and ("create", "W1", "cryoSPIN ab-initio") in calls
    vol = job.saved["volume"]
    assert str(vol["map/path"][0]) == "J99/cryospin_map.mrc"
    assert str(vol["map_half_A/path"][0]) == "J99/cryospin_half1_map.mrc"
    assert str(vol["map_half_B/path"][0]) == "J99/cryospin_half2_map.mrc"
    assert float(vol["map/psize_A"][0]) == pytest.approx(1.31 * 320 / 8, rel=1e-4)
    assert set(job.uploads) == {"cryospin_map.mrc", "cryospin_half1_map.mrc", "cryospin_half2_map.mrc",
                                "cryospin_fsc.txt"}
    parts = job.saved["particles"]
    assert _same(parts["uid"], ds["uid"]) and (parts["alignments3D/shift"] == 0.5).all()
    np.testing.assert_array_equal(parts["alignments3D/split"], np.arange(len(ds))[::-1] % 2)  # matched by uid
    assert any("--box 8" in t for _, t in job.logs) and any(lv == "warning" and "lane" in t for lv, t in job.logs)
    local = Dataset.load(tmp_path / "work" / "particles_with_poses.cs")
    assert set(ds.fields()) <= set(local.fields())


@pytest.mark.slow
def test_run_job_with_real_abinit_and_stand_in_server(empiar, shared_data, tmp_path, monkeypatch):
    fake, job, calls, args, unknown, ds = _run_fake(
        empiar, shared_data, tmp_path, monkeypatch, real_abinit=True,
        extra=["--heads", "2", "--epochs-amortized", "1", "--epochs-autodecode", "1", "--seed", "0", "--quiet"])
    assert ej.run_job(args, unknown, server=fake, environ={}) == 0, job.logs[-5:]
    assert job.state == "completed"
    vol = job.saved["volume"]
    n = int(vol["map/shape"][0][-1])
    # abinit writes its maps at the particles' box and pixel size (refinement takes them as they are)
    assert n == 320 and float(vol["map/psize_A"][0]) == pytest.approx(1.31, rel=2e-3)
    parts = job.saved["particles"]
    assert _same(parts["uid"], ds["uid"])
    A = cryosparc_pose_to_relion(parts["alignments3D/pose"].astype(np.float64))
    assert np.allclose(np.einsum("nij,nkj->nik", A, A), np.eye(3), atol=1e-5)
    assert set(np.unique(parts["alignments3D/split"]).tolist()) <= {0, 1}
    # the run's per-particle loss reaches cryoSPARC where its own jobs keep theirs (lifecycle/scores.py)
    assert (parts["alignments3D/error"] > 0).all()
    # the uploaded maps are the abinit maps, with the voxel size in their headers
    import mrcfile

    local = tmp_path / "work" / "abinit" / "map.mrc"
    assert job.uploads["cryospin_map.mrc"] == local.read_bytes()
    with mrcfile.open(local, permissive=True) as m:
        assert float(m.voxel_size.x) == pytest.approx(float(vol["map/psize_A"][0]), rel=1e-5)


def test_run_job_with_classes_saves_one_volume_and_one_particle_output_per_class(empiar, shared_data, tmp_path,
                                                                                monkeypatch):
    """--classes 4 (stand-in abinit: 7 particles in classes 0, 1, 0, 1, 0, 1, 2; class 2 too small for maps,
    class 3 empty): volume_class_0/1 with that class's maps, particles_class_0/1/2 with exactly that class's
    rows, nothing for class 3 but a warning."""
    fake, job, calls, args, unknown, ds = _run_fake(empiar, shared_data, tmp_path, monkeypatch,
                                                    extra=["--classes", "4"])
    assert args.classes == 4 and "--classes 4" in " ".join(ej.abinit_args(args, unknown))
    assert ej.run_job(args, unknown, server=fake, environ={}) == 0, job.logs[-5:]
    assert job.state == "completed"
    outputs = [c[1:] for c in calls if c[0] == "add_output"]
    assert outputs == [("volume", "volume_class_0"), ("particle", "particles_class_0"),
                       ("volume", "volume_class_1"), ("particle", "particles_class_1"),
                       ("particle", "particles_class_2")]
    assert set(job.saved) == {"volume_class_0", "particles_class_0", "volume_class_1", "particles_class_1",
                              "particles_class_2"}
    # each volume row references that class's uploaded maps (the stand-in fills class k's maps with k)
    import mrcfile

    for k in (0, 1):
        vol = job.saved[f"volume_class_{k}"]
        folder = f"class{k + 1:03d}"
        assert len(vol) == 1
        for slot, name in convert.VOLUME_SLOTS.items():
            assert str(vol[f"{slot}/path"][0]) == f"J99/cryospin_{folder}_{name}"
            local = tmp_path / "work" / "abinit" / folder / name
            assert job.uploads[f"cryospin_{folder}_{name}"] == local.read_bytes()
            with mrcfile.open(local, permissive=True) as m:
                assert float(m.data.mean()) == k
        assert float(vol["map/psize_A"][0]) == pytest.approx(1.31 * 320 / 8, rel=1e-4)
        assert f"cryospin_{folder}_fsc.txt" in job.uploads
    assert not any("class003" in name for name in job.uploads) and "cryospin_map.mrc" not in job.uploads
    # each particle output: exactly the uids of that class, with its alignments3D/class and hard posterior
    want = {0: [0, 2, 4], 1: [1, 3, 5], 2: [6]}
    for k, rows in want.items():
        parts = job.saved[f"particles_class_{k}"]
        assert _same(np.sort(parts["uid"]), np.sort(ds["uid"][rows]))
        assert (parts["alignments3D/class"] == k).all() and (parts["alignments3D/class_posterior"] == 1).all()
        assert (parts["alignments3D/shift"] == 0.5).all()
        by_uid = dict(zip(ds["uid"].tolist(), range(len(ds))))
        np.testing.assert_array_equal(parts["alignments3D/split"], [by_uid[u] % 2 for u in parts["uid"].tolist()])
    assert sum(len(job.saved[f"particles_class_{k}"]) for k in want) == len(ds)
    assert any(lv == "warning" and "class003: 1 particles, no maps" in t for lv, t in job.logs)
    assert any(lv == "warning" and "class004: no particles: no particles_class_3 output" in t for lv, t in job.logs)
    local = Dataset.load(tmp_path / "work" / "particles_with_poses.cs")
    np.testing.assert_array_equal(local["alignments3D/class"], [0, 1, 0, 1, 0, 1, 2])


def test_class_outputs_from_a_star_only_result(p12, tmp_path):
    """A K-class result given as particles.star only: the classes come from rlnClassNumber - 1."""
    table = read_particles(p12, check_stacks=False)
    R, sh, halves = _new_poses(len(table), seed=19)
    classes = np.arange(len(table)) % 3
    outdir = tmp_path / "abinit"
    for c in (1, 2, 3):
        (outdir / f"class{c:03d}").mkdir(parents=True)
        for name in convert.VOLUME_SLOTS.values():
            write_mrc(outdir / f"class{c:03d}" / name, np.zeros((4, 4, 4), np.float32), 2.0)
    star = outdir / "particles.star"
    write_particles(table.with_poses(R, sh, halves).with_classes(classes), star)
    assert "rlnClassNumber" in star.read_text()
    outs = convert.abinit_outputs(outdir)
    assert outs.volumes == {} and [c.number for c in outs.classes] == [1, 2, 3]
    assert outs.classes[1].volumes["map_half_B"] == outdir / "class002" / "half2_map.mrc"
    got = convert.result_particles(outs, table.raw)
    np.testing.assert_array_equal(convert.particle_classes(got), classes)
    assert got["alignments3D/class"].dtype == np.uint32 and (got["alignments3D/class_posterior"] == 1).all()
    assert convert.class_output_names(2) == ("volume_class_2", "particles_class_2")
    # the same from the particles.cs the I/O layer writes (matched by uid, in any order)
    write_particles(table.with_poses(R, sh, halves).with_classes(classes), outdir / "particles.cs")
    got = convert.result_particles(convert.abinit_outputs(outdir), table.raw.take(np.arange(len(table))[::-1]))
    np.testing.assert_array_equal(convert.particle_classes(got), classes[::-1])
    (outdir / "particles.cs").unlink()
    # a one-class result keeps the top-level maps and adds no class field
    for name in convert.VOLUME_SLOTS.values():
        write_mrc(outdir / name, np.zeros((4, 4, 4), np.float32), 2.0)
    write_particles(table.with_poses(R, sh, halves), star)
    outs = convert.abinit_outputs(outdir)
    assert outs.classes is None and set(outs.volumes) == set(convert.VOLUME_SLOTS)
    # a class folder missing a map is an error naming it
    for name in convert.VOLUME_SLOTS.values():
        (outdir / name).unlink()
    (outdir / "class002" / "half1_map.mrc").unlink()
    with pytest.raises(InputError, match="class002/half1_map.mrc: abinit output missing"):
        convert.abinit_outputs(outdir)


def test_run_job_failure_marks_job_failed(empiar, shared_data, tmp_path, monkeypatch, capsys):
    fake, job, calls, args, unknown, ds = _run_fake(empiar, shared_data, tmp_path, monkeypatch, extra=["--fail"])
    with pytest.raises(RuntimeError, match="boom"):
        ej.run_job(args, unknown, server=fake, environ={})
    assert job.state.startswith("failed") and "volume" not in job.saved
    assert any("boom" in t for _, t in job.logs)


def test_connect_failure_marks_job_failed(empiar, shared_data, tmp_path, monkeypatch):
    fake, job, calls, args, unknown, ds = _run_fake(empiar, shared_data, tmp_path, monkeypatch)

    def no_output(j, sj, so):
        raise ValueError(f"Source job {sj} does not have output {so}")

    fake.connect_particles = no_output
    fake.fail = lambda j, msg: setattr(j, "state", f"failed: {msg}")
    with pytest.raises(RuntimeError, match="does not have output particles_selected"):
        ej.run_job(args, unknown, server=fake, environ={})
    assert job.state.startswith("failed") and "\n" not in job.state


def test_missing_stacks_named_in_one_line(empiar, shared_data, tmp_path, monkeypatch):
    fake, job, calls, args, unknown, ds = _run_fake(empiar, shared_data, tmp_path, monkeypatch,
                                                    extra=["--project-dir", str(tmp_path / "nowhere")])
    with pytest.raises(InputError, match="--download-stacks"):
        ej.run_job(args, unknown, server=fake, environ={})
    assert job.state.startswith("failed")


def test_run_command_forwards_lines_and_raises(tmp_path):
    lines = []
    convert.run_command([sys.executable, "-c", "print('a'); print('b')"], log=lines.append)
    assert lines == ["a", "b"]
    with pytest.raises(RuntimeError, match="bad thing"):
        convert.run_command([sys.executable, "-c", "import sys; print('bad thing'); sys.exit(3)"],
                            log=lines.append)


# -- server.py against the installed cryosparc-tools' real method signatures (offline) -----


class _SignatureChecked:
    """Stands in for a cryosparc-tools controller: every call must bind to the real method's
    signature (so a renamed or missing argument fails here), then returns a canned value."""

    def __init__(self, real_cls, returns=None, **attrs):
        self._real, self._returns, self.calls = real_cls, returns or {}, []
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        import inspect

        real = getattr(self._real, name)

        def call(*args, **kwargs):
            inspect.signature(real).bind(self, *args, **kwargs)
            self.calls.append((name, args, kwargs))
            ret = self._returns.get(name)
            return ret(*args, **kwargs) if callable(ret) else ret

        return call


def test_server_calls_bind_to_the_installed_cryosparc_tools(tmp_path, shared_data):
    from contextlib import contextmanager

    from cryosparc.controllers import as_input_slot, as_output_slot
    from cryosparc.controllers.job import ExternalJobController
    from cryosparc.controllers.project import ProjectController
    from cryosparc.models.job_spec import InputSpec, OutputSpec
    from cryosparc.tools import CryoSPARC

    from cs_tools import server

    ds = Dataset.load(shared_data / "cryodrgn" / "empiar_10076_7.cs")

    @contextmanager
    def run():
        yield

    job = _SignatureChecked(ExternalJobController, uid="J99", returns={
        "load_input": lambda *a, **k: ds, "run": lambda: run(),
        "add_output": lambda *a, **k: Dataset.allocate(1, []) if isinstance(k.get("alloc"), int) else
        Dataset({"uid": k["alloc"]["uid"]})})
    project = _SignatureChecked(ProjectController, returns={"create_external_job": lambda *a, **k: job})
    cs = _SignatureChecked(CryoSPARC, returns={"find_project": lambda *a, **k: project})

    assert server.find_project(cs, "P3") is project
    assert server.create_job(project, "W1", "cryoSPIN ab-initio") is job
    server.connect_particles(job, "J12", "particles_selected")
    assert server.load_particles(job) is ds
    with server.running(job):
        server.log(job, "hello", "warning")
    (tmp_path / "m.mrc").write_bytes(b"x")
    assert server.upload(job, "cryospin_map.mrc", tmp_path / "m.mrc") == "J99/cryospin_map.mrc"
    server.add_volume_output(job)
    server.add_particles_output(job, ds)
    server.save_output(job, "volume", Dataset.allocate(1, []))
    server.download(project, "J1/imported/a.mrcs", tmp_path / "a.mrcs")
    server.fail(job, "boom")
    names = [c[0] for c in job.calls]
    assert names == ["add_input", "connect", "load_input", "run", "log", "upload", "add_output", "add_output",
                     "save_output", "stop"]
    # the slot specs pass the library's own models
    add_input = job.calls[0]
    InputSpec(type="particle", title="Particles", description="",
              slots=[as_input_slot(s) for s in add_input[2]["slots"]], count_min=1, count_max=1)
    for name, args, kw in job.calls:
        if name == "add_output":
            OutputSpec(type=args[0], title=kw["title"], slots=[as_output_slot(s) for s in kw["slots"]],
                       passthrough=kw.get("passthrough"))
    vol = next(c for c in job.calls if c[0] == "add_output" and c[1][0] == "volume")
    assert [as_output_slot(s).name for s in vol[2]["slots"]] == ["map", "map_half_A", "map_half_B"]
    # K classes: several outputs of one type, told apart by names that cryosparc-tools' own check accepts
    import re

    from cryosparc.controllers.job import GROUP_NAME_PATTERN

    job.calls.clear()
    for k in (0, 1):
        vname, pname = convert.class_output_names(k)
        server.add_volume_output(job, name=vname, title=f"class {k}")
        server.add_particles_output(job, ds.take([k]), name=pname, title=f"class {k}")
    named = [(c[1][0], c[1][1], c[2]["title"]) for c in job.calls]
    assert named == [("volume", "volume_class_0", "class 0"), ("particle", "particles_class_0", "class 0"),
                     ("volume", "volume_class_1", "class 1"), ("particle", "particles_class_1", "class 1")]
    assert all(re.fullmatch(GROUP_NAME_PATTERN, n) for _, n, _ in named)
    for name, args, kw in job.calls:
        OutputSpec(type=args[0], title=kw["title"], slots=[as_output_slot(s) for s in kw["slots"]],
                   passthrough=kw.get("passthrough"))
