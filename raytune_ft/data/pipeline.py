"""The data pipeline: read -> curate -> split -> balance -> tokenizer report -> write, one counted step at a time."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_ft.config.schema import ExperimentConfig, OverlapConfig, SplitConfig
from raytune_ft.data import curation, overlap
from raytune_ft.data.readers import DataError, Records, detect_format, read_records
from raytune_ft.data.split import SPLITS, check_classes_present, check_disjoint, split_records
from raytune_ft.data.store import (
    REPORT,
    file_sha256,
    is_complete,
    read_manifest,
    retire,
    write_json_atomic,
    write_prepared,
)

# Fields that change tokenisation only; the splits (and so the test split) do not depend on them. data.chat renders,
# masks, cuts and packs conversations after they are split.
TOKENIZATION_FIELDS = ("max_length", "block_size", "chat")


@dataclass
class PreparedData:
    data_dir: Path
    report: dict[str, Any]
    reused: bool
    replaced: Path | None = None


def data_dir_for(cfg: ExperimentConfig, task: str | None = None) -> Path:
    """The experiment's data directory; an extra task of a multi-task experiment has its own, tasks/NAME/data."""
    root = Path(cfg.output_dir) / cfg.name
    return root / "data" if task is None else root / "tasks" / task / "data"


def task_experiment(cfg: ExperimentConfig, task: Any) -> ExperimentConfig:
    """The experiment as one extra task sees it: that task's data and task type, everything else shared."""
    return cfg.model_copy(
        update={"data": task.data, "model": cfg.model.model_copy(update={"task": task.task}), "tasks": []}
    )


def split_fingerprint(cfg: ExperimentConfig, source_sha256: str) -> str:
    """Identity of a split: the source bytes and every setting that decides which row lands where."""
    data = cfg.data.model_dump(mode="json", exclude={"path", *TOKENIZATION_FIELDS})
    blob = json.dumps({"data": data, "task": cfg.model.task, "source": source_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_data(
    cfg: ExperimentConfig,
    *,
    force: bool = False,
    with_tokens: bool = True,
    on_stage: Callable[[str], None] = lambda stage: None,
    task: str | None = None,
) -> PreparedData:
    """Build (or reuse) the experiment's data directory. A directory whose test split came from other settings
    is an error unless `force`, which always rebuilds and moves the old directory aside rather than deleting it."""
    source = Path(cfg.data.path)
    data_dir = data_dir_for(cfg, task)
    if not source.is_file():
        raise DataError(source, None, "file not found" if not source.exists() else "is not a file")
    on_stage(f"hashing {source.name}")
    fingerprint = split_fingerprint(cfg, file_sha256(source))
    replaced = None
    if not force and is_complete(data_dir, fingerprint):
        report = json.loads((data_dir / REPORT).read_text())
        if with_tokens and report.get("tokens", {}).get("settings") != _token_settings(cfg):
            on_stage("tokenizing")
            report["tokens"] = _token_report(cfg, _tables_of(data_dir))
            write_json_atomic(data_dir / REPORT, report)
        return PreparedData(data_dir, report, reused=True)
    if data_dir.exists():
        # Same settings rebuild the same deterministic split, so a damaged build of them may be redone.
        same_split = (read_manifest(data_dir) or {}).get("fingerprint") == fingerprint
        if (data_dir / "test.parquet").exists() and not force and not same_split:
            raise DataError(
                data_dir,
                None,
                "holds a test split built from other data or settings; the test split is written once. "
                "Use a new experiment name, or --force to move the old directory aside and rebuild",
            )

    # read and split before the old directory moves: a file with bad rows leaves what was built in place
    report, splits, classes = curate_and_split(cfg, on_stage)
    if data_dir.exists() and (force or (data_dir / "test.parquet").exists()):
        replaced = retire(data_dir)
    tables = {name: _table(recs, classes) for name, recs in splits.items()}
    if with_tokens:
        on_stage("tokenizing")
        report["tokens"] = _token_report(cfg, tables)
    report["fingerprint"] = fingerprint
    on_stage("writing splits")
    write_prepared(data_dir, tables, report, fingerprint)
    return PreparedData(data_dir, report, reused=False, replaced=replaced)


def curate_and_split(
    cfg: ExperimentConfig, on_stage: Callable[[str], None] = lambda stage: None
) -> tuple[dict[str, Any], dict[str, Records], list[str] | None]:
    if cfg.model.task == "chat":
        return _curate_and_split_chat(cfg, on_stage)
    data, cur = cfg.data, cfg.data.curation
    source = Path(data.path)
    fmt = detect_format(source, data.format)
    label_column = data.columns.label if cfg.model.task == "sequence-classification" else None

    on_stage(f"reading {source.name}")
    records = read_records(source, fmt, data.columns.text, label_column, data.columns.slice)
    rows_read = len(records)
    if data.max_rows is not None and data.max_rows < len(records):
        records = records.take(list(range(data.max_rows)))
    classes = _classes(records, data.labels, source)

    on_stage("curating")
    normalize = curation.normalizer(cur.normalize)
    findings = {
        "exact": curation.repeat_findings(records, curation.exact),
        "normalized": curation.repeat_findings(records, normalize),
    }
    steps: list[curation.StepReport] = []

    def apply(result: tuple[Records, curation.StepReport]) -> None:
        nonlocal records
        records, step = result
        steps.append(step)

    if cur.drop_empty:
        apply(curation.drop_empty(records))
    if cur.min_chars or cur.max_chars is not None:
        apply(curation.length_filter(records, cur.min_chars, cur.max_chars))
    group_key = normalize if cur.dedupe == "normalized" else curation.exact
    if records.labels is not None and cur.conflicts != "keep":
        apply(curation.resolve_conflicts(records, group_key, cur.conflicts))
    if cur.dedupe in ("exact", "normalized"):
        apply(curation.dedupe(records, curation.exact, "dedupe_exact"))
    if cur.dedupe == "normalized":
        apply(curation.dedupe(records, normalize, "dedupe_normalized"))
    if len(records) == 0:
        raise DataError(source, None, "no rows left after curation; loosen data.curation")

    on_stage("splitting")
    splits, strategy, grouping = split_records(records, data.split, normalize, str(source))
    check_disjoint(splits, normalize)
    if classes is not None:
        check_classes_present(splits, classes, data.split, str(source))
    else:
        check_classes_present(splits, [], data.split, str(source))

    weights = None
    if classes is not None and cur.balance == "downsample":
        splits["train"], step = curation.downsample(splits["train"], data.split.seed)
        steps.append(step)
    elif classes is not None and cur.balance == "class_weights":
        weights = curation.class_weights(splits["train"].labels or [], classes)

    report = {
        "source": {
            "path": str(source),
            "format": fmt,
            "rows_read": rows_read,
            "rows_used": min(rows_read, data.max_rows or rows_read),
        },
        "findings": findings,
        "steps": [s.as_dict() for s in steps],
        "classes": classes,
        "label_names": data.label_names,
        "split": {
            "strategy": strategy,
            "seed": data.split.seed,
            "validation": data.split.validation,
            "test": data.split.test,
            "disjoint_after_normalization": True,
            "grouping": grouping.report,
        },
        "leakage": leakage_report(records, splits, data.split, normalize, on_stage),
        "splits": {
            name: {
                "rows": len(recs),
                "class_balance": curation.class_balance(recs.labels, classes),
                # rows no other row contains (SST-2's whole sentences): validation and test report them apart
                "whole_rows": sum(recs.whole) if recs.whole is not None else None,
            }
            for name, recs in splits.items()
        },
        "class_weights": weights,
    }
    return report, splits, classes


def _curate_and_split_chat(
    cfg: ExperimentConfig, on_stage: Callable[[str], None]
) -> tuple[dict[str, Any], dict[str, Records], None]:
    """Chat data: conversations read, curated as wholes (empty answers, exact and normalised repeats), then split
    as units, grouped by overlap of their split text (data.columns.split_text, else the user turns). Tokenising,
    and so the length policy, comes later (data.chat.max_tokens depends on the tokenizer)."""
    from raytune_ft.data.chat import ChatColumns, as_records, curate_conversations, read_conversations

    data = cfg.data
    source = Path(data.path)
    on_stage(f"reading {source.name}")
    read = read_conversations(source, data.format, ChatColumns.of(data.columns))
    conversations = read.conversations
    rows_read = len(conversations)
    if data.max_rows is not None:
        conversations = conversations[: data.max_rows]
    on_stage("curating")
    conversations, steps = curate_conversations(conversations, data.curation.dedupe, data.curation.normalize)
    if not conversations:
        raise DataError(source, None, "no conversations left after curation; every answer was empty or repeated")
    records = as_records(conversations)
    records.messages = [json.dumps(c.messages(), ensure_ascii=False) for c in conversations]
    normalize = curation.normalizer(data.curation.normalize)
    on_stage("splitting")
    split_cfg = chat_split_settings(data.split)
    splits, strategy, grouping = split_records(records, split_cfg, normalize, str(source))
    check_classes_present(splits, [], data.split, str(source))
    report = {
        "source": {
            "path": str(source),
            "format": read.format,
            "shape": read.shape,
            "rows_read": rows_read,
            "rows_used": min(rows_read, data.max_rows or rows_read),
        },
        "steps": [s.as_dict() for s in steps],
        "classes": None,
        "split": {
            "strategy": strategy,
            "seed": data.split.seed,
            "validation": data.split.validation,
            "test": data.split.test,
            "unit": "conversation",
            "compared": f"column '{data.columns.split_text}'" if data.columns.split_text else "user turns",
            "grouping": grouping.report,
        },
        "leakage": leakage_report(records, splits, split_cfg, normalize, on_stage),
        "splits": {name: {"rows": len(recs)} for name, recs in splits.items()},
    }
    return report, splits, None


def chat_split_settings(split: SplitConfig) -> SplitConfig:
    """Conversations are independent units, so `auto` splits them at random (not the contiguous regions of a
    corpus), and their split texts are short prompts, so the overlap check takes the classification defaults."""
    strategy = "random" if split.strategy == "auto" else split.strategy
    found = split.overlap
    short = found.model_copy(update={"min_words": found.min_words or 3, "shingle_words": found.shingle_words or 3})
    return split.model_copy(update={"strategy": strategy, "overlap": short})


def leakage_report(
    records: Records,
    splits: dict[str, Records],
    cfg: SplitConfig,
    key: Callable[[str], str],
    on_stage: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """How much of validation and test overlaps the training split, in these splits and in the splits the same
    seed gives without overlap-aware grouping (by normalised text alone); the splits' lengths side by side; a
    warning for each share above data.split.overlap.warn_above."""
    on_stage("measuring overlap between splits")
    settings = overlap.resolve(cfg.overlap, causal_lm=records.labels is None)
    plain = cfg.model_copy(update={"overlap": OverlapConfig(containment=False, near_duplicates=False)})
    before, _, _ = split_records(records, plain, key, "")
    report: dict[str, Any] = {"settings": settings.as_dict(), "warnings": []}
    grouped, plain_train = (overlap.TrainingText(s["train"].texts, key, settings) for s in (splits, before))
    for name in ("validation", "test"):
        after = grouped.overlap(splits[name].texts)
        report[name] = {"after_grouping": after, "without_grouping": plain_train.overlap(before[name].texts)}
        if after["rows"] and after["any"]["share"] > settings.warn_above:
            report["warnings"].append(
                f"{after['any']['share']:.1%} of the {name} rows ({after['any']['rows']} of {after['rows']}) "
                f"overlap a training row (inside, containing or nearly repeating it; above "
                f"data.split.overlap.warn_above {settings.warn_above:g}); e.g. {after['examples'][:2]}"
            )
    report["words"] = {name: _word_lengths(recs.texts) for name, recs in splits.items()}
    return report


def _word_lengths(texts: list[str]) -> dict[str, Any]:
    from raytune_ft.data.tokenize import length_stats

    return length_stats([overlap.word_count(overlap.words(t)) for t in texts]) if texts else {"rows": 0}


def _classes(records: Records, declared: list[str] | None, source: Path) -> list[str] | None:
    if records.labels is None:
        return None
    if declared is None:
        classes = curation.infer_classes(records.labels)
        if len(classes) < 2:
            raise DataError(source, None, f"only one label value ({classes[0]!r}) in the data; need at least 2")
        return classes
    allowed = set(declared)
    bad = [i for i, label in enumerate(records.labels) if label not in allowed]
    if bad:
        first = bad[0]
        raise DataError(
            source,
            records.rows[first],
            f"label {records.labels[first]!r} is not one of data.labels {declared} "
            f"({len(bad)} row(s) with undeclared labels; first shown)",
        )
    return list(declared)


def _token_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    task = cfg.model.task
    settings: dict[str, Any] = {
        "tokenizer": cfg.model.name_or_path,
        "max_length": cfg.data.max_length if task == "sequence-classification" else None,
        "block_size": None if task == "sequence-classification" else cfg.data.block_size,
    }
    if task == "chat":
        settings["chat"] = cfg.data.chat.model_dump(mode="json")
    return settings


def _token_report(cfg: ExperimentConfig, tables: dict[str, Any]) -> dict[str, Any]:
    """Token lengths per split; for chat, also what the length policy cut or dropped and how many tokens learn."""
    from raytune_ft.data.tokenize import length_stats, token_stats
    from raytune_ft.model_source import load_tokenizer

    settings = _token_settings(cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    if cfg.model.task != "chat":
        per_split = {
            name: token_stats(
                table.column("text").to_pylist(), tokenizer, settings["max_length"], settings["block_size"]
            )
            for name, table in tables.items()
        }
        return {"settings": settings, "splits": per_split}
    from raytune_ft.data.chat import tokenize_chat_table

    report: dict[str, Any] = {"settings": settings, "splits": {}}
    for name, table in tables.items():
        columns, chat = tokenize_chat_table(table, tokenizer, cfg.data.chat, cfg.data.block_size, prompts=False)
        report["template"] = chat["chat"]["template"]
        lengths = [len(ids) for ids in columns["input_ids"]]
        report["splits"][name] = {
            **(length_stats(lengths) if lengths else {"rows": 0}),
            "length_policy": chat["steps"][0],
            "tokens": chat["tokens"],
        }
    return report


def _tables_of(data_dir: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    return {name: pq.read_table(data_dir / f"{name}.parquet") for name in SPLITS}


def _table(records: Records, classes: list[str] | None) -> Any:
    import pyarrow as pa

    columns: dict[str, Any] = {"text": pa.array(records.texts, pa.string())}
    if records.labels is not None and classes is not None:
        index = {c: i for i, c in enumerate(classes)}
        columns["label"] = pa.array(records.labels, pa.string())
        columns["label_id"] = pa.array([index[label] for label in records.labels], pa.int64())
    if records.slices is not None:
        columns["slice"] = pa.array(records.slices, pa.string())
    if records.whole is not None:
        columns["whole"] = pa.array(records.whole, pa.bool_())
    if records.messages is not None:
        columns["messages"] = pa.array(records.messages, pa.string())
    columns["source_line"] = pa.array(records.rows, pa.int64())
    return pa.table(columns)
