"""Summarise a particle STAR or .cs file: counts, box, pixel sizes, optics, CTF, poses, halves, stacks.

Missing image stacks are reported, not treated as an error (``--check-images``
reads every image and fails on missing stacks or NaN/inf pixels). ``--json``
prints the same summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd

from cryospin_relion.io.particles import ParticleTable
from cryospin_relion.io.read import read_particles
from cryospin_relion.validate import table_warnings


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--i", required=True, metavar="IN", help="particles (.star or .cs)")
    parser.add_argument("--datadir", default=None, help="extra folder to look for image stacks in")
    parser.add_argument("--angpix", type=float, default=None,
                        help="pixel size in A, used only when the input has none")
    parser.add_argument("--no-ctf", dest="no_ctf", action="store_true",
                        help="accept input without CTF parameters")
    parser.add_argument("--check-images", dest="check_images", action="store_true",
                        help="read every image: fail on missing stacks, bad indices or NaN/inf pixels")
    parser.add_argument("--json", action="store_true", help="print JSON")


def summarize(table: ParticleTable) -> dict:
    """JSON-serialisable summary of a particle table."""
    df = pd.DataFrame({"group": table.optics_group, "apix": table.apix})
    if table.ctf is not None:
        df["voltage"], df["cs"], df["amp"] = table.ctf.voltage, table.ctf.cs, table.ctf.amp_contrast
    groups = []
    for g, d in df.groupby("group", sort=True):
        row = {"group": int(g), "particles": int(len(d)), "pixel_size": float(d["apix"].iloc[0])}
        if table.ctf is not None:
            row.update(voltage=float(d["voltage"].iloc[0]), cs=float(d["cs"].iloc[0]),
                       amp_contrast=float(d["amp"].iloc[0]))
        groups.append(row)
    ctf = None
    if table.ctf is not None:
        dfs = np.concatenate([table.ctf.defocus_u, table.ctf.defocus_v])
        ctf = {"defocus_min": float(dfs.min()), "defocus_max": float(dfs.max()),
               "phase_shift_max": float(np.abs(table.ctf.phase_shift).max())}
    halves = None
    if table.subset is not None:
        v, c = np.unique(table.subset, return_counts=True)
        halves = {str(int(a)): int(b) for a, b in zip(v, c)}
    missing = list(table.extra.get("missing_stacks", []))
    return {
        "file": table.source_file, "format": table.source_format, "particles": len(table),
        "box": int(table.box), "pixel_size_min": float(table.apix.min()), "pixel_size_max": float(table.apix.max()),
        "optics_groups": groups, "ctf": ctf, "poses": bool(table.has_poses), "halves": halves,
        "image_sign": float(table.sign), "stacks": int(pd.unique(table.stack_paths).size),
        "missing_stacks": len(missing), "missing_stack_examples": missing[:5],
    }


def format_summary(s: dict) -> str:
    lines = [f"file          : {s['file']} ({s['format']})", f"particles     : {s['particles']}",
             f"box           : {s['box'] or 'unknown'} px",
             f"pixel size    : {s['pixel_size_min']:.4f}" + (f" - {s['pixel_size_max']:.4f}"
                                                             if s["pixel_size_max"] != s["pixel_size_min"] else "")
             + " A", f"optics groups : {len(s['optics_groups'])}"]
    for g in s["optics_groups"]:
        extra = (f", {g['voltage']:g} kV, Cs {g['cs']:g} mm, Q0 {g['amp_contrast']:g}" if "voltage" in g else "")
        lines.append(f"  group {g['group']}: {g['particles']} particles, {g['pixel_size']:.4f} A/px{extra}")
    c = s["ctf"]
    lines.append("CTF           : none" if c is None else
                 f"CTF           : defocus {c['defocus_min']:.0f} - {c['defocus_max']:.0f} A"
                 + (f", phase shift up to {c['phase_shift_max']:g} deg" if c["phase_shift_max"] else ""))
    lines.append(f"poses         : {'yes' if s['poses'] else 'no'}")
    h = s["halves"]
    lines.append("halves        : " + ("none" if h is None else ", ".join(f"{k}: {v}" for k, v in h.items())))
    lines.append(f"image sign    : {s['image_sign']:+g}")
    lines.append(f"stacks        : {s['stacks']} ({s['missing_stacks']} missing)")
    lines += [f"  missing: {m}" for m in s["missing_stack_examples"]]
    if "images_checked" in s:
        lines.append(f"images        : all {s['images_checked']} read, finite")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    table = read_particles(args.i, datadir=args.datadir, angpix=args.angpix, no_ctf=args.no_ctf,
                           check_stacks=args.check_images)
    s = summarize(table)
    for w in table_warnings(table):
        print(f"cryospin info: warning: {w}", file=sys.stderr, flush=True)
    if args.check_images:
        from cryospin_relion.data.stack import ImageSource

        src, n = ImageSource(table), len(table)
        for a in range(0, n, 1024):
            src.images(np.arange(a, min(a + 1024, n)))
        s["images_checked"] = n
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0
