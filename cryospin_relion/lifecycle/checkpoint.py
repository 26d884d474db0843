"""Checkpoints: what one holds, when one is written, and when a run may continue from one.

``DIR/checkpoint.pt`` (``torch.save``, written atomically) holds

- ``engine``: the engine's ``state_dict()`` (tensors, dicts, lists, primitives only,
  so ``torch.load(weights_only=True)`` reads it);
- ``input``: the input's fingerprint (file, size, mtime, particle count);
- ``pose_error``: the ``--true-poses`` record, when there is one.

Policy: after every epoch, at a stop, and mid-epoch when ``checkpoint_minutes``
have passed since the last one -- never during the stage-1 starts (a stop resets
them to the beginning; ``engine.resumable``).

``--continue`` is refused when the input changed or when an option changed that
is not resumable (``config.RESUMABLE``: schedule length, hardware, hand).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cryospin_relion.config import AbinitConfig
from cryospin_relion.errors import InputError
from cryospin_relion.io.atomic import atomic_path

CHECKPOINT = "checkpoint.pt"


def input_fingerprint(inp: Path, n_particles: int) -> dict:
    """What identifies the input of a run: the file (path, size, mtime) and the particle count."""
    st = inp.stat()
    return {"file": str(inp.resolve()), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns), "n": n_particles}


def resume_mismatch(state: dict, cfg: AbinitConfig, fingerprint: dict) -> str:
    """'' when a checkpoint may be continued with this config and input, else what changed."""
    diff = [f"config {k}" for k in cfg.resume_changes(state.get("engine", {}).get("config", {}))]
    old_in = state.get("input")
    if old_in is not None and old_in != fingerprint:
        diff.append("input particles (" + ", ".join(k for k in fingerprint if old_in.get(k) != fingerprint[k]) + ")")
    return ", ".join(diff)


def save_checkpoint(path: Path, engine_state: dict, fingerprint: dict, pose_error: list | None) -> None:
    with atomic_path(path) as tmp:
        torch.save({"engine": engine_state, "input": fingerprint, "pose_error": pose_error}, tmp)


def load_for_resume(path: Path, cfg: AbinitConfig, fingerprint: dict) -> dict:
    """The checkpoint at ``path`` if this run may continue from it, else InputError saying why."""
    if not path.is_file():
        raise InputError(f"{path}: --continue: no checkpoint in the output folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "engine" not in state:
            raise ValueError("not a checkpoint of this version")
    except (ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"{path}: --continue: checkpoint does not match this run ({e})") from None
    changed = resume_mismatch(state, cfg, fingerprint)
    if changed:
        raise InputError(f"{path}: --continue: {changed} changed since the checkpoint; rerun without "
                         f"--continue in a new folder, or restore them")
    return state


class TimedCheckpoints:
    """Mid-epoch checkpoints: due when ``minutes`` (> 0) have passed since the last checkpoint."""

    def __init__(self, minutes: float):
        self.minutes = minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self.last > 60 * self.minutes

    def saved(self) -> None:
        self.last = time.monotonic()
