"""The machine a benchmark ran on, in one line, printed above its table.

Why: seconds only compare on one machine. The default row of
bench/abinit_vs_relion.py took 204 s on one 2-core machine and 377 s on another
(2 x AMD EPYC, torch's CPU kernels AVX2), with the same map, so every table says
where it ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def describe() -> str:
    """E.g. "machine: 2 x AMD EPYC, torch 2.13.0+cpu (CPU kernels AVX2); CUDA: none"."""
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"
    return (f"machine: {os.cpu_count()} x {cpu_model()}, torch {torch.__version__} "
            f"(CPU kernels {torch.backends.cpu.get_cpu_capability()}); CUDA: {gpus}")


if __name__ == "__main__":
    print(describe())
