"""Driver side of training: prepare and ship the data, build the TorchTrainer, fit, pick the best checkpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytune_ft.config import ExperimentConfig, config_to_yaml
from raytune_ft.config.schema import CAUSAL_TASKS
from raytune_ft.console import evaluation_line, tell
from raytune_ft.data import load_split, prepare_data
from raytune_ft.layout import CONFIG_FILE, METADATA
from raytune_ft.model_source import load_tokenizer
from raytune_ft.train.batches import tokenize_splits
from raytune_ft.train.checkpoint import CheckpointError, list_checkpoints, newest_whole_checkpoint, read_state
from raytune_ft.train.hooks import StepHooks
from raytune_ft.train.loop import train_loop
from raytune_ft.train.ray_cluster import ensure_ray
from raytune_ft.train.ray_run import torch_trainer
from raytune_ft.train.storage import bytes_needed, check_storage

REPORTS = "reports.jsonl"  # in RUN_DIR/train: what rank 0 reported, one line per report


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    metrics: dict[str, Any]
    export_dir: Path | None
    history: list[dict[str, Any]]


def score_of(cfg: ExperimentConfig) -> tuple[str, str]:
    """The metric that ranks checkpoints: the early-stopping metric when set, else validation loss."""
    if cfg.train.early_stopping is not None:
        return cfg.train.early_stopping.metric, cfg.train.early_stopping.mode
    return "eval_loss", "min"


def prepare_worker_data(cfg: ExperimentConfig) -> dict[str, Any]:
    """Tokenised train/validation splits plus what workers need to interpret them (never the test split)."""
    # chat: the token report holds what the length policy cut or dropped, which the export's data report must say
    prepared = prepare_data(cfg, with_tokens=cfg.model.task == "chat")
    tables = {name: load_split(prepared.data_dir, name) for name in ("train", "validation")}
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    data = tokenize_splits(
        tables, tokenizer, cfg.model.task, cfg.data.max_length, cfg.data.block_size, cfg.data.chat, cfg.seed
    )
    return {
        "data": data,
        "classes": prepared.report.get("classes"),
        "class_weights": prepared.report.get("class_weights"),
        "pad_token_id": tokenizer.pad_token_id,
        "data_dir": prepared.data_dir,
        "data_report": prepared.report,
        "tasks": [_task_data(cfg, task, tokenizer) for task in cfg.tasks],
        "retain": _retain_data(cfg, tokenizer, prepared.report.get("classes")),
    }


def _retain_data(cfg: ExperimentConfig, tokenizer: Any, classes: list[str] | None) -> dict[str, list] | None:
    """train.retain_path tokenised like the validation split: blocks of text (causal LM) or labelled rows."""
    if cfg.train.retain_path is None:
        return None
    from raytune_ft.data.readers import DataError, read_records
    from raytune_ft.data.tokenize import tokenize_causal_blocks, tokenize_classification

    path, columns = cfg.train.retain_path, cfg.data.columns
    if cfg.model.task in CAUSAL_TASKS:  # general text, scored as perplexity
        records = read_records(path, "auto", columns.text, None)
        blocks = tokenize_causal_blocks(records.texts[: cfg.train.retain_max_rows], tokenizer, cfg.data.block_size)
        if not blocks["input_ids"]:
            raise DataError(path, None, f"train.retain_path: fewer tokens than one block of {cfg.data.block_size}")
        return {"input_ids": blocks["input_ids"]}
    records = read_records(path, "auto", columns.text, columns.label)
    index = {c: i for i, c in enumerate(classes or [])}
    ids = []
    for label, row in zip(records.labels or [], records.rows, strict=True):
        if label not in index:
            raise DataError(path, row, f"train.retain_path: label '{label}' is not one of the classes {classes}")
        ids.append(index[label])
    n = cfg.train.retain_max_rows
    enc = tokenize_classification(records.texts[:n], ids[:n], tokenizer, cfg.data.max_length)
    return {"input_ids": enc["input_ids"], "labels": enc["labels"]}


def loop_data(worker_data: dict[str, Any]) -> dict[str, Any]:
    """What every worker's loop reads of the prepared data; token ids go through the object store once."""
    import ray

    keep = ("name", "task", "loss_weight", "classes", "label_names")
    return {
        "data": ray.put(worker_data["data"]),
        "classes": worker_data["classes"],
        "class_weights": worker_data["class_weights"],
        "pad_token_id": worker_data["pad_token_id"],
        "tasks": [{**{k: t[k] for k in keep}, "data": ray.put(t["data"])} for t in worker_data.get("tasks", [])],
        "retain": ray.put(worker_data["retain"]) if worker_data.get("retain") else None,
    }


def _task_data(cfg: ExperimentConfig, task: Any, tokenizer: Any) -> dict[str, Any]:
    """One extra task's tokenised train/validation splits (its own data directory and test split)."""
    from raytune_ft.data import task_experiment

    own = task_experiment(cfg, task)
    prepared = prepare_data(own, with_tokens=False, task=task.name)
    tables = {name: load_split(prepared.data_dir, name) for name in ("train", "validation")}
    return {
        "name": task.name,
        "task": task.task,
        "loss_weight": task.loss_weight,
        "classes": prepared.report.get("classes"),
        "label_names": task.data.label_names,
        "data": tokenize_splits(
            tables, tokenizer, task.task, task.data.max_length, task.data.block_size, task.data.chat, cfg.seed
        ),
        "data_dir": prepared.data_dir,
        "data_report": prepared.report,
    }


def export_prepared(checkpoint_dir: Path, cfg: ExperimentConfig, out_dir: Path, worker_data: dict[str, Any]) -> Path:
    """Export a checkpoint with what prepare_worker_data gathered (classes, data report, validation probe)."""
    from raytune_ft.export import export_checkpoint

    return export_checkpoint(
        checkpoint_dir,
        cfg,
        out_dir,
        classes=worker_data["classes"],
        data_report=worker_data["data_report"],
        probe=worker_data["data"]["validation"],
        pad_token_id=worker_data["pad_token_id"],
        tasks=[
            {k: t[k] for k in ("name", "task", "classes", "label_names", "loss_weight")}
            | {"data_report": t["data_report"]}
            for t in worker_data.get("tasks", [])
        ],
    )


def _finished_run(run_dir: Path, existing: list[Path], log: Callable[[str], None]) -> TrainResult | None:
    """A run that trained to the end and exported is reused as it is, so rerunning a pipeline is cheap."""
    import json

    newest = newest_whole_checkpoint(existing, log=log)
    meta_path = run_dir / "export" / METADATA
    if newest is None or not newest[1].get("finished") or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    log(f"{run_dir} already finished training (step {newest[1]['step']}); reusing it")
    return TrainResult(
        run_dir=run_dir,
        best_checkpoint=Path(meta["checkpoint"]["path"]),
        metrics=meta["metrics"],
        export_dir=meta_path.parent,
        history=newest[1].get("history", []),
    )


def train(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    export: bool = True,
    hooks: Sequence[StepHooks] = (),
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Fine-tune on Ray Train. A fresh run refuses a run directory that already has checkpoints; `resume`
    continues one (Ray Train V2 resumes a run by its name and storage path) and refuses one without any. HOOKS
    join every worker's run (raytune_ft/train/hooks.py; the tests inject faults with them)."""
    from functools import partial

    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    run_dir = cfg.run_dir
    train_dir = run_dir / "train"
    existing = list_checkpoints(train_dir)
    if resume:
        if newest_whole_checkpoint(existing, log=log) is None:
            raise CheckpointError(f"nothing to resume: {train_dir} has no whole checkpoint")
    elif existing:
        done = _finished_run(run_dir, existing, log)
        if done is not None:
            return done
        raise CheckpointError(
            f"{run_dir} already holds a training run ({len(existing)} checkpoint(s)); "
            f"continue it with `raytune-ft train --resume {run_dir}` or choose a new experiment name"
        )

    check_storage(run_dir, bytes_needed(cfg))  # before any data work or worker: StorageError names the problem
    log("preparing data")
    worker_data = prepare_worker_data(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))
    ensure_ray(cfg)
    metric, mode = score_of(cfg)
    loop_config = {
        "experiment": cfg.model_dump(mode="json", by_alias=True),
        **loop_data(worker_data),
        "require_checkpoint": resume,
        "run_storage": str(run_dir / "train"),
    }
    trainer = torch_trainer(
        cfg,
        partial(train_loop, hooks=list(hooks)) if hooks else train_loop,
        loop_config,
        RunConfig(
            name="train",
            storage_path=str(run_dir),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[reports_to_file(str(run_dir / "train" / REPORTS))],
        ),
    )
    log(f"training on {cfg.scaling.num_workers} worker(s), ZeRO stage {cfg.deepspeed.zero_stage}")
    with ReportsFollowed(run_dir / "train" / REPORTS, log, global_batch(cfg, worker_data), score_of(cfg)):
        result = trainer.fit()
    best = result.get_best_checkpoint(metric, mode) if result.best_checkpoints else result.checkpoint
    if best is None:
        raise CheckpointError(f"training finished without a checkpoint in {train_dir}")
    best_dir = Path(best.path)
    best_metrics = next((m for c, m in (result.best_checkpoints or []) if c.path == best.path), result.metrics)
    export_dir = None
    if export:
        export_dir = export_prepared(best_dir, cfg, run_dir / "export", worker_data)
        log(f"exported {best_dir.name} to {export_dir}")
    latest = read_state(Path(result.checkpoint.path)) if result.checkpoint else {}
    return TrainResult(
        run_dir=run_dir,
        best_checkpoint=best_dir,
        metrics=dict(best_metrics or {}),
        export_dir=export_dir,
        history=latest.get("history", []),
    )


def global_batch(cfg: ExperimentConfig, worker_data: dict[str, Any]) -> int:
    from raytune_ft.train.batches import StepPlan

    return StepPlan.of(cfg, worker_data["data"]["train"], cfg.scaling.num_workers).global_batch


def reports_to_file(path: str) -> Any:
    """A Ray Train callback that appends each report of rank 0 to PATH. It runs in the run's controller, which
    Ray Train places on the driver's node, so the driver can follow the file while fit() blocks. Defined in here
    so that it is pickled by value: the controller need not import this module, and with it torch."""
    from ray.train import UserCallback

    class ReportsToFile(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if not metrics:
                return
            plain = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float, str, bool)) or v is None}
            with open(path, "a") as fh:
                fh.write(json.dumps(plain) + "\n")

    return ReportsToFile()


class ReportsFollowed:
    """While the block runs, each new line of REPORTS (reports_to_file) to LOG as an evaluation event, once: a
    worker group restarted at a checkpoint reports that checkpoint's metrics again. With it the best SCORE
    (metric, mode) so far. Only a display (raytune_ft.console) follows: a plain `log` (a library caller, a
    benchmark) has the workers' own lines, and these would repeat them."""

    def __init__(
        self,
        reports: Path,
        log: Callable[[str], None],
        batch: int,
        score: tuple[str, str] = ("eval_loss", "min"),
        every_s: float = 0.5,
    ) -> None:
        self.reports, self.log, self.batch, self.score, self.every_s = reports, log, batch, score, every_s
        self.offset = reports.stat().st_size if reports.is_file() else 0
        self.seen: set[str] = set()
        self.best: tuple[float, int] | None = None
        self.active = getattr(log, "event", None) is not None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.follow, name="raytune-ft-reports", daemon=True)

    def __enter__(self) -> ReportsFollowed:
        if self.active:
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self.stop.set()
            self.thread.join()
            self.poll()

    def follow(self) -> None:
        while not self.stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        if not self.reports.is_file():
            return
        with open(self.reports, "rb") as fh:
            fh.seek(self.offset)
            text = fh.read()
        whole = text[: text.rfind(b"\n") + 1]  # a line still being written is read next time
        self.offset += len(whole)
        for line in whole.decode().splitlines():
            if line in self.seen:
                continue
            self.seen.add(line)
            metrics = json.loads(line)
            total, rate = int(metrics.get("total_steps") or 0), metrics.get("samples_per_s")
            eta = (total - metrics["step"]) * self.batch / rate if rate and "step" in metrics else None
            metric, mode = self.score
            value = metrics.get(metric)
            if isinstance(value, (int, float)) and (
                self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0])
            ):
                self.best = (float(value), metrics.get("step"))
            best = f"best {metric} {self.best[0]:.4f} (step {self.best[1]})" if self.best else None
            line = evaluation_line(metrics, total, eta)
            tell(self.log, line, "evaluation", metrics=metrics, total=total, eta_s=eta, best=best)
