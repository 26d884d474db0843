"""Checkpoints: what one holds, when one is written, and when a run may continue from one.

``DIR/checkpoint.pt`` (``torch.save``, written atomically) holds

- ``engine``: the engine's ``state_dict()`` (tensors, dicts, lists, primitives only,
  so ``torch.load(weights_only=True)`` reads it);
- ``input``: the input's fingerprint (file, size, mtime, particle count);
- ``pose_error``: the ``--true-poses`` record, when there is one.

The checkpoint before it is kept as ``DIR/checkpoint.prev.pt``: a new checkpoint is
written to a temporary file, the newest becomes the previous one, then the
temporary file becomes the newest. A kill at any moment of that leaves at least
one complete checkpoint, and a damaged newest one (a full disk, a copy cut short)
costs at most one more epoch: ``--continue`` falls back to the previous one.

Policy: after every epoch, at a stop, and mid-epoch when ``checkpoint_minutes``
have passed since the last one -- never during the stage-1 starts (a stop resets
them to the beginning; ``engine.resumable``).

``--continue`` is refused when the input changed or when an option changed that
is not resumable (``config.RESUMABLE``: schedule length, hardware, hand).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryospin_relion.config import AbinitConfig
from cryospin_relion.errors import InputError
from cryospin_relion.io.atomic import atomic_path

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


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
    """Write the newest checkpoint; the one it replaces becomes ``checkpoint.prev.pt``."""
    import torch  # here, so that the names and checkpoint_exists need no torch (the RELION job imports them)

    with atomic_path(path) as tmp:
        torch.save({"engine": engine_state, "input": fingerprint, "pose_error": pose_error}, tmp)
        if path.exists():
            os.replace(path, path.with_name(PREVIOUS))  # the temporary file becomes ``path`` next


def checkpoint_exists(path: Path) -> bool:
    """Whether ``path`` or the previous checkpoint beside it is there."""
    return path.is_file() or path.with_name(PREVIOUS).is_file()


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``; ValueError saying what is wrong when it cannot be used at all."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, text, not a zip: all the ways a file can be damaged
        raise ValueError(f"damaged: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    if not isinstance(state, dict) or not isinstance(state.get("engine"), dict):
        raise ValueError("not a checkpoint of this version of cryospin")
    return state


def load_for_resume(path: Path, cfg: AbinitConfig, fingerprint: dict, log=None) -> dict:
    """The newest usable checkpoint (``path``, else the previous one) if this run may continue from it,
    else InputError saying why. A damaged newest checkpoint is logged and skipped."""
    candidates = [p for p in (path, path.with_name(PREVIOUS)) if p.is_file()]
    if not candidates:
        raise InputError(f"{path}: --continue: no checkpoint in the output folder")
    damaged = []
    for p in candidates:
        try:
            state = read_checkpoint(p)
        except ValueError as e:
            damaged.append(f"{p.name} {e}")
            continue
        if damaged and log is not None:
            log.info(f"--continue: {damaged[0]}; resuming from the previous checkpoint {p}")
        changed = resume_mismatch(state, cfg, fingerprint)
        if changed:
            raise InputError(f"{p}: --continue: {changed} changed since the checkpoint; rerun without "
                             f"--continue in a new folder, or restore them")
        return state
    raise InputError(f"{path}: --continue: the checkpoint cannot be used ({'; '.join(damaged)}); rerun without "
                     f"--continue (in a new folder, or after deleting it)")


class TimedCheckpoints:
    """Mid-epoch checkpoints: due when ``minutes`` (> 0) have passed since the last checkpoint."""

    def __init__(self, minutes: float):
        self.minutes = minutes
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self.last > 60 * self.minutes

    def saved(self) -> None:
        self.last = time.monotonic()
