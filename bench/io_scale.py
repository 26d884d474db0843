"""Benchmark: a million particles with bounded memory.

    python bench/io_scale.py                            # everything (about 10 min on 2 loaded cores)
    python bench/io_scale.py --only star --star-rows 100000 1000000
    python bench/io_scale.py --only cache --cache-n 10000 50000 200000
    python bench/io_scale.py --only state --state-n 200000

Prints

- STAR: time and peak RssAnon growth to read (``read_star``, stacks not checked) and write back
  (``write_star``) a generated RELION 3.1 particle STAR of 26 columns (strings such as
  ``000001@Particles/stack_001.mrcs``), and that every column came back (same labels, strings equal,
  numbers equal to 1e-9 relative; angles and origins, which go through rotation matrices, to 1e-6);
- cache: time and peak anonymous memory (RssAnon of /proc/self/status, sampled every 20 ms) of
  ``data.stack.build_cache`` at N images of box 128 -> working box 64, each N in a fresh process;
  the images come from a few stacks of noise written in chunks and referenced over and over, so
  no N images are ever held in memory (the cache itself, N * 16 KiB, is a file on disk);
- state: bytes per particle of what a run keeps besides the image cache, at N particles:
  the engine's tensors (``engine.particles.ParticleImages`` pixel sizes and CTF, ``model.pose_table``,
  ``model.pose_memory``, the previous-epoch rotations), and the host ``ParticleTable`` read from a STAR.

Everything is made in a temporary folder (``--tmp``, default the system's) and deleted at the end:
disk use peaks at about N_max * 16 KiB (3.3 GB at 200,000) plus 260 MB of stacks and 280 MB of STAR.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

STACK_IMAGES, STACKS, BOX, WORK_BOX = 1000, 4, 128, 64


def rss_anon() -> int:
    """Anonymous resident memory of this process in bytes (RssAnon of /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Peak RssAnon while the ``with`` block runs (sampled every ``dt`` s in a thread)."""

    def __init__(self, dt: float = 0.02):
        self.dt, self.peak, self.start = dt, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.dt)

    def __enter__(self):
        self.start = self.peak = rss_anon()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon())


# -- STAR ---------------------------------------------------------------------------------------


def make_star(path: Path, n: int, seed: int = 0) -> list[str]:
    """A RELION 3.1 particle STAR of ``n`` rows and 26 columns (two optics groups), written in chunks."""
    rng = np.random.default_rng(seed)
    k = np.arange(n)
    stack = np.char.zfill((k // 1000 + 1).astype(str), 3)
    c = {
        "rlnCoordinateX": np.round(rng.uniform(0, 4000, n), 1), "rlnCoordinateY": np.round(rng.uniform(0, 4000, n), 1),
        "rlnAutopickFigureOfMerit": rng.normal(size=n), "rlnClassNumber": rng.integers(1, 5, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnImageName": np.char.add(np.char.add(np.char.zfill((k % 1000 + 1).astype(str), 6), "@Particles/stack_"),
                                    np.char.add(stack, ".mrcs")),
        "rlnMicrographName": np.char.add(np.char.add("MotionCorr/job002/mic_", stack), ".mrc"),
        "rlnOpticsGroup": 1 + (k // 1000) % 2, "rlnCtfMaxResolution": rng.uniform(3, 8, n),
        "rlnCtfFigureOfMerit": rng.uniform(0, 0.3, n), "rlnDefocusU": rng.uniform(8000, 25000, n),
    }
    c["rlnDefocusV"] = c["rlnDefocusU"] - rng.uniform(0, 500, n)
    c.update({
        "rlnDefocusAngle": rng.uniform(-180, 180, n), "rlnCtfBfactor": np.zeros(n), "rlnCtfScalefactor": np.ones(n),
        "rlnPhaseShift": np.zeros(n), "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n), "rlnOriginYAngst": rng.normal(0, 3, n), "rlnGroupNumber": 1 + k // 1000,
        "rlnNormCorrection": rng.uniform(0.8, 1.2, n), "rlnLogLikeliContribution": rng.normal(1e5, 1e3, n),
        "rlnMaxValueProbDistribution": rng.uniform(0, 1, n), "rlnNrOfSignificantSamples": rng.integers(1, 100, n),
        "rlnRandomSubset": 1 + k % 2,
    })
    fmt = ["%s" if v.dtype.kind == "U" else "%d" if v.dtype.kind == "i" else "%.6f" for v in c.values()]
    optics = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
              "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
              "rlnImageDimensionality"]
    with open(path, "w") as f:
        f.write("\n# version 30001\n\ndata_optics\n\nloop_\n")
        f.write("".join(f"_{x} #{i + 1}\n" for i, x in enumerate(optics)))
        f.write("opticsGroup1 1 0.885 300.0 2.7 0.1 1.77 128 2\nopticsGroup2 2 0.885 300.0 2.7 0.1 1.77 128 2\n\n")
        f.write("\n# version 30001\n\ndata_particles\n\nloop_\n" + "".join(f"_{x} #{i + 1}\n" for i, x in enumerate(c)))
        for a in range(0, n, 100_000):
            sub = [v[a: a + 100_000] for v in c.values()]
            f.write("\n".join(" ".join(fm % x for fm, x in zip(fmt, row)) for row in zip(*sub)) + "\n")
        f.write("\n")
    return list(c)


def same_columns(a, b) -> str:
    """'' when the two particle DataFrames hold the same labels and values (numbers to 10 significant
    digits; the angles and origins go through rotation matrices), else what differs."""
    if list(a.columns) != list(b.columns) or len(a) != len(b):
        return f"columns/rows differ: {list(a.columns)} vs {list(b.columns)}"
    for col in a.columns:
        x, y = a[col].to_numpy(), b[col].to_numpy()
        if x.dtype.kind in "if" and y.dtype.kind in "if":
            tol = 1e-6 if col.startswith(("rlnAngle", "rlnOrigin")) else 1e-9  # through matrices / exact
            if not np.allclose(x, y, rtol=tol, atol=tol):
                return f"{col}: values differ"
        elif not (x.astype(str) == y.astype(str)).all():
            return f"{col}: strings differ"
    return ""


def bench_star(tmp: Path, rows: list[int]) -> None:
    from cryospin_relion.io.star import load_star_blocks, read_star, write_star

    print("\nSTAR read / write (RELION 3.1, 26 particle columns; read_star without stack checks)")
    print(f"{'rows':>10} {'MB':>7} {'make s':>7} {'read s':>7} {'write s':>8} {'re-read s':>9} "
          f"{'read +MiB':>9} {'write +MiB':>10}  columns")
    for n in rows:
        src, out = tmp / f"p{n}.star", tmp / f"p{n}_out.star"
        t0 = time.perf_counter()
        make_star(src, n)
        t_make = time.perf_counter() - t0
        with PeakRss() as mr:
            t0 = time.perf_counter()
            table = read_star(src, check_stacks=False)
            t_read = time.perf_counter() - t0
        with PeakRss() as mw:
            t0 = time.perf_counter()
            write_star(table, out)
            t_write = time.perf_counter() - t0
        del table
        t0 = time.perf_counter()
        a, b = load_star_blocks(src)["particles"], load_star_blocks(out)["particles"]
        t_reread = time.perf_counter() - t0
        diff = same_columns(a, b)
        print(f"{n:>10,} {src.stat().st_size / 1e6:>7.0f} {t_make:>7.1f} {t_read:>7.1f} {t_write:>8.1f} "
              f"{t_reread:>9.1f} {(mr.peak - mr.start) / 2**20:>9.0f} {(mw.peak - mw.start) / 2**20:>10.0f}  "
              f"{'all kept' if not diff else 'LOST: ' + diff}", flush=True)
        del a, b
        src.unlink()
        out.unlink()


# -- image cache ---------------------------------------------------------------------------------


def make_stacks(folder: Path) -> list[Path]:
    """STACKS stacks of STACK_IMAGES noise images (box BOX), each written image by image chunk."""
    import mrcfile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(STACKS):
        p = folder / f"stack_{s:03d}.mrcs"
        with mrcfile.new_mmap(p, shape=(STACK_IMAGES, BOX, BOX), mrc_mode=2, overwrite=True) as m:
            m.set_image_stack()
            for a in range(0, STACK_IMAGES, 100):
                m.data[a: a + 100] = rng.normal(size=(100, BOX, BOX)).astype(np.float32)
            m.voxel_size = 1.5
        paths.append(p)
    return paths


def cache_one(n: int, stacks: list[str], out: str) -> None:
    """In a fresh process: build the cache of n images; print 'seconds base_MB peak_MB table_MB'."""
    import torch

    torch.set_num_threads(1)
    from cryospin_relion.data.stack import build_cache
    from cryospin_relion.io.particles import ParticleTable

    base0 = rss_anon()
    k = np.arange(n)
    paths = np.asarray(stacks, dtype=object)
    table = ParticleTable(source_file=str(Path(out) / "none.star"), source_format="star31",
                          stack_paths=paths[k % len(paths)], stack_indices=(k // len(paths)) % STACK_IMAGES,
                          box=BOX, apix=np.full(n, 1.5), ctf=None, rotations=None, shifts_A=None, subset=None,
                          optics_group=np.ones(n, dtype=np.int64))
    with PeakRss() as m:
        t0 = time.perf_counter()
        cache = build_cache(table, out, WORK_BOX, progress=False)
        dt = time.perf_counter() - t0
    assert cache.images.shape == (n, WORK_BOX, WORK_BOX)
    print(f"{dt:.2f} {m.start / 2**20:.1f} {m.peak / 2**20:.1f} {(m.start - base0) / 2**20:.1f}")


def bench_cache(tmp: Path, ns: list[int]) -> None:
    stacks = make_stacks(tmp / "stacks")
    print(f"\nimage cache: build_cache, box {BOX} -> {WORK_BOX}, images from {STACKS} stacks of {STACK_IMAGES} "
          "(one fresh process per N; RssAnon in MiB)")
    print(f"{'N':>9} {'cache GB':>8} {'build s':>8} {'img/s':>7} {'RssAnon before':>15} {'peak':>7} "
          f"{'peak - before':>14} {'table':>6}")
    for n in ns:
        out = tmp / f"cache{n}"
        r = subprocess.run([sys.executable, __file__, "--cache-one", str(n), str(out)] + [str(p) for p in stacks],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-2000:])
            raise SystemExit(1)
        dt, base, peak, tab = (float(x) for x in r.stdout.split()[-4:])
        print(f"{n:>9,} {n * WORK_BOX**2 * 4 / 1e9:>8.2f} {dt:>8.1f} {n / dt:>7.0f} {base:>15.1f} {peak:>7.1f} "
              f"{peak - base:>14.1f} {tab:>6.1f}", flush=True)
        shutil.rmtree(out)
    shutil.rmtree(tmp / "stacks")


# -- per-particle state ---------------------------------------------------------------------------


def nbytes(*tensors) -> int:
    """Bytes of storage behind tensors (an expanded one-value tensor counts once)."""
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


def table_bytes(table) -> dict[str, int]:
    """Bytes of a ParticleTable's per-particle arrays and of its source DataFrames (deep)."""
    import pandas as pd

    arrays = {"stack_paths": table.stack_paths, "stack_indices": table.stack_indices, "apix": table.apix,
              "rotations": table.rotations, "shifts_A": table.shifts_A, "subset": table.subset,
              "optics_group": table.optics_group, "stack_names": table.extra.get("stack_names")}
    out = {}
    for k, v in arrays.items():
        if v is None:
            continue
        v = np.asarray(v)
        out[k] = v.nbytes + (sum(sys.getsizeof(s) for s in {id(x): x for x in v}.values()) if v.dtype == object else 0)
    if table.ctf is not None:
        out["ctf (9 float64 + bool)"] = sum(np.asarray(v).nbytes for v in table.ctf.as_dict().values()
                                            if isinstance(v, np.ndarray))
    raw = table.raw if isinstance(table.raw, dict) else {}
    for k, df in raw.items():
        if isinstance(df, pd.DataFrame):
            out[f"raw {k} ({df.shape[1]} columns)"] = int(df.memory_usage(deep=True).sum())
    return out


def bench_state(tmp: Path, n: int) -> None:
    import torch

    torch.set_num_threads(1)
    from cryospin_relion.engine.particles import ParticleImages
    from cryospin_relion.geometry.ctf import CTF
    from cryospin_relion.io.star import read_star
    from cryospin_relion.model.pose_memory import PoseMemory
    from cryospin_relion.model.pose_table import PoseTable

    src = tmp / f"state{n}.star"
    make_star(src, n)
    table = read_star(src, check_stacks=False)
    src.unlink()
    images = np.zeros((n, 1, WORK_BOX), np.float32)  # only the shape matters here (1 row per image)
    images = np.lib.stride_tricks.as_strided(images, (n, WORK_BOX, WORK_BOX), (images.strides[0], 0, 4))
    ctf = CTF.from_arrays(table.ctf)
    data = ParticleImages(images, table.apix * BOX / WORK_BOX, ctf, torch.device("cpu"))
    poses = PoseTable(n)
    memory = PoseMemory.random(n, torch.Generator().manual_seed(0))
    items = {
        "ParticleImages: pixel size": nbytes(data.apix),
        "ParticleImages: CTF": nbytes(*(v for _, v in data.ctf.items()), data.ctf.premultiplied),
        "ParticleImages: CTF if stored dense": nbytes(*(v for _, v in ctf.to("cpu", torch.float32).items()),
                                                      ctf.premultiplied),
        "PoseTable: rotations, shifts": nbytes(poses.rotations, poses.shifts),
        "PoseTable: Adam m, v, steps": nbytes(poses.m, poses.v, poses.steps),
        "PoseMemory: rotations, shifts": nbytes(memory.rotations, memory.shifts),
        "engine: previous-epoch rotations (prev_R)": nbytes(poses.rotations.clone()),
        "engine: stage-1 subset rows (int64, <= stage1_particles)": nbytes(torch.arange(n)),
    }
    print(f"\nper-particle state at N = {n:,} (bytes per particle)")
    engine = 0
    for k, v in items.items():
        if "dense" not in k:
            engine += v
        print(f"  {k:<58} {v / n:7.1f}")
    print(f"  {'engine total (device; the dense CTF line not counted)':<58} {engine / n:7.1f}")
    host = table_bytes(table)
    for k, v in host.items():
        print(f"  host ParticleTable {k:<39} {v / n:7.1f}")
    print(f"  {'host ParticleTable total (arrays + source DataFrames)':<58} {sum(host.values()) / n:7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=("star", "cache", "state"), action="append")
    ap.add_argument("--star-rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--cache-n", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--state-n", type=int, default=200_000)
    ap.add_argument("--tmp", default=None, help="folder for the temporary files (deleted at the end)")
    ap.add_argument("--cache-one", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cache_one:
        cache_one(int(a.cache_one[0]), a.cache_one[2:], a.cache_one[1])
        return
    only = set(a.only or ("star", "cache", "state"))
    tmp = Path(tempfile.mkdtemp(prefix="cryospin_io_scale_", dir=a.tmp))
    try:
        if "star" in only:
            bench_star(tmp, a.star_rows)
        if "cache" in only:
            bench_cache(tmp, a.cache_n)
        if "state" in only:
            bench_state(tmp, a.state_n)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
