"""Benchmark (#10): the first-pose pass from the encoder's heads (amortised) against the global scan.

    python bench/amortize.py --work W                      # dataset, stage 1, the three passes + stage 2
    python bench/amortize.py --work W --first-poses-only   # only the passes (from W/stage1's checkpoint)
    python bench/amortize.py --work W --measure-rule       # the fallback rule's figures (precision/recall)

Dataset (made once in --work/data and reused): `cryospin simulate` of the 70S ribosome map of
../shared/data/aspire (taken as 4.0 A/px, as bench/scale.py) straight at box 64 (working box 64),
--n particles (10,000), uniform random poses, CTF (defocus 1-2.5 um), Gaussian shifts (2 px std), SNR --snr
(0.1). The simulator is the project's forward model, equal to relion_project's
(tests/relion/test_relion_project.py).

Stage 1 is run once (`cryospin abinit --epochs-autodecode 0 --first-pose search`, in --work/stage1): it stops
right after the switch. Its checkpoint is then wound back to just before the first-pose pass (the end of the
switch epoch, the particles outside the stage-1 subset back at their random start) and, for each mode of
``first_pose`` (search = the global scan + refinement, as before; heads = the best head; amortized = heads +
local refinement + the scan for the images the rule sends there), continued with `cryospin abinit --continue`
(the pass, the stage-2 epochs, the outputs). Stage 1 is therefore the same for every row.

Columns: the pass's wall seconds and images/s (history.json ``first_poses``), the share of its images sent to
the global scan, where its winners came from, the median rotation error after the pass of the particles
outside the subset against the truth (after the best global alignment, mirror included: --first-poses-only),
and the final resolution at FSC 0.5 against the ground truth of a backprojection with the run's poses after
`cryospin compare` alignment (as bench/scale.py), and the same with the true poses.

--measure-rule: for --rule-n particles outside the subset, the head-local pose (heads + refinement, no scan)
and the full search's pose; "wrong basin" = the two more than 15 deg apart with the search's loss lower.
Prints, per threshold of the rule's figure, the share of images sent to the scan and the recall of the
wrong-basin images (share of them sent) and precision (share of the sent that are wrong-basin).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT.parent / "shared" / "data" / "aspire" / "clean70SRibosome_vol_65p.mrc"
MODES = ("search", "heads", "amortized")


def sh(cmd: list[str], log: Path | None = None, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))
    return time.perf_counter() - t0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cryospin_relion.cli", *args]


def make_dataset(data: Path, n: int, snr: float, seed: int) -> None:
    params = {"n": n, "box": 64, "snr": snr, "seed": seed}
    stamp = data / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    sh(cli("simulate", "--map", str(MAP), "--map-apix", "4.0", "--o", str(data), "--n", str(n), "--box", "64",
           "--apix", f"{4.0 * 65 / 64:.6f}", "--snr", str(snr), "--shift-std", "2", "--seed", str(seed), "--quiet"))
    stamp.write_text(json.dumps(params))


def resolution(work: Path, name: str, star: Path, data: Path, j: int) -> float:
    recon = work / f"{name}_recon"
    shutil.rmtree(recon, ignore_errors=True)
    sh(cli("reconstruct", "--i", str(star), "--o", str(recon), "--j", str(j), "--quiet"), cwd=data)
    out = recon / "compare.json"
    sh(cli("compare", "--map", str(recon / "map.mrc"), "--ref", str(data / "ground_truth.mrc"), "--json", str(out),
           "--quiet"))
    return float(json.loads(out.read_text())["fsc_0.5_A"])


# -- the state just before the first-pose pass ----------------------------------------------------------------

def rewind_to_switch(state: dict, eng) -> dict:
    """The engine state of a checkpoint taken right after the switch (``epochs_autodecode: 0``), wound back to
    the end of the switch epoch before its first-pose pass: stage 1, every batch done, the particles outside
    the stage-1 subset back at their random start. (The switch epoch's pose change is then recorded as 0.)"""
    from cryospin_relion.engine.schedule import Seeds
    from cryospin_relion.model.pose_memory import PoseMemory

    s = copy.deepcopy(state)
    h = s["history"]
    rec = h["epochs"].pop()
    assert rec["switched"] and s["stage"] == 2, "not a checkpoint taken at the switch"
    S = len(eng.s1_idx)
    s["stage"], s["epoch"], s["done"] = 1, rec["epoch"] - 1, False
    s["batch_pos"] = math.ceil(S / eng.cfg.schedule.batch_size)
    shares = rec["winner_source_share"] or {}
    s["tally"] = {"heads": len(rec["head_wins"]), "loss_sum": rec["loss"] * S, "count": S,
                  "time_s": rec["epoch_time_s"] - (h.get("assign_s") or 0.0), "wins": rec["head_wins"],
                  "sources": [int(round(v * S)) for v in shares.values()] or [S, 0, 0, 0]}
    h["switch_epoch"], h["assign_s"] = None, None
    h.pop("first_poses", None)
    out = torch.ones(eng.N, dtype=torch.bool)
    out[eng.s1_idx] = False
    start = PoseMemory.random(eng.N, Seeds.generator(eng.seeds.memory(s["trial"])))
    s["memory"]["rotations"][out] = start.rotations[out]
    s["memory"]["shifts"][out] = start.shifts[out]
    s["prev_R"] = s["memory"]["rotations"].clone()
    return s


def load_engine(run: Path, star: Path, **override):
    """The engine of run folder ``run`` (its config with ``override``), at the state before the first-pose pass."""
    from cryospin_relion.config import AbinitConfig
    from cryospin_relion.data.stack import build_cache
    from cryospin_relion.engine.run import AbinitEngine
    from cryospin_relion.geometry.ctf import CTF
    from cryospin_relion.io.read import read_particles

    cfg = AbinitConfig.from_yaml(run / "config.yaml").override(source="bench", **override)
    table = read_particles(star)
    cache = build_cache(table, run, cfg.data.box, progress=False)
    eng = AbinitEngine(cache.images, torch.as_tensor(np.asarray(cache.apix), dtype=torch.float32),
                       CTF.from_arrays(table.ctf), cfg, "cpu")
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["engine"]
    eng.load_state_dict(rewind_to_switch(state, eng))
    return eng, table


def true_rotations(star: Path) -> np.ndarray:
    from cryospin_relion.io.read import read_particles

    return read_particles(star, no_ctf=True, check_stacks=False).rotations


def errors_outside(eng, R_true: np.ndarray, R: np.ndarray | None = None) -> np.ndarray:
    """Rotation errors (deg) of the particles outside the stage-1 subset (poses ``R``, default the pose
    memory), in the truth's frame fitted on the subset (whose poses stage 1 estimated)."""
    from cryospin_relion.evaluate.pose_error import align_pose_sets
    from cryospin_relion.geometry.rotations import geodesic_distance_deg

    R = eng.memory.rotations.double().cpu().numpy() if R is None else R
    s1 = eng.s1_idx.numpy()
    al = align_pose_sets(R_true[s1], R[s1])
    out = np.ones(eng.N, bool)
    out[s1] = False
    R_al, _ = al.to_truth_frame(R[out])
    return geodesic_distance_deg(torch.as_tensor(R_al), torch.as_tensor(R_true[out])).numpy()


def measure_rule(run: Path, data: Path, a) -> None:
    """Figures of the head-local pose against the full search on particles outside the stage-1 subset."""
    from cryospin_relion.engine.forward import per_image_loss
    from cryospin_relion.engine.schedule import FIRST_POSE_BATCH0, Seeds
    from cryospin_relion.engine.stage1 import FIRST_POSE_REFERENCE, candidate_losses, pose_fit, search_poses
    from cryospin_relion.geometry.rotations import geodesic_distance_deg, random_rotations

    torch.set_num_threads(a.j)
    eng, _ = load_engine(run, data / "particles.star", first_pose="search")
    R_true = true_rotations(data / "particles.star")
    out = torch.ones(eng.N, dtype=torch.bool)
    out[eng.s1_idx] = False
    rows = out.nonzero()[:, 0][torch.randperm(int(out.sum()), generator=torch.Generator().manual_seed(1))[:a.rule_n]]
    rows = rows.sort().values
    c, sc, B = eng.crop(), eng.cfg.search, eng.cfg.schedule.batch_size
    eng.encoder.eval()
    keys = ("hl_loss", "full_loss", "empty", "rand_mean", "rand_std", "d_hl_full", "hl_R", "full_R", "heads_loss")
    acc = {k: [] for k in keys}
    t_hl = t_full = 0.0
    with torch.no_grad():
        for bi, idx in enumerate(torch.tensor_split(rows, math.ceil(len(rows) / B))):
            b = eng.batch(idx, c)
            t0 = time.perf_counter()
            hr, ht = eng.encoder(b.images)
            g = Seeds.generator(eng.seeds.search(eng.trial, eng.epoch, FIRST_POSE_BATCH0 + bi))
            hl = search_poses(eng.volume, b, hr, ht, g, None, sc, eng.max_shift, eng.cfg.model.loss)
            t_hl += time.perf_counter() - t0
            t0 = time.perf_counter()
            full = eng.explore(b, FIRST_POSE_BATCH0 + bi)
            t_full += time.perf_counter() - t0
            K = 16
            Rr = random_rotations(len(idx) * K, torch.Generator().manual_seed(bi), dtype=torch.float32)
            lr = candidate_losses(eng.volume, b, Rr.reshape(len(idx), K, 3, 3), hl.shift[:, None].expand(-1, K, -1),
                                  eng.cfg.model.loss)
            acc["hl_loss"].append(hl.loss)
            acc["full_loss"].append(full.loss)
            acc["empty"].append(per_image_loss(torch.zeros_like(b.target), b.target, eng.cfg.model.loss))
            acc["rand_mean"].append(lr.mean(1))
            acc["rand_std"].append(lr.std(1))
            acc["d_hl_full"].append(geodesic_distance_deg(hl.rot.double(), full.rot.double()))
            acc["hl_R"].append(hl.rot.double())
            acc["full_R"].append(full.rot.double())
            acc["heads_loss"].append(candidate_losses(eng.volume, b, hr, ht, eng.cfg.model.loss).min(1).values)
        ref = eng.s1_idx[:FIRST_POSE_REFERENCE]
        ref_fit = float(torch.cat([pose_fit(eng.volume, b, eng.memory.rotations[b.idx], eng.memory.shifts[b.idx],
                                            eng.cfg.model.loss)
                                   for b in (eng.batch(r, c) for r in torch.split(ref, B))]).median())
    f = {k: torch.cat(v).numpy() for k, v in acc.items()}
    R_mem = eng.memory.rotations.double().numpy().copy()
    errs = {}
    for name in ("hl_R", "full_R"):
        R_mem[rows.numpy()] = f[name]
        e = np.full(eng.N, np.nan)
        e[out.numpy()] = errors_outside(eng, R_true, R_mem)
        errs[name] = e[rows.numpy()]
    wrong = (f["d_hl_full"] > 15) & (f["full_loss"] < f["hl_loss"])
    n = len(rows)
    print(f"{n} particles outside the subset: head-local {t_hl:.1f} s, full search {t_full:.1f} s; "
          f"head-local > 15 deg from the search (search lower): {100 * wrong.mean():.1f}%")
    print(f"median error vs truth: head-local {np.median(errs['hl_R']):.1f} deg, search {np.median(errs['full_R']):.1f}"
          f" deg; within 15 deg: {100 * (errs['hl_R'] < 15).mean():.0f}% / {100 * (errs['full_R'] < 15).mean():.0f}%")
    print(f"reference: median fit of {len(ref)} stage-1 subset images at their remembered poses {ref_fit:.4g}")
    figures = {"fit / reference (the rule)": (1 - f["hl_loss"] / f["empty"]) / ref_fit,
               "fit = 1 - loss / empty-model loss": 1 - f["hl_loss"] / f["empty"],
               "z = (random-pose loss - loss) / its std": (f["rand_mean"] - f["hl_loss"]) / f["rand_std"],
               "gain over random = 1 - loss / random-pose loss": 1 - f["hl_loss"] / f["rand_mean"]}
    for name, x in figures.items():
        print(f"\n{name}: right basin median {np.median(x[~wrong]):.4g}, wrong basin median {np.median(x[wrong]):.4g}")
        print("| threshold | sent to the scan | recall (wrong sent) | precision | right kept |")
        print("|---|---|---|---|---|")
        ts = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8) if "rule" in name else np.quantile(x, (0.02, 0.05, 0.1, 0.15, 0.2, 0.3))
        for t in ts:
            sent = x < t
            print(f"| {t:.4g} | {100 * sent.mean():.1f}% | {100 * (sent & wrong).sum() / max(1, wrong.sum()):.0f}% | "
                  f"{100 * (sent & wrong).sum() / max(1, sent.sum()):.0f}% | "
                  f"{100 * (~sent & ~wrong).sum() / max(1, (~wrong).sum()):.0f}% |")
    np.savez(run.parent / "rule_figures.npz", wrong=wrong, err_hl=errs["hl_R"], err_full=errs["full_R"],
             **{k: v for k, v in f.items() if not k.endswith("_R")})


# -- modes -------------------------------------------------------------------------------------------------------

def stage1(work: Path, data: Path, a) -> Path:
    run = work / "stage1"
    if (run / "checkpoint.pt").is_file() and (run / "history.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    wall = sh(cli("abinit", "--i", str(data / "particles.star"), "--o", str(run), "--j", str(a.j), "--quiet",
                  "--epochs-autodecode", "0", "--first-pose", "search", *a.abinit_args.split()), work / "stage1.log")
    print(f"stage 1: {wall:.0f} s", flush=True)
    return run


def first_poses_only(run: Path, data: Path, a) -> dict:
    """Each mode's pass from the wound-back stage-1 state, in this process: time, sources, errors vs truth."""
    torch.set_num_threads(a.j)
    R_true = true_rotations(data / "particles.star")
    rows = {}
    for mode in a.modes.split(","):
        eng, _ = load_engine(run, data / "particles.star", first_pose=mode)
        t0 = time.perf_counter()
        eng._end_epoch()  # the switch: the first-pose pass, then the pose table
        wall = time.perf_counter() - t0
        fp = eng.history.first_poses
        e = errors_outside(eng, R_true)
        rows[mode] = {"wall_s": wall, "pass_s": fp.seconds, "img_s": fp.particles / fp.seconds,
                      "scanned": fp.scanned / fp.particles, "sources": fp.shares(),
                      "median_deg": float(np.median(e)), "within_15": float((e < 15).mean())}
        print(mode, json.dumps(rows[mode]), flush=True)
    return rows


def continue_mode(work: Path, run: Path, data: Path, mode: str, a) -> dict:
    """The run of one mode: the wound-back checkpoint continued by `cryospin abinit --continue`."""
    from cryospin_relion.config import AbinitConfig

    out = work / f"run_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    eng, _ = load_engine(run, data / "particles.star", first_pose=mode)
    cfg = AbinitConfig.from_yaml(run / "config.yaml").override(source="bench", first_pose=mode,
                                                               epochs_autodecode=a.epochs_autodecode)
    cfg.to_yaml(out / "config.yaml")
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    ck["engine"] = eng.state_dict()
    torch.save(ck, out / "checkpoint.pt")
    for f in run.glob("cache_*"):
        os.link(f, out / f.name)
    wall = sh(cli("abinit", "--i", str(data / "particles.star"), "--o", str(out), "--j", str(a.j), "--quiet",
                  "--continue", "--config", str(out / "config.yaml"), "--json-summary", str(out / "summary.json"),
                  "--true-poses", str(data / "particles.star")),
              work / f"run_{mode}.log")
    h = json.loads((out / "history.json").read_text())
    fp, pe = h["first_poses"], h["pose_error"]
    at_switch = pe["median_deg"][pe["epoch"].index(h["switch_epoch"])]
    return {"wall_s": wall, "pass_s": fp["seconds"], "img_s": fp["particles"] / fp["seconds"],
            "scanned": fp["scanned"] / fp["particles"],
            "sources": {k: v / fp["particles"] for k, v in fp["sources"].items()},
            "switch_median_deg": at_switch, "final_median_deg": pe["median_deg"][-1],
            "res": resolution(work, f"run_{mode}", out / "particles.star", data, a.j)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="bench_amortize", help="working folder (the dataset and stage 1 are reused)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--j", type=int, default=2, help="threads")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--epochs-autodecode", type=int, default=6)
    p.add_argument("--abinit-args", default="", help="extra arguments for the stage-1 run (cryospin abinit)")
    p.add_argument("--first-poses-only", action="store_true", help="only the first-pose passes (no stage 2)")
    p.add_argument("--measure-rule", action="store_true", help="the fallback rule's precision / recall")
    p.add_argument("--rule-n", type=int, default=2048, help="particles for --measure-rule")
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    make_dataset(data, a.n, a.snr, a.seed)
    run = stage1(work, data, a)
    if a.measure_rule:
        measure_rule(run, data, a)
        return
    if a.first_poses_only:
        rows = first_poses_only(run, data, a)
        (work / "first_poses.json").write_text(json.dumps(rows, indent=1))
        print("\n| first poses | pass s | img/s | sent to the scan | winners heads/local/memory/global | "
              "median error deg (outside subset) | within 15 deg |")
        print("|---|---|---|---|---|---|---|")
        for m, r in rows.items():
            print(f"{_pass_cells(m, r)} {r['median_deg']:.1f} | {100 * r['within_15']:.0f}% |")
        return
    rows = {m: continue_mode(work, run, data, m, a) for m in a.modes.split(",")}
    res_true = resolution(work, "truth", data / "particles.star", data, a.j)
    (work / "results.json").write_text(json.dumps({"rows": rows, "res_true": res_true}, indent=1))
    print(f"\n{describe()}")
    print(f"{a.n} particles, box 64, SNR {a.snr}, --j {a.j}; true poses FSC 0.5 {res_true:.2f} A")
    print("| first poses | pass s | img/s | sent to the scan | winners heads/local/memory/global | median error "
          "after the pass / final, deg (all particles) | FSC0.5 A | ratio to true poses |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        print(f"{_pass_cells(m, r)} {r['switch_median_deg']:.1f} / {r['final_median_deg']:.1f} | {r['res']:.2f} | "
              f"{r['res'] / res_true:.2f} |")


def _pass_cells(mode: str, r: dict) -> str:
    """The first cells of a table row: mode, pass seconds, images/s, share scanned, winner sources."""
    s = r["sources"]
    return (f"| {mode} | {r['pass_s']:.1f} | {r['img_s']:.0f} | {100 * r['scanned']:.1f}% | "
            f"{'/'.join(f'{100 * s[k]:.0f}' for k in ('heads', 'local', 'memory', 'global'))}% |")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
