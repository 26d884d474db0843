"""``make_report``: the run's PNG figures and a multi-page ``logfile.pdf``.

Every file is written to a temporary name in ``out_dir`` and renamed into
place, so a failure never leaves a half-written PNG or PDF (an earlier
``logfile.pdf`` stays as it was). Missing inputs skip their page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from cryospin_relion.io.atomic import atomic_path
from cryospin_relion.report import plots

__all__ = ["make_report", "PDF_NAME", "PNG_NAMES", "CLASS_PNG_NAMES"]

PDF_NAME = "logfile.pdf"

#: key in make_report's result -> PNG file name, in page order
PNG_NAMES = {
    "fsc": "fsc.png",
    "loss": "loss.png",
    "view_directions": "view_directions.png",
    "head_wins": "head_wins.png",
    "central_slices": "central_slices.png",
    "pose_error": "pose_error.png",
    "orientation": "orientation.png",
    "scores": "scores.png",
}

#: the class pages' PNGs (runs with K > 1 classes only; report/classes.py), in page order
CLASS_PNG_NAMES = {
    "class_sizes": "class_sizes.png",
    "class_slices": "class_slices.png",
}

PNG_DPI = 110


def _pages(
    *,
    summary: Mapping[str, Any] | None,
    fsc: Any,
    fsc_resolution_A: float | None,
    apix: float | None,
    box: int | None,
    history: Mapping[str, Any] | None,
    rotations: Any,
    head_wins: Any,
    volume: Any,
    pose_error_history: Mapping[str, Any] | None,
    orientation: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    classes: Sequence[Mapping[str, Any]] | None = None,
) -> list[tuple[str | None, Callable[[], Figure]]]:
    """(result key or None for PDF-only pages, figure builder) for each page to draw."""
    pages: list[tuple[str | None, Callable[[], Figure]]] = []
    if summary:
        pages.append((None, lambda: plots.plot_title_page(summary)))
    if fsc is not None:
        pages.append(("fsc", lambda: plots.plot_fsc(fsc, apix=apix, box=box, resolution_A=fsc_resolution_A)))
    if history and history.get("loss") is not None and len(history["loss"]) > 0:
        pages.append(("loss", lambda: plots.plot_history(history)))
    if rotations is not None and len(rotations) > 0:
        pages.append(("view_directions", lambda: plots.plot_view_directions(rotations)))
    wins = head_wins if head_wins is not None else plots.last_head_wins(history)
    if wins is not None and len(wins) > 0:
        sources = plots.winner_sources(history)
        pages.append(("head_wins", lambda: plots.plot_head_wins(wins, sources)))
    if volume is not None:
        pages.append(("central_slices", lambda: plots.plot_central_slices(volume, apix=apix)))
    if pose_error_history and pose_error_history.get("median_deg") is not None and len(pose_error_history["median_deg"]) > 0:
        pages.append(("pose_error", lambda: plots.plot_pose_error(pose_error_history)))
    if orientation and (orientation.get("efficiency") is not None or orientation.get("directional") is not None):
        directional = orientation.get("directional")
        pages.append(("orientation", lambda: plots.plot_orientation(
            orientation.get("efficiency"), getattr(directional, "directions", None),
            getattr(directional, "resolution_A", None),
            cone_half_angle_deg=getattr(directional, "cone_half_angle_deg", None))))
    if scores and scores.get("confidence") is not None and len(scores["confidence"]) > 0:
        from cryospin_relion.report.scores import plot_scores

        pages.append(("scores", lambda: plot_scores(scores["confidence"], scores.get("cutoff"), scores.get("loss"))))
    from cryospin_relion.report import classes as class_pages

    if class_pages.class_sizes(history) is not None or (classes and len(classes) > 1):
        pages.append(("class_sizes", lambda: class_pages.plot_class_sizes(history, classes)))
    if classes and any(c.get("map") is not None for c in classes):
        pages.append(("class_slices", lambda: class_pages.plot_class_slices(classes, apix=apix)))
    return pages


def make_report(
    out_dir: str | os.PathLike,
    *,
    fsc: Any = None,
    fsc_resolution_A: float | None = None,
    apix: float | None = None,
    box: int | None = None,
    history: Mapping[str, Any] | None = None,
    rotations: Any = None,
    head_wins: Any = None,
    volume: Any = None,
    pose_error_history: Mapping[str, Any] | None = None,
    summary: Mapping[str, Any] | None = None,
    png: bool = True,
    orientation: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    classes: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write the report figures (PNG) and ``logfile.pdf`` (one page per figure) in ``out_dir``.

    Args:
        out_dir: output folder (created if needed).
        fsc: (n // 2 + 1,) half-map FSC per shell, or ``{label: curve}``.
        fsc_resolution_A: resolution to annotate (else computed at 0.143 from fsc, apix, box).
        apix: pixel size in A (FSC frequency axis; slice page title).
        box: box size in pixels (default from len(fsc)).
        history: per-epoch lists 'epoch', 'loss', 'stage' (1/2), 'time_s'
            (cumulative elapsed seconds), optionally 'pose_change_deg', 'lr',
            'head_wins' (per-epoch (M,) counts or None), 'winner_source_share' (per-epoch {source: share}
            or None) and 'first_poses' (engine/history.py FirstPoseRecord): the head-wins page then also shows
            where the winners came from.
        rotations: final poses, (N, 3, 3) RELION matrices A or (N, 3) unit view directions.
        head_wins: (M,) images won per head in stage 1; default: the last
            stage-1 entry of ``history['head_wins']``.
        volume: (n, n, n) map indexed (z, y, x).
        pose_error_history: 'epoch', 'median_deg', optionally 'mean_deg', 'stage'.
        summary: key -> value lines for a title page (resolution, particles, times, paths).
        png: also write one PNG per figure page.
        orientation: {'efficiency': cryoEF E_od or None, 'directional': an
            ``evaluate.orientation.DirectionalResolution`` (or any object with
            ``directions``, ``resolution_A``, ``cone_half_angle_deg``) or None}.
        scores: {'confidence': (N,), 'cutoff': suggested minimum or None, 'loss': (N,) or None}: the
            per-particle score page (report/scores.py), drawn only when given.
        classes: K > 1 classes, one {'class': 1-based, 'n_particles', 'resolution_A' (None: no maps),
            'map': (n, n, n) or None} each: the class table and the class slices (report/classes.py). The
            class-size page is drawn whenever ``history['class_sizes']`` has sizes (or ``classes`` is given).

    Returns:
        {'pdf': out_dir/logfile.pdf, and for each figure drawn its PNG under the
        keys 'fsc', 'loss', 'view_directions', 'head_wins', 'central_slices',
        'pose_error', 'orientation' (file names in PNG_NAMES), 'class_sizes', 'class_slices'
        (CLASS_PNG_NAMES)}. Empty (nothing written) when
        no input is given. Exceptions propagate; then no temporary file is
        left and ``logfile.pdf`` is not replaced.
    """
    out = Path(out_dir)
    pages = _pages(summary=summary, fsc=fsc, fsc_resolution_A=fsc_resolution_A, apix=apix, box=box,
                   history=history, rotations=rotations, head_wins=head_wins, volume=volume,
                   pose_error_history=pose_error_history, orientation=orientation, scores=scores, classes=classes)
    if not pages:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    pdf_path = out / PDF_NAME
    with atomic_path(pdf_path) as tmp_pdf:
        with PdfPages(tmp_pdf, metadata={"Title": "cryoSPIN reconstruction report", "Creator": "cryospin_relion"}) as pdf:
            for key, build in pages:
                fig = build()
                try:
                    if png and key is not None:
                        path = out / {**PNG_NAMES, **CLASS_PNG_NAMES}[key]
                        with atomic_path(path) as tmp_png:
                            fig.savefig(tmp_png, dpi=PNG_DPI, format="png")
                        written[key] = path
                    pdf.savefig(fig)
                finally:
                    fig.clear()  # standalone Figure (no pyplot): dropping it frees it
                    del fig
    return {"pdf": pdf_path, **written}
