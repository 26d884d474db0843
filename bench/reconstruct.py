"""Benchmark: images/s of `cryospin reconstruct` vs RELION 3.1's relion_reconstruct on the same data.

    python bench/reconstruct.py                 # 10,000 images, box 64, 2 threads
    python bench/reconstruct.py --n 2000 --repeat 3 --keep /tmp/bench

Makes a map of pseudo-atoms (box 64, 2 A/px), a STAR of --n uniformly random
poses with origins and CTFs, projects it with relion_project --ctf into a
temporary folder, then times, as wall-clock time of the whole program (start-up,
reading, insertion, inversion, writing):

- cryospin reconstruct --j 1 and --j J (CTF-corrected; writes half1, half2, full map, FSC),
- relion_reconstruct --ctf (full map only; it has no thread option),
- mpirun -n J relion_reconstruct_mpi --ctf (full map),
- relion_reconstruct --ctf three times (--subset 1, --subset 2, all), which
  is what it takes RELION to give the outputs of one cryospin run.

Prints a table with wall and CPU seconds, images/s and the speed relative to
relion_reconstruct, and the FSC between the two full maps as a sanity check.
On a shared machine compare CPU seconds too: wall times then depend on the load.
The "in-process" rows time cryospin's work without the Python start-up
(importing torch and the package), which dominates at this size.
Needs RELION on PATH.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
import torch

from cryospin_relion.geometry.fsc import fsc
from cryospin_relion.geometry.rotations import matrix_to_euler_np, random_rotations
from cryospin_relion.io.mrc import read_mrc, write_mrc


def atoms_map(n: int, natoms: int = 400, sigma: float = 0.8, seed: int = 0) -> np.ndarray:
    """Pseudo-atoms in an ellipsoid, (n, n, n) float32."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1, 1, (4 * natoms, 3))
    pts = pts[(pts**2).sum(1) <= 1][:natoms] * 0.3 * n * np.array([1.0, 0.8, 0.6])
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float64) - n // 2,) * 3, indexing="ij")
    vol = np.zeros((n, n, n))
    for px, py, pz in pts:
        sl = tuple(slice(max(0, int(c) + n // 2 - 4), min(n, int(c) + n // 2 + 5)) for c in (pz, py, px))
        vol[sl] += np.exp(-((x[sl] - px) ** 2 + (y[sl] - py) ** 2 + (z[sl] - pz) ** 2) / (2 * sigma**2))
    return vol.astype(np.float32)


def make_dataset(d: Path, n_img: int, box: int, apix: float, seed: int = 0) -> Path:
    """Map + pose STAR + relion_project --ctf images in ``d``; returns the STAR relion_project wrote."""
    write_mrc(d / "truth.mrc", atoms_map(box), apix)
    rng = np.random.default_rng(seed)
    eul = matrix_to_euler_np(random_rotations(n_img, torch.Generator().manual_seed(seed)).numpy())
    du = rng.uniform(8000, 25000, n_img)
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@none.mrcs" for i in range(n_img)],
        "rlnAngleRot": eul[:, 0], "rlnAngleTilt": eul[:, 1], "rlnAnglePsi": eul[:, 2],
        "rlnOriginXAngst": rng.uniform(-6, 6, n_img), "rlnOriginYAngst": rng.uniform(-6, 6, n_img),
        "rlnDefocusU": du, "rlnDefocusV": du * rng.uniform(0.85, 1.0, n_img),
        "rlnDefocusAngle": rng.uniform(-180, 180, n_img), "rlnOpticsGroup": 1,
        "rlnRandomSubset": np.arange(n_img) % 2 + 1})
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [apix], "rlnImageSize": [box], "rlnImageDimensionality": [2]})
    starfile.write({"optics": optics, "particles": parts}, d / "poses.star", overwrite=True)
    run(["relion_project", "--i", "truth.mrc", "--o", "proj", "--ang", "poses.star", "--ctf"], d)
    return d / "proj.star"


def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall-clock s, CPU s of the program and its children) of one run (output discarded); exits on failure."""
    c0, t0 = _child_cpu(), time.perf_counter()
    p = subprocess.run(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    dt, dc = time.perf_counter() - t0, _child_cpu() - c0
    if p.returncode != 0:
        sys.exit(f"{' '.join(args)} failed (exit {p.returncode}):\n{p.stdout[-2000:]}")
    return dt, dc


def in_process(star: Path, threads: int) -> tuple[float, float]:
    """(wall s, CPU s) of reading the particles and images, reconstructing the halves and the
    full map, and writing them, in this process (interpreter and imports already paid for)."""
    from cryospin_relion.data.stack import ImageSource
    from cryospin_relion.io.read import read_particles
    from cryospin_relion.halfmaps import reconstruct_halves

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    c0, t0 = time.process_time(), time.perf_counter()
    table = read_particles(star)
    res = reconstruct_halves(ImageSource(table), table, threads=threads, progress=False)
    for name, vol in (("half1", res.half1), ("half2", res.half2), ("map", res.map)):
        write_mrc(star.parent / f"inproc_{name}.mrc", vol, float(table.apix[0]))
    out = time.perf_counter() - t0, time.process_time() - c0
    torch.set_num_threads(prev)
    return out


def best_of(repeat: int, fn) -> tuple[float, float]:
    """The run with the shortest wall time: (wall s, CPU s)."""
    return min((fn() for _ in range(repeat)), key=lambda r: r[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="number of images (default 10000)")
    ap.add_argument("--box", type=int, default=64, help="box size (default 64)")
    ap.add_argument("--j", type=int, default=2, help="threads / MPI ranks (default 2)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per program; the best time counts (default 1)")
    ap.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--no-mpi", dest="mpi", action="store_false", help="skip relion_reconstruct_mpi")
    args = ap.parse_args(argv)
    for exe in ("relion_project", "relion_reconstruct"):
        if shutil.which(exe) is None:
            sys.exit(f"{exe} not on PATH: this benchmark needs RELION 3.1")
    cryospin = shutil.which("cryospin")
    cry_cmd = [cryospin] if cryospin else [sys.executable, "-m", "cryospin_relion.cli"]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cryospin_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"dataset: {args.n} images, box {args.box}, relion_project --ctf, in {work}", flush=True)
        t0 = time.perf_counter()
        star = make_dataset(work, args.n, args.box, 2.0)
        print(f"  generated in {time.perf_counter() - t0:.1f} s", flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.j), OMPI_ALLOW_RUN_AS_ROOT="1",
                   OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        rows = []
        for j in sorted({1, args.j}):
            t = best_of(args.repeat, lambda: run(cry_cmd + ["reconstruct", "--i", star.name, "--o", "cryospin",
                                                            "--j", str(j), "--quiet"], work, env))
            rows.append((f"cryospin reconstruct --j {j} (half1+half2+full+FSC)", t))
        t_rel = best_of(args.repeat, lambda: run(["relion_reconstruct", "--i", star.name, "--o", "relion.mrc", "--ctf"],
                                                 work, env))
        rows.append(("relion_reconstruct --ctf (full map, 1 thread)", t_rel))
        if args.mpi and shutil.which("relion_reconstruct_mpi") and shutil.which("mpirun"):
            t = best_of(args.repeat, lambda: run(["mpirun", "-n", str(args.j), "relion_reconstruct_mpi", "--i",
                                                  star.name, "--o", "relion_mpi.mrc", "--ctf"], work, env))
            rows.append((f"mpirun -n {args.j} relion_reconstruct_mpi --ctf (full map)", t))

        for j in sorted({1, args.j}):
            rows.append((f"  same, in-process after imports (--j {j}): read+insert+invert", in_process(star, j)))

        def relion_three() -> tuple[float, float]:
            runs = [run(["relion_reconstruct", "--i", star.name, "--o", f"relion_{s}.mrc", "--ctf"]
                        + (["--subset", s] if s != "all" else []), work, env) for s in ("1", "2", "all")]
            return sum(r[0] for r in runs), sum(r[1] for r in runs)

        rows.append(("relion_reconstruct --ctf x3 (half1, half2, full)", best_of(args.repeat, relion_three)))

        print(f"\n{'program':58s} {'wall s':>7s} {'CPU s':>6s} {'images/s':>9s} {'speed vs relion_reconstruct':>28s}")
        for name, (t, c) in rows:
            print(f"{name:58s} {t:7.2f} {c:6.2f} {args.n / t:9.0f} {t_rel[0] / t:27.2f}x")
        print(f"(wall-clock times, best of {args.repeat}; load average now "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs)")
        ours, _ = read_mrc(work / "cryospin" / "map.mrc")
        rel, _ = read_mrc(work / "relion.mrc")
        c = fsc(torch.as_tensor(ours), torch.as_tensor(rel)).numpy()
        print(f"\nFSC(cryospin map, relion_reconstruct map): min {c[1:int(0.8 * (args.box // 2)) + 1].min():.4f} "
              f"up to 0.8 Nyquist ({torch.get_num_threads()} torch threads available, {os.cpu_count()} CPUs)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
