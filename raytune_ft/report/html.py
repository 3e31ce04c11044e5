"""The report page: one self-contained HTML file, figures embedded as base64 PNG, no scripts or outside styles.

Every string from the run directory (trial names, config values, error messages, class labels) is escaped.
"""

from __future__ import annotations

import base64
import json
import re
import time
from html import escape
from typing import Any

from raytune_ft.modelcard import dotted_value
from raytune_ft.report.load import RunData, Trial, parse_value

CLASS_METRICS = ("precision", "recall", "f1", "support")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1250px;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: .6rem 0 1rem; font-size: .88rem; }
th, td { border: 1px solid #ddd; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.winner td { background: #fff7d6; font-weight: 600; }
.meta td:first-child { color: #555; }
.notes { background: #fff4e5; border-left: 4px solid #f0a020; padding: .5rem 1rem; }
.muted { color: #666; } code { background: #f4f4f6; padding: 0 .2rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .88rem; }
.scroll { overflow-x: auto; }
"""


def fmt(value: Any) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.5g}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _cell(value: Any) -> str:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return f'<td class="num">{escape(fmt(value))}</td>' if number else f"<td>{escape(fmt(value))}</td>"


def table(headers: list[str], rows: list[list[Any]], highlight: set[int] | None = None) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="winner"' if highlight and i in highlight else ""
        body.append(f"<tr{cls}>{''.join(_cell(v) for v in row)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode()
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def _p(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{escape(text)}</p>' if cls else f"<p>{escape(text)}</p>"


def _scalars(metrics: dict[str, Any], prefix: str, extra: tuple[str, ...] = ()) -> list[list[Any]]:
    return [
        [k, v]
        for k, v in metrics.items()
        if (k.startswith(prefix) and "/" not in k or k in extra) and not isinstance(v, dict | list)
    ]


def _per_class(metrics: dict[str, Any], prefix: str) -> tuple[list[str], list[list[Any]]]:
    """`{prefix}precision/<class>` and friends, one row per class."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        match = re.fullmatch(rf"{re.escape(prefix)}({'|'.join(CLASS_METRICS)})/([^/]+)", key)
        if match:
            found.setdefault(match[2], {})[match[1]] = value
    columns = [m for m in CLASS_METRICS if any(m in v for v in found.values())]
    return ["class", *columns], [[name, *(v.get(m) for m in columns)] for name, v in found.items()]


def _val_slices(metrics: dict[str, Any], prefix: str) -> tuple[list[str], list[list[Any]]]:
    found: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        match = re.fullmatch(rf"{re.escape(prefix)}slice/(.+)/([^/]+)", key)
        if match:
            found.setdefault(match[1], {})[match[2]] = value
    columns = sorted({m for v in found.values() for m in v})
    return ["slice", *columns], [[name, *(v.get(m) for m in columns)] for name, v in sorted(found.items())]


def _trained_config(trial: Trial | None, step: float | None) -> dict[str, Any] | None:
    for row, config in zip(trial.rows if trial else [], trial.configs if trial else [], strict=True):
        if step is not None and row.get("step") == step:
            return config
    return None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def header(run: RunData) -> str:
    name = run.config.get("name") or run.run_dir.name
    tune = run.tune
    task = _dict(run.config.get("model")).get("task")
    scheduler = tune.get("scheduler")
    algorithm = run.algorithm + (f" + {scheduler}" if scheduler and scheduler != "none" else "")
    statuses: dict[str, int] = {}
    for t in run.trials:
        statuses[t.status or "unknown"] = statuses.get(t.status or "unknown", 0) + 1
    rows = [
        ["run directory", str(run.run_dir.resolve())],
        ["search", algorithm],
        ["metric", f"{run.metric} ({run.mode})"],
        ["task", task],
        ["trials", ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none"],
        ["generated", time.strftime("%Y-%m-%d %H:%M:%S %z")],
    ]
    meta = "".join(f"<tr><td>{escape(k)}</td><td>{escape(fmt(v))}</td></tr>" for k, v in rows)
    notes = ""
    if run.notes:
        items = "".join(f"<li>{escape(n)}</li>" for n in run.notes)
        notes = f'<div class="notes"><strong>Missing or incomplete</strong><ul>{items}</ul></div>'
    return f"<h1>Report: {escape(str(name))}</h1><table class='meta'>{meta}</table>{notes}"


def winner(run: RunData, confusion_png: bytes | None) -> str:
    parts = ["<h2>Winner</h2>"]
    if run.winner is None:
        parts.append(_p("No winner yet: winner/raytune_ft.json is missing.", "muted"))
        return "".join(parts)
    metrics = _dict(run.winner.get("metrics"))
    best = metrics.get(run.metric)
    trial = run.trial(run.winner_trial)
    parts.append(
        _p(
            f"Trial {run.winner_trial or '?'}, checkpoint at step {fmt(run.winner_step)}: "
            f"validation {run.metric} = {fmt(best)}. Exported to winner/."
        )
    )
    experiment = _dict(run.winner.get("experiment"))
    keys = list(run.space) or list(trial.params if trial else [])
    trained = _trained_config(trial, run.winner_step)
    if keys:
        parts.append("<h3>Config</h3>")
        heads = ["key", "in winner/raytune_ft.json"]
        rows = [[k, dotted_value(experiment, k)] for k in keys]
        if trained is not None:
            heads.append(f"trained with (report at step {fmt(run.winner_step)})")
            rows = [[*row, trained.get(row[0])] for row in rows]
        parts.append(table(heads, rows))
        differ = [r[0] for r in rows if len(r) == 3 and r[2] is not None and r[1] != r[2]]
        if differ:
            parts.append(
                '<p class="notes">'
                + escape(
                    f"{', '.join(differ)}: winner/raytune_ft.json records another value than the exported "
                    "checkpoint was trained with: it holds the trial's last config, which PBT changed (or decided to "
                    "change) after that checkpoint."
                )
                + "</p>"
            )
    if run.schedule:
        parts.append("<h3>PBT schedule it trained with (winner/schedule.json)</h3>")
        rows = [
            [e.get("from_iteration"), e.get("config"), e.get("inherited_from")]
            for e in run.schedule
            if isinstance(e, dict)
        ]
        parts.append(table(["from training iteration", "config", "inherited from"], rows))
    parts.append("<h3>Validation metrics (at the exported checkpoint)</h3>")
    scalars = _scalars(metrics, "eval_", ("step", "epoch", "train_loss"))
    parts.append(table(["metric", "value"], scalars) if scalars else _p("none recorded", "muted"))
    heads, rows = _per_class(metrics, "eval_")
    if rows:
        parts.append("<h4>Per class (validation)</h4>" + table(heads, rows))
    heads, rows = _val_slices(metrics, "eval_")
    if rows:
        parts.append("<h4>Per slice (validation)</h4>" + table(heads, rows))
    parts.append(_test(run, confusion_png))
    return "".join(parts)


def _test(run: RunData, confusion_png: bytes | None) -> str:
    parts = ["<h3>Test metrics (test split, read once)</h3>"]
    tested = run.test_metrics
    if not isinstance(tested, dict):
        parts.append(_p("No test metrics: winner/test_metrics.json is missing.", "muted"))
        return "".join(parts)
    parts.append(table(["metric", "value"], _scalars(tested, "test_")))
    heads, rows = _per_class(tested, "test_")
    if rows:
        parts.append("<h4>Per class (test)</h4>" + table(heads, rows))
    if confusion_png is not None:
        parts.append(figure(confusion_png, "confusion matrix", "Confusion matrix: rows are the true class."))
    elif "confusion_matrix" in tested:
        parts.append(_p("confusion_matrix in test_metrics.json is malformed; not drawn.", "muted"))
    slices = tested.get("slices")
    if isinstance(slices, dict) and isinstance(slices.get("slices"), dict):
        per = slices["slices"]
        columns = sorted({m for v in per.values() if isinstance(v, dict) for m in v})
        rows = [[name, *(v.get(m) for m in columns)] for name, v in per.items() if isinstance(v, dict)]
        parts.append("<h4>Per slice (test)</h4>" + table(["slice", *columns], rows))
        summary = {k: v for k, v in slices.items() if k != "slices"}
        if summary:
            parts.append(_p(", ".join(f"{k}: {fmt(v)}" for k, v in summary.items()), "muted"))
    return "".join(parts)


def trials_table(run: RunData) -> str:
    parts = ["<h2>Trials</h2>"]
    if not run.trials:
        return parts[0] + _p("No trials found.", "muted")
    winner = {i for i, t in enumerate(run.trials) if t.id == run.winner_trial}
    exploits = ["exploits"] if run.pbt else []
    if run.csv_columns:
        columns = [c for c in run.csv_columns if c != "trial"]
        rows = [
            [t.id, *(parse_value((t.csv_row or {}).get(c)) for c in columns), *_exploit_count(run, t)]
            for t in run.trials
        ]
        parts.append(_p("From trials.csv; the search-space values are each trial's final config.", "muted"))
        parts.append(table(["trial", *columns, *exploits], rows, winner))
    else:
        keys = list(run.space)
        columns = ["status", *keys, f"best_{run.metric}", "reports", f"last {run.x_key}", "error"]
        rows = [
            [
                t.id,
                t.status or "unknown",
                *(t.params.get(k) for k in keys),
                t.best,
                len(t.rows),
                t.rows[-1].get(run.x_key) if t.rows else None,
                t.error,
                *_exploit_count(run, t),
            ]
            for t in run.trials
        ]
        parts.append(table(["trial", *columns, *exploits], rows, winner))
    return "".join(parts)


def _exploit_count(run: RunData, trial: Trial) -> list[Any]:
    return [len(trial.exploits)] if run.pbt else []


def exploits_table(run: RunData) -> str:
    parts = ["<h2>Exploits</h2>"]
    if not run.pbt and not run.exploits:
        parts.append(_p(f"Not applicable: {run.algorithm} does not exploit other trials (PBT and PB2 do).", "muted"))
        return "".join(parts)
    if not run.exploits:
        parts.append(_p("No exploit was recorded.", "muted"))
    else:
        parts.append(_p(f"From {run.exploit_source}.", "muted"))
        columns = list(dict.fromkeys(k for e in run.exploits for k in e.record))
        parts.append(table(columns, [[e.record.get(c) for c in columns] for e in run.exploits]))
    if run.policy_decisions is not None and run.exploit_source == "exploits.jsonl":
        if run.policy_decisions != len(run.exploits):
            parts.append(
                _p(
                    f"Ray's pbt_global.txt logs {run.policy_decisions} exploit decision(s) and exploits.jsonl "
                    f"{len(run.exploits)} restore(s): a decision taken when its trial was already finishing is "
                    "logged but never restored.",
                    "muted",
                )
            )
    return "".join(parts)


def search_space(run: RunData) -> str:
    if not run.space:
        return ""
    rows = []
    for key, dim in run.space.items():
        dim = dim if isinstance(dim, dict) else {"type": dim}
        bounds = dim.get("values") if "values" in dim else [dim.get("low"), dim.get("high")]
        rows.append([key, dim.get("type"), bounds])
    return "<h2>Search space</h2>" + table(["key", "type", "values or [low, high]"], rows)


def promotion_section(promotion: dict[str, Any] | None) -> str:
    if promotion is None:
        return ""
    verdict = "promoted" if promotion.get("promoted") else "NOT promoted"
    rows = [
        [c.get("threshold"), c.get("limit"), c.get("value"), "pass" if c.get("passed") else "FAIL"]
        for c in promotion.get("checks") or []
    ]
    body = table(["threshold", "limit", "value", "verdict"], rows) if rows else _p("No thresholds set.", "muted")
    return f"<h2>Promotion: {escape(verdict)}</h2>{body}"


def serving_section(served: dict[str, Any] | None, bench: dict[str, Any] | None, plot_png: bytes | None) -> str:
    if served is None and bench is None:
        return ""
    parts = ["<h2>Serving</h2>"]
    if served is not None:
        check = _dict(served.get("check"))
        parts.append(
            _p(
                f"Served at {served.get('url')} from {served.get('export')}; {check.get('agree')}/{check.get('texts')} "
                "validation texts got the same answer from the app as from the export in-process."
            )
        )
    if bench is not None:
        keys = ("concurrency", "rps", "p50_ms", "p95_ms", "p99_ms", "errors", "server_batch_mean")
        rows = [[lv.get(k) for k in keys] for lv in bench.get("levels") or []]
        parts.append(table(["clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "mean batch"], rows))
        if plot_png:
            parts.append(
                figure(
                    plot_png,
                    "latency against throughput",
                    "p50 (solid) and p99 (dashed) latency "
                    "against requests per second, one point per closed-loop concurrency level.",
                )
            )
    return "".join(parts)


def page(run: RunData, figures: dict[str, bytes | None], extra: str = "") -> str:
    """The whole page. `figures`: curves, schedule, search and confusion, each PNG bytes or None; EXTRA: the
    promotion and serving sections of a `raytune-ft run`."""
    body = [header(run), winner(run, figures.get("confusion")), extra, "<h2>Learning curves</h2>"]
    if figures.get("curves"):
        body.append(
            figure(
                figures["curves"],
                "learning curves",
                f"One line per trial against {run.x_key}. Stars mark PBT restores: the dotted line jumps to the "
                "donor's checkpoint (its step and value), then on to the trial's next report. The ring is the "
                "winner's exported checkpoint.",
            )
        )
    else:
        body.append(_p("No reports to plot.", "muted"))
    if run.pbt:
        body.append("<h2>Hyper-parameter schedule</h2>")
        if figures.get("schedule"):
            body.append(
                figure(
                    figures["schedule"],
                    "hyper-parameter schedule",
                    "The config each report was trained with, per trial; a dotted line is a restore with the "
                    "perturbed config (from exploits, result.json or progress.csv's config columns).",
                )
            )
        else:
            body.append(_p("No reports with a known config to plot.", "muted"))
    body.append("<h2>Search</h2>")
    if figures.get("search"):
        body.append(
            figure(
                figures["search"],
                "search view",
                "Each point is a trial: its best value of the metric against the value of the key it reached it "
                "with. Colour: how many reports the trial made (schedulers stop poor trials early).",
            )
        )
    else:
        body.append(_p("Nothing to plot: no trial has a best metric, or the search space is empty.", "muted"))
    body += [trials_table(run), exploits_table(run), search_space(run)]
    title = escape(f"Report: {run.config.get('name') or run.run_dir.name}")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def markdown_html(text: str) -> str:
    """The model card's Markdown as HTML, rendered by markdown-it-py (CommonMark and its tables), with raw HTML in
    the card escaped, not passed through. The Hub's YAML front matter is dropped, and headings move two levels
    down, below the report's own h1 and h2. A hand-made parser here showed tables' separator rows as rows."""
    from markdown_it import MarkdownIt

    lines = text.splitlines()
    if lines and lines[0] == "---" and "---" in lines[1:]:  # YAML front matter for the Hugging Face Hub
        lines = lines[lines.index("---", 1) + 1 :]
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse("\n".join(lines))
    for token in tokens:
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + 2, 6)}"
    return md.renderer.render(tokens, md.options, {})


def model_card_section(card: str | None, reliability: list[tuple[str, bytes]]) -> str:
    """The winner's model card (its README.md) and the reliability diagram of each evaluation."""
    if card is None:
        return ""
    body = ["<h2>Model card</h2>", markdown_html(card)]
    for name, png in reliability:
        body.append(figure(png, f"reliability diagram ({name})", f"Calibration of the winner on {name}."))
    return "".join(body)
