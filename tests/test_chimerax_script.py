"""open_in_chimerax.cxc: contour levels that enclose the expected volume, names and voxel sizes that match
the maps; the citation and version at the start of run.log."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cryospin_relion import CITATION, __version__, cli
from cryospin_relion.geometry.filters import lowpass
from cryospin_relion.geometry.threshold import (DALTON_VOLUME_A3, contour_level, enclosed_volume_A3,
                                                expected_volume_A3, level_for_volume, map_level)
from cryospin_relion.io.mrc import read_mrc, write_mrc
from cryospin_relion.lifecycle.outputs import CHIMERAX_SCRIPT, output_files, write_chimerax

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402

N, APIX = 48, 2.0


def _ellipsoid(axes=(10, 8, 6), n=N) -> np.ndarray:
    """A solid ellipsoid (semi-axes in voxels) about voxel n // 2, low-passed like a map (8 A)."""
    r = np.arange(n) - n // 2
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    a, b, c = axes
    solid = ((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2 <= 1).astype(np.float32)
    return lowpass(solid, 8.0, APIX)


def _volume(axes=(10, 8, 6)) -> float:
    a, b, c = axes
    return 4 / 3 * np.pi * a * b * c * APIX ** 3


def _parse(script: str) -> list[dict]:
    """Per ``volume`` line: model, name (from its ``open``), level, voxel size, origin index."""
    names = dict(re.findall(r"^open (\S+) id (\d+)$", script, re.M))
    names = {int(i): n for n, i in names.items()}
    out = []
    for m in re.finditer(r"^volume #(\d+) level (\S+) voxelSize (\S+) originIndex (\d+),(\d+),(\d+)", script, re.M):
        i = int(m[1])
        out.append({"id": i, "name": names[i], "level": float(m[2]), "voxel": float(m[3]),
                    "origin": tuple(int(m[k]) for k in (4, 5, 6))})
    return out


def test_protein_volume_constant():
    assert DALTON_VOLUME_A3 == pytest.approx(0.73 * 1.6605, rel=0.01)  # 0.73 cm^3/g partial specific volume
    assert expected_volume_A3(100) == pytest.approx(121_000)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_mw_level_encloses_the_mw_volume(noise):
    vol = _ellipsoid() + np.random.default_rng(0).normal(0, noise, (N, N, N)).astype(np.float32)
    mw = _volume() / DALTON_VOLUME_A3 / 1000  # kDa of a protein of the ellipsoid's volume
    level, rule = contour_level(vol, APIX, mw)
    assert "kDa" in rule
    assert enclosed_volume_A3(vol, APIX, level) == pytest.approx(expected_volume_A3(mw), rel=0.01)
    # and the object it encloses is the ellipsoid's (within 20%)
    assert enclosed_volume_A3(vol, APIX, level) == pytest.approx(_volume(), rel=0.2)
    # a volume larger than the box is clamped, not an error
    assert np.isfinite(level_for_volume(vol, APIX, 1e12))


@pytest.mark.parametrize("axes,noise", [((10, 8, 6), 0.0), ((10, 10, 10), 0.0), ((12, 7, 5), 0.05)])
def test_map_level_gives_a_plausible_volume(axes, noise):
    vol = _ellipsoid(axes) + np.random.default_rng(1).normal(0, noise, (N, N, N)).astype(np.float32)
    level, rule = contour_level(vol, APIX, None)
    assert level == map_level(vol) and "Otsu" in rule
    assert enclosed_volume_A3(vol, APIX, level) == pytest.approx(_volume(axes), rel=0.2)


@pytest.mark.parametrize("mw", [None, "fit"])
def test_script_on_written_maps(tmp_path, mw):
    maps = {"map.mrc": _ellipsoid(), "half1_map.mrc": _ellipsoid() * 2, "half2_map.mrc": _ellipsoid() + 0.1}
    for name, v in maps.items():
        write_mrc(tmp_path / name, v, APIX)
    mw_kda = _volume() / DALTON_VOLUME_A3 / 1000 if mw else None
    write_chimerax(tmp_path, maps, APIX, mw_kda, logging.getLogger("test"))
    entries = _parse((tmp_path / CHIMERAX_SCRIPT).read_text())
    assert [e["name"] for e in entries] == ["map.mrc", "half1_map.mrc", "half2_map.mrc"]
    for e in entries:
        vol, voxel = read_mrc(tmp_path / e["name"])
        assert e["voxel"] == pytest.approx(voxel, rel=1e-5)
        assert e["origin"] == (N // 2,) * 3
        assert enclosed_volume_A3(vol, voxel, e["level"]) == pytest.approx(_volume(), rel=0.2)
    assert CHIMERAX_SCRIPT in output_files(16)
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


def test_abinit_run_writes_the_script_and_cites(tmp_path):
    star = simulated_star(tmp_path / "sim", n=96, map_seed=1, sim_seed=2)
    dry = tmp_path / "dry"
    assert cli.run(["abinit", "--i", str(star), "--o", str(dry), "--dry-run", "--quiet"]) == 0
    log = (dry / "run.log").read_text()
    first = log.splitlines()[0]  # as RELION prints its references: first, with the version
    assert CITATION in first and f"cryospin {__version__}" in first

    out = tmp_path / "run"
    rc = cli.run(["abinit", "--i", str(star), "--o", str(out), "--quiet", "--heads", "2", "--epochs-amortized", "1",
                  "--min-epochs-amortized", "1", "--epochs-autodecode", "1", "--batch-size", "32",
                  "--stage1-trials", "1", "--mw", "20"])
    assert rc == 0
    script = (out / CHIMERAX_SCRIPT).read_text()
    entries = _parse(script)
    assert {e["name"] for e in entries} == {"map.mrc", "half1_map.mrc", "half2_map.mrc"}
    for name in re.findall(r"^open (\S+)", script, re.M):
        assert (out / name).is_file(), name
    for e in entries:
        vol, voxel = read_mrc(out / e["name"])
        assert e["voxel"] == pytest.approx(voxel, rel=1e-5)
        assert e["origin"] == (vol.shape[-1] // 2,) * 3
        # the level encloses the volume of 20 kDa (to a voxel, and the 6 significant digits of the script)
        assert enclosed_volume_A3(vol, voxel, e["level"]) == pytest.approx(expected_volume_A3(20), rel=0.05)
