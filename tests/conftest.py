"""Shared fixtures: the real data in ../shared/data and the RELION binaries."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real STAR/.cs/MRC files (``../shared/data`` next to the repo); skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared/data relative to the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def relion() -> str:
    """Folder of the RELION binaries; skip when ``relion_project`` is not on PATH."""
    exe = shutil.which("relion_project")
    if exe is None:
        pytest.skip("RELION binaries not on PATH (relion_project not found)")
    return str(Path(exe).parent)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.relion`` skip without RELION, even if they do not use the fixture."""
    if shutil.which("relion_project"):
        return
    skip = pytest.mark.skip(reason="RELION binaries not on PATH (relion_project not found)")
    for item in items:
        if item.get_closest_marker("relion") is not None:
            item.add_marker(skip)


# -- small synthetic particle files ---------------------------------------------------------


def _loop(name: str, cols: dict) -> str:
    lines = [f"\ndata_{name}\n", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    n = len(next(iter(cols.values())))
    lines += [" ".join(str(v[r]) for v in cols.values()) for r in range(n)]
    return "\n".join(lines) + "\n"


def write_star_file(path: Path, particles: dict, optics: dict | None = None) -> Path:
    """A STAR file from column dicts (3.1 layout when ``optics`` is given, else one ``data_`` table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# version 30001\n" + _loop("optics", optics) + _loop("particles", particles)) if optics else _loop(
        "", particles)
    path.write_text(text)
    return path


def write_stack_file(path: Path, n: int = 4, box: int = 16, seed: int = 0, ny: int | None = None) -> np.ndarray:
    """An (n, ny, box) float32 .mrcs of Gaussian noise; returns the images."""
    import mrcfile

    path.parent.mkdir(parents=True, exist_ok=True)
    imgs = np.random.default_rng(seed).normal(size=(n, ny or box, box)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(imgs)
        m.set_image_stack()
    return imgs


def tiny_particles(stack: str, n: int = 4, ctf: bool = True, poses: bool = True) -> dict:
    """Particle columns for n images of ``stack`` (RELION 3.1 names)."""
    cols = {"rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)], "rlnOpticsGroup": [1] * n,
            "rlnMicrographName": [f"mic{i % 2}.mrc" for i in range(n)]}
    if ctf:
        cols.update(rlnDefocusU=[10000 + 100 * i for i in range(n)], rlnDefocusV=[9800 + 100 * i for i in range(n)],
                    rlnDefocusAngle=[15.0] * n)
    if poses:
        cols.update(rlnAngleRot=[10.0 * i for i in range(n)], rlnAngleTilt=[20.0 + i for i in range(n)],
                    rlnAnglePsi=[-30.0 + 5 * i for i in range(n)], rlnOriginXAngst=[0.5 * i for i in range(n)],
                    rlnOriginYAngst=[-0.25 * i for i in range(n)])
    return cols


def tiny_optics(box: int = 16, apix: float = 2.0, groups: int = 1, boxes: list | None = None) -> dict:
    return {"rlnOpticsGroup": list(range(1, groups + 1)), "rlnOpticsGroupName": [f"og{g + 1}" for g in range(groups)],
            "rlnVoltage": [300.0] * groups, "rlnSphericalAberration": [2.7] * groups,
            "rlnAmplitudeContrast": [0.1] * groups, "rlnImagePixelSize": [apix] * groups,
            "rlnImageSize": boxes or [box] * groups, "rlnImageDimensionality": [2] * groups}
