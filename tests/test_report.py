"""Report: pure plotting functions and make_report (PNGs + logfile.pdf, atomic writes)."""

from __future__ import annotations

import gc
import re
import weakref

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cryospin_relion.evaluate.orientation import DirectionalResolution
from cryospin_relion.geometry.rotations import euler_to_matrix
from cryospin_relion.report import PDF_NAME, PNG_NAMES, make_report, plots, view_direction_histogram


def _pdf_pages(path) -> int:
    data = path.read_bytes()
    assert data.startswith(b"%PDF")
    assert data.rstrip().endswith(b"%%EOF")
    return len(re.findall(rb"/Type\s*/Page\b", data))  # \b: not /Pages


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def _inputs(n_poses: int = 300) -> dict:
    rng = np.random.default_rng(0)
    n = 16
    s = np.arange(n // 2 + 1)
    fsc = 1.0 / (1.0 + np.exp((s - 5.0) / 1.0))
    fsc[0] = 1.0
    ang = np.stack([rng.uniform(-180, 180, n_poses), np.degrees(np.arccos(rng.uniform(-1, 1, n_poses))),
                    rng.uniform(-180, 180, n_poses)], 1)
    rotations = euler_to_matrix(torch.tensor(ang))  # torch input accepted
    stage = [1] * 4 + [2] * 3
    history = {
        "epoch": list(range(7)),
        "loss": [1.0, 0.7, 0.5, 0.4, 0.35, 0.3, 0.28],
        "stage": stage,
        "time_s": [1.0, 2.0, 3.0, 4.0, 5.5, 7.0, 8.5],
        "pose_change_deg": [None, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5],
        "lr": [1e-3] * 4 + [1e-2] * 3,
        "head_wins": [rng.integers(0, 50, 4) for _ in range(4)] + [None] * 3,
    }
    z, y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j, -1:1:n * 1j]
    volume = np.exp(-((x - 0.3) ** 2 + y**2 + z**2) / 0.1).astype(np.float32)
    pose_err = {"epoch": list(range(7)), "median_deg": [60, 30, 10, 5, 2, 1, 0.5], "mean_deg": [70, 40, 20, 9, 5, 3, 2]}
    dirs = np.stack([np.ones(8), np.linspace(-1, 1, 8), np.zeros(8)], 1)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    directional = DirectionalResolution(dirs, np.ones((8, n // 2 + 1)), np.linspace(6.0, 9.0, 8), 20.0)
    return dict(fsc=fsc, apix=3.0, box=n, history=history, rotations=rotations, volume=volume,
                pose_error_history=pose_err, orientation={"efficiency": 0.42, "directional": directional},
                scores={"confidence": rng.uniform(0, 1, 50), "cutoff": 0.4, "loss": rng.uniform(0.5, 1, 50)})


def test_full_report_writes_pdf_and_pngs(tmp_path):
    inp = _inputs()
    out = make_report(tmp_path / "rep", summary={"resolution (A)": 7.5, "particles": 300, "output": "Job001/x.mrc"}, **inp)
    assert set(out) == {"pdf", *PNG_NAMES}
    assert out["pdf"] == tmp_path / "rep" / PDF_NAME
    assert _pdf_pages(out["pdf"]) == 1 + 8  # title + eight figures
    for key, name in PNG_NAMES.items():
        assert out[key].name == name and _is_png(out[key])
    assert _leftovers(tmp_path / "rep") == []


def test_only_fsc_skips_other_pages(tmp_path):
    out = make_report(tmp_path, fsc=_inputs()["fsc"])  # no apix: x axis in shells
    assert set(out) == {"pdf", "fsc"}
    assert _pdf_pages(out["pdf"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsc.png", PDF_NAME]


def test_no_inputs_writes_nothing(tmp_path):
    assert make_report(tmp_path / "empty") == {}
    assert not (tmp_path / "empty").exists()


def test_page_count_follows_inputs_and_explicit_head_wins(tmp_path):
    inp = _inputs()
    out = make_report(tmp_path, rotations=inp["rotations"], head_wins=np.array([5, 0, 3]),
                      pose_error_history=inp["pose_error_history"], png=False)
    assert set(out) == {"pdf"}
    assert _pdf_pages(out["pdf"]) == 3
    assert [p.name for p in tmp_path.iterdir()] == [PDF_NAME]


@pytest.mark.parametrize("fail_at", [1, 4])
def test_failure_leaves_no_partial_pdf(tmp_path, monkeypatch, fail_at):
    old = tmp_path / PDF_NAME
    old.write_bytes(b"%PDF previous run")
    calls = {"n": 0}
    real = Figure.savefig

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError("disk full")
        return real(self, *a, **k)

    monkeypatch.setattr(Figure, "savefig", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        make_report(tmp_path, **_inputs())
    assert old.read_bytes() == b"%PDF previous run"  # untouched, not half-replaced
    assert _leftovers(tmp_path) == []
    for p in tmp_path.glob("*.png"):
        assert _is_png(p)  # PNGs finished before the failure are whole


def test_figures_are_freed(tmp_path, monkeypatch):
    refs = []
    for name in ("plot_fsc", "plot_view_directions"):
        real = getattr(plots, name)

        def wrapped(*a, _real=real, **k):
            fig = _real(*a, **k)
            refs.append(weakref.ref(fig))
            return fig

        monkeypatch.setattr(plots, name, wrapped)
    inp = _inputs()
    make_report(tmp_path, fsc=inp["fsc"], apix=3.0, rotations=inp["rotations"])
    gc.collect()
    assert len(refs) == 2 and all(r() is None for r in refs)


def test_view_direction_histogram_equal_area_and_fast_path():
    rng = np.random.default_rng(1)
    d = rng.normal(size=(20000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    counts, lon, lat = view_direction_histogram(d, nlon=12, nlat=6)
    assert counts.shape == (6, 12) and counts.sum() == 20000
    assert np.allclose(np.diff(np.sin(lat)), 2 / 6)  # equal-area rows
    # uniform directions fill equal-area cells evenly (expected 278 per cell)
    assert counts.min() > 200 and counts.max() < 360
    # matrices: the third row of A is the view direction; tilt 0 -> north pole
    A = euler_to_matrix(torch.zeros(5, 3)).numpy()
    c, _, _ = view_direction_histogram(A, nlon=4, nlat=2)
    assert c[1].sum() == 5
    with pytest.raises(ValueError, match="Euler"):
        view_direction_histogram(np.full((4, 3), 30.0))


def test_plot_helpers_tolerate_odd_inputs():
    # epochs restarting per stage, a NaN loss, no time; several FSC curves
    h = {"epoch": [0, 1, 0, 1], "loss": [1.0, None, 0.5, 0.4], "stage": [1, 1, 2, 2]}
    assert isinstance(plots.plot_history(h), Figure)
    fsc = _inputs()["fsc"]
    assert isinstance(plots.plot_fsc({"unmasked": fsc, "masked": fsc * 0.9}, apix=2.0, resolution_A=6.0), Figure)
    assert plots.last_head_wins({"head_wins": [[1, 2], [3, 4], None], "stage": [1, 1, 2]}).tolist() == [3, 4]
    with pytest.raises(ValueError):
        plots.plot_central_slices(np.zeros((4, 4)))
