"""Image access from stacks and the preprocessed cache."""

from __future__ import annotations

import json
import warnings

import mrcfile
import numpy as np
import pytest
import torch
from conftest import tiny_optics, tiny_particles, write_stack_file, write_star_file

from cryospin_relion.data import stack as stack_mod
from cryospin_relion.data.stack import ImageSource, build_cache, normalize_background
from cryospin_relion.geometry.fourier import fourier_crop_2d
from cryospin_relion.io.read import read_particles


def _mrc(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as m:
            return np.array(m.data, dtype=np.float32)


def test_relion31_images_equal_mrcfile(shared_data):
    t = read_particles(shared_data / "cryodrgn" / "relion31.star")
    src = ImageSource(t)
    ref = _mrc(shared_data / "cryodrgn" / "relion31.mrcs")
    np.testing.assert_array_equal(src.images(np.arange(5)), ref)
    np.testing.assert_array_equal(src.images(np.array([4, 0, 4])), ref[[4, 0, 4]])


def test_cs_sign_applied_and_mrc_volume_used_as_stack(shared_data):
    d = shared_data / "cryodrgn"
    t = read_particles(d / "empiar_10076_7.cs")
    assert t.sign == -1.0
    ref = _mrc(d / "empiar_10076_7.mrc")
    np.testing.assert_array_equal(ImageSource(t).images(np.arange(7)), -ref)
    t = read_particles(d / "empiar_10076_7.star")
    np.testing.assert_array_equal(ImageSource(t).images(np.array([6])), ref[[6]])


def test_images_grouped_over_several_stacks(tmp_path):
    a = write_stack_file(tmp_path / "a.mrcs", n=3, seed=1)
    b = write_stack_file(tmp_path / "b.mrcs", n=2, seed=2)
    cols = tiny_particles("a.mrcs", n=5)
    cols["rlnImageName"] = ["000002@b.mrcs", "000001@a.mrcs", "000003@a.mrcs", "000001@b.mrcs", "000002@a.mrcs"]
    t = read_particles(write_star_file(tmp_path / "p.star", cols, tiny_optics()))
    src = ImageSource(t, max_open=1)  # forces reopening: the LRU must not break reads
    got = src.images(np.array([0, 1, 2, 3, 4, 0]))
    np.testing.assert_array_equal(got, np.stack([b[1], a[0], a[2], b[0], a[1], b[1]]))


def test_build_cache_crop_normalise_reuse(tmp_path):
    imgs = write_stack_file(tmp_path / "a.mrcs", n=5, box=32, seed=3) * 3 + 7
    with mrcfile.open(tmp_path / "a.mrcs", mode="r+") as m:
        m.set_data(imgs)
    t = read_particles(write_star_file(tmp_path / "p.star", tiny_particles("a.mrcs", n=5), tiny_optics(box=32)))
    out = tmp_path / "cache"
    c = build_cache(t, out, 16, progress=False, chunk=2)
    assert c.images.shape == (5, 16, 16) and c.images.dtype == np.float32 and c.box == 16
    np.testing.assert_allclose(c.apix, 2.0 * 32 / 16)
    expect = fourier_crop_2d(torch.from_numpy(imgs), 16).numpy()
    expect = normalize_background(expect.copy())
    np.testing.assert_allclose(c.images, expect, atol=1e-5)
    r = np.hypot(*np.meshgrid(np.arange(16) - 8, np.arange(16) - 8, indexing="ij"))
    bg = np.asarray(c.images)[:, r > 0.8 * 8]
    np.testing.assert_allclose(bg.mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(bg.std(1), 1, atol=1e-5)
    stamp = (out / "cache_16.npy").stat().st_mtime_ns
    c2 = build_cache(t, out, 16, progress=False)  # unchanged inputs: reused, not rewritten
    assert (out / "cache_16.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(c2.images, c.images)
    ci = build_cache(t, tmp_path / "inv", 16, invert=True, progress=False)
    np.testing.assert_allclose(ci.images, -np.asarray(c.images), atol=1e-5)
    full = build_cache(t, out, 32, progress=False)  # another box: another file
    assert full.images.shape == (5, 32, 32) and (out / "cache_16.npy").exists()
    assert sorted(p.name for p in out.iterdir()) == ["cache_16.json", "cache_16.npy", "cache_32.json",
                                                     "cache_32.npy"]


def test_cache_rebuilt_when_inputs_change(tmp_path):
    write_stack_file(tmp_path / "a.mrcs", n=4, seed=4)
    star = write_star_file(tmp_path / "p.star", tiny_particles("a.mrcs"), tiny_optics())
    t = read_particles(star)
    c = build_cache(t, tmp_path / "c", 16, progress=False)
    first = np.array(c.images)
    write_stack_file(tmp_path / "a.mrcs", n=4, seed=5)  # new images, same names
    c = build_cache(read_particles(star), tmp_path / "c", 16, progress=False)
    assert not np.allclose(first, c.images)
    sub = t.subset_rows(np.array([1, 0]))
    c = build_cache(sub, tmp_path / "c", 16, progress=False)
    assert c.images.shape == (2, 16, 16)


def test_killed_cache_never_reused(tmp_path, monkeypatch):
    write_stack_file(tmp_path / "a.mrcs", n=6, seed=6)
    t = read_particles(write_star_file(tmp_path / "p.star", tiny_particles("a.mrcs", n=6), tiny_optics()))
    out = tmp_path / "c"
    build_cache(t, out, 16, progress=False)
    meta = json.loads((out / "cache_16.json").read_text())
    calls = {"n": 0}
    real = ImageSource.images

    def dying(self, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed half way
        return real(self, rows)

    monkeypatch.setattr(stack_mod.ImageSource, "images", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(t, out, 16, invert=True, chunk=2, progress=False)
    # the old sidecar is gone, no temp file left, so nothing half-written can be mistaken for a cache
    assert not (out / "cache_16.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["cache_16.npy"]
    monkeypatch.setattr(stack_mod.ImageSource, "images", real)
    c = build_cache(t, out, 16, invert=True, progress=False)
    assert json.loads((out / "cache_16.json").read_text())["key"] != meta["key"]
    assert c.images.shape == (6, 16, 16)


def test_noise_free_images_keep_common_scale():
    imgs = np.zeros((2, 16, 16), np.float32)
    imgs[:, 6:10, 6:10] = [[[1.0]], [[3.0]]]
    out = normalize_background(imgs.copy())
    np.testing.assert_allclose(out, imgs)  # background 0, std 0: untouched
