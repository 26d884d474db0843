"""Symmetrised reconstruction by resampling the Fourier sums once per operator (geometry/backproject.py
``symmetrise_accumulator``), against inserting every image at every pose A @ S."""

from __future__ import annotations

import time

import numpy as np
import torch

from cryospin_relion.geometry.backproject import Accumulator, insert_images, symmetrise_accumulator, volume_from_accumulator
from cryospin_relion.geometry.fsc import fsc
from cryospin_relion.geometry.rotations import random_rotations
from cryospin_relion.geometry.symmetry import symmetry_operators


def _images(n: int, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, n, n, generator=g), random_rotations(count, g, dtype=torch.float64)


def test_resampled_sums_equal_the_g_fold_insertion():
    n, count = 24, 300
    imgs, A = _images(n, count)
    t = torch.zeros(count, 2, dtype=torch.float64)
    apix = torch.full((count,), 2.0, dtype=torch.float64)
    for name in ("C4", "D7", "O"):
        S = torch.as_tensor(symmetry_operators(name))
        direct = Accumulator.zeros(n)
        t0 = time.perf_counter()
        for op in S:
            insert_images(direct, imgs, A @ op, t, apix, None, threads=1)
        t_direct = time.perf_counter() - t0
        grid = Accumulator.zeros(n)
        t0 = time.perf_counter()
        insert_images(grid, imgs, A, t, apix, None, threads=1)
        symmetrise_accumulator(grid, S, threads=1)
        t_grid = time.perf_counter() - t0
        a, b = volume_from_accumulator(direct), volume_from_accumulator(grid)
        f = fsc(a.double(), b.double()).numpy()
        top = int(0.8 * (len(f) - 1))
        # lattice-preserving operators (C4, O) give the same sums; D7's need a second interpolation,
        # which white noise (the hardest case) shows most: measured 0.978
        assert f[1:top + 1].min() >= (0.999 if name in ("C4", "O") else 0.95), (name, f.round(3))
        print(f"{name}: G-fold insertion {t_direct:.2f} s, grid {t_grid:.2f} s, min FSC {f[1:top + 1].min():.4f}")


def test_identity_leaves_the_sums_and_c1_is_unchanged():
    n, count = 16, 50
    imgs, A = _images(n, count, seed=1)
    acc = Accumulator.zeros(n)
    insert_images(acc, imgs, A, torch.zeros(count, 2, dtype=torch.float64), torch.full((count,), 2.0,
                  dtype=torch.float64), None, threads=1)
    num, w = acc.num.clone(), acc.weight.clone()
    symmetrise_accumulator(acc, torch.eye(3, dtype=torch.float64)[None])
    assert torch.equal(acc.num, num) and torch.equal(acc.weight, w)
    # C2 twice the same operator set: symmetrising a symmetrised sum multiplies it by G (nothing new is made)
    S = torch.as_tensor(symmetry_operators("C2"))
    symmetrise_accumulator(acc, S)
    once = volume_from_accumulator(acc)
    symmetrise_accumulator(acc, S)
    twice = volume_from_accumulator(acc)
    assert float(fsc(once.double(), twice.double())[1:7].min()) > 0.999
