"""The report's figures as PNG bytes.

Drawn with matplotlib's object API on its Agg canvas, never through pyplot: no global backend switch and no
figure left registered in a long-lived process. Each function returns None when there is nothing to draw.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

from raytune_ft.report.load import RunData, Trial

MAX_LEGEND_TRIALS = 20  # past this the legend would hide the plot; the trials table names them instead
MAX_ANNOTATED_POINTS = 12
MAX_MARKED_REPORTS = 60  # past this, per-report dots merge into a thick line


class MissingMatplotlibError(ImportError):
    """The report needs matplotlib, which the training and tuning code does not."""


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingMatplotlibError(
            "the report draws its figures with matplotlib: pip install 'matplotlib>=3.7'"
        ) from exc
    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def trial_colors(run: RunData) -> dict[str, Any]:
    """One colour per trial, the same in every figure."""
    from matplotlib import colormaps

    n = len(run.trials)
    if n <= 10:
        colors = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        colors = [colormaps["tab20"](i) for i in range(n)]
    else:
        colors = [colormaps["viridis"](i / (n - 1)) for i in range(n)]
    return {t.id: c for t, c in zip(run.trials, colors, strict=True)}


def _label(run: RunData, trial: Trial) -> str:
    return f"{trial.id} (winner)" if trial.id == run.winner_trial else trial.id


def _legend(fig: Any, run: RunData, axes: list[Any]) -> None:
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    trials = {_label(run, t) for t in run.trials}
    # trials first, then the markers (exploit, winner) whatever order they were drawn in
    labels = sorted(entries, key=lambda label: label not in trials)
    handles = [entries[label] for label in labels]
    if handles:
        # below the axes: at the upper right it collides with the figure title once labels are long
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(handles)), fontsize="small")


def _plain_numbers(ax: Any) -> None:
    # values such as 0.69327 otherwise get an offset label ("+6.93e-1") that hides what the ticks mean
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if hasattr(formatter, "set_useOffset"):  # not on a categorical axis's fixed labels
            formatter.set_useOffset(False)


def _spans_decades(values: list[float]) -> bool:
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > 100


def _draw_trial(
    ax: Any,
    run: RunData,
    trial: Trial,
    ys: list[float | None],
    jump: Callable[[Any], tuple[float, float] | None],
    color: Any,
    steps: bool = False,
) -> None:
    """One trial's line, broken at each PBT restore: a dotted line runs from its last report before to the
    restored point (where the donor was), and on to its first report after."""
    xs = [row.get(run.x_key) for row in trial.rows]
    breaks = {e.row: e for e in trial.exploits if e.row is not None}
    cuts = [0, *sorted(breaks), len(xs)]
    label = _label(run, trial) if len(run.trials) <= MAX_LEGEND_TRIALS else None
    style = {"drawstyle": "steps-pre"} if steps else {}
    for start, stop in zip(cuts, cuts[1:], strict=False):
        points = [
            (x, y) for x, y in zip(xs[start:stop], ys[start:stop], strict=True) if x is not None and y is not None
        ]
        if points:
            marker = "o" if len(xs) <= MAX_MARKED_REPORTS else None
            ax.plot(*zip(*points, strict=True), marker=marker, markersize=3, color=color, label=label, **style)
            label = None
    for row, exploit in breaks.items():
        before = next(((xs[j], ys[j]) for j in range(row - 1, -1, -1) if ys[j] is not None), None)
        after = (xs[row], ys[row]) if ys[row] is not None else None
        restored = jump(exploit)
        path = [p for p in (before, restored, after) if p is not None and p[0] is not None]
        if len(path) > 1:
            ax.plot(*zip(*path, strict=True), linestyle=":", color=color, linewidth=1.2)
        if restored is not None:
            ax.plot(
                *restored,
                marker="*",
                markersize=11,
                color=color,
                markeredgecolor="black",
                linestyle="none",
                label="PBT exploit: restored the donor's checkpoint",
            )


def learning_curves(run: RunData) -> bytes | None:
    """The tune metric and train_loss per trial against step, with PBT restores and the winner's checkpoint."""
    trials = [t for t in run.trials if t.rows]
    keys = [
        k for k in dict.fromkeys([run.metric, "train_loss"]) if any(v is not None for t in trials for v in t.series(k))
    ]
    if not keys:
        return None
    fig = _figure(11, 0.8 + 3.4 * len(keys))
    axes = list(fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0])
    colors = trial_colors(run)
    better = "lower" if run.mode == "min" else "higher"
    for ax, key in zip(axes, keys, strict=True):
        for trial in trials:

            def donor_point(exploit: Any, key: str = key) -> tuple[float, float] | None:
                donor = run.trial(exploit.donor)
                for row in donor.rows if donor else []:
                    if row.get("step") == exploit.donor_step and isinstance(row.get(key), float):
                        return row.get(run.x_key), row[key]
                return None

            _draw_trial(ax, run, trial, trial.series(key), donor_point, colors[trial.id])
        winner = run.trial(run.winner_trial)
        if key == run.metric and winner is not None and run.winner_step is not None:
            for row in winner.rows:
                if row.get("step") == run.winner_step and isinstance(row.get(key), float):
                    ring = {"marker": "o", "markersize": 14, "markerfacecolor": "none", "markeredgecolor": "black"}
                    ax.plot(row.get(run.x_key), row[key], linestyle="none", label="winner's checkpoint", **ring)
                    break
        ax.set_ylabel(f"{key} ({better} is better)" if key == run.metric else key)
        ax.grid(alpha=0.3)
        _plain_numbers(ax)
    axes[-1].set_xlabel(run.x_key)
    fig.suptitle(f"Learning curves: validation {run.metric} and train_loss per trial")
    _legend(fig, run, axes)
    return _png(fig)


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _categorical_axis(ax: Any, values: list[Any], axis: str) -> dict[str, int]:
    names = sorted({str(v) for v in values})
    positions = {name: i for i, name in enumerate(names)}
    (ax.set_yticks if axis == "y" else ax.set_xticks)(range(len(names)), names)
    return positions


def hyperparameter_schedule(run: RunData) -> bytes | None:
    """Each search-space key's value per report and trial: what PBT/PB2 perturbed, and when."""
    trials = [t for t in run.trials if t.rows]
    keys = list(run.space) or sorted({k for t in trials for c in t.configs for k in c})
    keys = [k for k in keys if any(k in c for t in trials for c in t.configs)]
    if not keys:
        return None
    # a key no trial ever changed would only add a flat panel; keep them all if nothing changed at all
    varied = [k for k in keys if len({str(c.get(k)) for t in trials for c in t.configs}) > 1]
    keys = varied or keys
    fig = _figure(11, 0.8 + 2.8 * len(keys))
    axes = list(fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0])
    colors = trial_colors(run)
    for ax, key in zip(axes, keys, strict=True):
        values = [c[key] for t in trials for c in t.configs if c.get(key) is not None]
        numeric = _numeric(values)
        positions = {} if numeric else _categorical_axis(ax, values, "y")

        def position(value: Any, numeric: bool = numeric, positions: dict = positions) -> float | None:
            if value is None:
                return None
            return float(value) if numeric else float(positions[str(value)])

        for trial in trials:

            def restored(exploit: Any, key: str = key, position: Callable = position) -> tuple[float, float] | None:
                new = (exploit.new_config or {}).get(key)
                step = exploit.restored_step if run.x_key == "step" else None
                return (step, position(new)) if step is not None and new is not None else None

            ys = [position(c.get(key)) for c in trial.configs]
            _draw_trial(ax, run, trial, ys, restored, colors[trial.id], steps=True)
        if numeric and _spans_decades([float(v) for v in values]):
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        _plain_numbers(ax)
    axes[-1].set_xlabel(f"{run.x_key} (each value holds from the previous report up to the marked one)")
    fig.suptitle(f"{run.algorithm.upper()} hyper-parameter schedule: the config each report was trained with")
    _legend(fig, run, axes)
    return _png(fig)


def search_view(run: RunData) -> bytes | None:
    """Each search-space key against the trial's best metric, at the value that best report was trained with."""
    trials = [t for t in run.trials if t.best is not None]
    keys = list(run.space)
    if not trials or not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(max(8.0, 1.5 + 4.3 * cols), 0.8 + 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    reports = [len(t.rows) for t in trials]
    color_by_reports = len(set(reports)) > 1
    scatter = None
    for ax, key in zip(axes, keys, strict=False):
        points = [(t.config_at_best(key), t) for t in trials if t.config_at_best(key) is not None]
        if not points:
            ax.set_title(f"{key}: no values", fontsize="medium")
            continue
        values = [v for v, _ in points]
        if _numeric(values):
            xs = [float(v) for v in values]
            kind = (run.space.get(key) or {}).get("type")
            if _spans_decades(xs) or (kind == "loguniform" and all(x > 0 for x in xs)):
                ax.set_xscale("log")
        else:
            positions = _categorical_axis(ax, values, "x")
            xs = [float(positions[str(v)]) for v in values]
        ys = [t.best for _, t in points]
        counts = [len(t.rows) for _, t in points]
        colour = {"c": counts, "cmap": "viridis", "vmin": min(reports), "vmax": max(reports)}
        scatter = ax.scatter(xs, ys, s=40, edgecolors="black", linewidths=0.5, **(colour if color_by_reports else {}))
        for x, (_, t) in zip(xs, points, strict=True):
            if t.id == run.winner_trial:
                ax.plot(
                    x,
                    t.best,
                    marker="*",
                    markersize=16,
                    markerfacecolor="none",
                    markeredgecolor="red",
                    linestyle="none",
                    label="winner",
                )
            if len(points) <= MAX_ANNOTATED_POINTS:
                ax.annotate(t.id, (x, t.best), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        ax.margins(0.12)  # room for the trial labels at the edges
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {run.metric}")
        ax.grid(alpha=0.3)
        _plain_numbers(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if color_by_reports and scatter is not None:
        from matplotlib.ticker import MaxNLocator

        bar = fig.colorbar(scatter, ax=list(axes[: len(keys)]), label="reports (trials stopped early have fewer)")
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    better = "lower" if run.mode == "min" else "higher"
    fig.suptitle(f"Best {run.metric} per trial ({better} is better) against its search-space values")
    return _png(fig)


def confusion_matrix(labels: list[str], counts: list[list[float]]) -> bytes | None:
    """Test confusion matrix: counts in the cells, coloured by the share of the true class's rows."""
    n = len(labels)
    if n == 0 or len(counts) != n or any(len(row) != n for row in counts):
        return None
    shares = [[c / sum(row) if sum(row) else 0.0 for c in row] for row in counts]
    side = min(14.0, 2.5 + 0.6 * n)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    if n <= 25:
        for i, row in enumerate(counts):
            for j, count in enumerate(row):
                color = "white" if shares[i][j] > 0.6 else "black"
                ax.text(
                    j,
                    i,
                    f"{count:g}\n{shares[i][j]:.0%}",
                    ha="center",
                    va="center",
                    color=color,
                    fontsize="small" if n > 8 else "medium",
                )
    rotate = 45 if max(len(str(label)) for label in labels) > 4 else 0
    ax.set_xticks(range(n), labels, rotation=rotate, ha="right" if rotate else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Winner on the test split")
    fig.colorbar(image, ax=ax, label="share of the true class's rows", shrink=0.8)
    return _png(fig)
