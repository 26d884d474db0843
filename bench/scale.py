"""Benchmark: `cryospin abinit` against the number of particles (and of ranks). Prints a table.

    python bench/scale.py --n 10000,50000                  # ~1 h on 2 cores
    python bench/scale.py --n 50000 --ranks 2 --device cpu  # data parallel (torchrun, gloo)
    python bench/scale.py --n 50000 --ranks 8 --device cuda # one rank per GPU (NCCL)

Dataset (made once per N in --work/data_N and reused): `cryospin simulate` of the
70S ribosome map of ../shared/data/aspire (taken as 4.0 A/px, as in
bench/abinit_vs_relion.py) at --box (128 by default, so the working box is 64)
with uniform random poses, CTF (defocus 1-2.5 um), Gaussian shifts (2 px std) and
SNR --snr (0.1). The simulator is the project's forward model, which is equal to
relion_project's (tests/relion/test_relion_project.py).

Per N (each program its own process): wall seconds of stage 1 (with the starts),
of the first-pose pass of the particles outside the stage-1 subset, of stage 2 and
of the final outputs; the CPU seconds of all its processes (with --ranks G, about
those of one process where the ranks share the work); the stage-2 images/s; the
peak anonymous memory of the run (RssAnon summed over its processes, polled every
0.5 s: it leaves out the memory-mapped image cache, which the kernel can drop);
the resolution at FSC 0.5 against the ground truth of a backprojection with the
run's poses, after aligning it to the truth (rotation, translation, mirror:
`cryospin compare`), and of one with the true poses; their ratio. A second table
gives, per stage-2 epoch, the loss and the median pose change (degrees): the loss
must not rise and the change must fall at every N. Writes --work/scale.png (wall time against N).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from machine import describe  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT.parent / "shared" / "data" / "aspire" / "clean70SRibosome_vol_65p.mrc"


def rss_anon_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def descendants(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += descendants(int(k))
    return out


def run(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (user + system, of it and every process it waited for: all the
    ranks under torchrun) and the peak RssAnon (MB) of it and its children."""
    t0, peak, before = time.perf_counter(), 0, resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        while p.poll() is None:
            peak = max(peak, rss_anon_kb(descendants(p.pid)))
            time.sleep(0.5)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}; see {log}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "rss_anon_mb": peak / 1024}


def make_dataset(data: Path, n: int, box: int, snr: float, seed: int) -> None:
    params = {"n": n, "box": box, "snr": snr, "seed": seed}
    stamp = data / "params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return
    if not MAP.is_file():
        sys.exit(f"{MAP}: not found (the benchmark needs ../shared/data beside the project)")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    subprocess.run(["cryospin", "simulate", "--map", str(MAP), "--map-apix", "4.0", "--o", str(data), "--n", str(n),
                    "--box", str(box), "--apix", f"{4.0 * 65 / box:.6f}", "--snr", str(snr), "--shift-std", "2",
                    "--seed", str(seed), "--quiet"], check=True)
    stamp.write_text(json.dumps(params))


def resolution(work: Path, name: str, star: Path, data: Path, j: int) -> float:
    recon = work / f"{name}_recon"
    shutil.rmtree(recon, ignore_errors=True)
    subprocess.run(["cryospin", "reconstruct", "--i", str(star), "--o", str(recon), "--j", str(j), "--quiet"],
                   check=True, cwd=data)
    out = recon / "compare.json"
    subprocess.run(["cryospin", "compare", "--map", str(recon / "map.mrc"), "--ref", str(data / "ground_truth.mrc"),
                    "--json", str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["fsc_0.5_A"])


def abinit(work: Path, n: int, data: Path, a: argparse.Namespace) -> dict:
    out = work / f"run_{n}_r{a.ranks}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["abinit", "--i", str(data / "particles.star"), "--o", str(out), "--j", str(a.j), "--quiet",
            "--device", a.device, "--json-summary", str(out.with_suffix(".json")), *a.abinit_args.split()]
    if a.ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(a.ranks),
               "-m", "cryospin_relion.cli", *args]
    else:
        cmd = [sys.executable, "-m", "cryospin_relion.cli", *args]
    r = run(cmd, work / f"run_{n}_r{a.ranks}.log")
    s = json.loads(out.with_suffix(".json").read_text())
    h = json.loads((out / "history.json").read_text())
    s2 = [i for i, st in enumerate(h["stage"]) if st == 2]
    return {**r, "summary": s, "first_poses_s": h.get("assign_s") or 0.0, "s2_loss": [h["loss"][i] for i in s2],
            "s2_change": [h["pose_change_deg"][i] for i in s2],
            "s2_img_s": sum(h["images_per_s"][i] for i in s2) / max(1, len(s2)),
            "res": resolution(work, f"run_{n}_r{a.ranks}", out / "particles.star", data, a.j)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="bench_scale", help="working folder (datasets are reused)")
    p.add_argument("--n", default="10000,50000", help="comma-separated particle counts")
    p.add_argument("--box", type=int, default=128)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--j", type=int, default=2, help="threads per process")
    p.add_argument("--ranks", type=int, default=1, help="data-parallel ranks (torchrun); 1 = one process")
    p.add_argument("--device", default="auto")
    p.add_argument("--abinit-args", default="", help="extra arguments for cryospin abinit")
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = {}
    for n in (int(x) for x in a.n.split(",")):
        data = work / f"data_{n}"
        make_dataset(data, n, a.box, a.snr, a.seed)
        r = abinit(work, n, data, a)
        r["res_true"] = resolution(work, f"truth_{n}", data / "particles.star", data, a.j)
        rows[n] = r
        (work / "results.json").write_text(json.dumps(rows, indent=1))
        print(f"N {n}: done in {r['wall_s']:.0f} s", flush=True)
    report(rows, a, work)


def report(rows: dict, a: argparse.Namespace, work: Path) -> None:
    print(f"\n{describe()}")
    print(f"cryospin abinit, box {a.box}, SNR {a.snr}, {a.ranks} rank(s), device {a.device}, --j {a.j}")
    print("| N | stage 1 s | first poses s | stage 2 s | outputs s | total s | CPU s | stage-2 img/s | "
          "peak RssAnon MB | FSC0.5 A | true poses A | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, r in rows.items():
        s = r["summary"]
        s1 = s.get("stage1_s", float("nan"))
        print(f"| {n} | {s1:.0f} | {r['first_poses_s']:.0f} | {s.get('stage2_s', float('nan')):.0f} | "
              f"{s.get('final_outputs_s', float('nan')):.0f} | {r['wall_s']:.0f} | {r.get('cpu_s', float('nan')):.0f} | "
              f"{r['s2_img_s']:.0f} | "
              f"{r['rss_anon_mb']:.0f} | {r['res']:.2f} | {r['res_true']:.2f} | {r['res'] / r['res_true']:.2f} |")
    print("\nstage-2 epochs: loss / median pose change (deg)")
    for n, r in rows.items():
        print(f"N {n}: " + ", ".join(f"{l:.4f}/{c:.2f}" for l, c in zip(r["s2_loss"], r["s2_change"])))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ns = sorted(rows)
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.loglog(ns, [rows[n]["wall_s"] for n in ns], "o-", label="total")
        ax.loglog(ns, [rows[ns[0]]["wall_s"] * n / ns[0] for n in ns], "k:", label="linear")
        ax.set_xlabel("particles")
        ax.set_ylabel("wall s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(work / "scale.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
