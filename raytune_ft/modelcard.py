"""The model card every export carries: README.md (what Hugging Face shows) and experiment.yaml beside it.

Built only from what the export directory holds (raytune_ft.json, test_metrics.json, schedule.json and each
eval/*/eval.json), so it can be rewritten whenever one of them is added: after the export, after the winner's
test evaluation, after `raytune-ft eval`.

An evaluation report (eval.json) is rendered to Markdown here and nowhere else: the card shows its headline
(evaluation_summary), eval.md and `raytune-ft eval` print the whole (evaluation_markdown), which begins with it.
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
        "pipeline_tag: "
        + ("text-classification" if meta.get("task") == "sequence-classification" else "text-generation"),
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

    if meta.get("task") == "chat":
        lines += ["", "## Chat", ""] + chat_lines(meta, exp, report, tested)

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
        lines += evaluation_summary(ev)

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


def chat_lines(meta: dict[str, Any], exp: dict[str, Any], report: dict[str, Any], tested: Any) -> list[str]:
    """How a chat model was trained and is prompted: template, loss masking, length policy, packing, generation."""
    chat = dotted_value(exp, "data.chat") or {}
    generation = dotted_value(exp, "train.generation") or {}
    template = meta.get("chat_template")
    named = "the base tokenizer's own" if template == "tokenizer" else f"`{template}`"
    masked = (
        "the loss is on the assistant turns only (system, user and template tokens are masked)"
        if chat.get("train_on") == "assistant"
        else "the loss is on every token"
    )
    lines = [
        f"- Template: {named}, saved with the tokenizer (`tokenizer.apply_chat_template` renders prompts as in "
        "training).",
        f"- Masking: {masked}.",
        f"- Length: at most {chat.get('max_tokens') or dotted_value(exp, 'data.block_size')} tokens per "
        f"conversation ({chat.get('length_policy')} beyond)" + _length_counts(report) + ".",
        "- Packing: "
        + (
            f"on: conversations share rows of {dotted_value(exp, 'data.block_size')} tokens, attention within each."
            if chat.get("packing")
            else "off."
        ),
        f"- Generation metrics: {', '.join(generation.get('metrics') or [])} on greedy answers (at most "
        f"{generation.get('max_new_tokens')} new tokens); validation on the first {generation.get('prompts')} "
        "conversations at each evaluation" + (", the test split on every conversation" if tested else "") + ".",
    ]
    if meta.get("adapter_only"):
        lines.append(f"- The LoRA adapter alone: load it on `{meta.get('provenance', {}).get('base_model')}`.")
    return lines


def _length_counts(report: dict[str, Any]) -> str:
    steps = [s.get("length_policy") for s in (report.get("tokens") or {}).get("splits", {}).values()]
    removed = sum(s.get("removed", 0) for s in steps if s)
    cut = sum(s.get("truncated", 0) for s in steps if s)
    return f"; {cut} truncated and {removed} dropped over the splits" if steps else ""


ANSWER_SCORES = ("exact", "contains", "token_f1")  # a chat evaluation's scores per slice, as metrics.answer_scores


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


OVERLAP_KINDS = {
    "inside_a_training_text": "inside a training text",
    "contains_a_training_text": "containing one",
    "near_duplicate_of_a_training_text": "nearly repeating one",
}


def evaluation_summary(ev: dict[str, Any]) -> list[str]:
    """The headline of an evaluation report (eval.json) as Markdown bullets: what the model card shows of each
    evaluation, and how evaluation_markdown's whole report begins. Reports written by older versions lack some
    keys; what is missing is left out."""
    out: list[str] = []
    m = ev.get("metrics", {})
    if "perplexity" in m:
        texts = f" ({m['rows']} texts)" if "rows" in m else ""
        out.append(f"Perplexity {m['perplexity']:.3f} over {m.get('tokens')} tokens{texts}.")
    if "token_f1" in m:  # a chat export: greedy answers scored against the references (evaluation/chat.py)
        out.append(
            f"Answers to {m.get('rows')} conversations: exact {_pct(m.get('exact'))}, contains "
            f"{_pct(m.get('contains'))}, token F1 {_pct(m['token_f1'])}."
        )
    elif "perplexity" not in m:
        out.append(f"{m.get('rows')} rows: accuracy {_pct(m.get('accuracy'))}, macro-F1 {_pct(m.get('f1_macro'))}.")
    cal = ev.get("calibration")
    if cal:
        bins = f" over {len(cal['bins'])} bins" if cal.get("bins") else ""
        out.append(f"Calibration: expected calibration error {cal['ece']:.4f} (maximum {cal['mce']:.4f}){bins}.")
    for column, s in (ev.get("slices") or {}).items():
        gap = ("token F1", s["token_f1_gap"]) if "token_f1_gap" in s else ("macro-F1", s.get("f1_macro_gap"))
        out.append(
            f"Slices by {column}: worst {s.get('worst_slice')}, best {s.get('best_slice')}, {gap[0]} gap "
            f"{_pct(gap[1])}."
        )
    seen = ev.get("overlap_with_training") or {}
    if seen.get("measured"):
        parts = ", ".join(f"{label} {_pct(seen[key]['share'])}" for key, label in OVERLAP_KINDS.items() if key in seen)
        share = _pct(seen["any"]["share"]) if "any" in seen else "n/a"
        out.append(f"Overlap with the training split: {share} of the rows ({parts or 'no rows'}).")
    elif seen:
        out.append(f"Overlap with the training split: not measured ({seen.get('reason')}).")
    edge = ev.get("edge_cases")
    if edge:
        kinds = ", ".join(f"{k} {v['passed']}/{v['cases']}" for k, v in edge["by_kind"].items())
        out.append(f"Edge cases: {edge['passed']}/{edge['cases']} passed ({_pct(edge.get('pass_rate'))}; {kinds}).")
    forget = ev.get("forgetting")
    if forget:
        before = "not measured" if forget.get("before") is None else _num(forget["before"])
        worse = "" if forget.get("worse_by") is None else f" (worse by {_num(forget['worse_by'])})"
        out.append(
            f"Forgetting on {forget['file']}: {forget['metric']} {before} before, {_num(forget['after'])} after{worse}."
        )
    lat = ev.get("latency")
    if lat:
        rate = lat.get("batched_rows_per_s")
        threads = f" ({lat['threads']} threads)" if lat.get("threads") else ""
        out.append(
            f"Latency in-process: batch 1 p50 {lat['batch1_p50_ms']:.1f} ms, p95 {lat['batch1_p95_ms']:.1f} ms;"
            f" batches of {lat['batch_size']}: {'n/a' if rate is None else f'{rate:.1f}'} rows/s{threads}."
        )
    return [f"- {line}" for line in out]


def evaluation_markdown(ev: dict[str, Any]) -> str:
    """The whole evaluation report for people (eval.md, and what `raytune-ft eval` prints): the headline the model
    card shows, then per class, per slice, every failed edge case and the most confident mistakes."""
    lines = [f"# Evaluation of {ev.get('export', '')} on {ev.get('data', '')}", "", *evaluation_summary(ev)]
    per_class = ev.get("metrics", {}).get("per_class")
    if per_class:
        lines += ["", "## Per class", ""]
        lines += _table(
            ["class", "precision", "recall", "F1", "support"],
            [
                [name, _pct(c["precision"]), _pct(c["recall"]), _pct(c["f1"]), f"{c['support']:.0f}"]
                for name, c in per_class.items()
            ],
        )
    for column, s in (ev.get("slices") or {}).items():
        lines += ["", f"## Slices by {column}", ""]
        if "token_f1_gap" in s:  # a chat export's slices: answer scores
            lines += _table(
                ["value", "rows", "exact", "contains", "token F1"],
                [[k, v.get("rows"), *(_pct(v.get(n)) for n in ANSWER_SCORES)] for k, v in s["slices"].items()],
            )
            continue
        lines += _table(
            ["value", "rows", "accuracy", "macro-F1"],
            [
                [value, v.get("rows"), _pct(v.get("accuracy")), _pct(v.get("f1_macro"))]
                for value, v in s["slices"].items()
            ],
        )
    failures = (ev.get("edge_cases") or {}).get("failures")
    if failures:
        lines += ["", "## Failed edge cases", ""]
        lines += [f"- [{f['kind']}] {f['text']!r}: expected {f['expected']!r}, got {f['got']!r}" for f in failures]
    worst = (ev.get("examples") or {}).get("worst")
    if worst:
        lines += ["", "## Worst answers", ""]
        lines += [
            f"- {w['token_f1']:.2f} {w['prompt']!r}: expected {w['reference']!r}, said {w['answer']!r}" for w in worst
        ]
    mistakes = ev.get("confident_mistakes")
    if mistakes:
        lines += ["", "## Most confident mistakes", ""]
        lines += [f"- {w['confidence']:.3f} said {w['predicted']} (true {w['label']}): {w['text']!r}" for w in mistakes]
    return "\n".join(lines) + "\n"


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
