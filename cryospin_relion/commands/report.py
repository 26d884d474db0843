"""Rebuild logfile.pdf and the PNGs from a cryospin abinit output folder.

Reads only the folder's files: history.json (required), fsc.txt, map.mrc (else
decoder_map.mrc) and particles.star when present, so it works on a finished run
and on one still running or stopped (then the pages whose files are missing are
left out; during a run the run itself rewrites the report after every epoch, at
most every 30 s). Every file is replaced atomically.
"""

from __future__ import annotations

import argparse


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="the output folder of a cryospin abinit run (its --o)")


def main(args) -> int:
    from cryospin_relion.lifecycle.live_report import report_from_folder

    written = report_from_folder(args.dir)
    pngs = sorted(p.name for k, p in written.items() if k != "pdf")
    print(f"cryospin report: wrote {written['pdf']}" + (f" and {', '.join(pngs)}" if pngs else ""))
    return 0
