"""Pose errors against known poses, per epoch (``cryospin abinit --true-poses``).

Errors are the median / mean geodesic rotation errors after the best global
alignment of the pose sets, mirror included (``evaluate/pose_error.pose_errors``),
over at most ``max_n`` evenly spaced particles whose poses are estimates (the
stage-1 subset before the switch). Entries are kept per stage-1 start, so the
record of a run holds the errors of the start that continued only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cryospin_relion.errors import InputError


def load_true_rotations(path: str, table) -> np.ndarray:
    """Ground-truth RELION matrices (N, 3, 3) for the particles of ``table``, in the same order."""
    from cryospin_relion.io.read import read_particles

    true = read_particles(path, no_ctf=True, check_stacks=False)
    if true.rotations is None:
        raise InputError(f"{path}: rlnAngleRot: --true-poses has no poses")
    if len(true) != len(table):
        raise InputError(f"{path}: --true-poses: {len(true)} particles, the input has {len(table)}")
    return true.rotations


@dataclass
class PoseErrorEntry:
    trial: int
    epoch: int
    stage: int
    median_deg: float
    mean_deg: float


class PoseErrorLog:
    """Pose errors per (stage-1 start, epoch); a re-recorded epoch replaces the old entry."""

    def __init__(self, truth: np.ndarray, max_n: int = 2000):
        self.truth = truth
        self.max_n = max_n
        self.entries: list[PoseErrorEntry] = []

    def record(self, engine) -> None:
        from cryospin_relion.evaluate.pose_error import pose_errors

        last = engine.history.last
        R, _ = engine.final_poses()
        rows = engine.estimated_rows().numpy()
        idx = rows[np.linspace(0, len(rows) - 1, min(len(rows), self.max_n)).astype(np.int64)]
        e = pose_errors(self.truth[idx], R[idx])["rotation_error_deg"]
        self.entries = [x for x in self.entries if (x.trial, x.epoch) != (engine.trial, last.epoch)]
        self.entries.append(PoseErrorEntry(engine.trial, last.epoch, last.stage, float(e["median"]), float(e["mean"])))

    def to_json(self, engine) -> dict:
        """{epoch, stage, median_deg, mean_deg: lists} for the epochs of the engine's history."""
        epochs = set(engine.history.column("epoch"))
        rows = sorted((x for x in self.entries if x.trial == engine.trial and x.epoch in epochs), key=lambda x: x.epoch)
        return {k: [getattr(x, k) for x in rows] for k in ("epoch", "median_deg", "mean_deg", "stage")}

    def state_dict(self) -> list[dict]:
        return [asdict(x) for x in self.entries]

    def load_state_dict(self, d: list[dict]) -> None:
        self.entries = [PoseErrorEntry(**x) for x in d]
