"""`raytune-ft report`: one self-contained HTML page about a tune run directory.

Learning curves, the PBT/PB2 hyper-parameter schedule, the search seen per key, the winner with its test metrics
and confusion matrix, and the trials and exploits tables; figures are PNGs embedded in the page, so the single
file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import json
from pathlib import Path

from raytune_ft.layout import CARD
from raytune_ft.report.load import RunData, RunDirError, load_run
from raytune_ft.report.plots import MissingMatplotlibError

__all__ = ["MissingMatplotlibError", "RunData", "RunDirError", "load_run", "write_report"]


def write_report(run_dir: Path, out: Path | None = None, extras: Path | None = None) -> Path:
    """Write the report of RUN_DIR to `out` (default RUN_DIR/report.html) and return its path. EXTRAS: the
    directory of a `raytune-ft run`, whose promotion.json, serve.json and bench/ add their sections.

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
    extra = _run_sections(Path(extras)) if extras is not None else ""
    card = Path(run_dir) / "winner" / CARD
    diagrams = [(p.parent.name, p.read_bytes()) for p in sorted((card.parent / "eval").glob("*/reliability.png"))]
    extra += html.model_card_section(card.read_text() if card.is_file() else None, diagrams)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html.page(run, figures, extra), encoding="utf-8")
    return path


def _run_sections(root: Path) -> str:
    from raytune_ft.report import html

    def read(name: str) -> dict | None:
        try:
            return json.loads((root / name).read_text())
        except (OSError, ValueError):
            return None

    plot = root / "bench" / "serve.png"
    return html.promotion_section(read("promotion.json")) + html.serving_section(
        read("serve.json"), read("bench/serve.json"), plot.read_bytes() if plot.is_file() else None
    )
