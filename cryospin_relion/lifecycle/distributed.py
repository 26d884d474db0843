"""Joining a data-parallel run: ``torchrun`` (or SLURM) environment -> torch.distributed -> ``World``.

``torchrun --nproc_per_node G cryospin abinit ...`` starts G processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
several nodes use ``--nnodes`` / ``--rdzv-endpoint`` (docs/getting-started.md has a
SLURM script). Without ``WORLD_SIZE`` (or with 1) the run is a single process and
nothing here touches torch.distributed.

Backend: NCCL when the ranks compute on GPUs (each rank on ``cuda:LOCAL_RANK``),
gloo on the CPU. Errors: an exception on any rank ends that process with its
message and a non-zero code, and ``torchrun`` then stops the other ranks (as it
does when a rank is killed); a collective also fails on the surviving ranks when a
peer's connection closes. ``CRYOSPIN_DIST_TIMEOUT_MIN`` (default 60) bounds how
long a rank waits in one collective, e.g. for rank 0 building the image cache.
"""

from __future__ import annotations

import datetime
import os

import torch

from cryospin_relion.engine.distributed import ALONE, World
from cryospin_relion.errors import InputError


def launched_size() -> int:
    """The number of ranks the launcher started (1 without a launcher)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not a number of ranks") from None


def rank_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when the run computes on CUDA with several ranks."""
    if launched_size() > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def join_world(device: torch.device) -> World:
    """This process's ``World``: joins the process group when the launcher started several ranks."""
    size = launched_size()
    if size <= 1:
        return ALONE
    import torch.distributed as dist

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise InputError(f"WORLD_SIZE={size} but {name} is not set: start several ranks with torchrun "
                             "(docs/getting-started.md)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    minutes = float(os.environ.get("CRYOSPIN_DIST_TIMEOUT_MIN", "60"))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    return World(dist.get_rank(), dist.get_world_size(), device if backend == "nccl" else torch.device("cpu"))


def leave_world(world: World) -> None:
    """Leave the process group (after the last collective)."""
    if world.alone:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
