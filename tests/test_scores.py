"""Per-particle scores: the confidence separates junk from particles; the columns reach particles.star/.cs,
the summary and logfile.pdf."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cryospin_relion import cli
from cryospin_relion.config import SearchConfig
from cryospin_relion.engine.particles import ParticleImages
from cryospin_relion.engine.scores import ScoreSettings, confidence_from_gap, score_particles
from cryospin_relion.engine.stage1 import search_poses
from cryospin_relion.evaluate.blobs import simulate_blobs, with_junk
from cryospin_relion.geometry.ctf import CTF
from cryospin_relion.geometry.fourier import ht3_centered
from cryospin_relion.geometry.rotations import super_fibonacci_rotations
from cryospin_relion.lifecycle.scores import suggest_cutoff
from cryospin_relion.model.volume import HartleyVolume

sys.path.insert(0, str(Path(__file__).parent))
from engine_synth import simulated_star  # noqa: E402


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of scores ``pos`` (should be high) against ``neg`` (Mann-Whitney U / (n_pos n_neg), ties 1/2)."""
    x = np.concatenate([pos, neg])
    order = x.argsort(kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):  # average ranks of ties
        m = x == v
        ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def junk_set():
    """Box 32, 300 particles (SNR 0.3, CTF, shifts) of which 20% are replaced by pure noise; the true volume.
    Junk images get the best pose a pose search finds for them (as a run leaves them), the others
    their true pose."""
    torch.set_num_threads(1)
    n, N = 32, 300
    d = simulate_blobs(n=n, N=N, apix=4.0, snr=0.3, seed=1)
    images, J = with_junk(d["images"], 0.2, seed=0)
    junk = J.numpy()
    vol = HartleyVolume(n)
    with torch.no_grad():
        vol.values.copy_(ht3_centered(d["vol"].double()).float() / n / d["sigma"])
    data = ParticleImages(images, torch.tensor(d["apix"]), CTF.from_arrays(d["ctf"]), "cpu")
    R, t = d["R"].float().clone(), d["t"].float().clone()
    ji = J.nonzero()[:, 0]
    found = search_poses(vol, data.batch(ji, n, 1.0), R[ji][:, None], t[ji][:, None],
                         torch.Generator().manual_seed(0), super_fibonacci_rotations(4608, dtype=torch.float32),
                         SearchConfig(), 0.1 * n, "l1")
    R[ji], t[ji] = found.rot, found.shift
    return {"vol": vol, "data": data, "R": R, "t": t, "junk": junk}


def test_confidence_separates_junk_from_particles(junk_set):
    s = junk_set
    sc = score_particles(s["vol"], s["data"], s["R"], s["t"], ScoreSettings(chunk=128), "l1")
    c, junk = sc.confidence.numpy(), s["junk"]
    assert c.shape == (len(junk),) and np.isfinite(c).all() and (c >= 0).all() and (c <= 1).all()
    a = auc(c[~junk], c[junk])
    assert a >= 0.8, a  # measured 0.97
    assert np.median(c[~junk]) > np.median(c[junk]) + 0.3
    # chance alone: a pure-noise image's best pose beats its best far pose by about one noise unit or less
    z = (sc.gap / sc.noise).numpy()
    assert np.percentile(z[junk], 90) < 1.0
    assert sc.loss.shape == (len(junk),) and (sc.loss > 0).all()


def _first(s: dict, n: int, settings: ScoreSettings, **kw):
    """Scores of the junk set's first ``n`` particles."""
    rows, d = torch.arange(n), s["data"]
    sub = ParticleImages(d.images[rows], d.apix[rows], d.ctf[rows], "cpu")
    return score_particles(s["vol"], sub, s["R"][rows], s["t"][rows], settings, "l1", **kw)


def test_chunks_do_not_change_scores_and_exclusion_matters(junk_set):
    s = junk_set
    a, b = _first(s, 40, ScoreSettings(chunk=7)), _first(s, 40, ScoreSettings(chunk=40))
    for x, y in ((a.confidence, b.confidence), (a.loss, b.loss), (a.gap, b.gap)):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    # without the excluded cap the "far" pose may be the final pose's neighbour: the gap collapses
    near = _first(s, 40, ScoreSettings(exclude_deg=0.0))
    good = ~torch.from_numpy(s["junk"][:40])
    z_near, z_far = float((near.gap / near.noise)[good].median()), float((a.gap / a.noise)[good].median())
    assert z_near < 0.3 * z_far, (z_near, z_far)


def test_scores_of_row_shares_sum_to_the_whole(junk_set):
    # a data-parallel rank scores its share (the other rows 0); the shares summed are the whole run's scores
    whole = _first(junk_set, 60, ScoreSettings(chunk=16))
    parts = [_first(junk_set, 60, ScoreSettings(chunk=16), rows=torch.arange(a, b)) for a, b in ((0, 25), (25, 60))]
    assert (parts[0].loss[25:] == 0).all() and (parts[0].loss[:25] > 0).all()
    for name in ("loss", "gap", "noise"):
        assert torch.allclose(getattr(parts[0], name) + getattr(parts[1], name), getattr(whole, name),
                              rtol=1e-4, atol=1e-6), name


def test_confidence_mapping_and_cutoff():
    gap = torch.tensor([-1.0, 0.0, 1.0, 10.0])
    c = confidence_from_gap(gap, torch.ones(4), 1.0)
    assert c[0] == 0 and c[1] == 0 and abs(float(c[2]) - (1 - np.exp(-1))) < 1e-6 and c[3] > 0.9999
    rng = np.random.default_rng(0)
    mix = np.concatenate([rng.uniform(0, 0.15, 200), rng.uniform(0.6, 1.0, 800)])
    cut = suggest_cutoff(mix)
    assert 0.15 <= cut <= 0.6, cut
    assert suggest_cutoff(np.full(10, 0.3)) == 0.5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny `cryospin abinit` run (box 16) with a .cs copy of its input."""
    base = tmp_path_factory.mktemp("scores")
    star = simulated_star(base, n=96, map_seed=1, sim_seed=2)
    from cryospin_relion.io.read import read_particles, write_particles

    cs = base / "sim" / "particles_in.cs"
    write_particles(read_particles(star), cs)
    out = base / "run"
    rc = cli.run(["abinit", "--i", str(cs), "--o", str(out), "--quiet", "--heads", "2", "--epochs-amortized", "1",
                  "--epochs-autodecode", "1", "--batch-size", "32", "--j", "1", "--stage1-trials", "1",
                  "--explore-candidates", "576", "--json-summary",
                  str(base / "summary.json")])
    assert rc == 0
    return {"out": out, "input": cs, "summary": json.loads((base / "summary.json").read_text())}


def test_run_writes_scores(run_dir):
    import starfile
    from cryosparc.dataset import Dataset

    from cryospin_relion.io.read import read_particles

    out = run_dir["out"]
    parts = starfile.read(out / "particles.star", always_dict=True)["particles"]
    c = parts["rlnMaxValueProbDistribution"].to_numpy()
    loss = parts["rlnCryospinLoss"].to_numpy()
    assert len(c) == 96 and ((c >= 0) & (c <= 1)).all() and (loss > 0).all()
    # the project's reader keeps the columns (raw) and reads the poses
    t = read_particles(out / "particles.star", check_stacks=False)
    assert "rlnMaxValueProbDistribution" in t.raw["particles"].columns and t.has_poses
    ds = Dataset.load(out / "particles.cs")
    assert ds["cryospin/confidence"].dtype == np.float32 and ds["alignments3D/error"].dtype == np.float32
    np.testing.assert_allclose(ds["cryospin/confidence"], c, atol=1e-6)
    np.testing.assert_allclose(ds["alignments3D/error"], loss, rtol=1e-6)
    src = Dataset.load(run_dir["input"])
    assert set(src.fields()) <= set(ds.fields())  # every input field kept
    sm = run_dir["summary"]
    assert 0 <= sm["score_median_confidence"] <= 1 and 0 <= sm["score_suggested_cutoff"] <= 1
    frac = float(np.mean(c >= sm["score_suggested_cutoff"]))
    assert abs(sm["score_fraction_above_cutoff"] - frac) < 1e-9
    assert (out / "scores.png").is_file()
    assert "particle scores" in (out / "run.log").read_text()


def test_plot_scores_figure():
    from matplotlib.figure import Figure

    from cryospin_relion.report.scores import plot_scores

    fig = plot_scores(np.linspace(0, 1, 50), 0.4, loss=np.linspace(1, 2, 50))
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    with pytest.raises(ValueError):
        plot_scores(np.array([]))
