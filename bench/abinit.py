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
import time

import torch

from cryospin_relion.config import AbinitConfig
from cryospin_relion.engine.forward import per_image_loss, render
from cryospin_relion.engine.run import AbinitEngine
from cryospin_relion.evaluate.blobs import backproject_fsc, simulate_blobs
from cryospin_relion.evaluate.pose_error import align_pose_sets


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_row(name: str, d: dict, cfg: AbinitConfig) -> dict:
    t0 = time.perf_counter()
    eng = AbinitEngine(d["images"], d["apix"], d["ctf"], cfg, "cpu")
    eng.run()
    wall = time.perf_counter() - t0
    R, t = eng.final_poses()
    al = align_pose_sets(d["R"], R, d["t"], t)
    R_al, t_al = al.to_truth_frame(R, t)
    r = backproject_fsc(d["images"], R_al, t_al, d["apix"], d["ctf"], d["vol"].double())
    h = eng.history
    s1 = [x for x, s in zip(h.column("images_per_s"), h.column("stage")) if s == 1]
    s2 = [x for x, s in zip(h.column("images_per_s"), h.column("stage")) if s == 2]
    return {"name": name, "wall_s": wall, "res05": r["res05"], "median_deg": al.median_deg,
            "switch": h.switch_epoch, "s1_img_s": sum(s1) / max(1, len(s1)),
            "s2_img_s": sum(s2) / max(1, len(s2)), "rss_mb": peak_rss_mb(), "engine": eng}


def bare_rate(eng: AbinitEngine, d: dict, batch: int = 64, reps: int = 10) -> float:
    """Images/s of one slice + CTF + shift + L1 forward/backward (w.r.t. volume and poses) at the full box."""
    idx = torch.arange(batch)
    b = eng.batch(idx, eng.box)
    R = d["R"][idx].float().requires_grad_()
    t = d["t"][idx].float().requires_grad_()

    def once() -> None:
        per_image_loss(render(eng.volume.slices(R, freqs=b.mask.freqs), b.ctf, t, b.mask), b.target, "l1").sum().backward()

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
    d = simulate_blobs(a.box, a.n, apix=128.0 / a.box, snr=a.snr, seed=0)
    nyq = 2 * d["apix"]
    base = AbinitConfig()
    rows_cfg = [("default (fast)", base)]
    if not a.quick:
        rows_cfg += [("paper encoder", base.override(preset="paper")),
                     ("loss l2", base.override(loss="l2")),
                     ("no coarse-to-fine", base.override(coarse_to_fine=False)),
                     ("no exploration", base.override(explore_candidates=0))]
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
    per_img_passes = cfg.optim.pose_iters + cfg.optim.vol_iters
    print(f"\nstage 2: {rows[0]['s2_img_s']:.0f} img/s with {cfg.optim.pose_iters} pose + {cfg.optim.vol_iters} "
          f"volume steps per batch; bare slice+CTF+shift+loss fwd/bwd {bare:.0f} img/s "
          f"(ideal stage-2 rate {bare / per_img_passes:.0f} img/s)")


if __name__ == "__main__":
    main()
