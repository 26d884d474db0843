"""What a run records per epoch: typed records, and their one on-disk layout (``history.json``).

``EpochRecord`` is one finished epoch; ``History`` the run's list of them with the
events of the schedule (the switch, the stage-1 starts, the first-pose pass:
``FirstPoseRecord``).
``History.to_json()`` is the layout of ``history.json`` -- one list per field,
indexed like ``epoch`` -- which the report (``report/``) reads, so that a report
can be made again from a run's folder alone. ``EpochTally`` sums one epoch's
batches while it runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# where an image's overall stage-1 winner came from (engine/stage1.py ``search_poses``), and where the
# first pose of a particle outside the stage-1 subset came from (engine/stage1.py ``first_poses``)
WINNER_SOURCES = ("heads", "memory", "local", "global")


@dataclass
class EpochTally:
    """Sums over the batches of the running epoch (checkpointed with the engine, so a resumed epoch
    reports the same figures as an uninterrupted one). The image count and time are added per batch; the
    losses and counts when the engine reads them from the device (engine/tally.py), at the latest before
    the epoch's record or a checkpoint is made."""

    heads: int
    loss_sum: float = 0.0
    count: int = 0
    time_s: float = 0.0
    wins: list[int] = field(default_factory=list)  # per head: images where it was the best head
    sources: list[int] = field(default_factory=lambda: [0] * len(WINNER_SOURCES))
    rank_images: list[int] = field(default_factory=lambda: [0])  # per rank: the images it computed

    def __post_init__(self):
        if not self.wins:
            self.wins = [0] * self.heads

    @classmethod
    def for_ranks(cls, heads: int, ranks: int) -> "EpochTally":
        """An empty tally of a run of ``ranks`` ranks."""
        return cls(heads, rank_images=[0] * ranks)

    def add_batch(self, n: int, seconds: float) -> None:
        """One batch of ``n`` images (all ranks) in ``seconds``; its losses and counts come with ``add_sums``."""
        self.count += n
        self.time_s += seconds

    def add_sums(self, loss_sum: float, wins: list[int], sources: list[int], rank_images: list[int]) -> None:
        """Sums over batches read from the device (engine/tally.py ``PendingSums.drain``): the losses times
        the images, head wins and winner sources (all zero in stage 2), and how many images each rank computed."""
        self.loss_sum += loss_sum
        self.rank_images = [a + int(x) for a, x in zip(self.rank_images, rank_images)]
        self.wins = [a + int(x) for a, x in zip(self.wins, wins)]
        self.sources = [a + int(x) for a, x in zip(self.sources, sources)]

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.count)

    @property
    def images_per_s(self) -> float:
        return self.count / max(self.time_s, 1e-9)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, d: dict, ranks: int = 1) -> "EpochTally":
        """The tally of a checkpoint, resumed on ``ranks`` ranks (a resume on another number of ranks counts the
        per-rank images of the running epoch from the resume on)."""
        t = cls(**d)
        if len(t.rank_images) != ranks:
            t.rank_images = [0] * ranks
        return t


@dataclass
class EpochRecord:
    """One finished epoch. Times in seconds; learning rates as used; stage-1-only fields are None in stage 2."""

    epoch: int  # 1-based
    stage: int  # 1 auto-encoding, 2 auto-decoding
    loss: float  # mean per-image loss over the epoch's batches
    time_s: float  # cumulative training time at the end of this epoch
    epoch_time_s: float
    images_per_s: float
    crop: int  # Fourier box
    lr_encoder: float
    lr_decoder: float
    lr_pose: float
    head_wins: list[int] | None  # (M,) images where each head was the best head (one head near all = collapse)
    head_win_share: list[float] | None  # the same as fractions
    winner_source_share: dict[str, float] | None  # WINNER_SOURCES -> fraction of images
    pose_change_deg: float | None  # median geodesic change of each pose since the previous epoch
    switched: bool  # stage 2 starts after this epoch
    class_sizes: list[int] | None = None  # K > 1: particles per class at the epoch's end (stage 1: its subset)
    class_moves: int | None = None  # K > 1, stage 2: particles that changed class after the epoch
    # per rank: the images it computed in the epoch's batches (one entry alone; with G ranks each has about
    # 1/G of them: the work is shared, engine/distributed.py)
    rank_images: list[int] | None = None


@dataclass
class TrialsRecord:
    """The stage-1 starts (``stage1_trials``): each start's loss after ``epochs`` epochs, the one kept, and
    the training time of the dropped ones."""

    loss: list[float]
    chosen: int
    epochs: int
    dropped_s: float


@dataclass
class FirstPoseRecord:
    """The first-pose pass of the particles outside the stage-1 subset (config ``first_pose``): how many, how
    many were sent to the global scan, and where each one's pose came from (WINNER_SOURCES -> images: a head as
    it is, the remembered start's basin, refinement around a head, the global scan's basin)."""

    mode: str  # amortized | search | heads
    particles: int
    scanned: int
    sources: dict[str, int]
    seconds: float = 0.0
    scan_below: float | None = None  # the fit under which an image went to the scan (amortized)

    def shares(self) -> dict[str, float]:
        return {k: v / max(1, self.particles) for k, v in self.sources.items()}

    @property
    def images_per_s(self) -> float:
        return self.particles / max(self.seconds, 1e-9)


@dataclass
class History:
    """The per-epoch records of a run and the events of its schedule."""

    epochs: list[EpochRecord] = field(default_factory=list)
    switch_epoch: int | None = None  # stage-1 epochs when stage 2 began
    trials: TrialsRecord | None = None
    assign_s: float | None = None  # time of the first-pose pass of the particles outside the stage-1 subset
    first_poses: FirstPoseRecord | None = None  # that pass
    class_reseeds: list[dict] = field(default_factory=list)  # K > 1: {"epoch", "class", "from_class"} (0-based)
    # K > 1: {"epoch", "class", "into_class", "spread_deg"}: a class emptied as a duplicate (engine/classes.py)
    class_merges: list[dict] = field(default_factory=list)
    # K > 1: {"epoch", "class", "particles", "loss", "reformed_loss", "replaced"} (0-based classes; run.py
    # ``_reform_classes``)
    class_reforms: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.epochs)

    @property
    def last(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None

    def column(self, name: str) -> list:
        """One field over the epochs."""
        return [getattr(e, name) for e in self.epochs]

    def stage_seconds(self) -> dict[str, float]:
        """Training seconds of stage 1 (dropped starts included) and of stage 2."""
        t = {1: 0.0, 2: 0.0}
        for e in self.epochs:
            t[e.stage] += e.epoch_time_s
        t[1] += self.trials.dropped_s if self.trials else 0.0
        return {"stage1_s": t[1], "stage2_s": t[2]}

    # -- the on-disk layout and the checkpoint ------------------------------------------------
    def to_json(self) -> dict:
        """``history.json``: {field: [value per epoch]} for every EpochRecord field, plus switch_epoch,
        and ``trials`` / ``assign_s`` / ``first_poses`` when they happened."""
        out: dict = {f.name: self.column(f.name) for f in dataclasses.fields(EpochRecord)}
        out["switch_epoch"] = self.switch_epoch
        if self.trials is not None:
            out["trials"] = dataclasses.asdict(self.trials)
        if self.assign_s is not None:
            out["assign_s"] = self.assign_s
        if self.first_poses is not None:
            out["first_poses"] = dataclasses.asdict(self.first_poses)
        if self.class_reseeds:
            out["class_reseeds"] = list(self.class_reseeds)
        if self.class_merges:
            out["class_merges"] = list(self.class_merges)
        if self.class_reforms:
            out["class_reforms"] = list(self.class_reforms)
        return out

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "History":
        return cls(epochs=[EpochRecord(**e) for e in d["epochs"]], switch_epoch=d["switch_epoch"],
                   trials=None if d["trials"] is None else TrialsRecord(**d["trials"]), assign_s=d["assign_s"],
                   first_poses=None if d.get("first_poses") is None else FirstPoseRecord(**d["first_poses"]),
                   class_reseeds=list(d.get("class_reseeds", [])), class_merges=list(d.get("class_merges", [])),
                   class_reforms=list(d.get("class_reforms", [])))


def epoch_line(rec: EpochRecord, seconds: float, explore: bool) -> str:
    """The log line of a finished epoch (``seconds``: its training time before the first-pose pass)."""
    msg = (f"epoch {rec.epoch} stage {rec.stage} box {rec.crop} loss {rec.loss:.5g} "
           f"time {seconds:.1f}s ({rec.images_per_s:.0f} img/s)")
    if rec.pose_change_deg is not None:
        msg += f" pose change {rec.pose_change_deg:.2f} deg"
    if rec.head_win_share is not None:
        msg += " heads " + "/".join(f"{100 * s:.0f}" for s in rec.head_win_share) + "%"
        if explore:
            msg += " winners " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in rec.winner_source_share.items())
    if rec.rank_images is not None and len(rec.rank_images) > 1:
        msg += " images per rank " + "/".join(map(str, rec.rank_images))
    if rec.class_sizes is not None:
        msg += " classes " + "/".join(map(str, rec.class_sizes))
        if rec.class_moves is not None:
            msg += f" ({rec.class_moves} moved)"
    if rec.switched:
        msg += f" -> switch to auto-decoding after {rec.epoch} epochs"
    return msg


def first_pose_line(rec: FirstPoseRecord, subset: int, crop: int) -> str:
    """The log line of the first-pose pass."""
    how = {"amortized": "encoder heads + local refinement, the global scan for poor fits",
           "search": "the global scan + refinement, seeded by the heads", "heads": "the best encoder head"}[rec.mode]
    msg = (f"first poses of the {rec.particles} particles outside the stage-1 subset of {subset} ({how}, box {crop}): "
           f"{rec.seconds:.1f}s ({rec.images_per_s:.0f} img/s); from " +
           ", ".join(f"{k} {100 * v:.0f}%" for k, v in rec.shares().items()))
    if rec.mode == "amortized":
        msg += (f"; {100 * rec.scanned / max(1, rec.particles):.1f}% sent to the global scan "
                f"(fit < {rec.scan_below:.4g})")
    return msg
