"""The outputs of a K-class run (lifecycle/outputs.py ``write_final_outputs`` with ``n_classes`` > 1).

A small mixture on disk: the poses and CTFs of a `cryospin simulate` set, projected (`cryospin project`,
with CTF) from two different maps; class 1 holds images of map A, class 2 images of map B, class 3 three
particles (too few for two halves). Written with the true poses: one folder per class with maps made from
that class's particles only, rlnClassNumber (1-based) read back by RELION, cryoSPARC's class fields read
back by cryosparc-tools, the report's class pages; K = 1 writes no class output at all.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
import starfile
from matplotlib.figure import Figure

from cryospin_relion import cli
from cryospin_relion.evaluate.blobs import blob_volume
from cryospin_relion.io.mrc import write_mrc
from cryospin_relion.io.overwrite import overwrite_problems
from cryospin_relion.io.read import read_particles
from cryospin_relion.lifecycle.outputs import (MAP_FILES, add_orientation_summary, class_folder, final_table,
                                                output_files, write_final_outputs, write_report)
from cryospin_relion.report import CLASS_PNG_NAMES, PDF_NAME
from cryospin_relion.report.classes import plot_class_sizes, plot_class_slices

N_A, N_B, N_TINY = 70, 50, 3  # class 1, class 2, class 3 (no maps)
LOG = logging.getLogger("test_class_outputs")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """(table of all particles, images (N, 16, 16), working pixel sizes, poses, classes, truths A and B)."""
    from engine_synth import simulated_star

    d = tmp_path_factory.mktemp("classes")
    n = N_A + N_B + N_TINY
    sim = simulated_star(d / "sim", n=n, map_seed=1, sim_seed=2)  # its poses, shifts and CTFs
    truth = {"A": blob_volume(16, seed=1).float().numpy(), "B": blob_volume(16, seed=7).float().numpy()}
    imgs = {}
    for name, vol in truth.items():
        write_mrc(d / f"{name}.mrc", vol, 6.0)
        assert cli.run(["project", "--map", str(d / f"{name}.mrc"), "--i", str(sim), "--o",
                        str(d / f"{name}.mrcs"), "--ctf", "--quiet"]) == 0
        imgs[name] = mrcfile.read(d / f"{name}.mrcs").astype(np.float32)
    table = read_particles(d / "A.star")
    classes = np.repeat([0, 1, 2], [N_A, N_B, N_TINY])
    classes = classes[np.random.default_rng(0).permutation(n)]  # classes interleaved over the rows
    images = np.where((classes == 0)[:, None, None], imgs["A"], imgs["B"])
    apix = np.full(n, float(table.apix[0]))
    poses = (table.rotations, -table.shifts_A / apix[:, None])  # content translation in working-box px
    return SimpleNamespace(table=table, images=images, apix=apix, poses=poses, classes=classes, truth=truth, n=n)


def _write(m, out: Path, **kw):
    out.mkdir()
    scores = SimpleNamespace(confidence=np.linspace(0.2, 0.9, m.n), loss=np.linspace(1.0, 2.0, m.n), cutoff=0.5)
    return write_final_outputs(out, m.table, m.images, m.apix, m.poses, m.truth["A"], flip_hand=False, seed=0,
                               use_ctf=True, device="cpu", progress=False, log=LOG, scores=scores, **kw)


@pytest.fixture(scope="module")
def three(mixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("k3") / "run"
    decoders = [mixture.truth["A"], mixture.truth["B"], mixture.truth["A"]]
    res = _write(mixture, out, write_cs=True, n_classes=3, classes=mixture.classes, decoders=decoders)
    return out, res


def test_one_folder_per_class_with_its_own_particles(mixture, three):
    out, res = three
    for name in MAP_FILES:  # no top-level maps with K > 1
        assert not (out / name).exists(), name
    for k in (1, 2):
        assert sorted(p.name for p in (out / class_folder(k)).iterdir()) == sorted(MAP_FILES)
    assert not (out / class_folder(3)).exists()  # 3 particles: no maps
    own_a, own_b = (mrcfile.read(out / class_folder(k) / "map.mrc") for k in (1, 2))
    a, b = mixture.truth["A"], mixture.truth["B"]
    assert _corr(own_a, a) > _corr(own_a, b) + 0.1 and _corr(own_b, b) > _corr(own_b, a) + 0.1, (
        _corr(own_a, a), _corr(own_a, b), _corr(own_b, b), _corr(own_b, a))
    assert np.array_equal(mrcfile.read(out / class_folder(2) / "decoder_map.mrc"), b)  # each class's decoder
    # the result: the largest class, and every class in order
    assert [c.n_particles for c in res.classes] == [N_A, N_B, N_TINY]
    assert res.classes[0].result is not None and res.resolution_A == res.classes[0].resolution_A
    assert len(res.rotations) == N_A and res.scores is not None
    assert [c.summary()["map"] for c in res.classes] == ["class001/map.mrc", "class002/map.mrc", None]
    assert res.classes[2].summary()["resolution_A"] is None


def test_particles_star_has_1_based_classes_and_relion_selects_them(mixture, three, tmp_path):
    out, _ = three
    parts = starfile.read(out / "particles.star", always_dict=True)["particles"]
    assert parts["rlnClassNumber"].tolist() == (mixture.classes + 1).tolist()
    assert len(parts) == mixture.n and "rlnMaxValueProbDistribution" in parts.columns
    # cryospin select --classes 2 keeps class 2 only, every column
    sel = tmp_path / "class2.star"
    assert cli.run(["select", "--i", str(out / "particles.star"), "--o", str(sel), "--min-score", "0",
                    "--classes", "2"]) == 0
    kept = starfile.read(sel, always_dict=True)["particles"]
    assert len(kept) == N_B and set(kept["rlnClassNumber"]) == {2} and list(kept.columns) == list(parts.columns)


@pytest.mark.relion
def test_relion_star_handler_reads_the_classes(three, tmp_path):
    out, _ = three
    theirs = tmp_path / "relion_class2.star"
    subprocess.run(["relion_star_handler", "--i", str(out / "particles.star"), "--o", str(theirs), "--select",
                    "rlnClassNumber", "--minval", "2", "--maxval", "2"], check=True, capture_output=True)
    kept = starfile.read(theirs, always_dict=True)["particles"]
    assert len(kept) == N_B and set(kept["rlnClassNumber"]) == {2}


def test_particles_cs_has_cryosparc_class_fields(mixture, three):
    from cryosparc.dataset import Dataset

    out, _ = three
    ds = Dataset.load(out / "particles.cs")
    assert len(ds) == mixture.n
    assert ds["alignments3D/class"].dtype == np.uint32 and ds["alignments3D/class"].tolist() == mixture.classes.tolist()
    for f in ("alignments3D/class_posterior", "alignments3D/class_ess"):
        assert ds[f].dtype == np.float32 and np.all(ds[f] == 1.0), f
    # the written poses read back (each in its class's frame: here the true ones)
    back = read_particles(out / "particles.cs", check_stacks=False)
    assert np.allclose(back.rotations, mixture.table.rotations, atol=1e-5)


def test_k1_writes_no_class_output(mixture, tmp_path):
    res = _write(mixture, tmp_path / "k1", write_cs=True)
    res0 = _write(mixture, tmp_path / "k1zeros", write_cs=True, classes=np.zeros(mixture.n, int))
    assert res.classes is None and not list((tmp_path / "k1").glob("class*"))
    assert "rlnClassNumber" not in starfile.read(tmp_path / "k1" / "particles.star", always_dict=True)["particles"]
    from cryosparc.dataset import Dataset

    assert not any("class" in f for f in Dataset.load(tmp_path / "k1" / "particles.cs").fields())
    for name in MAP_FILES:  # all-zero classes with K = 1: the same files (MRC headers hold the time: data only)
        a, b = tmp_path / "k1" / name, tmp_path / "k1zeros" / name
        assert (np.array_equal(mrcfile.read(a), mrcfile.read(b)) if name.endswith(".mrc")
                else a.read_bytes() == b.read_bytes()), name
    assert (tmp_path / "k1" / "particles.star").read_bytes() == (tmp_path / "k1zeros" / "particles.star").read_bytes()
    cs, cs0 = (Dataset.load(tmp_path / d / "particles.cs") for d in ("k1", "k1zeros"))
    assert cs.fields() == cs0.fields()  # the same fields and values (uid: random in every new Dataset)
    assert all(np.array_equal(cs[f], cs0[f]) for f in cs.fields() if f != "uid")
    assert res0.classes is None and res0.resolution_A == res.resolution_A


def test_output_files_protect_the_class_folders(tmp_path):
    names = output_files(16, 3)
    assert "class003/half2_map.mrc" in names and "class001/open_in_chimerax.cxc" in names
    assert not any(n.startswith("class0") for n in output_files(16))
    assert set(CLASS_PNG_NAMES.values()) <= set(output_files(16))
    inp = tmp_path / "run" / "class002" / "map.mrc"
    problems = overwrite_problems({"--o": [tmp_path / "run" / n for n in names]}, {"--i": [inp]})
    assert len(problems) == 1 and "class002/map.mrc" in problems[0]


def test_summary_table_and_report_pages(three, tmp_path):
    out, res = three
    summary = {"resolution_A": res.resolution_A, "apix": res.apix, "n_particles": 123, "stage1_s": 1.0,
               "stage2_s": 2.0, "final_outputs_s": 3.0, "classes": [c.summary() for c in res.classes]}
    add_orientation_summary(summary, res, LOG)
    json.dumps(summary)  # plain JSON
    text = final_table(summary, out)
    assert "class001/map.mrc" in text and "class 3 (3 particles)" in text and "no maps" in text
    history = {"epoch": [1, 2, 3, 4], "stage": [1, 1, 2, 2], "loss": [1.0, 0.8, 0.6, 0.5],
               "class_sizes": [[40, 30, 30], [50, 40, 10], [70, 50, 3], [70, 50, 3]],
               "class_reseeds": [{"epoch": 2, "class": 2, "from_class": 0}],
               "class_merges": [{"epoch": 3, "class": 2, "into_class": 0, "spread_deg": 4.2}],
               "class_reforms": [{"epoch": 2, "class": 1, "particles": 40, "loss": 0.9, "reformed_loss": 0.8,
                                  "replaced": True}]}
    write_report(out, res, history, summary, LOG)
    assert (out / PDF_NAME).stat().st_size > 0
    for png in CLASS_PNG_NAMES.values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_class_figures_are_pure_functions():
    history = {"epoch": [1, 2, 3], "stage": [1, 2, 2], "class_sizes": [[10, 5], [12, 3], [13, 2]]}
    assert isinstance(plot_class_sizes(history), Figure)
    classes = [{"class": 1, "n_particles": 13, "resolution_A": 12.5, "map": np.random.rand(8, 8, 8)},
               {"class": 2, "n_particles": 2, "resolution_A": None, "map": None}]
    assert isinstance(plot_class_sizes(history, classes), Figure)
    assert isinstance(plot_class_slices(classes, apix=6.0), Figure)
    with pytest.raises(ValueError):  # a K = 1 history has no class page
        plot_class_sizes({"epoch": [1, 2], "class_sizes": [None, None]})
