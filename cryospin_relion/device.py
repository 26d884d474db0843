"""The compute device of a command: one rule for every command that runs torch."""

from __future__ import annotations

import torch

from cryospin_relion.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' (or None) -> CUDA when present, else the CPU; 'cpu', 'cuda', 'cuda:1' as given.

    Raises InputError (exit 2) when CUDA is asked for on a machine without it."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    return dev
