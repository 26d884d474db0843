"""Ab-initio reconstruction with cryoSPIN (semi-amortized pose inference).

Examples:
  cryospin abinit --i Extract/job005/particles.star --o abinit
  cryospin abinit --i J12_particles.cs --o abinit --box 64 --heads 7 --device cuda
  cryospin abinit --i particles.star --o abinit --continue        # resume after a stop

Stage 1 trains a multi-head image encoder and a Hartley-space volume (auto-encoding,
winner takes all over the heads); stage 2 optimises every particle's pose directly
(auto-decoding), starting from its winning head. Images are Fourier-cropped to the
working box (--box, default min(input box, 64)).

Outputs in DIR: half1_map.mrc, half2_map.mrc (backprojections of the two random
halves with the final poses; both halves come from ONE ab-initio run, so they are
not independent refinements and their FSC is optimistic), map.mrc (all particles,
low-pass filtered at the 0.143 resolution, for use as a RELION initial model with
--ini_high; these three maps are at the particles' box and pixel size, as RELION
and cryoSPARC refinement need), decoder_map.mrc (the learned volume, at the working
box), fsc.txt, particles.star (RELION
3.1+, every input column kept, new angles/origins/rlnRandomSubset), particles.cs
(for .cs input), config.yaml (effective config), run.log, history.json,
checkpoint.pt (after every epoch), logfile.pdf.

Options precedence: command-line flags > --config YAML > built-in defaults.
Exit codes: 0 success, 1 internal failure, 2 bad input, 130/143 stopped by
SIGINT/SIGTERM (a checkpoint is written; rerun with --continue).
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Literal

from cryospin_relion.config import AbinitConfig, Option, options


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True, metavar="IN", help="particles (.star or .cs)")
    p.add_argument("--o", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", metavar="YAML", help="configuration file (any option of config.yaml)")
    p.add_argument("--continue", dest="cont", action="store_true", help="resume from DIR/checkpoint.pt")
    p.add_argument("--datadir", metavar="D", help="extra folder to search for image stacks")
    p.add_argument("--angpix", type=float, metavar="A", help="pixel size when the file has none")
    p.add_argument("--quiet", action="store_true", help="no progress bars or console log lines")
    p.add_argument("--json-summary", metavar="FILE", help="write a JSON summary of the run")
    p.add_argument("--true-poses", default=None, metavar="STAR",
                   help="ground-truth poses (.star/.cs of the same particles, e.g. from cryospin simulate): "
                        "pose error per epoch in history.json and logfile.pdf")
    p.add_argument("--dry-run", action="store_true", help="check inputs, write config.yaml, do not run")
    groups: dict[str | None, argparse._ActionsContainer] = {None: p}
    for o in options():
        if o.flag is None and o.meta["off_flag"] is None:
            continue
        g = groups.get(o.meta["group"]) or groups.setdefault(o.meta["group"], p.add_argument_group(o.meta["group"]))
        _add_option(g, o)


def _add_option(g, o: Option) -> None:
    """The flag of a config option: its type and choices from the annotation, its help from the metadata."""
    help = o.meta["help"].replace("{default}", str(o.default))
    if o.meta["off_flag"]:  # a boolean that defaults to True
        g.add_argument(f"--{o.meta['off_flag']}", dest=o.name, action="store_const", const=False, default=None,
                       help=o.meta["off_help"])
        return
    tp = _plain_type(o.type)
    if tp is bool:
        g.add_argument(f"--{o.flag}", dest=o.name, action="store_const", const=True, default=None, help=help)
    elif typing.get_origin(tp) is Literal:
        g.add_argument(f"--{o.flag}", dest=o.name, choices=typing.get_args(tp), help=help)
    else:
        g.add_argument(f"--{o.flag}", dest=o.name, type=tp, metavar=o.meta["metavar"], help=help)


def _plain_type(tp):
    """int | None -> int (a flag is never None)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if typing.get_origin(tp) not in (None, Literal, list) and len(args) == 1 else tp


def effective_config(args: argparse.Namespace, out_dir: Path) -> AbinitConfig:
    """defaults < (DIR/config.yaml when continuing without --config) < --config YAML < flags."""
    if args.config:
        cfg = AbinitConfig.from_yaml(args.config)
    elif getattr(args, "cont", False) and (out_dir / "config.yaml").is_file():
        cfg = AbinitConfig.from_yaml(out_dir / "config.yaml")
    else:
        cfg = AbinitConfig()
    return cfg.override(**{o.name: getattr(args, o.name, None) for o in options()})


def main(args: argparse.Namespace) -> int:
    from cryospin_relion.lifecycle.abinit import AbinitRequest, run_abinit

    out = Path(args.o)
    return run_abinit(AbinitRequest(
        input=Path(args.i), output=out, config=effective_config(args, out),
        config_file=Path(args.config) if args.config else None, resume=args.cont, datadir=args.datadir,
        angpix=args.angpix, dry_run=args.dry_run, quiet=args.quiet,
        json_summary=Path(args.json_summary) if args.json_summary else None, true_poses=args.true_poses))
