"""Configuration of ``cryospin abinit``: one dataclass with documented defaults.

Precedence: command-line flags > YAML file (``--config``) > the defaults below.
The effective configuration is written to ``DIR/config.yaml`` by the command.

Units: ``box`` and ``max_shift`` are in pixels of the *working* box (the images
are Fourier-cropped from the input box to ``box``); learning rates are Adam
step sizes in the parameters' own units (radians for the pose perturbation,
pixels for the stage-2 shifts, preconditioned Hartley values for the volume).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cryospin_relion.errors import InputError

PRESETS = ("fast", "paper")
LOSSES = ("l1", "l2")
VOLUME_PARAMS = ("linear", "expmant")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class AbinitConfig:
    # --- data / working box ------------------------------------------------------
    box: int | None = None  # working box (even); None = input box, capped at max_box
    max_box: int = 64  # cap for the automatic working box
    invert: bool = False  # multiply images by -1 (use for protein-black data without a sign flag)
    no_ctf: bool = False  # ignore the CTF (phase-flipped or simulated data without CTF)

    # --- model ---------------------------------------------------------------------
    preset: str = "fast"  # encoder size: fast (CPU) or paper (64-128-256-256-256)
    heads: int = 4  # pose heads M (reference: 7 synthetic, 15 experimental)
    octaves: int = 4  # Gaussian-pyramid octaves stacked as encoder channels (reference 4)
    max_shift: float | None = None  # bound on |shift| per axis in working-box px; None = 0.1 * box
    volume_param: str = "linear"  # Hartley voxel values: linear or expmant (mantissa * exp(exponent))
    mask_radius: float = 1.0  # radial frequency mask, fraction of the working-box Nyquist

    # --- loss ------------------------------------------------------------------------
    loss: str = "l1"  # l1 (reference) or l2 (Gaussian)

    # --- schedule --------------------------------------------------------------------
    epochs_amortized: int = 10  # maximum stage-1 (auto-encoding) epochs
    min_epochs_amortized: int = 7  # stage 1 lasts at least this many epochs
    auto_switch: bool = True  # switch early once winning poses stop changing
    switch_threshold_deg: float = 3.0  # ... median change of winning pose between epochs below this
    epochs_autodecode: int = 6  # stage-2 (auto-decoding) epochs after the switch
    stage1_trials: int = 3  # independent starts of stage 1; the one with the lowest loss after stage1_trial_epochs
    stage1_trial_epochs: int = 3  # epochs continues, the others are dropped (1 = a single start)
    stage1_particles: int = 3000  # stage 1 trains on a fixed random subset of this many particles (0 = all); the
    # others get their first pose at the switch from the encoder's heads + the pose search (amortised inference)
    batch_size: int = 64

    # --- optimisation (reference values unless noted) ----------------------------------
    lr_encoder: float = 1e-3  # reference 1e-4 (tuned up for short CPU runs, see docs)
    lr_decoder: float = 0.2  # stage-1 volume lr (reference 5e-3; with exploration the volume must follow the
    # searched poses within a few epochs: at box 32, 0.02 and 0.05 stay in a wrong basin, 0.1-0.2 converge)
    lr_decoder_decay: float = 0.8  # stage-1 volume lr factor per epoch (lr_decoder * decay^epoch; box 32: 10.3 -> 9.3 deg)
    lr_decoder_stage2: float = 1e-2  # stage-2 volume lr (reference 2e-3; raised like lr_decoder)
    lr_pose: float = 0.05  # stage-2 rotation perturbation lr, radians (reference)
    lr_shift: float = 0.05  # stage-2 shift lr, working-box pixels
    pose_betas: list = field(default_factory=lambda: [0.9, 0.9])  # reference
    pose_iters: int = 5  # pose steps per batch in stage 2 (reference)
    vol_iters: int = 1  # volume steps per batch in stage 2 (reference)

    # --- stage-1 exploration (beyond the reference; explore_candidates: 0 = the pure reference WTA) ----
    # Each image's winner-takes-all candidate set = the M heads + the best pose of a gradient-free search
    # seeded by its remembered best pose and the heads: a scan of explore_candidates near-uniform rotations
    # (randomly turned each batch) whose explore_top best are re-scored, then explore_rounds rounds of
    # explore_local perturbations (engine/stage1.py). The volume is trained by the overall winner; the
    # nearest head is pulled toward a winner that is not a head (distillation, distill_weight).
    explore_candidates: int = 4608  # global candidates (near-uniform rotation grid) per image; 0 = off (reference)
    explore_grid_crop: int = 16  # Fourier box of the global scan (even; 0 = the epoch's box): coarse grid, low resolution
    explore_shift_range: float = 0.05  # the global scan also tries shifts out to +- this fraction of the working box
    # around the remembered shift (picking errors scale with the particle, i.e. the box; 0 = remembered shift only;
    # measured: 0 -> 32% of new particles within 10 deg at box 64, 0.05 -> 88%; 0.1 fails at box 32) ...
    explore_shift_step: float = 1.5  # ... on a square grid of this step in working-box px
    explore_top: int = 8  # best global candidates per image re-scored with the configured loss
    explore_rounds: int = 3  # local refinement rounds of the search (the perturbation halves each round)
    explore_local: int = 8  # perturbations of the current best per round
    explore_local_deg: float = 10.0  # RMS angle of the first round's perturbations
    explore_shift_px: float = 1.0  # RMS shift jitter of the first round, working-box pixels
    distill_weight: float = 1.0  # weight of the head -> winner distillation term

    # --- coarse-to-fine ----------------------------------------------------------------
    coarse_to_fine: bool = True  # work at a reduced Fourier box early (beyond the reference)
    stage1_max_crop: int = 32  # with coarse_to_fine, stage 1 works at most at this Fourier box (px, even; 0 = the
    # working box): the pose search needs only low resolution (~2 x apix x box / 32; cf. RELION's 15 A SGD limit)
    c2f_stage2_epochs: int = 2  # stage-2 epochs to grow from the last stage-1 Fourier box to the working box
    c2f_start: float = 0.375  # first Fourier box as a fraction of the working box (12 at box 32: smoother search)
    c2f_epochs: int | None = None  # epochs to reach the full box; None = min_epochs_amortized + 1

    # --- run -------------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads; 0 = torch default
    flip_hand: bool = False  # mirror the result (poses and maps)
    checkpoint_minutes: float = 10.0  # also checkpoint mid-epoch after this many minutes (0 = epochs only)

    # ------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> "AbinitConfig":
        def bad(name, msg):
            raise InputError(f"{source}: {name}: {msg}")

        if self.preset not in PRESETS:
            bad("preset", f"'{self.preset}' is not one of {', '.join(PRESETS)}")
        if self.loss not in LOSSES:
            bad("loss", f"'{self.loss}' is not one of {', '.join(LOSSES)}")
        if self.volume_param not in VOLUME_PARAMS:
            bad("volume_param", f"'{self.volume_param}' is not one of {', '.join(VOLUME_PARAMS)}")
        if self.device not in DEVICES:
            bad("device", f"'{self.device}' is not one of {', '.join(DEVICES)}")
        if self.box is not None and (self.box < 8 or self.box % 2):
            bad("box", f"{self.box} must be an even number >= 8")
        if self.max_box < 8 or self.max_box % 2:
            bad("max_box", f"{self.max_box} must be an even number >= 8")
        for name in ("heads", "batch_size", "pose_iters", "stage1_trials", "stage1_trial_epochs"):
            if getattr(self, name) < 1:
                bad(name, f"{getattr(self, name)} must be >= 1")
        for name in ("epochs_amortized", "epochs_autodecode", "min_epochs_amortized", "vol_iters", "octaves", "threads",
                     "explore_candidates", "explore_top", "explore_rounds", "explore_local", "stage1_particles",
                     "c2f_stage2_epochs"):
            if getattr(self, name) < 0:
                bad(name, f"{getattr(self, name)} must be >= 0")
        if self.explore_grid_crop and (self.explore_grid_crop < 8 or self.explore_grid_crop % 2):
            bad("explore_grid_crop", f"{self.explore_grid_crop} must be 0 or an even number >= 8")
        if self.stage1_max_crop and (self.stage1_max_crop < 8 or self.stage1_max_crop % 2):
            bad("stage1_max_crop", f"{self.stage1_max_crop} must be 0 or an even number >= 8")
        if self.epochs_amortized < 1:
            bad("epochs_amortized", "at least one amortized epoch is needed to initialise the poses")
        if self.max_shift is not None and self.max_shift < 0:
            bad("max_shift", f"{self.max_shift} must be >= 0")
        if not 0 < self.mask_radius <= 1.0:
            bad("mask_radius", f"{self.mask_radius} must be in (0, 1]")
        if not 0 < self.c2f_start <= 1.0:
            bad("c2f_start", f"{self.c2f_start} must be in (0, 1]")
        if len(self.pose_betas) != 2 or not all(0 <= b < 1 for b in self.pose_betas):
            bad("pose_betas", f"{self.pose_betas} must be two numbers in [0, 1)")
        for name in ("checkpoint_minutes", "lr_encoder", "lr_decoder", "lr_decoder_stage2", "lr_pose", "lr_shift", "switch_threshold_deg",
                     "explore_local_deg", "explore_shift_px", "distill_weight", "explore_shift_range",
                     "explore_shift_step"):
            if getattr(self, name) < 0:
                bad(name, f"{getattr(self, name)} must be >= 0")
        return self

    # -- derived values ------------------------------------------------------------------
    def working_box(self, input_box: int) -> int:
        """The working box for images of side ``input_box`` (even, <= input box)."""
        if self.box is not None:
            b = min(self.box, input_box)
        else:
            b = min(input_box, self.max_box)
        return b - (b % 2)

    def shift_bound(self, box: int) -> float:
        return float(self.max_shift) if self.max_shift is not None else 0.1 * box

    # -- YAML / dict ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "AbinitConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"{source}: unknown option(s): {', '.join(unknown)}")
        cfg = cls()
        for k, v in d.items():
            setattr(cfg, k, _coerce(cls, k, v, source))
        return cfg.validate(source)

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
            from cryospin_relion.io.atomic import atomic_path

            with atomic_path(path) as tmp:
                Path(tmp).write_text(text)
        return text

    def override(self, **kw) -> "AbinitConfig":
        """A copy with the given fields replaced (``None`` values are ignored)."""
        new = dataclasses.replace(self)
        for k, v in kw.items():
            if v is not None:
                setattr(new, k, _coerce(type(self), k, v, "command line"))
        return new.validate("command line")


def _coerce(cls, name: str, v: Any, source: str) -> Any:
    f = {f.name: f for f in fields(cls)}[name]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    t = str(f.type)
    try:
        if v is None:
            if "None" in t:
                return None
            raise ValueError("null is not allowed")
        if isinstance(default, bool) or t == "bool":
            if isinstance(v, str):
                if v.lower() in ("true", "yes", "1", "on"):
                    return True
                if v.lower() in ("false", "no", "0", "off"):
                    return False
                raise ValueError(f"'{v}' is not a boolean")
            return bool(v)
        if t.startswith("int"):
            if isinstance(v, float) and not v.is_integer():
                raise ValueError(f"'{v}' is not an integer")
            return int(v)
        if t.startswith("float"):
            return float(v)
        if t == "list":
            return [float(x) for x in v]
        return str(v)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: {name}: {e}") from None
