"""The stage-1 pose memory: each image's best pose found so far.

With the pose search (``explore_candidates > 0``) the memory holds every image's
overall winner of its last visit, which is itself a candidate at the next visit,
so a good pose once found is never lost to a worse one; it starts at random
rotations (each image then starts from a different basin). For the reference
method it only records the winning heads and starts at the identity. At the
switch to stage 2 the pose table starts from the memory.

Rotations are RELION matrices A (N, 3, 3); shifts are content translations
(N, 2) in working-box pixels, as in ``model/pose_table.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cryospin_relion.geometry.rotations import random_rotations


class PoseMemory:
    """Rotations (N, 3, 3) and shifts (N, 2) on one device (plain tensors)."""

    def __init__(self, rotations: Tensor, shifts: Tensor):
        self.rotations = rotations
        self.shifts = shifts

    @classmethod
    def random(cls, n: int, generator: torch.Generator, device=None) -> "PoseMemory":
        """Uniformly random rotations (drawn on the CPU from ``generator``), zero shifts."""
        R = random_rotations(n, generator, dtype=torch.float32).to(device)
        return cls(R, torch.zeros(n, 2, device=device))

    @classmethod
    def identity(cls, n: int, device=None) -> "PoseMemory":
        return cls(torch.eye(3, device=device).repeat(n, 1, 1), torch.zeros(n, 2, device=device))

    def __len__(self) -> int:
        return self.rotations.shape[0]

    def remember(self, idx: Tensor, rotations: Tensor, shifts: Tensor) -> None:
        self.rotations[idx] = rotations
        self.shifts[idx] = shifts

    def state_dict(self) -> dict:
        return {"rotations": self.rotations.cpu(), "shifts": self.shifts.cpu()}

    def load_state_dict(self, d: dict) -> None:
        self.rotations = d["rotations"].to(self.rotations.device)
        self.shifts = d["shifts"].to(self.shifts.device)
