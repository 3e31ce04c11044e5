"""`raytune-ft report`: one self-contained HTML page about a tune run directory.

Learning curves, the PBT/PB2 hyper-parameter schedule, the search seen per key, the winner with its test metrics
and confusion matrix, and the trials and exploits tables; figures are PNGs embedded in the page, so the single
file can be mailed or attached to a ticket.
"""

from __future__ import annotations

from pathlib import Path

from raytune_ft.report.load import RunData, RunDirError, load_run
from raytune_ft.report.plots import MissingMatplotlibError

__all__ = ["MissingMatplotlibError", "RunData", "RunDirError", "load_run", "write_report"]


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report of RUN_DIR to `out` (default RUN_DIR/report.html) and return its path.

    Raises RunDirError when RUN_DIR is missing or holds none of a run's files, MissingMatplotlibError without
    matplotlib. Missing parts of a run (no winner yet, an empty progress.csv) are named in the report instead.
    """
    from raytune_ft.report import html, plots

    run = load_run(Path(run_dir))
    figures: dict[str, bytes | None] = {
        "curves": plots.learning_curves(run),
        "schedule": plots.hyperparameter_schedule(run) if run.pbt else None,
        "search": plots.search_view(run),
        "confusion": None,
    }
    matrix = (run.test_metrics or {}).get("confusion_matrix") if isinstance(run.test_metrics, dict) else None
    if isinstance(matrix, dict):
        try:
            figures["confusion"] = plots.confusion_matrix(
                [str(label) for label in matrix.get("labels") or []], matrix.get("counts") or []
            )
        except (TypeError, ValueError):
            figures["confusion"] = None  # the page says the matrix is malformed
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html.page(run, figures), encoding="utf-8")
    return path
