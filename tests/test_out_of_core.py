"""Out-of-core data: prefetched batches from the memory-mapped cache, the chunked cache build, large STAR files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from cryospin_relion.engine.particles import ParticleImages
from cryospin_relion.geometry.ctf import CTF


def _memmap_images(tmp_path, n=300, box=16, seed=0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    np.save(tmp_path / "cache.npy", x)
    return np.load(tmp_path / "cache.npy", mmap_mode="r")


def _particles(images, device="cpu") -> ParticleImages:
    n = images.shape[0]
    rng = np.random.default_rng(1)
    ctf = CTF.from_arrays({"defocus_u": rng.uniform(1e4, 2e4, n), "defocus_v": rng.uniform(1e4, 2e4, n),
                           "defocus_angle": rng.uniform(0, 180, n), "voltage": np.full(n, 300.0),
                           "cs": np.full(n, 2.7), "amp_contrast": np.full(n, 0.1)})
    return ParticleImages(images, np.full(n, 3.0), ctf, torch.device(device))


def test_prefetch_equals_direct_reads_in_order(tmp_path):
    data = _particles(_memmap_images(tmp_path))
    g = torch.Generator().manual_seed(0)
    batches = list(torch.randperm(300, generator=g).split(32))  # unsorted rows, last batch shorter
    with data.prefetch(batches, depth=3) as ready:
        got = list(ready)
    assert len(got) == len(batches)
    for idx, x in zip(batches, got):
        assert torch.equal(x, data.load(idx))
        assert torch.equal(x, torch.from_numpy(np.asarray(data.images)[idx.numpy()]))
    # the batch made from prefetched images is the batch made by reading directly
    b0 = data.batch(batches[0], 12, 0.9, 8, images=got[0])
    b1 = data.batch(batches[0], 12, 0.9, 8)
    for a, b in ((b0.images, b1.images), (b0.target, b1.target), (b0.ctf, b1.ctf), (b0.mask.index, b1.mask.index)):
        assert torch.equal(a, b)


def test_prefetch_early_exit_stops_thread_and_errors_reach_caller(tmp_path):
    data = _particles(_memmap_images(tmp_path, n=64))
    batches = list(torch.arange(64).split(4))
    before = threading.active_count()
    with data.prefetch(batches, depth=2) as ready:
        first = next(ready)
    assert torch.equal(first, data.load(batches[0]))
    assert threading.active_count() == before  # the reader thread has ended
    bad = [torch.arange(4), torch.tensor([1, 64])]  # row 64 does not exist
    with data.prefetch(bad) as ready:
        assert torch.equal(next(ready), data.load(bad[0]))
        with pytest.raises(IndexError):
            next(ready)
    with data.prefetch([]) as ready:
        assert list(ready) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetch_cuda_pinned_equals_direct_reads(tmp_path):
    data = _particles(_memmap_images(tmp_path), device="cuda")
    batches = list(torch.randperm(300, generator=torch.Generator().manual_seed(2)).split(50))
    with data.prefetch(batches) as ready:
        for idx, x in zip(batches, ready):
            assert x.is_cuda and torch.equal(x, data.load(idx))
            torch.cuda._sleep(1000)  # compute queued on the consumer's stream while the next batch arrives


def test_constant_ctf_values_stored_once_same_batches(tmp_path):
    images = _memmap_images(tmp_path, n=40)
    data = _particles(images)
    assert data.ctf.voltage.stride() == (0,) and data.ctf.voltage.untyped_storage().nbytes() == 4
    assert data.ctf.defocus_u.stride() == (1,)  # per-particle values stay per particle
    assert data.apix.untyped_storage().nbytes() == 4
    dense = _particles(images).ctf  # same values, dense
    idx = torch.tensor([5, 1, 39])
    for (k, a), (_, b) in zip(data.ctf[idx].items(), dense.map(lambda v: v.contiguous().clone())[idx].items()):
        assert torch.equal(a, b), k


# -- the image cache, built chunk by chunk ------------------------------------------------------------


def test_chunked_cache_equals_whole_stack_processing(tmp_path):
    from conftest import tiny_optics, tiny_particles, write_stack_file, write_star_file

    from cryospin_relion.data.stack import build_cache, normalize_background
    from cryospin_relion.geometry.fourier import fourier_crop_2d
    from cryospin_relion.io.read import read_particles

    imgs = write_stack_file(tmp_path / "a.mrcs", n=23, box=32, seed=5)
    t = read_particles(write_star_file(tmp_path / "p.star", tiny_particles("a.mrcs", n=23), tiny_optics(box=32)))
    whole = normalize_background(fourier_crop_2d(torch.from_numpy(imgs), 16).numpy().copy())
    for chunk in (None, 1, 5, 23):
        c = build_cache(t, tmp_path / f"c{chunk}", 16, chunk=chunk, progress=False)
        np.testing.assert_allclose(c.images, whole, rtol=0, atol=2e-6)
        if chunk is None:
            first = np.array(c.images)
        else:
            np.testing.assert_allclose(c.images, first, rtol=0, atol=2e-6)


# -- STAR: every column survives a round trip ---------------------------------------------------------


def _big_star(path, n: int) -> None:
    """A RELION 3.1 STAR of n rows: numbers, image names, quoted names with spaces, an empty string."""
    rng = np.random.default_rng(0)
    k = np.arange(n)
    cols = {
        "rlnCoordinateX": np.round(rng.uniform(0, 4000, n), 1).astype(str),
        "rlnImageName": np.char.add(np.char.zfill((k % 500 + 1).astype(str), 6),
                                    np.char.add("@Particles/stack_", np.char.add((k // 500).astype(str), ".mrcs"))),
        "rlnMicrographName": np.where(k % 7 == 0, '"My mics/a b.mrc"', np.where(k % 11 == 0, '""', "mics/m.mrc")),
        "rlnOpticsGroup": (1 + k % 2).astype(str),
        "rlnDefocusU": rng.uniform(8000, 25000, n).round(6).astype(str),
        "rlnDefocusV": rng.uniform(8000, 25000, n).round(6).astype(str),
        "rlnDefocusAngle": rng.uniform(-180, 180, n).round(6).astype(str),
        "rlnAngleRot": rng.uniform(-180, 180, n).round(6).astype(str),
        "rlnAngleTilt": rng.uniform(1, 179, n).round(6).astype(str),
        "rlnAnglePsi": rng.uniform(-180, 180, n).round(6).astype(str),
        "rlnOriginXAngst": rng.normal(0, 3, n).round(6).astype(str),
        "rlnOriginYAngst": rng.normal(0, 3, n).round(6).astype(str),
        "rlnClassNumber": rng.integers(1, 5, n).astype(str),
        "rlnLogLikeliContribution": rng.normal(1e5, 1e3, n).astype(str),  # 17 digits
        "rlnNormCorrection": rng.uniform(0.8, 1.2, n).round(8).astype(str),
        "rlnRandomSubset": (1 + k % 2).astype(str),
    }
    rows = np.array(list(cols.values())).T
    optics = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
              "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
    text = ["# version 30001", "data_optics", "loop_"] + [f"_{c}" for c in optics]
    text += ["opticsGroup1 1 300 2.7 0.1 1.5 128 2", "opticsGroup2 2 200 2.7 0.07 1.5 128 2", "",
             "# version 30001", "data_particles", "loop_"] + [f"_{c} #{i + 1}" for i, c in enumerate(cols)]
    path.write_text("\n".join(text) + "\n" + "\n".join(" ".join(r) for r in rows) + "\n")


def test_star_round_trip_20k_rows_keeps_every_column(tmp_path):
    from cryospin_relion.io.star import load_star_blocks, read_star, write_star

    src, out = tmp_path / "in.star", tmp_path / "out.star"
    _big_star(src, 20_000)
    write_star(read_star(src, check_stacks=False), out)
    a, b = load_star_blocks(src), load_star_blocks(out)
    pa, pb = a["particles"], b["particles"]
    # every input column, in its place (the writer adds the CTF defaults rlnPhaseShift etc.)
    assert [c for c in pb.columns if c in pa.columns] == list(pa.columns) and len(pb) == len(pa) == 20_000
    for c in pa.columns:
        x, y = pa[c].to_numpy(), pb[c].to_numpy()
        if x.dtype.kind in "iuf":
            assert y.dtype.kind in "iuf", c
            # angles and origins go through rotation matrices; every number is written to 10 significant digits
            tol = 1e-6 if c.startswith(("rlnAngle", "rlnOrigin")) else 0
            np.testing.assert_allclose(y, x, rtol=5e-10, atol=tol, err_msg=c)
            if c in ("rlnCoordinateX", "rlnClassNumber", "rlnNormCorrection"):  # <= 10 digits: exactly as read
                assert np.array_equal(x, y), c
        else:
            assert (x.astype(str) == y.astype(str)).all(), c
    assert (pb["rlnMicrographName"].iloc[[0, 11, 1]] == ["My mics/a b.mrc", "", "mics/m.mrc"]).all()
    for c in a["optics"].columns:
        assert c in b["optics"].columns
        assert (a["optics"][c].astype(str).to_numpy() == b["optics"][c].astype(str).to_numpy()).all(), c
