"""Benchmark: `cryospin abinit` against RELION 3.1's InitialModel on data projected by RELION (prints a table).

    python bench/abinit_vs_relion.py                          # everything, ~1 h on 2 cores
    python bench/abinit_vs_relion.py --rows truth,default     # some rows
    python bench/abinit_vs_relion.py --work /tmp/b --n 2000   # smaller, kept folder

Dataset (made once in --work/data and reused while its parameters match):
the 70S ribosome map of ../shared/data/aspire/clean70SRibosome_vol_65p.mrc (header
voxel size unset; taken as 4.0 A, which makes it a ribosome-sized ~210 A particle),
resampled by `cryospin simulate` to box 64 at 65/64 * 4.0 A, which also draws the
uniform random poses, CTFs (defocus 1-2.5 um) and Gaussian origins (2 px std)
into a RELION 3.1 STAR. The images are then made by RELION itself:
`relion_project --ang --ctf` gives the clean projections, whose variance sets the
noise (SNR = var(signal) / var(noise)), and `relion_project --ang --ctf --add_noise
--white_noise 1` of the map scaled to that SNR gives the particles.

Rows (each program is run as its own process; wall time and peak RSS are of that process):

- true poses (the limit): `cryospin reconstruct` with the true poses.
- cryospin default / paper: `cryospin abinit` (default config; --preset paper).
- RELION InitialModel: `relion_refine --denovo_3dref --sgd --ctf --K 1 --sym C1 --zero_mask
  --flatten_solvent` with the shortened schedule 10/40/10 iterations and the other
  options of the RELION 3.1 GUI's defaults (--sgd_ini/fin_resol 35/15, subsets 100/500,
  --healpix_order 1, --offset_range 6, --offset_step 2), --j threads. On 2 cores this
  schedule takes hours (the iterations slow down as the subset grows from 100 to 500
  particles and the resolution from 35 to 15 A: iteration 19 took 3 minutes), so RELION
  is stopped after --relion-limit-min minutes and the last iteration it wrote (every 20)
  is scored, timed up to the moment it was written: its wall time is a lower bound of
  the full run's.

Columns: wall seconds; "FSC0.5 poses", the resolution at FSC 0.5 against the truth of
a map backprojected (`cryospin reconstruct`, same for every row) with that row's
poses, after aligning it to the truth over rotations, translations and the mirror
(`cryospin compare`); its ratio to the true-pose limit; "FSC0.5 job map", the same
for the map the job itself wrote (cryospin: map.mrc, low-passed at its half-map
0.143 resolution; RELION: the last iteration's class map, limited by
--sgd_fin_resol); the median rotation error in degrees after the best global
alignment of the pose sets (mirror included); peak memory.
A second table gives the stage-2 images/s of the default run against the bare
slice + CTF + shift + L1 forward/backward rate at the working box (the floor).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np

from machine import describe  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT.parent / "shared" / "data" / "aspire" / "clean70SRibosome_vol_65p.mrc"
MAP_APIX = 4.0


def run(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run a command; returns wall seconds and the peak RSS (MB) of the process and its children."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text(errors="replace")[-2000:]
        sys.exit(f"{shlex.join(cmd)} failed (exit {rc}); log {log}:\n{tail}")
    return {"wall_s": wall, "rss_mb": ru.ru_maxrss / 1024.0}


def quiet_run(cmd: list[str], cwd: Path) -> None:
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-2000:]}")


def fmt(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def make_dataset(data: Path, n: int, box: int, snr: float, seed: int) -> None:
    params = {"map": MAP.name, "map_apix": MAP_APIX, "n": n, "box": box, "snr": snr, "seed": seed}
    stamp = data / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        print(f"dataset: reusing {data}", flush=True)
        return
    if not MAP.is_file():
        sys.exit(f"{MAP}: not found (the benchmark needs ../shared/data beside the project)")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    apix = MAP_APIX * 65 / box
    t0 = time.perf_counter()
    quiet_run(["cryospin", "simulate", "--map", str(MAP), "--map-apix", str(MAP_APIX), "--o", "sim", "--n", str(n),
               "--box", str(box), "--apix", f"{apix:.6f}", "--snr", "inf", "--seed", str(seed), "--quiet"], data)
    quiet_run(["relion_project", "--i", "sim/ground_truth.mrc", "--ang", "sim/particles.star", "--ctf",
               "--o", "clean"], data)
    signal_var = float(np.var(mrcfile.mmap(data / "clean.mrcs", mode="r").data))
    with mrcfile.open(data / "sim" / "ground_truth.mrc") as m:
        truth = (m.data / np.sqrt(signal_var / snr)).astype(np.float32)  # noise std 1 after projection
        voxel = m.voxel_size
    with mrcfile.new(data / "truth.mrc") as m:
        m.set_data(truth)
        m.voxel_size = voxel
    quiet_run(["relion_project", "--i", "truth.mrc", "--ang", "sim/particles.star", "--ctf", "--add_noise",
               "--white_noise", "1", "--o", "particles"], data)
    for f in ("clean.mrcs", "clean.star", "sim/particles.mrcs"):
        (data / f).unlink()
    stamp.write_text(json.dumps(params))
    print(f"dataset: {n} RELION projections, box {box}, {apix:.4f} A/px, SNR {snr} in {data} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)


def compare(work: Path, name: str, mapfile: Path, poses: Path | None, data: Path) -> dict:
    out = work / name / f"compare_{mapfile.stem}.json"
    cmd = ["cryospin", "compare", "--map", str(mapfile), "--ref", str(data / "truth.mrc"), "--json", str(out),
           "--quiet"]
    if poses is not None:
        cmd += ["--poses", str(poses), "--true-poses", str(data / "particles.star")]
    quiet_run(cmd, work)
    return json.loads(out.read_text())


def backproject(work: Path, name: str, star: Path, j: int) -> Path:
    out = work / name / "recon"
    quiet_run(["cryospin", "reconstruct", "--i", str(star), "--o", str(out), "--j", str(j), "--quiet"], work / "data")
    return out / "map.mrc"


def row_truth(work: Path, j: int) -> dict:
    (work / "truth").mkdir(exist_ok=True)
    star = work / "data" / "particles.star"
    r = run(["cryospin", "reconstruct", "--i", str(star), "--o", str(work / "truth" / "recon"), "--j", str(j),
             "--quiet"], work / "data", work / "truth" / "stdout.txt")
    c = compare(work, "truth", work / "truth" / "recon" / "map.mrc", None, work / "data")
    return {**r, "res_poses": c["fsc_0.5_A"], "res_job": c["fsc_0.5_A"], "median_deg": 0.0}


def row_cryospin(work: Path, name: str, extra: list[str], j: int) -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    summary = out / "summary.json"
    r = run(["cryospin", "abinit", "--i", str(work / "data" / "particles.star"), "--o", str(out), "--j", str(j),
             "--quiet", "--json-summary", str(summary), *extra], work / "data", out / "stdout.txt")
    recon = backproject(work, name, out / "particles.star", j)
    cp = compare(work, name, recon, out / "particles.star", work / "data")
    cj = compare(work, name, out / "map.mrc", None, work / "data")
    hist = json.loads((out / "history.json").read_text())
    box = max(hist["crop"])  # stage-2 epochs at the full working box
    s2 = [x for x, s, c in zip(hist["images_per_s"], hist["stage"], hist["crop"]) if s == 2 and c == box]
    return {**r, "res_poses": cp["fsc_0.5_A"], "res_job": cj["fsc_0.5_A"],
            "median_deg": cp["poses"]["rotation_error_deg"]["median"], "summary": json.loads(summary.read_text()),
            "s2_img_s": float(np.mean(s2)) if s2 else float("nan")}


def relion_command(j: int, iters: tuple[int, int, int], diameter: float) -> list[str]:
    ini, mid, fin = iters
    return ["relion_refine", "--o", "../relion/run", "--i", "particles.star", "--denovo_3dref", "--sgd", "--ctf",
            "--K", "1", "--sym", "C1", "--zero_mask", "--flatten_solvent",
            "--sgd_ini_iter", str(ini), "--sgd_inbetween_iter", str(mid), "--sgd_fin_iter", str(fin),
            "--sgd_write_iter", "20", "--sgd_ini_resol", "35", "--sgd_fin_resol", "15",
            "--sgd_ini_subset", "100", "--sgd_fin_subset", "500", "--particle_diameter", f"{diameter:.0f}",
            "--oversampling", "1", "--healpix_order", "1", "--offset_range", "6", "--offset_step", "2",
            "--pool", "3", "--pad", "1", "--skip_gridding", "--dont_combine_weights_via_disc", "--j", str(j)]


def evaluate_relion(work: Path, started: float, total_iters: int, rss_mb: float) -> dict:
    """Score the last iteration RELION wrote (run_itNNN_class001.mrc): its class map against the truth.

    Wall time = the map file's modification time - ``started`` (epoch seconds), so a run stopped at the
    time limit is timed up to the iteration it is scored at. RELION's SGD data.star holds the poses of
    each particle's last subset visit only (most are stale), so no pose error is given."""
    out = work / "relion"
    maps = sorted(out.glob("run_it[0-9][0-9][0-9]_class001.mrc"))
    last = maps[-1]
    it = int(last.name[6:9])
    cj = compare(work, "relion", last, None, work / "data")
    return {"wall_s": last.stat().st_mtime - started, "rss_mb": rss_mb, "res_poses": None, "res_job": cj["fsc_0.5_A"],
            "median_deg": None, "iteration": it, "total_iterations": total_iters}


def row_relion(work: Path, j: int, iters: tuple[int, int, int], diameter: float, limit_min: float) -> dict:
    out = work / "relion"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    cmd = relion_command(j, iters, diameter)
    started = time.time()
    deadline = time.monotonic() + 60 * limit_min if limit_min > 0 else None
    with open(out / "stdout.txt", "w") as fh:
        p = subprocess.Popen(cmd, cwd=work / "data", stdout=fh, stderr=subprocess.STDOUT)
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                print(f"  RELION stopped at the {limit_min:g}-minute limit", flush=True)
                break
            time.sleep(2)
    r = evaluate_relion(work, started, sum(iters), ru.ru_maxrss / 1024.0)
    return {**r, "cmd": shlex.join(cmd)}


def bare_rate(box: int, j: int, batch: int = 64, reps: int = 10) -> float:
    """Images/s of one slice + CTF + shift + L1 forward/backward (volume and poses) at ``box``
    (``bench/abinit.py``'s measurement, on a small simulated batch)."""
    import torch

    from abinit import bare_rate as engine_bare_rate  # bench/abinit.py: the script's folder is on sys.path

    from cryospin_relion.config import AbinitConfig
    from cryospin_relion.engine.run import AbinitEngine
    from cryospin_relion.evaluate.blobs import simulate_blobs

    torch.set_num_threads(j)
    d = simulate_blobs(box, batch, apix=4.0, snr=0.1, seed=0)
    eng = AbinitEngine(d["images"], d["apix"], d["ctf"], AbinitConfig(), "cpu", progress=False)
    return engine_bare_rate(eng, d, batch, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="bench_abinit_vs_relion", help="working folder (dataset is reused)")
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--j", type=int, default=2, help="threads for every program")
    p.add_argument("--rows", default="truth,default,relion,paper", help="comma-separated: truth,default,paper,relion")
    p.add_argument("--relion-iters", default="10,40,10", help="--sgd_ini_iter,--sgd_inbetween_iter,--sgd_fin_iter")
    p.add_argument("--diameter", type=float, default=240.0, help="RELION --particle_diameter in A")
    p.add_argument("--relion-limit-min", type=float, default=25.0,
                   help="stop RELION after this many minutes and score the last iteration it wrote (every 20; "
                        "0 = no limit). On 2 cores the 10/40/10 schedule takes hours: iteration 19 alone took 3 min")
    p.add_argument("--abinit-args", default="", help="extra arguments for every cryospin abinit row")
    p.add_argument("--table-only", action="store_true", help="print the table of the rows in --work/results.json")
    a = p.parse_args()
    work = Path(a.work).resolve()
    if a.table_only:
        report(json.loads((work / "results.json").read_text()), a)
        return
    if shutil.which("relion_project") is None:
        sys.exit("relion_project: not on PATH (install RELION 3.1: apt-get install -y relion)")
    work.mkdir(parents=True, exist_ok=True)
    make_dataset(work / "data", a.n, a.box, a.snr, a.seed)
    extra = shlex.split(a.abinit_args)
    rows = {}
    for key in [k.strip() for k in a.rows.split(",") if k.strip()]:
        print(f"running {key} ...", flush=True)
        if key == "truth":
            rows["true poses (limit)"] = row_truth(work, a.j)
        elif key == "default":
            rows["cryospin default"] = row_cryospin(work, "default", extra, a.j)
        elif key == "paper":
            rows["cryospin paper"] = row_cryospin(work, "paper", ["--preset", "paper", *extra], a.j)
        elif key == "relion":
            it = tuple(int(x) for x in a.relion_iters.split(","))
            rows["RELION InitialModel"] = row_relion(work, a.j, it, a.diameter, a.relion_limit_min)
        else:
            sys.exit(f"--rows: unknown row {key!r}")
        r = list(rows.values())[-1]
        print(f"  {list(rows)[-1]}: {r['wall_s']:.0f} s, FSC0.5 (poses) {fmt(r['res_poses'])} A, "
              f"(job map) {fmt(r['res_job'])} A, median error {fmt(r['median_deg'], 1)} deg", flush=True)
        old = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
        (work / "results.json").write_text(json.dumps({**old, **rows}, indent=2))
    report(rows, a)


def report(rows: dict, a: argparse.Namespace) -> None:
    apix = MAP_APIX * 65 / a.box
    limit = rows.get("true poses (limit)", {}).get("res_poses")
    relion_wall = rows.get("RELION InitialModel", {}).get("wall_s")
    print(f"\n{describe()}")
    print(f"N={a.n} box={a.box} apix={apix:.4f} A SNR={a.snr} threads={a.j}; Nyquist {2 * apix:.2f} A")
    print(f"{'row':<34}{'wall s':>8}{'x RELION':>9}{'FSC0.5 poses':>13}{'x limit':>8}{'FSC0.5 job map':>15}"
          f"{'median err':>11}{'peak MB':>9}")
    for name, r in rows.items():
        xr = f"{r['wall_s'] / relion_wall:.2f}" if relion_wall else "-"
        xl = f"{r['res_poses'] / limit:.2f}" if limit and r["res_poses"] else "-"
        if "iteration" in r:
            name = f"{name} (it {r['iteration']}/{r['total_iterations']})"
        print(f"{name:<34}{r['wall_s']:>8.0f}{xr:>9}{fmt(r['res_poses']):>13}{xl:>8}{fmt(r['res_job']):>15}"
              f"{fmt(r['median_deg'], 1):>11}{r['rss_mb']:>9.0f}")
    if "cryospin default" in rows:
        r = rows["cryospin default"]
        box = min(a.box, 64)  # the default working box: min(input box, max_box 64)
        bare = bare_rate(box, a.j)
        print(f"\nstage 2 (default, epochs at the full box): {r['s2_img_s']:.0f} img/s; bare slice+CTF+shift+L1 fwd/bwd at box {box}: "
              f"{bare:.0f} img/s; with 5 pose + 1 volume steps per batch the floor is {bare / 6:.0f} img/s")
    for name, r in rows.items():
        if "summary" in r:
            sm = r["summary"]
            print(f"{name}: stage 1 {sm['stage1_s']:.0f} s, stage 2 {sm['stage2_s']:.0f} s, outputs "
                  f"{sm['final_outputs_s']:.0f} s, switch after epoch {sm['switch_epoch']}, "
                  f"half-map FSC0.143 {sm['resolution_A']:.2f} A")
    if "RELION InitialModel" in rows:
        print(f"\nRELION command: {rows['RELION InitialModel']['cmd']}")


if __name__ == "__main__":
    main()
