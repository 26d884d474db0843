"""Point-group symmetry on a whole pipeline (prints figures; not a test).

    python bench/symmetry.py [--n 2000] [--box 32] [--snr 0.5] [--sym D7] [--j 2] [--quick] [--refine]
                             [--modes align,impose] [--no-c1] [--work DIR]

1. Data: a pseudo-atomic map symmetrised under --sym (geometry/symmetry.py, RELION's
   frame), and the same map without symmetry; relion_project --ctf of each at random
   poses, white noise at --snr. Both are written under --work.
2. Symmetry scores (evaluate/symmetry_align.py) of: the truths, relion_reconstruct
   --ctf (C1) maps from the noisy images with the true poses, under C4, D7, T, O, I:
   where symmetric and asymmetric maps fall, for lifecycle/symmetry.SCORE_WARN_BELOW.
3. cryospin abinit on the symmetric data with --sym C1 (unless --no-c1) and with --sym SYM
   for each --sym-mode of --modes (same seed): wall time, the run's symmetry score,
   FSC 0.5 / 0.143 of map.mrc against the truth (``cryospin compare``: aligned over
   rotations and the hand), and for --sym the FSC of map.mrc against the truth in
   RELION's frame *without* alignment (up to the frame's alternatives and the hand):
   whether the run ended in RELION's frame. The same for abinit --sym SYM on the
   asymmetric data, each mode (the warning should appear).
4. --refine: relion_refine --auto_refine --sym SYM continuing from the --sym run
   (its particles.star, map.mrc as --ref, --ini_high 2x the run's resolution):
   final resolution and FSC against the truth.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryospin_relion.evaluate.align import transform_volume
from cryospin_relion.evaluate.symmetry_align import symmetrise_map, symmetry_score
from cryospin_relion.geometry.fsc import fsc, resolution_at
from cryospin_relion.geometry.hand import flip_volume_hand
from cryospin_relion.geometry.symmetry import frame_alternatives
from cryospin_relion.io.mrc import write_mrc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "relion"))
from relion_oracle import atoms_map, write_pose_star  # noqa: E402

APIX = 4.0


def sh(cmd: list[str], cwd: Path) -> float:
    """Run a command quietly; seconds; exits with its output's tail on failure."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-2500:]}")
    return time.perf_counter() - t0


def make_data(d: Path, vol: np.ndarray, n: int, snr: float, seed: int) -> Path:
    """relion_project --ctf of ``vol`` at random poses with white noise at ``snr``; returns the STAR."""
    d.mkdir(parents=True, exist_ok=True)
    box = vol.shape[-1]
    write_mrc(d / "truth.mrc", vol, APIX)
    write_pose_star(d / "poses.star", n, box, APIX, seed=seed, ctf=True)
    sh(["relion_project", "--i", "truth.mrc", "--o", "particles", "--ang", "poses.star", "--ctf"], d)
    with mrcfile.open(d / "particles.mrcs", mode="r+") as m:
        sigma = np.sqrt(m.data.var(axis=(1, 2), dtype=np.float64).mean() / snr)
        m.data[:] += np.random.default_rng(seed).normal(0, sigma, m.data.shape).astype(np.float32)
    return d / "particles.star"


def res_at(a: np.ndarray, b: np.ndarray, level: float) -> float:
    c = fsc(torch.as_tensor(a), torch.as_tensor(b))
    return float(resolution_at(c.numpy(), a.shape[-1], APIX, level))


def in_frame_fsc(m: np.ndarray, truth: np.ndarray, sym: str) -> float:
    """FSC 0.5 resolution of ``m`` against ``truth`` with no alignment beyond the frame's alternatives and the hand."""
    best = float("inf")
    for i, X in enumerate(frame_alternatives(sym)):
        for mm in (m, flip_volume_hand(m)):
            best = min(best, res_at(mm if i == 0 else transform_volume(mm, X), truth, 0.5))  # [0]: the identity
    return best


def abinit(work: Path, name: str, star: Path, sym: str, j: int, quick: bool, mode: str = "align") -> dict:
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--epochs-amortized", "4", "--min-epochs-amortized", "3", "--epochs-autodecode", "2",
             "--stage1-trials", "1"] if quick else []
    extra += ["--sym-mode", mode]
    wall = sh(["cryospin", "abinit", "--i", str(star), "--o", str(out), "--j", str(j), "--quiet", "--sym", sym,
               "--json-summary", str(work / f"{name}.json"), *extra], star.parent)
    summary = json.loads((work / f"{name}.json").read_text())
    sh(["cryospin", "compare", "--map", str(out / "map.mrc"), "--ref", str(star.parent / "truth.mrc"),
        "--json", str(work / f"{name}_compare.json"), "--quiet"], work)
    cmp = json.loads((work / f"{name}_compare.json").read_text())
    return {"wall_s": wall, "summary": summary, "fsc05": cmp["fsc_0.5_A"], "fsc0143": cmp["fsc_0.143_A"],
            "map": mrcfile.read(out / "map.mrc")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--sym", default="D7")
    p.add_argument("--j", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="short abinit schedule")
    p.add_argument("--refine", action="store_true", help="also relion_refine --auto_refine --sym from the --sym run")
    p.add_argument("--work", default="bench_symmetry_work")
    p.add_argument("--refine-only", action="store_true", help="only step 4, from the runs already in --work")
    p.add_argument("--modes", default="align,impose", help="--sym-mode values to run, comma-separated")
    p.add_argument("--no-c1", action="store_true", help="skip the --sym C1 run")
    a = p.parse_args()
    torch.set_num_threads(a.j)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    asym = atoms_map(a.box, natoms=max(20, 200 // 14), sigma=1.0, seed=3)
    symm = symmetrise_map(atoms_map(a.box, natoms=max(20, 200 // 14), sigma=1.0, seed=3), a.sym)
    if a.refine_only:
        return refine(work, a, symm)
    t0 = time.perf_counter()
    star_s = make_data(work / "sym_data", symm, a.n, a.snr, a.seed + 1)
    star_a = make_data(work / "asym_data", asym, a.n, a.snr, a.seed + 2)
    for d in (star_s.parent, star_a.parent):
        sh(["relion_reconstruct", "--i", "particles.star", "--o", "c1_true_poses.mrc", "--ctf"], d)
    print(f"data: {a.n} relion_project --ctf images, box {a.box}, {APIX} A/px, SNR {a.snr} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    print("\nsymmetry scores (1 = symmetric; lifecycle/symmetry.SCORE_WARN_BELOW warns):")
    groups = ("C4", "D7", "T", "O", "I")
    print(f"  {'map':44s}" + "".join(f"{g:>7s}" for g in groups))
    maps = {f"truth, {a.sym}-symmetric": symm, "truth, asymmetric": asym,
            f"relion_reconstruct C1, true poses, {a.sym} data": mrcfile.read(star_s.parent / "c1_true_poses.mrc"),
            "relion_reconstruct C1, true poses, asym data": mrcfile.read(star_a.parent / "c1_true_poses.mrc")}
    for name, m in maps.items():
        print(f"  {name:44s}" + "".join(f"{symmetry_score(m, g):7.3f}" for g in groups), flush=True)

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    rows = {} if a.no_c1 else {f"--sym C1, {a.sym} data": abinit(work, "run_c1", star_s, "C1", a.j, a.quick)}
    for mode in modes:
        suffix = "" if mode == "align" else f"_{mode}"  # align keeps the folder names that --refine reads
        rows[f"--sym {a.sym} {mode}, {a.sym} data"] = abinit(work, f"run_sym{suffix}", star_s, a.sym, a.j, a.quick, mode)
        rows[f"--sym {a.sym} {mode}, asym data"] = abinit(work, f"run_sym_asym{suffix}", star_a, a.sym, a.j, a.quick,
                                                          mode)
    print(f"\nabinit ({'quick schedule' if a.quick else 'default schedule'}), FSC vs the truth after alignment:")
    print(f"  {'run':30s} {'wall s':>7s} {'score':>7s} {'FSC0.5 A':>9s} {'FSC0.143 A':>11s} {'in-frame 0.5':>13s}  warnings")
    for name, r in rows.items():
        s = r["summary"]
        truth = symm if f"{a.sym} data" in name else asym
        frame = in_frame_fsc(r["map"], truth, a.sym) if "symmetry" in s else float("nan")
        warn = [w for w in s.get("warnings", []) if "--sym" in w]
        print(f"  {name:30s} {r['wall_s']:7.0f} {s.get('symmetry_score', float('nan')):7.3f} {r['fsc05']:9.2f} "
              f"{r['fsc0143']:11.2f} {frame:13.2f}  {'symmetry warning' if warn else '-'}", flush=True)

    # the limit: the symmetrised backprojection with the true poses (cryospin reconstruct --sym)
    known = work / "known_poses_sym"
    shutil.rmtree(known, ignore_errors=True)
    sh(["cryospin", "reconstruct", "--i", "particles.star", "--o", str(known), "--sym", a.sym, "--j", str(a.j),
        "--quiet"], star_s.parent)
    sh(["cryospin", "compare", "--map", str(known / "map.mrc"), "--ref", str(star_s.parent / "truth.mrc"),
        "--json", str(work / "known_compare.json"), "--quiet"], work)
    lim = json.loads((work / "known_compare.json").read_text())["fsc_0.5_A"]
    print(f"\nknown poses, reconstruct --sym {a.sym}: FSC0.5 {lim:.2f} A (target: abinit within 1.15x)")
    for name, r in rows.items():
        if "asym data" not in name:
            print(f"  abinit {name}: {r['fsc05']:.2f} A, {r['fsc05'] / lim:.2f}x the limit", flush=True)

    if a.refine:
        refine(work, a, symm)


def refine(work: Path, a: argparse.Namespace, symm: np.ndarray) -> None:
    """mpirun -n 3 relion_refine_mpi --auto_refine --sym from the --sym run in ``work``; prints its figures."""
    star_s = work / "sym_data" / "particles.star"
    run = work / "run_sym"
    res = json.loads((work / "run_sym.json").read_text())["resolution_A"]
    ref = work / "refine"
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir()
    t = sh(["mpirun", "-n", "3", "--oversubscribe", "relion_refine_mpi", "--o", str(ref / "run"), "--auto_refine", "--split_random_halves",
            "--i", str(run / "particles.star"), "--ref", str(run / "map.mrc"), "--ini_high", f"{max(2 * res, 15):.1f}",
            "--sym", a.sym, "--ctf", "--particle_diameter", f"{0.8 * a.box * APIX:.0f}", "--flatten_solvent",
            "--zero_mask", "--oversampling", "1", "--healpix_order", "2", "--auto_local_healpix_order", "4",
            "--offset_range", "5", "--offset_step", "2", "--j", "1", "--pad", "2", "--low_resol_join_halves", "40",
            "--norm", "--scale", "--dont_combine_weights_via_disc", "--pool", "3"], star_s.parent)
    final = mrcfile.read(ref / "run_class001.mrc")
    model = (ref / "run_model.star").read_text()
    line = [ln for ln in model.splitlines() if ln.startswith("_rlnCurrentResolution")]
    print(f"\nrelion_refine_mpi --auto_refine --sym {a.sym} from the --sym run: {t:.0f} s, "
          f"{line[0] if line else ''}; FSC 0.5 vs the truth in RELION's frame (no alignment): "
          f"{in_frame_fsc(final, symm, a.sym):.2f} A; after alignment: {res_after_alignment(ref, star_s):.2f} A")


def res_after_alignment(ref: Path, star: Path) -> float:
    out = ref / "compare.json"
    sh(["cryospin", "compare", "--map", str(ref / "run_class001.mrc"), "--ref", str(star.parent / "truth.mrc"),
        "--json", str(out), "--quiet"], ref)
    return float(json.loads(out.read_text())["fsc_0.5_A"])

if __name__ == "__main__":
    main()
