"""Configuration of ``cryospin abinit``: sections of typed, documented options.

Precedence: command-line flags > YAML file (``--config``) > the defaults below.
The effective configuration is written to ``DIR/config.yaml`` by the run.

The sections (``data``, ``model``, ``schedule``, ``optim``, ``search``, ``run``) group
the options for the code; files and flags stay flat: every option has one
name, unique over all sections, used as it is in YAML (``heads: 7``) and, for
the options that have one, as a flag (``--heads 7``). Each field's metadata
holds its help text, its flag, and whether it may change on ``--continue``,
so the flags and the resumable set are derived here, never kept by hand.

Types are checked exactly against the annotations: a boolean is ``true`` or
``false`` (not ``1``, ``"yes"`` or ``[false]``), an integer is not a float or a
boolean, a float is finite (NaN and infinity are refused), a choice is one of
its ``Literal`` values. Anything else is an ``InputError`` naming the source
and the option.

Units: ``box`` and ``max_shift`` are in pixels of the *working* box (the images
are Fourier-cropped from the input box to ``box``); learning rates are Adam
step sizes in the parameters' own units (radians for the pose perturbation,
pixels for the stage-2 shifts, preconditioned Hartley values for the volume).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from cryospin_relion.errors import InputError

Preset = Literal["fast", "paper"]
Loss = Literal["l1", "l2"]
VolumeParam = Literal["linear", "expmant"]
Device = Literal["auto", "cpu", "cuda"]
SymMode = Literal["align", "impose"]
FirstPose = Literal["amortized", "search", "heads"]

COMMAND_LINE = "command line"  # the source of flags: messages name the flag, not the option
GROUP_MAIN, GROUP_SCHEDULE, GROUP_SEARCH = None, "schedule", "stage-1 pose search (beyond the reference; docs/method.md)"
GROUP_CLASSES = "classes (--classes K > 1; docs/method.md)"
# engine/stage1.py first_poses; bench/amortize.py --measure-rule (10,000 ribosome images, box 64, SNR 0.1, 2,048 of
# the particles outside the stage-1 subset): fit / reference of right-basin poses (the search's, within 15 deg of
# the truth) median 0.79, 1st percentile 0.23; of wrong-basin head-local poses (> 15 deg) median -0.19, 99th
# percentile 0.28. At 0.3: 99.1% of the wrong-basin images go to the scan, 98.1% of right-basin poses would not
FIRST_POSE_SCAN_BELOW = 0.3


def opt(default: Any, help: str, *, flag: str | bool = False, metavar: str | None = None, off_flag: str | None = None,
        off_help: str | None = None, resumable: bool = False, group: str | None = GROUP_MAIN) -> Any:
    """A config field with its documentation.

    Args:
        help: the help text; ``{default}`` is replaced by the default.
        flag: True = a flag named after the field (``_`` -> ``-``), a string = that flag name, False = none.
        off_flag: for a boolean that defaults to True, the flag that sets it to False (``no-auto-switch``), with
            its own help text ``off_help``.
        resumable: the option may change between a checkpoint and ``--continue`` (length of the schedule,
            hardware, what is done with the result), the others may not.
    """
    meta = {"help": help, "flag": flag, "metavar": metavar, "off_flag": off_flag, "off_help": off_help,
            "resumable": resumable, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """What is read: the working box and how the images are taken."""

    box: int | None = opt(None, "working box in pixels, even (default min(input box, max_box), max_box 64)",
                          flag=True)
    max_box: int = opt(64, "cap for the automatic working box")
    invert: bool = opt(False, "invert the image contrast (protein black -> white)", flag=True)
    no_ctf: bool = opt(False, "ignore the CTF", flag=True)
    ctf_phase_flipped: bool = opt(False, "the images' CTF phases are already flipped: model |CTF| (as RELION's "
                                  "--ctf_phase_flipped)", flag=True)
    mw_kda: float | None = opt(None, "molecular weight in kDa: the ChimeraX script's contour level encloses its "
                               "volume, 1.21 A^3/Da (default: a level from the map)", flag="mw", metavar="KDA",
                               resumable=True)

    def working_box(self, input_box: int) -> int:
        """The working box for images of side ``input_box`` (even, <= input box)."""
        b = min(self.box, input_box) if self.box is not None else min(input_box, self.max_box)
        return b - (b % 2)


@dataclass(frozen=True)
class ModelConfig:
    """The encoder, the volume and the loss."""

    preset: Preset = opt("fast", "encoder size (default {default})", flag=True)
    heads: int = opt(4, "pose heads M (default {default})", flag=True)  # reference: 7 synthetic, 15 experimental
    octaves: int = opt(4, "Gaussian-pyramid octaves stacked as encoder channels (reference 4)")
    max_shift: float | None = opt(None, "shift bound, working-box pixels (default 0.1 box)", flag=True, metavar="PX")
    volume_param: VolumeParam = opt("linear", "Hartley voxel values: linear or expmant (mantissa * exp(exponent))")
    mask_radius: float = opt(1.0, "radial frequency mask, fraction of the working-box Nyquist")
    loss: Loss = opt("l1", "reconstruction loss (default {default})", flag=True)  # l1 = the reference
    classes: int = opt(1, "classes K: K volumes, every particle in the class whose best pose fits it best "
                       "(default {default})", flag=True, metavar="K")

    def shift_bound(self, box: int) -> float:
        """|shift| bound per axis in working-box pixels."""
        return float(self.max_shift) if self.max_shift is not None else 0.1 * box


@dataclass(frozen=True)
class ScheduleConfig:
    """Epochs, the switch from stage 1 to stage 2, the stage-1 subset and starts, coarse-to-fine."""

    epochs_amortized: int = opt(10, "max stage-1 epochs (default {default})", flag=True, resumable=True)
    min_epochs_amortized: int = opt(7, "stage 1 lasts at least this many epochs (default {default})", flag=True,
                                    metavar="E", group=GROUP_SCHEDULE)
    auto_switch: bool = opt(True, "switch early once winning poses stop changing", off_flag="no-auto-switch",
                            off_help="run all --epochs-amortized epochs of stage 1 (no early switch)",
                            group=GROUP_SCHEDULE)
    switch_threshold_deg: float = opt(
        3.0, "auto-switch once the median change of the winning pose between epochs is below this (default "
        "{default})", flag="switch-threshold", metavar="DEG", group=GROUP_SCHEDULE)
    epochs_autodecode: int = opt(6, "stage-2 epochs (default {default})", flag=True, resumable=True)
    # also with K classes (each start then has K classes): one start was measured cheaper but worse (bench/classes.py
    # mixture, K=2: 96.9% right and a 27.3 A class map, against 99.9% and 10.3 A with 3 starts)
    stage1_trials: int = opt(3, "independent starts of stage 1; the lowest-loss one continues (default {default})",
                             flag=True, metavar="K", group=GROUP_SCHEDULE)
    stage1_trial_epochs: int = opt(3, "epochs of each start before choosing (default {default})", flag=True,
                                   metavar="E", group=GROUP_SCHEDULE)
    # the others get their first pose at the switch from the encoder's heads + the pose search
    stage1_particles: int = opt(3000, "stage 1 trains on a random subset of N particles, 0 = all (default {default})",
                                flag=True, metavar="N", group=GROUP_SCHEDULE)
    batch_size: int = opt(64, "batch size (default {default})", flag=True, metavar="B")
    coarse_to_fine: bool = opt(True, "work at a reduced Fourier box early (beyond the reference)",
                               off_flag="no-coarse-to-fine", off_help="work at the full working box from the start",
                               group=GROUP_SCHEDULE)
    # the pose search needs only low resolution (~2 x apix x box / 32; cf. RELION's 15 A SGD limit)
    stage1_max_crop: int = opt(32, "largest Fourier box of stage 1, 0 = the working box (default {default})",
                               flag=True, metavar="PX", group=GROUP_SCHEDULE)
    c2f_stage2_epochs: int = opt(2, "stage-2 epochs to grow from the last stage-1 Fourier box to the working box")
    # engine/classes.py: the soft-to-hard class assignment of stage 1 (cf. cryoSPARC's class similarity)
    class_similarity: float = opt(0.5, "K > 1: share of every image's stage-1 gradient spread evenly over the "
                                  "classes at the start, annealed to 0 (hard assignment) (default {default})",
                                  flag=True, metavar="S", group=GROUP_CLASSES)
    class_anneal_epochs: int = opt(4, "K > 1: stage-1 epochs over which the class similarity falls to 0 "
                                   "(default {default})", flag=True, metavar="E", group=GROUP_CLASSES)
    class_min_share: float = opt(0.2, "K > 1: a class holding less than this share of its even share (N / K) after "
                                 "an annealing epoch of stage 1 is re-seeded by splitting the largest class "
                                 "(default {default})",
                                 flag=True, metavar="F", group=GROUP_CLASSES)
    class_duplicate_deg: float = opt(
        30.0, "K > 1: after the annealing, of two classes whose poses of the same particles differ by one fixed "
        "rotation (median deviation below this, degrees; either hand) the smaller is emptied, its particles join "
        "the larger (0 = never; default {default})", flag=True, metavar="DEG", group=GROUP_CLASSES)
    class_reform_epochs: int = opt(
        6, "K > 1: when the annealing ends, each class but the largest is formed again alone, from random poses, "
        "on its own particles for this many epochs, and replaced where the new one fits them better (0 = never; "
        "default {default})", flag=True, metavar="E", group=GROUP_CLASSES)
    c2f_start: float = opt(0.375, "first Fourier box as a fraction of the working box (12 at box 32)")
    c2f_epochs: int | None = opt(None, "epochs to reach the full box; null = min_epochs_amortized + 1")


@dataclass(frozen=True)
class OptimConfig:
    """Learning rates and step counts (the reference's values unless noted)."""

    lr_encoder: float = opt(1e-3, "encoder lr (reference 1e-4, tuned up for short CPU runs)")
    # with exploration the volume must follow the searched poses within a few epochs: at box 32, 0.02 and
    # 0.05 stay in a wrong basin, 0.1-0.2 converge (reference 5e-3)
    lr_decoder: float = opt(0.2, "stage-1 volume lr")
    lr_decoder_decay: float = opt(0.8, "stage-1 volume learning-rate factor per epoch (default {default})",
                                  flag=True, metavar="F", group=GROUP_SEARCH)  # box 32: 10.3 -> 9.3 deg
    lr_decoder_stage2: float = opt(1e-2, "stage-2 volume lr (reference 2e-3; raised like lr_decoder)")
    # per particle visit, not per step (engine/schedule.py stage2_lr_decoder): 50,000 particles diverge at 1e-2
    stage2_lr_particles: int = opt(10000, "above this many particles the stage-2 volume lr falls as 1/N, so the "
                                   "volume moves as much per epoch at any N (0 = a constant lr)")
    lr_pose: float = opt(0.05, "stage-2 rotation perturbation lr, radians (reference)")
    lr_shift: float = opt(0.05, "stage-2 shift lr, working-box pixels")
    pose_betas: list[float] = opt([0.9, 0.9], "Adam betas of the per-particle poses (reference)")
    pose_iters: int = opt(5, "pose steps per batch in stage 2 (reference)")
    vol_iters: int = opt(1, "volume steps per batch in stage 2 (reference)")


@dataclass(frozen=True)
class SearchConfig:
    """The stage-1 pose search (beyond the reference; ``explore_candidates: 0`` = the pure reference WTA).

    Each image's winner-takes-all candidate set = the M heads + the best pose of a gradient-free search
    seeded by its remembered best pose and the heads: a scan of ``explore_candidates`` near-uniform
    rotations (randomly turned each batch) x a shift grid, whose ``explore_top`` best are re-scored, then
    ``explore_rounds`` rounds of ``explore_local`` perturbations (engine/stage1.py). The volume is trained
    by the overall winner; the nearest head is pulled toward a winner that is not a head (distillation)."""

    explore_candidates: int = opt(
        4608, "global rotation candidates per image, 0 = the reference winner-takes-all over the heads only "
        "(default {default})", flag=True, metavar="N", group=GROUP_SEARCH)
    explore_grid_crop: int = opt(16, "Fourier box of the global scan, 0 = the epoch's (default {default})",
                                 flag=True, metavar="PX", group=GROUP_SEARCH)
    # picking errors scale with the particle, i.e. the box; measured: 0 -> 32% of new particles within 10 deg
    # at box 64, 0.05 -> 88%; 0.1 fails at box 32
    explore_shift_range: float = opt(
        0.05, "the global scan tries shifts out to +- F x working box around the remembered shift (default "
        "{default})", flag=True, metavar="F", group=GROUP_SEARCH)
    explore_shift_step: float = opt(1.5, "step of that shift grid, working-box px (default {default})", flag=True,
                                    metavar="PX", group=GROUP_SEARCH)
    explore_top: int = opt(8, "best global candidates re-scored with the loss (default {default})", flag=True,
                           metavar="K", group=GROUP_SEARCH)
    explore_rounds: int = opt(3, "local refinement rounds (default {default})", flag=True, metavar="R",
                              group=GROUP_SEARCH)
    explore_local: int = opt(8, "perturbations of the current best per round (default {default})", flag=True,
                             metavar="L", group=GROUP_SEARCH)
    explore_local_deg: float = opt(10.0, "RMS angle of the first round's perturbations (default {default})",
                                   flag=True, metavar="DEG", group=GROUP_SEARCH)
    explore_shift_px: float = opt(1.0, "RMS shift jitter of the first round, working-box px (default {default})",
                                  flag="explore-shift", metavar="PX", group=GROUP_SEARCH)
    distill_weight: float = opt(1.0, "weight of the head-to-winner distillation term (default {default})",
                                flag=True, metavar="W", group=GROUP_SEARCH)
    # search stays the default: after a CPU-length stage 1 the heads' head-local pose is in a wrong basin for 95%
    # of new particles (median error 106 deg against 4.5 for the search; bench/amortize.py), so amortized sends
    # ~96% of them to the scan anyway and saves nothing; it pays once the encoder has learned the poses
    first_pose: FirstPose = opt(
        "search", "first poses of the particles outside the stage-1 subset: search (the global scan + refinement "
        "for every image), amortized (the encoder's heads + local refinement, the global scan only for the images "
        "whose fit is poor), heads (the best head) (default {default})", flag=True, group=GROUP_SEARCH)
    first_pose_scan_below: float = opt(
        FIRST_POSE_SCAN_BELOW, "amortized first poses: the global scan for the images whose head-local fit "
        "(1 - loss / empty-model loss) is below F x the median fit of stage-1 subset images at their remembered "
        "poses; 0 = never (default {default})", flag=True, metavar="F", group=GROUP_SEARCH)

    @property
    def enabled(self) -> bool:
        return self.explore_candidates > 0


@dataclass(frozen=True)
class RunConfig:
    """Seed, hardware, and what is done with the result."""

    seed: int = opt(0, "random seed (default {default})", flag=True)
    device: Device = opt("auto", "compute device (default auto)", flag=True, resumable=True)
    threads: int = opt(0, "CPU threads (default: torch's default)", flag="j", metavar="N", resumable=True)
    flip_hand: bool = opt(False, "mirror the result (maps and poses)", flag=True, resumable=True)
    sym: str = opt("C1", "point group, RELION's names and axes: C1, Cn, Dn, T, O, I (= I2), I1..I4; the maps "
                   "and poses end in RELION's frame of it, the half maps backprojected with the symmetry "
                   "(--sym-mode) (default {default})", flag=True, resumable=True)
    sym_mode: SymMode = opt("align", "with --sym: align (the run in C1, its map rotated into the group's frame "
                            "at the end) or impose (the volume kept symmetric in that frame from the start) "
                            "(default {default})", flag=True)
    checkpoint_minutes: float = opt(10.0, "also checkpoint mid-epoch after this many minutes (0 = epochs only)",
                                    resumable=True)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "schedule": ScheduleConfig,
                             "optim": OptimConfig, "search": SearchConfig, "run": RunConfig}


@dataclass(frozen=True)
class Option:
    """One option: its section, name, type, default and metadata."""

    section: str
    name: str
    type: Any
    default: Any
    meta: dict

    @property
    def flag(self) -> str | None:
        f = self.meta["flag"]
        return None if f is False else (self.name.replace("_", "-") if f is True else f)


def options() -> Iterator[Option]:
    """Every option of every section, in the order of the flat YAML."""
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield Option(sec, f.name, hints[f.name], default, dict(f.metadata))


_OPTIONS = {o.name: o for o in options()}
assert len(_OPTIONS) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()), "option names must be unique"
RESUMABLE = frozenset(o.name for o in _OPTIONS.values() if o.meta["resumable"])


@dataclass(frozen=True)
class AbinitConfig:
    """The whole configuration: one frozen record per section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- flat views ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat mapping option -> value (the YAML layout)."""
        return {o.name: _plain(getattr(getattr(self, o.section), o.name)) for o in _OPTIONS.values()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "AbinitConfig":
        """From a flat mapping (missing options take their defaults); types checked exactly, then validated."""
        return cls().override(source=source, **{k: _Set(v) for k, v in d.items()})

    def override(self, source: str = COMMAND_LINE, **kw: Any) -> "AbinitConfig":
        """A validated copy with the given flat options replaced (``None`` values are ignored; wrap a value
        in ``_Set`` to set it even when it is None). Messages name ``source`` and the option, or for the
        command line the flag the user typed (``--j``, not ``threads``)."""
        unknown = sorted(set(kw) - set(_OPTIONS))
        if unknown:
            raise InputError(f"{source}: unknown option(s): {', '.join(unknown)}")
        per: dict[str, dict[str, Any]] = {}
        for k, v in kw.items():
            if isinstance(v, _Set):
                v = v.value
            elif v is None:
                continue
            o = _OPTIONS[k]
            per.setdefault(o.section, {})[k] = check_type(v, o.type, _where(source, o))
        new = dataclasses.replace(self, **{s: dataclasses.replace(getattr(self, s), **f) for s, f in per.items()})
        return new.validate(source, {k: _where(source, _OPTIONS[k]) for f in per.values() for k in f})

    def with_box(self, box: int) -> "AbinitConfig":
        """The same config with the effective working box recorded (what config.yaml keeps)."""
        return self.override(source="working box", box=box)

    # -- checks -------------------------------------------------------------------------------
    def validate(self, source: str = "config", where: dict[str, str] | None = None) -> "AbinitConfig":
        """Checks of values beyond their types; raises InputError naming ``source`` and the option (or
        ``where[option]``, e.g. the flag that set it)."""
        d = self.to_dict()
        where = where or {}

        def bad(name, msg):
            raise InputError(f"{where.get(name, f'{source}: {name}')}: {_show(d[name])} {msg}")

        if d["box"] is not None and (d["box"] < 8 or d["box"] % 2):
            bad("box", "must be an even number >= 8")
        if d["max_box"] < 8 or d["max_box"] % 2:
            bad("max_box", "must be an even number >= 8")
        for name in ("heads", "classes", "batch_size", "pose_iters", "stage1_trials", "stage1_trial_epochs",
                     "epochs_amortized"):
            if d[name] < 1:
                bad(name, "must be >= 1" + (" (stage 1 initialises the poses)" if name == "epochs_amortized" else ""))
        for name in ("explore_grid_crop", "stage1_max_crop"):
            if d[name] and (d[name] < 8 or d[name] % 2):
                bad(name, "must be 0 or an even number >= 8")
        if not 0 <= d["class_similarity"] <= 1:
            bad("class_similarity", "must be in [0, 1]")
        if d["class_reform_epochs"] < 0:
            bad("class_reform_epochs", "must be >= 0 (0 = never)")
        if not 0 <= d["class_duplicate_deg"] <= 180:
            bad("class_duplicate_deg", "must be in [0, 180] (0 = never)")
        for name in ("mask_radius", "c2f_start"):
            if not 0 < d[name] <= 1.0:
                bad(name, "must be in (0, 1]")
        from cryospin_relion.geometry.symmetry import parse_symmetry  # numpy only; the names live there

        try:
            parse_symmetry(d["sym"])
        except InputError:
            bad("sym", "is not a point group: use C1, Cn, Dn (n >= 1), T, O, I (= I2) or I1..I4")
        if d["mw_kda"] is not None and not 0 < d["mw_kda"] < float("inf"):
            bad("mw_kda", "must be a molecular weight in kDa > 0")
        if not 0 <= d["first_pose_scan_below"] <= 1:
            bad("first_pose_scan_below", "must be in [0, 1] (a fraction of the stage-1 subset's median fit)")
        if len(d["pose_betas"]) != 2 or not all(0 <= b < 1 for b in d["pose_betas"]):
            bad("pose_betas", "must be two numbers in [0, 1)")
        for o in _OPTIONS.values():  # every other number is a count, a rate or a bound: >= 0
            v = d[o.name]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                bad(o.name, "must be >= 0")
        return self

    def resume_changes(self, old: dict[str, Any]) -> list[str]:
        """Options of a checkpoint's flat config ``old`` that differ here and may not change on --continue."""
        changed = [k for k, v in self.to_dict().items() if k not in RESUMABLE and k in old and old[k] != v]
        if self.run.sym_mode == "impose" and "sym" in old:  # the volume was kept symmetric under old["sym"]
            from cryospin_relion.geometry.symmetry import parse_symmetry

            if parse_symmetry(old["sym"]) != parse_symmetry(self.run.sym):
                changed.append("sym")
        return sorted(changed)

    # -- YAML -----------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "AbinitConfig":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(d, dict):
            raise InputError(f"{path}: expected a mapping of option: value")
        return cls.from_dict(d, str(path))

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from cryospin_relion.io.atomic import write_text

            write_text(path, text)
        return text


def _where(source: str, o: Option) -> str:
    """How a message names option ``o`` set from ``source``: the flag for the command line."""
    flag = o.flag or o.meta["off_flag"]
    return f"--{flag}" if source == COMMAND_LINE and flag else f"{source}: {o.name}"


def _show(v: Any) -> str:
    """A value as the user wrote it (no Python reprs in messages)."""
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class _Set:
    """A value to set even when it is None (``override`` skips plain Nones: absent flags)."""

    value: Any


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def check_type(v: Any, tp: Any, where: str) -> Any:
    """``v`` if it has exactly the type ``tp`` (int accepted for float, as a float), else InputError."""

    def fail(what: str):
        raise InputError(f"{where}: {_show(v) if isinstance(v, (int, float, list, type(None))) else repr(v)} "
                         f"is not {what}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if v is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        if v is None:
            fail(_describe(inner))
        return check_type(v, inner, where)
    if origin is Literal:
        if not isinstance(v, str) or v not in args:
            fail("one of " + ", ".join(args))
        return v
    if origin is list:
        if not isinstance(v, (list, tuple)):
            fail("a list")
        return [check_type(x, args[0], where) for x in v]
    if tp is bool:
        if type(v) is not bool:
            fail("true or false")
        return v
    if tp is int:
        if type(v) is not int:
            fail("an integer")
        return v
    if tp is float:
        if type(v) not in (int, float) or not math.isfinite(v):
            fail("a finite number")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            fail("a string")
        return v
    raise TypeError(f"config type {tp} not handled")  # a programming error, not bad input


def _describe(tp: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))
