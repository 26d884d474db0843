"""Classes (#12) on a whole pipeline: a two-structure mixture and a junk set (prints figures; not a test).

    python bench/classes.py [--n 2000] [--box 32] [--snr 0.5] [--j 2] [--seed 0] [--quick] [--work DIR]
                            [--runs mixture:1,mixture:2,mixture:3,junk:1,junk:3]

1. Data: two pseudo-atomic maps A and B (atoms_map seeds 3 and 11), relion_project --ctf
   at random poses with random shifts (rlnOriginX/YAngst, which relion_project applies),
   white noise of one sigma for all images (--snr on A's projections). Under --work:
   mix_data/ (60% A, 40% B, shuffled) and junk_data/ (80% A, 20% pure-noise images of the
   same sigma, with CTF rows copied from A's particles), each one particles.star + stack,
   the truths and the true class of every image (truth_class.npy: 0 A, 1 B, 2 junk).
2. cryospin abinit --classes 1, 2, 3 on the mixture and 1, 3 on the junk set (same seed):
   wall time; class accuracy (each class counted as the truth most of its particles have;
   for K=2 that is the best label permutation); FSC 0.5 of each classNNN/map.mrc (K=1:
   map.mrc) against its truth (``cryospin compare``: aligned over rotations and the hand),
   against relion_reconstruct --ctf of that truth's own particles with the true poses (the
   known-pose limit); the share of the junk outside the main class (the class with most
   true-A particles); the ROC AUC of rlnMaxValueProbDistribution for A against junk; each
   class's pose error against the projections' poses, up to one rotation and the hand
   (``pose_error_deg``: about 4 degrees where a class formed).
Targets (#12): K=2 accuracy >= 90%, class maps <= 1.3x the known-pose limit; K=3 junk
outside the main class >= 70%, main class at least as good as K=1; AUC >= 0.8 at K=1;
wall K=3 < 2x K=1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import torch

from cryospin_relion.engine.classes import relation_spread_deg
from cryospin_relion.geometry.rotations import euler_to_matrix
from cryospin_relion.io.mrc import write_mrc, write_stack
from cryospin_relion.io.star import load_star_blocks, write_star_blocks
from machine import describe  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "relion"))
from relion_oracle import atoms_map, write_pose_star  # noqa: E402
from symmetry import sh  # noqa: E402  (bench/symmetry.py: the script's folder is on sys.path)

APIX = 4.0
NAMES = ("A", "B", "junk")  # truth_class values 0, 1, 2


def project(d: Path, vol: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """Noise-free relion_project --ctf of ``vol`` at ``n`` random poses: (images (n, box, box), particles, optics)."""
    d.mkdir(parents=True, exist_ok=True)
    write_mrc(d / "truth.mrc", vol, APIX)
    write_pose_star(d / "poses.star", n, vol.shape[-1], APIX, seed=seed, ctf=True)
    sh(["relion_project", "--i", "truth.mrc", "--o", "particles", "--ang", "poses.star", "--ctf"], d)
    blocks = load_star_blocks(d / "particles.star")
    return mrcfile.read(d / "particles.mrcs").astype(np.float32), blocks["particles"], blocks["optics"]


def write_set(d: Path, images: np.ndarray, rows: pd.DataFrame, optics: pd.DataFrame, truth: np.ndarray,
              maps: dict[str, np.ndarray], seed: int) -> Path:
    """One shuffled data set in ``d``: particles.mrcs, particles.star, truth_class.npy, truth_NAME.mrc; the STAR."""
    d.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(images))
    rows = rows.iloc[order].reset_index(drop=True)
    rows["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(len(rows))]
    rows["rlnRandomSubset"] = np.arange(len(rows)) % 2 + 1
    write_stack(d / "particles.mrcs", images[order], APIX)
    write_star_blocks({"optics": optics, "particles": rows}, d / "particles.star")
    np.save(d / "truth_class.npy", truth[order])
    for name, m in maps.items():
        write_mrc(d / f"truth_{name}.mrc", m, APIX)
    return d / "particles.star"


def compare(m: Path, truth: Path, out: Path) -> float:
    """FSC 0.5 resolution (A) of map ``m`` against ``truth`` after alignment (rotations, shift, hand)."""
    sh(["cryospin", "compare", "--map", str(m), "--ref", str(truth), "--json", str(out), "--quiet"], out.parent)
    return float(json.loads(out.read_text())["fsc_0.5_A"])


def known_pose(star: Path, truth: np.ndarray, c: int) -> float:
    """FSC 0.5 against truth_NAME.mrc of relion_reconstruct --ctf of the particles of true class ``c``, true poses."""
    d, name = star.parent, NAMES[c]
    blocks = load_star_blocks(star)
    write_star_blocks({"optics": blocks["optics"], "particles": blocks["particles"][truth == c]},
                      d / f"true_{name}.star")
    sh(["relion_reconstruct", "--i", f"true_{name}.star", "--o", f"known_{name}.mrc", "--ctf"], d)
    return compare(d / f"known_{name}.mrc", d / f"truth_{name}.mrc", d / f"known_{name}_compare.json")


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(pos > neg) + P(pos = neg) / 2 (Mann-Whitney, from ranks in the sorted negatives)."""
    s = np.sort(neg)
    below = np.searchsorted(s, pos, "left")
    ties = np.searchsorted(s, pos, "right") - below
    return float((below + 0.5 * ties).sum() / (len(pos) * len(neg)))


def abinit(star: Path, work: Path, name: str, k: int, a: argparse.Namespace) -> dict:
    """cryospin abinit --classes k; its wall time, classes (0-based, input order), confidence and class maps."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    quick = ["--epochs-amortized", "4", "--min-epochs-amortized", "3", "--epochs-autodecode", "2",
             "--stage1-trials", "1"] if a.quick else []
    wall = sh(["cryospin", "abinit", "--i", str(star), "--o", str(out), "--j", str(a.j), "--quiet",
               "--classes", str(k), "--seed", str(a.seed), "--json-summary", str(work / f"{name}.json"), *quick],
              star.parent)
    summary = json.loads((work / f"{name}.json").read_text())
    parts = load_star_blocks(out / "particles.star")["particles"]
    idx = parts["rlnImageName"].map(lambda s: int(str(s).split("@")[0]) - 1).to_numpy()  # row of the input stack
    cls, conf = np.zeros(len(idx), int), np.zeros(len(idx))
    cls[idx] = parts["rlnClassNumber"].to_numpy() - 1 if "rlnClassNumber" in parts else 0
    conf[idx] = parts["rlnMaxValueProbDistribution"].to_numpy()
    rot = np.zeros((len(idx), 3, 3))
    rot[idx] = rotations(parts)
    maps = {c["class"] - 1: out / c["map"] for c in summary.get("classes", [])} or {0: out / "map.mrc"}
    return {"wall": wall, "cls": cls, "conf": conf, "maps": maps, "k": k, "rot": rot}


def rotations(parts: pd.DataFrame) -> np.ndarray:
    """(n, 3, 3) rotation matrices of a particles table's rlnAngleRot/Tilt/Psi (RELION's ZYZ convention)."""
    eul = torch.from_numpy(parts[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64))
    return euler_to_matrix(eul).numpy()


def pose_error_deg(true_rot: np.ndarray, found: np.ndarray) -> float:
    """How far found poses are from the true ones up to the map's arbitrary orientation and hand: the median
    deviation of true_i^T found_i from its mean rotation, the better hand (``relation_spread_deg``; about 4
    degrees when a class has formed, 40-120 when it has not)."""
    return min(relation_spread_deg(torch.from_numpy(true_rot), torch.from_numpy(found)))


def score(r: dict, star: Path, truth: np.ndarray, known: dict[int, float], true_rot: np.ndarray) -> dict:
    """Each class counted as its majority truth: accuracy, sizes, and FSC 0.5 of the class maps against it."""
    conf_mat = np.array([[np.sum((r["cls"] == c) & (truth == t)) for t in range(len(NAMES))] for c in range(r["k"])])
    major = conf_mat.argmax(1)
    if r["k"] == 2 and 1 in truth:  # the best label permutation (one class per structure)
        perm = max(itertools.permutations(range(2)), key=lambda p: conf_mat[0, p[0]] + conf_mat[1, p[1]])
        major = np.array(perm)
    fscs = {}
    for c, m in r["maps"].items():
        t = int(major[c]) if major[c] < 2 else 0  # a junk class's map is compared with A
        fscs[c] = (NAMES[t], compare(m, star.parent / f"truth_{NAMES[t]}.mrc", m.parent / f"compare_{NAMES[t]}.json"),
                   known[t])
    pose = {c: pose_error_deg(true_rot[sel], r["rot"][sel]) for c in range(r["k"])
            if major[c] < 2 and (sel := (r["cls"] == c) & (truth == major[c])).sum() >= 10}
    main = int(conf_mat[:, 0].argmax())
    junk = truth == 2
    return {"acc": conf_mat[np.arange(r["k"]), major].sum() / len(truth), "conf_mat": conf_mat, "fscs": fscs,
            "pose_deg": pose,
            "main": main, "junk_out": float(np.mean(r["cls"][junk] != main)) if junk.any() else float("nan"),
            "auc": auc(r["conf"][truth == 0], r["conf"][junk]) if junk.any() else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--j", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="short abinit schedule")
    p.add_argument("--work", default="bench_classes_work")
    p.add_argument("--runs", default="mixture:1,mixture:2,mixture:3,junk:1,junk:3",
                   help="the abinit runs, DATA:K separated by commas (default all five)")
    a = p.parse_args()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    vols = [atoms_map(a.box, natoms=20, sigma=1.0, seed=s) for s in (3, 11)]
    n_a, n_b, n_mix_a = round(0.8 * a.n), a.n - round(0.6 * a.n), round(0.6 * a.n)
    img_a, rows_a, optics = project(work / "proj_A", vols[0], n_a, a.seed + 1)
    img_b, rows_b, _ = project(work / "proj_B", vols[1], n_b, a.seed + 2)
    sigma = np.sqrt(img_a.var(axis=(1, 2), dtype=np.float64).mean() / a.snr)  # one noise level for every image
    rng = np.random.default_rng(a.seed)
    img_a += rng.normal(0, sigma, img_a.shape).astype(np.float32)
    snr_b = img_b.var(axis=(1, 2), dtype=np.float64).mean() / sigma**2
    img_b += rng.normal(0, sigma, img_b.shape).astype(np.float32)
    n_junk = a.n - n_a
    junk = rng.normal(0, sigma, (n_junk, a.box, a.box)).astype(np.float32)
    junk_rows = rows_a.iloc[rng.choice(n_a, n_junk, replace=False)]  # CTF (and unused pose) rows of real particles
    maps = {"A": vols[0], "B": vols[1]}
    mix = write_set(work / "mix_data", np.concatenate([img_a[:n_mix_a], img_b]), pd.concat([rows_a[:n_mix_a], rows_b]),
                    optics, np.repeat([0, 1], [n_mix_a, n_b]), maps, a.seed + 3)
    jnk = write_set(work / "junk_data", np.concatenate([img_a, junk]), pd.concat([rows_a, junk_rows]), optics,
                    np.repeat([0, 2], [n_a, n_junk]), maps, a.seed + 4)
    print(f"data: box {a.box}, {APIX} A/px, SNR {a.snr} on A ({snr_b:.2f} on B, same noise sigma); mixture "
          f"{n_mix_a} A + {n_b} B, junk set {n_a} A + {n_junk} noise ({time.perf_counter() - t0:.0f} s)", flush=True)

    truths = {d: np.load(d.parent / "truth_class.npy") for d in (mix, jnk)}
    known = {mix: {t: known_pose(mix, truths[mix], t) for t in (0, 1)}, jnk: {0: known_pose(jnk, truths[jnk], 0)}}
    print(f"known poses (relion_reconstruct --ctf, true members): mixture A {known[mix][0]:.2f} A, "
          f"B {known[mix][1]:.2f} A; junk set A {known[jnk][0]:.2f} A", flush=True)

    true_rot = {d: rotations(load_star_blocks(d)["particles"]) for d in (mix, jnk)}  # the projections' poses
    runs = [(x.split(":")[0], int(x.split(":")[1])) for x in a.runs.split(",")]
    rows = []
    for star, label in ((mix, "mixture"), (jnk, "junk")):
        for k in [k for name, k in runs if name == label]:
            r = abinit(star, work, f"{label}_k{k}", k, a)
            s = score(r, star, truths[star], known[star], true_rot[star])
            rows.append((label, k, r, s))
            cols = [NAMES[t] for t in np.unique(truths[star])]
            cm = s["conf_mat"]
            sizes = "; ".join(f"class {c + 1}: {cm[c].sum()} (" + ", ".join(f"{n} {cm[c][NAMES.index(n)]}" for n in cols)
                              + ")" for c in range(k))
            print(f"  {label} K={k}: {r['wall']:.0f} s; {sizes}", flush=True)

    print(f"\n{describe()}")
    print(f"abinit --classes K ({'quick schedule' if a.quick else 'default schedule'}), {a.n} particles; FSC 0.5 "
          "vs the truth after alignment; each class counted as the truth most of its particles have "
          "(K=2 mixture: the best label permutation); main = the class with most true-A particles")
    print(f"  {'K':>2s} {'data':8s} {'wall s':>7s} {'acc / junk out':>16s}  {'class FSC0.5 A (truth)':36s} "
          f"{'known-pose A':26s} {'ratio':24s} {'AUC':>6s}  pose error deg (up to one rotation and the hand)")
    for label, k, r, s in rows:
        key = f"{s['acc']:.1%}" if label == "mixture" else f"{s['junk_out']:.1%} (main {s['main'] + 1})"
        fs = sorted(s["fscs"].items())
        cls = " ".join(f"{c + 1}:{v[1]:.2f}({v[0]})" for c, v in fs)
        kn = " ".join(f"{c + 1}:{v[2]:.2f}" for c, v in fs)
        ratio = " ".join(f"{c + 1}:{v[1] / v[2]:.2f}x" for c, v in fs)
        auc_s = "-" if np.isnan(s["auc"]) else f"{s['auc']:.3f}"
        pose = " ".join(f"{c + 1}:{v:.1f}" for c, v in sorted(s["pose_deg"].items()))
        print(f"  {k:2d} {label:8s} {r['wall']:7.0f} {key:>16s}  {cls:36s} {kn:26s} {ratio:24s} {auc_s:>6s}  {pose}")
    wall = {(label, k): r["wall"] for label, k, r, _ in rows}
    junk = {k: s for label, k, _, s in rows if label == "junk"}
    if not {("mixture", 1), ("mixture", 2), ("mixture", 3), ("junk", 1), ("junk", 3)} <= set(wall):
        return  # the targets below compare the five runs
    main3 = junk[3]["fscs"][junk[3]["main"]][1]
    print(f"\nwall mixture K=2 / K=1 {wall['mixture', 2] / wall['mixture', 1]:.2f}x, "
          f"K=3 / K=1 {wall['mixture', 3] / wall['mixture', 1]:.2f}x (target K=3 < 2x); junk K=3 / K=1 "
          f"{wall['junk', 3] / wall['junk', 1]:.2f}x")
    print(f"junk set: main class at K=3 {main3:.2f} A against K=1 {junk[1]['fscs'][0][1]:.2f} A (target: at least as "
          f"good); junk outside the main class {junk[3]['junk_out']:.1%} (target >= 70%); confidence AUC A vs junk "
          f"K=1 {junk[1]['auc']:.3f} (target >= 0.8), K=3 {junk[3]['auc']:.3f}")


if __name__ == "__main__":
    main()
