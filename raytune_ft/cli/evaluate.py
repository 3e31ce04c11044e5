"""`raytune-ft eval EXPORT DATA`: evaluate an exported model on any labelled file (or text, for a causal LM)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from raytune_ft.cli.common import EXIT_CONFIG, EXIT_RUNTIME, app, fail, out


@app.command("eval")
def evaluate(
    export: Annotated[Path, typer.Argument(help="Export directory, or the run directory holding one.")],
    data: Annotated[Path, typer.Argument(help="Labelled file (tsv, csv, jsonl, parquet); text for a causal LM.")],
    text_column: Annotated[
        str | None, typer.Option("--text-column", help="Text column of DATA (default: the export's).")
    ] = None,
    label_column: Annotated[
        str | None, typer.Option("--label-column", help="Label column of DATA (default: the export's).")
    ] = None,
    slices: Annotated[
        list[str] | None, typer.Option("--slice", help="A column to report metrics per value of (repeatable).")
    ] = None,
    edge_cases: Annotated[
        Path | None,
        typer.Option("--edge-cases", help="Hard inputs: columns text, expected (label or text), optional kind."),
    ] = None,
    retain: Annotated[
        Path | None, typer.Option("--retain", help="Retain set for forgetting: general text (LM) or labelled.")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="The model before fine-tuning, for --retain (LM default: the base model)."),
    ] = None,
    bins: Annotated[int, typer.Option("--bins", min=1, help="Calibration bins.")] = 10,
    top_mistakes: Annotated[int, typer.Option("--top-mistakes", min=0, help="Confident mistakes listed.")] = 10,
    latency_requests: Annotated[
        int, typer.Option("--latency-requests", min=1, help="Texts timed one at a time, then in batches.")
    ] = 50,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Texts per forward pass, for the metrics and batched latency.")
    ] = 32,
    max_rows: Annotated[int | None, typer.Option("--max-rows", min=1, help="Evaluate the first N rows.")] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            min=1,
            help="Chat: tokens generated per answer at most (default: the export's train.generation.max_new_tokens).",
        ),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="An extra task of a multi-task export: its head, labels and columns.")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Where eval.json, eval.md and reliability.png go (default: EXPORT/eval/<DATA name>/)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print eval.json instead of the summary.")] = False,
) -> None:
    """Judge an export as it will be used: metrics, slices, calibration, edge cases, forgetting, latency."""
    from raytune_ft.data.readers import DataError
    from raytune_ft.evaluation import EvalRequest, evaluate_export
    from raytune_ft.modelcard import evaluation_markdown
    from raytune_ft.serve.model import ExportError

    for option, path in (("DATA", data), ("--edge-cases", edge_cases), ("--retain", retain)):
        if path is not None and not path.is_file():
            fail(f"{option}: {path} is not a file", EXIT_CONFIG)
    request = EvalRequest(
        data=data,
        text_column=text_column,
        label_column=label_column,
        slice_columns=list(slices or []),
        edge_cases=edge_cases,
        retain=retain,
        reference=reference,
        bins=bins,
        top_mistakes=top_mistakes,
        latency_requests=latency_requests,
        batch_size=batch_size,
        max_rows=max_rows,
        max_new_tokens=max_new_tokens,
        task=task,
    )
    try:
        report = evaluate_export(export, request, out_dir)
    except (ExportError, DataError, ValueError) as exc:
        fail(str(exc), EXIT_CONFIG)
    except OSError as exc:
        fail(str(exc), EXIT_RUNTIME)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=float) + "\n")
    else:
        out.print(evaluation_markdown(report), markup=False, highlight=False)
