"""The model card every export carries: README.md (what Hugging Face shows) and experiment.yaml beside it.

Built only from what the export directory holds (raytune_ft.json, test_metrics.json, schedule.json and each
eval/*/eval.json), so it can be rewritten whenever one of them is added: after the export, after the winner's
test evaluation, after `raytune-ft eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raytune_ft.layout import CARD, CONFIG_FILE, EVAL_DIR, EVAL_FILE, EXPERIMENT, METADATA, TEST_METRICS

# the training and fine-tuning keys a reader of the card wants; the whole config is in experiment.yaml
HYPERPARAMETERS = (
    "finetune.method",
    "finetune.lora.r",
    "finetune.lora.alpha",
    "finetune.freeze.layers",
    "finetune.gradual_unfreeze",
    "finetune.layerwise_lr_decay",
    "finetune.dropout",
    "finetune.l1",
    "finetune.ewc",
    "deepspeed.zero_stage",
    "deepspeed.precision",
    "train.lr",
    "train.batch_size",
    "train.grad_accum",
    "train.max_steps",
    "train.epochs",
    "train.weight_decay",
    "train.warmup_ratio",
    "train.lr_schedule",
    "train.grad_clip",
    "scaling.num_workers",
    "seed",
)


# when a setting applied to the training at all (else the card leaves it out: no LoRA rank for a full fine-tuning)
APPLIES = {
    "finetune.lora.r": lambda exp: dotted_value(exp, "finetune.method") == "lora",
    "finetune.lora.alpha": lambda exp: dotted_value(exp, "finetune.method") == "lora",
    "finetune.freeze.layers": lambda exp: bool(dotted_value(exp, "finetune.freeze.layers")),
    "finetune.layerwise_lr_decay": lambda exp: dotted_value(exp, "finetune.layerwise_lr_decay") not in (None, 1, 1.0),
    "finetune.l1": lambda exp: bool(dotted_value(exp, "finetune.l1")),
    "train.grad_accum": lambda exp: (dotted_value(exp, "train.grad_accum") or 1) > 1,
}


def applied_settings(exp: dict[str, Any]) -> list[list[Any]]:
    """[key, value] of the HYPERPARAMETERS that were set and applied to this training."""
    return [
        [key, dotted_value(exp, key)]
        for key in HYPERPARAMETERS
        if dotted_value(exp, key) is not None and APPLIES.get(key, lambda _: True)(exp)
    ]


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def dotted_value(tree: dict[str, Any], dotted: str) -> Any:
    """tree["a"]["b"] for "a.b"; None where a part is missing."""
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_num(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def experiment_yaml(meta: dict[str, Any]) -> str:
    """The experiment this model was trained with, as `raytune-ft train` reads it (the search section dropped:
    the values the search chose are filled in)."""
    import yaml

    experiment = {k: v for k, v in meta.get("experiment", {}).items() if k != "tune"}
    return yaml.safe_dump(experiment, sort_keys=False)


def model_card(export_dir: Path) -> str:

    meta = json.loads((export_dir / METADATA).read_text())
    exp = meta.get("experiment", {})
    prov = meta.get("provenance", {})
    report = meta.get("data_report", {})
    tested = _read(export_dir / TEST_METRICS)
    schedule = _read(export_dir / "schedule.json")
    evals = {p.parent.name: _read(p) for p in sorted((export_dir / EVAL_DIR).glob(f"*/{EVAL_FILE}"))}
    name = exp.get("name", export_dir.name)
    lines = [
        "---",
        f"base_model: {prov.get('base_model')}",
        "library_name: transformers",
        f"pipeline_tag: {'text-generation' if meta.get('task') == 'causal-lm' else 'text-classification'}",
        "tags: [raytune-ft]",
        "---",
        "",
        f"# {name}",
        "",
        f"Fine-tuned from `{prov.get('base_model')}` for {meta.get('task')} by raytune_ft {prov.get('raytune_ft')}"
        f" (checkpoint step {meta.get('checkpoint', {}).get('step')}, exported {meta.get('exported')}).",
    ]
    if meta.get("classes"):
        names = meta.get("label_names") or meta["classes"]
        lines.append(f"Labels: {', '.join(f'{c} = {n}' for c, n in zip(meta['classes'], names, strict=False))}.")

    tasks = meta.get("tasks") or []
    if tasks:
        described = []
        for t in tasks:
            labels = t.get("label_names") or t.get("classes")
            extra = f": {', '.join(map(str, labels))}" if labels and not t.get("primary") else ""
            weight = "" if t.get("primary") else f", loss weight {t.get('loss_weight')}"
            described.append(f"{t['name']} ({'primary, ' if t.get('primary') else ''}{t['task']}{extra}{weight})")
        lines.append("Tasks on one shared backbone: " + "; ".join(described) + ".")

    lines += ["", "## Data", ""]
    data = prov.get("data", {})
    source = report.get("source", {})
    split = report.get("split", {})
    files = [
        [
            tasks[0]["name"] if tasks else "",
            data.get("path"),
            data.get("sha256"),
            source.get("rows_read"),
            source.get("rows_used"),
            split.get("seed"),
            data.get("split_fingerprint"),
        ]
    ]
    for t in tasks[1:]:
        report_t = t.get("data_report") or {}
        files.append(
            [
                t["name"],
                t.get("data", {}).get("path"),
                t.get("data", {}).get("sha256"),
                report_t.get("source", {}).get("rows_read"),
                report_t.get("source", {}).get("rows_used"),
                report_t.get("split", {}).get("seed"),
                report_t.get("fingerprint"),
            ]
        )
    lines += _table(["task", "file", "sha256", "rows read", "rows used", "split seed", "split fingerprint"], files)
    steps = report.get("steps", [])
    if steps:
        lines += ["", "Curation: " + "; ".join(f"{s['name']} removed {s['removed']}" for s in steps) + "."]
    splits = report.get("splits", {})
    if splits:
        lines += [
            "",
            "Splits: "
            + ", ".join(f"{k} {v.get('rows')} rows" for k, v in splits.items())
            + f" ({split.get('strategy')}; the test split is read once, after training or the search).",
        ]

    lines += ["", "## Fine-tuning", ""]
    lines += _table(["setting", "value"], applied_settings(exp))
    if schedule:
        lines += ["", "Population-based training schedule of this model (from training iteration: values):", ""]
        lines += [f"- {s['from_iteration']}: {json.dumps(s['config'], sort_keys=True)}" for s in schedule]

    lines += ["", "## Metrics", ""]
    metrics = meta.get("metrics", {})
    rows = [
        [k.removeprefix("eval_"), v, "validation"]
        for k, v in metrics.items()
        if k.startswith("eval_") and "/" not in k and isinstance(v, int | float)
    ]
    if tested:
        rows += [
            [k.removeprefix("test_"), v, "test (read once)"]
            for k, v in tested.items()
            if k.startswith("test_") and "/" not in k and isinstance(v, int | float)
        ]
    lines += _table(["metric", "value", "split"], rows)

    for data_name, ev in evals.items():
        if not ev:
            continue
        lines += ["", f"## Evaluation on {ev.get('data', data_name)}", ""]
        lines += _evaluation_lines(ev)

    lines += ["", "## Reproduce", ""]
    lines.append(f"Code: raytune_ft {prov.get('raytune_ft')}, git commit `{prov.get('git_commit')}`.")
    packages = prov.get("packages", {})
    lines.append("Packages: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v) + ".")
    lines += ["", "```bash", f"raytune-ft train {EXPERIMENT}   # this model: the same data, split seed and settings"]
    if (export_dir.parent / CONFIG_FILE).is_file() and exp.get("tune") is not None:
        lines.append(f"raytune-ft tune {export_dir.parent / 'config.yaml'}   # the search that chose it")
    if (export_dir / "pbt_policy.txt").is_file():
        lines.append(f"raytune-ft tune --replay {export_dir.parent}   # its PBT schedule, replayed")
    lines.append("```")
    return "\n".join(lines) + "\n"


def _evaluation_lines(ev: dict[str, Any]) -> list[str]:
    out: list[str] = []
    m = ev.get("metrics", {})
    if "perplexity" in m:
        out.append(f"Perplexity {m['perplexity']:.4g} over {m.get('tokens')} tokens.")
    else:
        out.append(f"{m.get('rows')} rows: accuracy {_num(m.get('accuracy'))}, macro-F1 {_num(m.get('f1_macro'))}.")
    cal = ev.get("calibration")
    if cal:
        out.append(f"Calibration: expected calibration error {cal['ece']:.4f} (maximum {cal['mce']:.4f}).")
    for column, s in (ev.get("slices") or {}).items():
        out.append(
            f"Slices by {column}: worst {s['worst_slice']}, best {s['best_slice']}, macro-F1 gap "
            f"{s['f1_macro_gap']:.4f}."
        )
    edge = ev.get("edge_cases")
    if edge:
        kinds = ", ".join(f"{k} {v['passed']}/{v['cases']}" for k, v in edge["by_kind"].items())
        out.append(f"Edge cases: {edge['passed']}/{edge['cases']} passed ({kinds}).")
    forget = ev.get("forgetting")
    if forget:
        out.append(
            f"Forgetting ({forget['file']}): {forget['metric']} before {_num(forget['before'])}, after "
            f"{_num(forget['after'])}, worse by {_num(forget['worse_by'])}."
        )
    lat = ev.get("latency")
    if lat:
        out.append(
            f"Latency in-process: batch 1 p50 {lat['batch1_p50_ms']:.1f} ms, p95 {lat['batch1_p95_ms']:.1f} ms;"
            f" batches of {lat['batch_size']}: {_num(lat['batched_rows_per_s'])} rows/s."
        )
    return [f"- {line}" for line in out]


def write_model_card(export_dir: Path) -> Path:
    """(Re)write EXPORT_DIR/README.md and experiment.yaml from what the export holds now."""

    export_dir = Path(export_dir)
    meta = json.loads((export_dir / METADATA).read_text())
    (export_dir / EXPERIMENT).write_text(experiment_yaml(meta))
    card = export_dir / CARD
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text(model_card(export_dir))
    tmp.replace(card)
    return card
