"""The per-particle score page of the report: the confidence histogram with the suggested cut-off."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cryospin_relion.report.plots import as_numpy

__all__ = ["plot_scores"]


def plot_scores(confidence: Any, cutoff: float | None = None, loss: Any = None) -> Figure:
    """Histogram of the pose confidence (N,) in [0, 1] (rlnMaxValueProbDistribution), the suggested
    minimum ``cutoff`` (a vertical line, with the share kept), and, when ``loss`` (N,) is given, the
    loss at the final pose against the confidence."""
    c = as_numpy(confidence).reshape(-1)
    c = c[np.isfinite(c)]
    if len(c) == 0:
        raise ValueError("confidence: empty")
    fig = Figure(figsize=(8.27, 4.6), layout="constrained")
    axes = fig.subplots(1, 2 if loss is not None else 1, squeeze=False)[0]
    ax = axes[0]
    ax.hist(c, bins=50, range=(0.0, 1.0), color="C0")
    title = f"pose confidence of {len(c):,} particles (median {np.median(c):.2f})"
    if cutoff is not None and np.isfinite(cutoff):
        kept = float(np.mean(c >= cutoff))
        ax.axvline(cutoff, color="C3", ls="--", lw=1.5,
                   label=f"suggested cut-off {cutoff:.2f} (Otsu): keeps {100 * kept:.0f}%")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("confidence (rlnMaxValueProbDistribution; cryospin select --min-score)")
    ax.set_ylabel("particles")
    ax.set_xlim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if loss is not None:
        lo = as_numpy(loss).reshape(-1)
        conf = as_numpy(confidence).reshape(-1)
        ok = np.isfinite(lo) & np.isfinite(conf)
        ax2 = axes[1]
        ax2.scatter(conf[ok], lo[ok], s=3, alpha=0.3, color="C0", rasterized=True)
        if cutoff is not None and np.isfinite(cutoff):
            ax2.axvline(cutoff, color="C3", ls="--", lw=1.5)
        ax2.set_xlabel("confidence")
        ax2.set_ylabel("loss at the final pose (rlnCryospinLoss)")
        ax2.set_xlim(0, 1)
        ax2.set_title("loss against confidence", fontsize=10)
        ax2.grid(alpha=0.3)
    return fig
