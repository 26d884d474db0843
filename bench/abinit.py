"""Benchmark of the ab-initio engine on a synthetic dataset (prints a table; not a test).

    python bench/abinit.py [--n 2000] [--box 32] [--snr 0.3] [--j 2] [--quick]

Rows: the default config (``fast`` encoder), the ``paper`` encoder preset, L2 loss,
no coarse-to-fine, no stage-1 exploration (``explore_candidates: 0``, the reference
winner-takes-all over the heads only); ``--rows`` picks some. Columns: wall time, FSC 0.5 resolution vs the truth after the best
global alignment of the poses (incl. mirror and the map's 3D offset), median rotation
error, peak memory (RSS). A second table compares stage-2 images/s with the bare
slice + CTF + shift + loss forward/backward rate. The comparison with RELION's
InitialModel, on particles projected by relion_project, is bench/abinit_vs_relion.py.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from engine_synth import align_poses, backproject_fsc, simulate  # noqa: E402

from cryospin_relion.config import AbinitConfig  # noqa: E402
from cryospin_relion.engine.losses import per_image_loss, render  # noqa: E402
from cryospin_relion.engine.run import AbinitEngine  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_row(name: str, d: dict, cfg: AbinitConfig) -> dict:
    t0 = time.perf_counter()
    eng = AbinitEngine(d["images"], d["apix"], d["ctf"], cfg, "cpu", progress=False)
    eng.run()
    wall = time.perf_counter() - t0
    R, t = eng.final_poses()
    al = align_poses(R, d["R"], t, d["t"])
    r = backproject_fsc(d["images"], al["R_aligned"], al["t_aligned"], d["apix"], d["ctf"], d["vol"].double())
    s1 = [x for x, s in zip(eng.history["images_per_s"], eng.history["stage"]) if s == 1]
    s2 = [x for x, s in zip(eng.history["images_per_s"], eng.history["stage"]) if s == 2]
    return {"name": name, "wall_s": wall, "res05": r["res05"], "median_deg": al["median_deg"],
            "switch": eng.history["switch_epoch"], "s1_img_s": sum(s1) / max(1, len(s1)),
            "s2_img_s": sum(s2) / max(1, len(s2)), "rss_mb": peak_rss_mb(), "engine": eng}


def bare_rate(eng: AbinitEngine, d: dict, batch: int = 64, reps: int = 10) -> float:
    """Images/s of one slice + CTF + shift + L1 forward/backward (w.r.t. volume and poses) at the full box."""
    idx = torch.arange(batch)
    b = eng.batch(idx, eng.box)
    R = d["R"][idx].float().requires_grad_()
    t = d["t"][idx].float().requires_grad_()

    def once() -> None:
        per_image_loss(render(eng.volume.slices(R), b.ctf, t, eng.box), b.target, b.mask, "l1").sum().backward()

    once()  # warm-up (first-call allocations)
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return batch * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--snr", type=float, default=0.3)
    p.add_argument("--j", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="default row only")
    p.add_argument("--rows", default="", help="comma-separated substrings of the row names to run")
    a = p.parse_args()
    torch.set_num_threads(a.j)
    d = simulate(a.box, a.n, apix=128.0 / a.box, snr=a.snr, seed=0)
    nyq = 2 * d["apix"]
    rows_cfg = [("default (fast)", AbinitConfig())]
    if not a.quick:
        rows_cfg += [("paper encoder", AbinitConfig(preset="paper")),
                     ("loss l2", AbinitConfig(loss="l2")),
                     ("no coarse-to-fine", AbinitConfig(coarse_to_fine=False)),
                     ("no exploration", AbinitConfig(explore_candidates=0))]
    if a.rows:
        rows_cfg = [r for r in rows_cfg if any(k in r[0] for k in a.rows.split(","))]
    rows = []
    for n, c in rows_cfg:
        rows.append(run_row(n, d, c))
        r = rows[-1]
        print(f"[{r['name']}] wall {r['wall_s']:.1f} s, FSC0.5 {r['res05']:.2f} A, median error "
              f"{r['median_deg']:.1f} deg", flush=True)
    truth = backproject_fsc(d["images"], d["R"], d["t"], d["apix"], d["ctf"], d["vol"].double())
    print(f"\nN={a.n} box={a.box} apix={d['apix']:.2f} snr={a.snr} threads={a.j}; Nyquist {nyq:.2f} A; "
          f"FSC0.5 with the true poses {truth['res05']:.2f} A")
    print(f"{'config':<20}{'wall s':>8}{'FSC0.5 A':>10}{'x Nyq':>7}{'med err':>9}{'switch':>8}"
          f"{'s1 img/s':>10}{'s2 img/s':>10}{'peak MB':>9}")
    for r in rows:
        print(f"{r['name']:<20}{r['wall_s']:>8.1f}{r['res05']:>10.2f}{r['res05'] / nyq:>7.2f}{r['median_deg']:>9.1f}"
              f"{str(r['switch']):>8}{r['s1_img_s']:>10.0f}{r['s2_img_s']:>10.0f}{r['rss_mb']:>9.0f}")
    eng = rows[0]["engine"]
    cfg = eng.cfg
    bare = bare_rate(eng, d)
    per_img_passes = cfg.pose_iters + cfg.vol_iters
    print(f"\nstage 2: {rows[0]['s2_img_s']:.0f} img/s with {cfg.pose_iters} pose + {cfg.vol_iters} volume steps "
          f"per batch; bare slice+CTF+shift+loss fwd/bwd {bare:.0f} img/s "
          f"(ideal stage-2 rate {bare / per_img_passes:.0f} img/s)")


if __name__ == "__main__":
    main()
