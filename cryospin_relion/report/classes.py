"""The class pages of the report (K > 1 classes): class sizes per epoch with each class's final size and
resolution, and the central slices of every class map.

Inputs are plain data: ``history.json``'s ``"class_sizes"`` (one list of K counts per epoch, None for an
epoch without classes; stage-1 epochs count the stage-1 subset, stage-2 epochs all particles) and
``"class_reseeds"`` ({"epoch", "class", "from_class"}, 0-based classes) and ``"class_merges"`` ({"epoch",
"class", "into_class", "spread_deg"}: a duplicate class emptied) and ``"class_reforms"`` ({"epoch", "class",
"replaced", ...}: a class formed again alone), and one entry per class
{"class": 1-based, "n_particles", "resolution_A" (None: no maps), "map": (n, n, n) or None}.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from cryospin_relion.report.plots import _epoch_axis, _stage_switches, as_numpy

__all__ = ["class_sizes", "plot_class_sizes", "plot_class_slices"]


def class_sizes(history: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(x (E,) epochs, sizes (E, K) float, NaN where an epoch has none) from ``history["class_sizes"]``;
    None when no epoch has class sizes (a K = 1 run) or K < 2."""
    rows = (history or {}).get("class_sizes")
    if not rows or all(r is None for r in rows):
        return None
    k = max(len(r) for r in rows if r is not None)
    if k < 2:
        return None
    sizes = np.full((len(rows), k), np.nan)
    for i, r in enumerate(rows):
        if r is not None:
            sizes[i, : len(r)] = as_numpy(r).reshape(-1)
    return _epoch_axis(history, len(rows)), sizes


def _stages(history: Mapping[str, Any], n: int) -> np.ndarray | None:
    s = history.get("stage")
    if s is None or len(s) != n:
        return None
    return np.nan_to_num(as_numpy(s).reshape(-1)).astype(int)


def _fmt_res(r: Any) -> str:
    return "no maps" if r is None or not math.isfinite(float(r)) else f"{float(r):.2f} Å"


def plot_class_sizes(history: Mapping[str, Any] | None, classes: Sequence[Mapping[str, Any]] | None = None) -> Figure:
    """Share of the particles in each class per epoch (stage-1 epochs: of the stage-1 subset), the stage
    switch, the re-seeds (dotted) and the duplicates emptied (dash-dotted) marked; with ``classes``, a table of each class's final size and resolution."""
    got = class_sizes(history)
    if got is None and not classes:
        raise ValueError("history: no class sizes (a run with one class)")
    fig = Figure(figsize=(8.27, 5.4), layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=[1.6, 1]) if classes else [fig.add_subplot()]
    ax = axes[0]
    if got is not None:
        x, sizes = got
        share = sizes / np.nansum(sizes, axis=1, keepdims=True).clip(min=1)
        for k in range(sizes.shape[1]):
            ax.plot(x, 100 * share[:, k], "-o", ms=3, lw=1.5, color=f"C{k % 10}", label=f"class {k + 1}")
        for xs in _stage_switches(x, _stages(history, len(x))):
            ax.axvline(xs, color="k", ls="--", lw=1)
            ax.text(xs, 0.98, " stage 1 → 2", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        for r in (history or {}).get("class_reseeds") or []:
            ax.axvline(float(r["epoch"]), color=f"C{int(r['class']) % 10}", ls=":", lw=1.2)
        if (history or {}).get("class_reseeds"):
            ax.plot([], [], "k:", lw=1.2, label="re-seeded (class colour)")
        for r in (history or {}).get("class_merges") or []:
            ax.axvline(float(r["epoch"]), color=f"C{int(r['class']) % 10}", ls="-.", lw=1.2)
        if (history or {}).get("class_merges"):
            ax.plot([], [], "k-.", lw=1.2, label="duplicate emptied (class colour)")
        reformed = [r for r in (history or {}).get("class_reforms") or [] if r.get("replaced")]
        for r in reformed:
            ax.axvline(float(r["epoch"]), color=f"C{int(r['class']) % 10}", ls=(0, (6, 2)), lw=1.2)
        if reformed:
            ax.plot([], [], color="k", ls=(0, (6, 2)), lw=1.2, label="formed again alone (class colour)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=8, loc="best")
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no class sizes per epoch in history.json", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("particles in the class (%)")
    ax.set_title("Class sizes per epoch (stage 1: of the stage-1 subset)", fontsize=10)
    if classes:
        tab = axes[1]
        tab.axis("off")
        total = max(1, sum(int(c["n_particles"]) for c in classes))
        cells = [[f"{int(c['class'])}", f"{int(c['n_particles']):,}", f"{100 * int(c['n_particles']) / total:.1f}%",
                  _fmt_res(c.get("resolution_A"))] for c in classes]
        t = tab.table(cellText=cells, colLabels=["class", "particles", "share", "FSC 0.143"], loc="upper center",
                      cellLoc="center")
        t.auto_set_font_size(False)
        t.set_fontsize(9)
        t.scale(1.0, 1.4)
        tab.set_title("Final classes (half-map FSC of each class)", fontsize=10)
    return fig


def plot_class_slices(classes: Sequence[Mapping[str, Any]], *, apix: float | None = None) -> Figure:
    """Central xy, xz and yz slices of every class map (one row per class; each on its own grey scale,
    as the classes' densities differ); a class without a map gets an empty row."""
    if not classes or all(c.get("map") is None for c in classes):
        raise ValueError("classes: no class map")
    heights = [1.0 if c.get("map") is not None else 0.2 for c in classes]  # a class without maps: one line
    fig = Figure(figsize=(8.27, 1.0 + 2.5 * sum(heights)), layout="constrained")
    axes = fig.subplots(len(classes), 3, squeeze=False, height_ratios=heights)
    for row, c in zip(axes, classes):
        label = f"class {int(c['class'])}: {int(c['n_particles']):,} particles, {_fmt_res(c.get('resolution_A'))}"
        v = c.get("map")
        if v is None:
            for ax in row:
                ax.axis("off")
            row[0].text(0.0, 0.5, label, transform=row[0].transAxes, va="center", fontsize=9)
            continue
        v = as_numpy(v, dtype=np.float32)
        if v.ndim != 3:
            raise ValueError(f"class {c['class']}: expected a (n, n, n) map, got shape {v.shape}")
        nz, ny, nx = v.shape
        slices = [("xy", v[nz // 2]), ("xz", v[:, ny // 2]), ("yz", v[:, :, nx // 2])]
        vals = np.concatenate([s.ravel() for _, s in slices])
        vals = vals[np.isfinite(vals)]
        lo, hi = np.percentile(vals, [0.5, 99.5]) if len(vals) else (0.0, 1.0)
        if hi <= lo:
            hi = lo + 1.0
        for ax, (name, img) in zip(row, slices):
            ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(name, fontsize=8)
        row[0].set_ylabel(label if len(label) < 40 else label.replace(": ", ":\n", 1), fontsize=8)
    title = "Central slices of each class map (unfiltered, working box"
    fig.suptitle(title + (f", {apix:g} Å/px)" if apix else ")"), fontsize=11)
    return fig
