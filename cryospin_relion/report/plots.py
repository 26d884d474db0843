"""Report figures: pure functions from arrays to matplotlib ``Figure`` objects.

Nothing here reads files or touches pyplot's global figure registry: every
function builds a standalone :class:`matplotlib.figure.Figure` (rendered with
Agg / the PDF backend when saved), so figures are freed as soon as the caller
drops them and no display backend is ever needed.

Inputs may be numpy arrays, lists or (CPU or GPU) torch tensors.

Conventions: rotations are RELION's A (volume -> image coordinates); the
viewing direction is the third row of A; its elevation is ``90 - tilt`` and
its azimuth is RELION's ``rot``. A volume is indexed (z, y, x) as in MRC files.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Mapping

import numpy as np
import matplotlib
from matplotlib.figure import Figure

from cryospin_relion.geometry.fsc import resolution_at

__all__ = [
    "as_numpy",
    "view_direction_histogram",
    "plot_title_page",
    "plot_fsc",
    "plot_history",
    "plot_view_directions",
    "plot_head_wins",
    "plot_central_slices",
    "plot_pose_error",
    "plot_orientation",
    "last_head_wins",
    "winner_sources",
]

STAGE_COLORS = {1: "C0", 2: "C1"}


# -- input helpers ------------------------------------------------------------------


def as_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """numpy array from an array, a list (``None`` entries -> NaN) or a torch tensor."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    if isinstance(x, (list, tuple)) and any(v is None for v in x):
        x = [np.nan if v is None else v for v in x]
    return np.asarray(x, dtype=dtype)


def _series(d: Mapping[str, Any], key: str, n: int) -> np.ndarray | None:
    """``d[key]`` as a float array of length n, or None if absent/empty/all-NaN."""
    if key not in d or d[key] is None:
        return None
    v = as_numpy(d[key]).reshape(-1)
    if len(v) == 0 or not np.isfinite(v).any():
        return None
    if len(v) != n:
        raise ValueError(f"history['{key}'] has {len(v)} entries, 'epoch' has {n}")
    return v


def _epoch_axis(d: Mapping[str, Any], n: int) -> np.ndarray:
    """x values: the epochs if given and non-decreasing, else a running index 0..n-1."""
    if "epoch" in d and d["epoch"] is not None:
        e = as_numpy(d["epoch"]).reshape(-1)
        if len(e) == n and np.all(np.isfinite(e)) and np.all(np.diff(e) >= 0):
            return e
    return np.arange(n, dtype=np.float64)


def _stage_switches(x: np.ndarray, stage: np.ndarray | None) -> list[float]:
    """x positions half-way between consecutive entries whose stage changes."""
    if stage is None:
        return []
    idx = np.nonzero(np.diff(stage) != 0)[0]
    return [0.5 * (x[i] + x[i + 1]) for i in idx]


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, numbers.Integral):
        return f"{int(v):,}"
    if isinstance(v, numbers.Real):
        f = float(v)
        if not math.isfinite(f):
            return str(f)
        if f != 0 and (abs(f) >= 1e6 or abs(f) < 1e-3):
            return f"{f:.4g}"
        return f"{f:.4g}" if abs(f) < 1e4 else f"{f:,.1f}"
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_value(u) for u in v)
    return str(v)


def _wrap(text: str, width: int) -> list[str]:
    out = []
    for line in text.splitlines() or [""]:
        while len(line) > width:
            out.append(line[:width])
            line = "    " + line[width:]
        out.append(line)
    return out


# -- title page ---------------------------------------------------------------------


def plot_title_page(summary: Mapping[str, Any], title: str = "cryoSPIN reconstruction report") -> Figure:
    """A text page listing ``summary`` (key: value), in the given order."""
    fig = Figure(figsize=(8.27, 5.85))
    fig.text(0.06, 0.92, title, fontsize=18, weight="bold", va="top")
    lines: list[str] = []
    for k, v in summary.items():
        lines += _wrap(f"{k}: {_fmt_value(v)}", 80)
    size = 10 if len(lines) <= 28 else max(5, int(10 * 28 / len(lines)))
    fig.text(0.06, 0.82, "\n".join(lines), fontsize=size, family="monospace", va="top", linespacing=1.4)
    return fig


# -- (1) FSC ------------------------------------------------------------------------


_NICE_A = (200, 100, 50, 30, 20, 15, 12, 10, 8, 7, 6, 5, 4.5, 4, 3.5, 3, 2.8, 2.6, 2.4, 2.2, 2, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1)


def _resolution_ticks(fmax: float) -> list[float]:
    """Resolutions (A) for the top axis, spread over spatial frequencies (0, fmax]."""
    ticks: list[float] = []
    last = -1.0
    for r in _NICE_A:
        f = 1.0 / r
        if f > fmax * 1.0001:
            break
        if f - last >= 0.07 * fmax:
            ticks.append(r)
            last = f
    return ticks


def plot_fsc(
    fsc: Any,
    *,
    apix: float | None = None,
    box: int | None = None,
    resolution_A: float | None = None,
    threshold: float = 0.143,
) -> Figure:
    """FSC between half-maps against spatial frequency, with the threshold line and resolution.

    Args:
        fsc: (n // 2 + 1,) correlations per Fourier shell (shell 0 = DC), or a
            dict ``{label: curve}`` of several curves (the first one gives the
            resolution).
        apix: pixel size in A. Without it the x axis is in Fourier shells.
        box: box size n in pixels (default ``2 * (len(curve) - 1)``).
        resolution_A: resolution to annotate; computed from the first curve at
            ``threshold`` when not given (needs apix).
    """
    curves = {str(k): as_numpy(v).reshape(-1) for k, v in fsc.items()} if isinstance(fsc, Mapping) else {"FSC": as_numpy(fsc).reshape(-1)}
    if not curves or any(len(c) < 2 for c in curves.values()):
        raise ValueError("fsc: need at least 2 shells per curve")
    first = next(iter(curves.values()))
    n = int(box) if box else 2 * (len(first) - 1)
    if apix is not None and apix <= 0:
        raise ValueError(f"apix must be positive, got {apix}")
    if resolution_A is None and apix is not None:
        resolution_A = resolution_at(first, n, float(apix), threshold)

    fig = Figure(figsize=(8.27, 5.2), layout="constrained")
    ax = fig.add_subplot()
    to_x = (lambda s: s / (n * apix)) if apix else (lambda s: s.astype(np.float64))
    xmax = 0.0
    for label, c in curves.items():
        x = to_x(np.arange(len(c), dtype=np.float64))
        xmax = max(xmax, float(x[-1]))
        ax.plot(x, c, lw=1.6, label=label if len(curves) > 1 else None)
    ax.axhline(threshold, color="0.4", ls="--", lw=1, label=f"FSC = {threshold:g}")
    ax.axhline(0.0, color="0.7", lw=0.6)
    ax.set_xlim(0, xmax)
    ymin = min(-0.05, float(np.nanmin([np.nanmin(c) for c in curves.values()])) - 0.02)
    ax.set_ylim(ymin, 1.05)
    ax.set_ylabel("Fourier shell correlation")
    ax.grid(alpha=0.3)
    if apix:
        ax.set_xlabel("spatial frequency (1/Å)")
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        ticks = _resolution_ticks(xmax)
        top.set_xticks([1.0 / r for r in ticks])
        top.set_xticklabels([f"{r:g}" for r in ticks])
        top.set_xlabel("resolution (Å)")
    else:
        ax.set_xlabel("Fourier shell (pixels⁻¹ × box)")
    if resolution_A is not None and math.isfinite(resolution_A) and resolution_A > 0:
        text = f"{resolution_A:.2f} Å at FSC = {threshold:g}"
        if apix:
            xr = 1.0 / resolution_A
            ax.axvline(xr, color="C3", lw=1, ls=":")
            ax.plot([xr], [threshold], "o", color="C3", ms=5)
        ax.text(0.97, 0.93, text, transform=ax.transAxes, ha="right", va="top", fontsize=12, color="C3",
                bbox=dict(boxstyle="round", fc="white", ec="C3", alpha=0.9))
    title = "FSC of the half-maps"
    if apix:
        title += f"  (box {n} px, {apix:g} Å/px, Nyquist {2 * apix:.2f} Å)"
    ax.set_title(title, fontsize=11, pad=8)
    ax.legend(loc="lower left", fontsize=9)
    return fig


# -- (2) loss per epoch ----------------------------------------------------------------


def plot_history(history: Mapping[str, Any]) -> Figure:
    """Loss per epoch over both stages, the stage 1 -> 2 switch marked.

    ``history`` holds equal-length lists: 'loss' (required), 'epoch', 'stage'
    (1 or 2), 'time_s' (elapsed wall time in seconds at the end of the epoch,
    cumulative), optionally 'pose_change_deg' and 'lr' (extra panels).
    ``None`` entries are gaps.
    """
    if "loss" not in history or history["loss"] is None:
        raise ValueError("history: no 'loss'")
    loss = as_numpy(history["loss"]).reshape(-1)
    n = len(loss)
    if n == 0:
        raise ValueError("history: 'loss' is empty")
    x = _epoch_axis(history, n)
    stage = _series(history, "stage", n)
    stage_i = np.where(np.isfinite(stage), stage, 0).astype(int) if stage is not None else np.ones(n, int)
    time_s = _series(history, "time_s", n)
    extra = [(k, lab) for k, lab in (("pose_change_deg", "pose change (°)"), ("lr", "learning rate")) if _series(history, k, n) is not None]

    fig = Figure(figsize=(8.27, 4.2 + 1.6 * len(extra)), layout="constrained")
    axes = fig.subplots(1 + len(extra), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": [2.2] + [1] * len(extra)})[:, 0]
    switches = _stage_switches(x, stage_i if stage is not None else None)

    labels = {s: f"stage {s}" if s in (1, 2) else "stage ?" for s in set(stage_i.tolist())}
    if time_s is not None:
        for s in labels:
            m = stage_i == s
            t_end = time_s[m][np.isfinite(time_s[m])]
            before = time_s[(x < x[m][0]) & np.isfinite(time_s)]
            if len(t_end):
                labels[s] += f" ({_duration(float(t_end.max()) - (float(before.max()) if len(before) else 0.0))})"

    def draw(ax, y, log_ok: bool) -> None:
        for s in sorted(labels):
            m = stage_i == s
            label = labels[s]
            ax.plot(x[m], y[m], "-o", ms=2.5 if m.sum() < 200 else 0, lw=1.4, color=STAGE_COLORS.get(s, "C7"), label=label)
        good = y[np.isfinite(y)]
        if log_ok and len(good) and good.min() > 0 and good.max() / good.min() > 20:
            ax.set_yscale("log")
        for xs in switches:
            ax.axvline(xs, color="k", ls="--", lw=1)
        ax.grid(alpha=0.3)

    draw(axes[0], loss, True)
    axes[0].set_ylabel("loss")
    title = "Training loss per epoch"
    if time_s is not None and np.isfinite(time_s).any():
        title += f"  (total {_duration(float(np.nanmax(time_s)))})"
    axes[0].set_title(title, fontsize=11)
    if switches:
        axes[0].text(switches[0], 0.98, " stage 1 → 2", transform=axes[0].get_xaxis_transform(), va="top", fontsize=9)
    axes[0].legend(fontsize=9, loc="upper right")
    for ax, (k, lab) in zip(axes[1:], extra):
        draw(ax, _series(history, k, n), k == "lr")
        ax.set_ylabel(lab)
    axes[-1].set_xlabel("epoch")
    return fig


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


# -- (3) viewing directions -----------------------------------------------------------


def _directions(rotations: Any) -> np.ndarray:
    r = as_numpy(rotations)
    if r.ndim >= 2 and r.shape[-2:] == (3, 3):
        d = r.reshape(-1, 3, 3)[:, 2, :]
    elif r.shape[-1] == 3:
        d = r.reshape(-1, 3)
        norms = np.linalg.norm(d, axis=1)
        if len(d) and not np.allclose(norms[np.isfinite(norms)], 1.0, atol=1e-3):
            raise ValueError("rotations: (N, 3) input must be unit viewing directions (not Euler angles)")
    else:
        raise ValueError(f"rotations: expected (N, 3, 3) matrices or (N, 3) directions, got shape {r.shape}")
    return d[np.all(np.isfinite(d), axis=1)]


def _sky_bins(n_poses: int) -> tuple[int, int]:
    nlat = int(np.clip(round(math.sqrt(max(n_poses, 1) / 20.0)), 6, 36))
    return 2 * nlat, nlat


def view_direction_histogram(rotations: Any, nlon: int | None = None, nlat: int | None = None):
    """Counts of viewing directions on an equal-area (azimuth, sin elevation) grid.

    Args:
        rotations: (N, 3, 3) RELION matrices A, or (N, 3) unit viewing directions.
        nlon, nlat: bins in azimuth and in sin(elevation); chosen from N if None.
    Returns:
        counts (nlat, nlon) int64, azimuth edges (nlon + 1,) and elevation
        edges (nlat + 1,) in radians. All cells cover the same solid angle.
    """
    d = _directions(rotations)
    if nlon is None or nlat is None:
        a, b = _sky_bins(len(d))
        nlon, nlat = nlon or a, nlat or b
    norm = np.linalg.norm(d, axis=1)
    norm[norm == 0] = 1.0
    az = np.arctan2(d[:, 1], d[:, 0])  # [-pi, pi]
    sz = np.clip(d[:, 2] / norm, -1.0, 1.0)
    i = np.clip(((az + np.pi) * (nlon / (2 * np.pi))).astype(np.int64), 0, nlon - 1)
    j = np.clip(((sz + 1.0) * (nlat / 2.0)).astype(np.int64), 0, nlat - 1)
    counts = np.bincount(j * nlon + i, minlength=nlat * nlon).reshape(nlat, nlon)
    lon_edges = np.linspace(-np.pi, np.pi, nlon + 1)
    lat_edges = np.arcsin(np.linspace(-1.0, 1.0, nlat + 1))
    return counts, lon_edges, lat_edges


def plot_view_directions(rotations: Any, *, projection: str = "mollweide") -> Figure:
    """Sky map of the viewing directions (Mollweide or 'hammer'), as an equal-area 2D histogram.

    Colour is the density relative to a uniform distribution (1 = uniform).
    Longitude = azimuth (RELION rot), latitude = elevation (90° - tilt).
    Cost is one pass over the poses (bincount), so 1e6 poses take well under a second.
    """
    counts, lon_e, lat_e = view_direction_histogram(rotations)
    total = int(counts.sum())
    fig = Figure(figsize=(8.27, 5.0), layout="constrained")
    ax = fig.add_subplot(projection=projection)
    rel = counts / (total / counts.size) if total else counts.astype(float)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.82")
    mesh = ax.pcolormesh(lon_e, lat_e, np.ma.masked_equal(rel, 0.0), cmap=cmap, shading="flat", rasterized=True,
                         vmin=0.0, vmax=max(float(rel.max()), 1.0))
    cb = fig.colorbar(mesh, ax=ax, orientation="horizontal", shrink=0.6, pad=0.04)
    cb.set_label("density relative to uniform (1 = uniform; grey = no particle)")
    ax.grid(alpha=0.4, color="w", lw=0.5)
    ax.tick_params(axis="x", colors="w", labelsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("azimuth (rot)")
    ax.set_ylabel("elevation (90° − tilt)")
    empty = float((counts == 0).mean()) if total else 1.0
    ax.set_title(f"Viewing directions of the final poses (N = {total:,})\n{counts.size} equal-area cells, "
                 f"{100 * empty:.0f}% empty, max {rel.max():.1f}× uniform", fontsize=10, pad=12)
    return fig


# -- (4) head wins --------------------------------------------------------------------


def last_head_wins(history: Mapping[str, Any] | None) -> np.ndarray | None:
    """The last stage-1 (or last non-empty) entry of ``history['head_wins']``, or None."""
    if not history or history.get("head_wins") is None:
        return None
    entries = list(history["head_wins"])
    stage = history.get("stage")
    order = range(len(entries) - 1, -1, -1)
    for want_stage1 in (True, False):
        for i in order:
            e = entries[i]
            if e is None:
                continue
            if want_stage1 and (stage is None or i >= len(stage) or stage[i] != 1):
                continue
            a = as_numpy(e).reshape(-1)
            if len(a):
                return a
    return None


def winner_sources(history: Mapping[str, Any] | None) -> dict[str, dict[str, float]]:
    """Where the winning poses came from, as shares: {"epoch E": {source: share}} for each stage-1 epoch of
    ``history['winner_source_share']``, and {"first poses": ...} from ``history['first_poses']`` (the pass over
    the particles outside the stage-1 subset). Empty when the history has neither."""
    out: dict[str, dict[str, float]] = {}
    if not history:
        return out
    for e, sh in zip(history.get("epoch") or [], history.get("winner_source_share") or []):
        if sh:
            out[f"epoch {e}"] = {k: float(v) for k, v in sh.items()}
    fp = history.get("first_poses")
    if fp and fp.get("particles"):
        out["first poses"] = {k: v / fp["particles"] for k, v in fp["sources"].items()}
    return out


def plot_head_wins(head_wins: Any, sources: Mapping[str, Mapping[str, float]] | None = None) -> Figure:
    """Bar chart of the share of images won by each of the M heads in stage 1; with ``sources``
    (``winner_sources``), a second panel: where the overall winners came from (heads, memory, local refinement,
    global scan) at each stage-1 epoch and in the first-pose pass -- the heads' share of all winners, which the
    first panel (shares among the heads) does not show."""
    w = as_numpy(head_wins).reshape(-1)
    if len(w) == 0:
        raise ValueError("head_wins: empty")
    w = np.where(np.isfinite(w), np.maximum(w, 0), 0)
    m = len(w)
    total = float(w.sum())
    share = 100.0 * w / total if total > 0 else np.zeros(m)
    fig = Figure(figsize=(8.27, 8.6 if sources else 4.6), layout="constrained")
    ax = fig.add_subplot(2, 1, 1) if sources else fig.add_subplot()
    if sources:
        _plot_sources(fig.add_subplot(2, 1, 2), sources)
    heads = np.arange(1, m + 1)
    ax.bar(heads, share, color="C0", width=0.8)
    ax.axhline(100.0 / m, color="0.4", ls="--", lw=1, label=f"uniform ({100.0 / m:.1f}%)")
    if m <= 16:
        for h, s in zip(heads, share):
            ax.text(h, s, f"{s:.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("share of images won (%)")
    if m <= 32:
        ax.set_xticks(heads)
    ax.set_xlim(0.3, m + 0.7)
    ax.set_ylim(0, max(float(share.max()) * 1.15, 100.0 / m * 1.5, 1.0))
    active = int((w > 0).sum())
    ax.set_title(f"Stage 1 winner-takes-all: share of images per head (M = {m}; {active} of {m} heads win images; "
                 f"{int(round(total)):,} images)", fontsize=10)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _plot_sources(ax, sources: Mapping[str, Mapping[str, float]]) -> None:
    """Stacked bars: per stage-1 epoch / the first-pose pass, the share of winners from each source."""
    labels = list(sources)
    names = list(dict.fromkeys(k for sh in sources.values() for k in sh))
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for i, k in enumerate(names):
        v = 100.0 * np.array([float(sources[lb].get(k, 0.0)) for lb in labels])
        ax.bar(x, v, bottom=bottom, color=f"C{i}", width=0.8, label=k)
        bottom += v
    if "first poses" in sources:
        fp = sources["first poses"]
        ax.text(x[-1], 101, "/".join(f"{100 * float(fp.get(k, 0)):.0f}" for k in names) + "%", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(x, [lb.replace("epoch ", "") if lb.startswith("epoch") else "first\nposes" for lb in labels],
                  fontsize=8)
    ax.set_xlabel("stage-1 epoch, and the first-pose pass of the particles outside the stage-1 subset")
    ax.set_ylabel("share of winners (%)")
    ax.set_ylim(0, 112)
    ax.legend(fontsize=8, ncol=len(names), loc="upper left")
    ax.set_title("Where the winning poses came from (" + ", ".join(names) + ")", fontsize=10)


# -- (5) central slices ----------------------------------------------------------------


def plot_central_slices(volume: Any, *, apix: float | None = None) -> Figure:
    """Central xy, xz and yz slices of a (n, n, n) map indexed (z, y, x), on one grey scale."""
    v = as_numpy(volume, dtype=np.float32)
    if v.ndim != 3:
        raise ValueError(f"volume: expected (n, n, n), got shape {v.shape}")
    nz, ny, nx = v.shape
    slices = [
        ("xy", f"z = {nz // 2}", v[nz // 2, :, :], ("x", "y")),
        ("xz", f"y = {ny // 2}", v[:, ny // 2, :], ("x", "z")),
        ("yz", f"x = {nx // 2}", v[:, :, nx // 2], ("y", "z")),
    ]
    vals = np.concatenate([s[2].ravel() for s in slices])
    vals = vals[np.isfinite(vals)]
    lo, hi = (np.percentile(vals, [0.5, 99.5]) if len(vals) else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    fig = Figure(figsize=(10.0, 3.9), layout="constrained")
    axes = fig.subplots(1, 3)
    im = None
    for ax, (name, where, img, (xl, yl)) in zip(axes, slices):
        im = ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(f"{name} slice ({where})", fontsize=10)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="density")
    title = f"Central slices of the map ({nz}×{ny}×{nx} voxels"
    title += f", {apix:g} Å/px)" if apix else ")"
    fig.suptitle(title, fontsize=11)
    return fig


# -- (6) pose error vs ground truth ------------------------------------------------------


def plot_pose_error(pose_error_history: Mapping[str, Any]) -> Figure:
    """Median (and mean) angular pose error against ground truth per epoch.

    ``pose_error_history``: 'median_deg' (required), 'epoch', optionally
    'mean_deg' and 'stage' (marks the stage switch).
    """
    if pose_error_history.get("median_deg") is None:
        raise ValueError("pose_error_history: no 'median_deg'")
    med = as_numpy(pose_error_history["median_deg"]).reshape(-1)
    n = len(med)
    if n == 0:
        raise ValueError("pose_error_history: 'median_deg' is empty")
    x = _epoch_axis(pose_error_history, n)
    mean = _series(pose_error_history, "mean_deg", n)
    stage = _series(pose_error_history, "stage", n)
    fig = Figure(figsize=(8.27, 4.6), layout="constrained")
    ax = fig.add_subplot()
    ms = 3 if n < 200 else 0
    ax.plot(x, med, "-o", ms=ms, lw=1.6, color="C2", label="median")
    if mean is not None:
        ax.plot(x, mean, "-s", ms=ms, lw=1.2, color="C4", alpha=0.8, label="mean")
    for xs in _stage_switches(x, np.where(np.isfinite(stage), stage, 0) if stage is not None else None):
        ax.axvline(xs, color="k", ls="--", lw=1)
        ax.text(xs, 0.98, " stage 1 → 2", transform=ax.get_xaxis_transform(), va="top", fontsize=9)
    good = med[np.isfinite(med)]
    if len(good):
        last = f"; last median {good[-1]:.2f}°"
    else:
        last = ""
    allv = np.concatenate([good] + ([mean[np.isfinite(mean)]] if mean is not None else []))
    if len(allv) and allv.min() > 0 and allv.max() / allv.min() > 30:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("pose error vs ground truth (°)")
    ax.set_title(f"Rotation error against ground truth{last}", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


# -- (7) orientation diagnostics ----------------------------------------------------------


def plot_orientation(efficiency: float | None, directions: Any = None, resolution_A: Any = None, *,
                     cone_half_angle_deg: float | None = None, warn_below: float = 0.5) -> Figure:
    """Orientation diagnostics: the cryoEF view-distribution efficiency and the directional resolution.

    Args:
        efficiency: E_od in [0, 1] (evaluate/orientation.py), or None.
        directions: (M, 3) unit vectors (x, y, z) of the conical FSCs, or None.
        resolution_A: (M,) 0.143 resolution in each direction, A.
        cone_half_angle_deg: the cones' half-angle (title only).
        warn_below: efficiency threshold drawn red in the title (0.5).

    The sky map shows each direction and its antipode (the FSC is Friedel symmetric) on a
    Mollweide projection, azimuth = atan2(y, x), elevation = asin(z), coloured by resolution.
    """
    fig = Figure(figsize=(8.27, 5.4), layout="constrained")
    lines = []
    if efficiency is not None:
        e = float(efficiency)
        verdict = "preferred orientation (< %.1f)" % warn_below if e < warn_below else (
            "good (>= 0.8)" if e >= 0.8 else "acceptable")
        lines.append(f"view-distribution efficiency E_od = {e:.2f} (cryoEF; 1 = uniform views): {verdict}")
    have_dirs = directions is not None and resolution_A is not None and len(as_numpy(resolution_A).reshape(-1)) > 0
    if have_dirs:
        d = as_numpy(directions).reshape(-1, 3)
        r = as_numpy(resolution_A).reshape(-1)
        d = np.concatenate([d, -d])
        r = np.concatenate([r, r])
        ax = fig.add_subplot(projection="mollweide")
        sc = ax.scatter(np.arctan2(d[:, 1], d[:, 0]), np.arcsin(np.clip(d[:, 2], -1, 1)), c=r, s=60,
                        cmap="viridis_r", edgecolors="k", linewidths=0.3)
        cb = fig.colorbar(sc, ax=ax, orientation="horizontal", shrink=0.6, pad=0.04)
        cb.set_label("FSC 0.143 resolution in the cone (Å)")
        ax.grid(alpha=0.4)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("azimuth")
        ax.set_ylabel("elevation")
        cone = f" ({cone_half_angle_deg:g}° cones)" if cone_half_angle_deg else ""
        lines.append(f"directional resolution{cone}: best {r.min():.2f} Å, worst {r.max():.2f} Å, "
                     f"median {np.median(r):.2f} Å")
    else:
        ax = fig.add_subplot()
        ax.axis("off")
    color = "C3" if efficiency is not None and float(efficiency) < warn_below else "k"
    fig.suptitle("Orientation diagnostics\n" + "\n".join(lines), fontsize=10, color=color)
    return fig
