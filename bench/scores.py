"""Benchmark: the per-particle scores (engine/scores.py): junk separation and cost, against stage 2.

    python bench/scores.py                  # box 64, 2,000 particles, SNR 0.1, 1 thread
    python bench/scores.py --box 32 --n 1000 --snr 0.3 --threads 2

Simulates blob particles (evaluate/blobs.py, CTF, shifts), replaces 20% by pure noise, and gives
the noise images the best pose a stage-1 pose search finds for them (as a run would leave them);
the other images keep their true pose; the volume is the true one. Prints:

- the ROC AUC of the confidence (particles against junk), and the quantiles of the confidence and
  of the gap in noise units for both groups;
- the cost of the scores per 1,000 images (CPU seconds and wall seconds; a first, warm-up call is
  not counted: a run pays it once), and of one stage-2 epoch at the default settings
  (5 pose steps + 1 volume step per batch of 64, full working box), to compare: a default run has
  6 stage-2 epochs, so the scores cost (score / (6 x epoch)) of stage 2 alone.
On a shared machine compare CPU seconds: wall times then depend on the load.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    x = np.concatenate([pos, neg])
    r = np.empty(len(x))
    r[x.argsort(kind="mergesort")] = np.arange(1, len(x) + 1)
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def main() -> None:
    from cryospin_relion.config import AbinitConfig, SearchConfig
    from cryospin_relion.engine.particles import ParticleImages
    from cryospin_relion.engine.scores import ScoreSettings, score_particles
    from cryospin_relion.engine.stage1 import search_poses
    from cryospin_relion.engine.stage2 import stage2_step
    from cryospin_relion.evaluate.blobs import simulate_blobs, with_junk
    from cryospin_relion.geometry.ctf import CTF
    from cryospin_relion.geometry.fourier import ht3_centered
    from cryospin_relion.geometry.rotations import super_fibonacci_rotations
    from cryospin_relion.model.pose_table import PoseTable
    from cryospin_relion.model.volume import HartleyVolume

    ap = argparse.ArgumentParser()
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n, N = a.box, a.n
    d = simulate_blobs(n=n, N=N, apix=128.0 / n, snr=a.snr, seed=1)
    images, J = with_junk(d["images"], 0.2, seed=0)
    junk = J.numpy()
    vol = HartleyVolume(n)
    with torch.no_grad():
        vol.values.copy_(ht3_centered(d["vol"].double()).float() / n / d["sigma"])
    data = ParticleImages(images.numpy(), torch.tensor(d["apix"]), CTF.from_arrays(d["ctf"]), "cpu")
    R, t = d["R"].float().clone(), d["t"].float().clone()
    ji = J.nonzero()[:, 0]
    found = search_poses(vol, data.batch(ji, n, 1.0), R[ji][:, None], t[ji][:, None],
                         torch.Generator().manual_seed(0), super_fibonacci_rotations(4608, dtype=torch.float32),
                         SearchConfig(), 0.1 * n, "l1")
    R[ji], t[ji] = found.rot, found.shift

    warm = ParticleImages(images[:256].numpy(), torch.tensor(d["apix"]), CTF.from_arrays(d["ctf"])[:256], "cpu")
    score_particles(vol, warm, R[:256], t[:256], ScoreSettings())  # warm-up (a run pays it once)
    c0, w0 = time.process_time(), time.perf_counter()
    sc = score_particles(vol, data, R, t, ScoreSettings())
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    conf, z = sc.confidence.numpy(), (sc.gap / sc.noise).numpy()
    print(f"box {n}, {N} particles (20% pure noise), SNR {a.snr}, {a.threads} thread(s)")
    print(f"confidence ROC AUC (particles vs junk): {auc(conf[~junk], conf[junk]):.3f}")
    for name, m in (("particles", ~junk), ("junk", junk)):
        print(f"  {name:9s} confidence q10/50/90 {np.percentile(conf[m], [10, 50, 90]).round(3)}, "
              f"gap in noise units q10/50/90 {np.percentile(z[m], [10, 50, 90]).round(2)}")
    print(f"scores: {1000 * cpu / N:.2f} CPU s, {1000 * wall / N:.2f} wall s per 1000 images")

    cfg = AbinitConfig()
    table = PoseTable(N, "cpu", cfg.optim.lr_pose, cfg.optim.lr_shift, cfg.optim.pose_betas, max_shift=0.1 * n)
    table.set(R, t)
    opt = torch.optim.Adam(vol.parameters(), lr=cfg.optim.lr_decoder_stage2)
    bs = cfg.schedule.batch_size
    m = min(N, 1024)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(0, m, bs):
        b = data.batch(torch.arange(i, min(m, i + bs)), n, cfg.model.mask_radius)
        stage2_step(vol, table, opt, b, cfg.optim.pose_iters, cfg.optim.vol_iters, cfg.model.loss)
    cpu2, wall2 = time.process_time() - c0, time.perf_counter() - w0
    e = 1000 * cpu2 / m
    print(f"one stage-2 epoch: {e:.2f} CPU s, {1000 * wall2 / m:.2f} wall s per 1000 images; "
          f"scores / (6 stage-2 epochs) = {100 * (1000 * cpu / N) / (6 * e):.1f}% (CPU)")


if __name__ == "__main__":
    main()
