"""Run report: pure plotting functions over arrays, and ``make_report`` (PNGs + logfile.pdf)."""

from cryospin_relion.report.pdf import CLASS_PNG_NAMES, PDF_NAME, PNG_NAMES, make_report
from cryospin_relion.report.plots import (
    last_head_wins,
    plot_central_slices,
    plot_fsc,
    plot_head_wins,
    plot_history,
    plot_orientation,
    plot_pose_error,
    plot_title_page,
    plot_view_directions,
    view_direction_histogram,
)

__all__ = [
    "make_report",
    "PDF_NAME",
    "PNG_NAMES",
    "CLASS_PNG_NAMES",
    "plot_title_page",
    "plot_fsc",
    "plot_history",
    "plot_view_directions",
    "plot_head_wins",
    "plot_central_slices",
    "plot_pose_error",
    "plot_orientation",
    "view_direction_histogram",
    "last_head_wins",
]
