"""Multi-task fine-tuning on a real local Ray: SST-2 sentiment and a second label set derived from the same
sentences (short or long) on one tiny BERT, 2 workers, ZeRO-2; metrics per task, one export that serves both
tasks over real HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_cfg, post_json, with_serve, write_reviews
from ray import serve
from shared_data import shared_data

from raytune_ft.serve.deploy import deploy
from raytune_ft.serve.model import LoadedModel
from raytune_ft.train import train

pytestmark = pytest.mark.integration


def sentences(tmp_path: Path, rows: int = 480) -> tuple[Path, Path]:
    """The SST-2 slice, and the same sentences labelled by length: a second task with its own label set."""
    lines = shared_data("sst2", "train.tsv").read_text().splitlines()[1 : rows + 1]  # label TAB sentence
    sentiment = tmp_path / "sentiment.tsv"
    sentiment.write_text("\n".join(["label\tsentence", *lines]) + "\n")
    length = tmp_path / "length.tsv"
    texts = [line.split("\t")[1].strip() for line in lines]
    rows_out = [f"{s}\t{'long' if len(s.split()) > 8 else 'short'}" for s in texts]
    length.write_text("\n".join(["sentence\tsize", *rows_out]) + "\n")
    return sentiment, length


def test_two_tasks_train_on_two_workers_with_zero2_and_the_export_serves_both(
    tiny_bert, tmp_path, local_ray, serve_port
):
    sentiment, length = sentences(tmp_path)
    cfg = make_cfg(
        tmp_path / "runs",
        "two-tasks",
        tiny_bert,
        sentiment,
        train={"max_steps": 16, "eval_every_steps": 8, "checkpoint_every_steps": 8, "lr": 5e-3},
    )
    raw = cfg.model_dump(mode="json", by_alias=True)
    raw["data"].update(
        columns={"text": "sentence", "label": "label"}, labels=["0", "1"], label_names=["negative", "positive"]
    )
    raw["tasks"] = [
        {
            "name": "length",
            "data": {"path": str(length), "columns": {"text": "sentence", "label": "size"}, "max_length": 16},
            "loss_weight": 0.5,
        }
    ]
    raw["multitask"] = {"primary": "sentiment", "sampling": "uniform"}
    from raytune_ft.config.loader import validate_raw

    cfg = validate_raw(raw, None, "two-tasks.yaml", [], base_dir=tmp_path)
    result = train(cfg)

    # metrics per task at every evaluation, and the combined objective Tune can optimise
    assert [h["step"] for h in result.history] == [8, 16]
    for h in result.history:
        assert {"eval_accuracy", "eval_length_accuracy", "eval_length_f1_macro", "eval_combined_loss"} <= set(h)
        assert h["eval_combined_loss"] == pytest.approx((h["eval_loss"] + 0.5 * h["eval_length_loss"]) / 1.5)
    # the extra task has its own data directory and splits (its test split apart, for the winner's test)
    assert (tmp_path / "runs" / "two-tasks" / "tasks" / "length" / "data" / "test.parquet").is_file()
    state = json.loads((result.best_checkpoint / "state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 2

    export = result.export_dir
    meta = json.loads((export / "raytune_ft.json").read_text())
    assert [t["name"] for t in meta["tasks"]] == ["sentiment", "length"]
    assert (export / "task_heads.safetensors").is_file()
    assert "length (sequence-classification: long, short, loss weight 0.5)" in (export / "README.md").read_text()
    local = LoadedModel(export)
    texts = ["a gorgeous , witty , seductive movie .", "it is a terrible film , with no story at all and no fun"]
    assert {p["label"] for p in local.classify(texts)} <= {"negative", "positive"}
    assert {p["label"] for p in local.classify(texts, task="length")} <= {"long", "short"}

    # over HTTP: the classify route takes the task's name; an unknown one is refused with 422
    url = deploy(export, with_serve(cfg, port=serve_port))
    try:
        status, _, body = post_json(f"{url}/v1/classify", {"text": texts, "task": "length"})
        assert status == 200 and [p["label"] for p in body["predictions"]] == [
            p["label"] for p in local.classify(texts, task="length")
        ]
        status, _, body = post_json(f"{url}/v1/classify", {"text": texts})
        assert status == 200
        assert [p["label"] for p in body["predictions"]] == [p["label"] for p in local.classify(texts)]
        status, _, body = post_json(f"{url}/v1/classify", {"text": "fine", "task": "topic"})
        assert status == 422 and "task" in json.dumps(body)
    finally:
        serve.shutdown()  # its replica's CPU goes back to the next test's 2 training workers


def test_causal_lm_with_a_classification_task_under_lora_and_zero3(tiny_llama, tmp_path, local_ray, serve_port):
    text = shared_data("tinyshakespeare", "input.txt").read_text()[:20_000]
    (tmp_path / "plays.txt").write_text(text)
    reviews = write_reviews(tmp_path / "reviews.tsv", rows=120)
    raw = {
        "name": "lm-and-sentiment",
        "seed": 5,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
        "data": {"path": str(tmp_path / "plays.txt"), "block_size": 32, "split": {"validation": 0.1, "test": 0.1}},
        "finetune": {"method": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "deepspeed": {"zero_stage": 3},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 8, "eval_every_steps": 8, "checkpoint_every_steps": 8},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "tasks": [{"name": "sentiment", "data": {"path": str(reviews), "max_length": 16}}],
        "multitask": {"primary": "plays", "sampling": "temperature", "temperature": 2.0},
    }
    from raytune_ft.config.loader import validate_raw
    from raytune_ft.data import reads_of_test_split
    from raytune_ft.tune.winner import test_metrics

    cfg = validate_raw(raw, None, "lm.yaml", [], base_dir=tmp_path)
    result = train(cfg)
    [last] = result.history
    assert last["eval_perplexity"] > 1 and 0 <= last["eval_sentiment_accuracy"] <= 1
    export = result.export_dir
    tested = test_metrics(export, cfg, tmp_path / "runs" / "lm-and-sentiment" / "data", None)
    assert tested["test_perplexity"] > 1 and tested["test_sentiment_rows"] > 0
    task_data = tmp_path / "runs" / "lm-and-sentiment" / "tasks" / "sentiment" / "data"
    assert len(reads_of_test_split(task_data)) == 1  # the extra task's test split, read once too

    # the export: a plain causal LM (LoRA merged) plus the sentiment head; completions and classify both served
    local = LoadedModel(export)
    assert local.task == "causal-lm" and set(local.heads) == {"sentiment"}
    texts = ["a good film", "a bad film", "the review is not good"]
    expected = local.classify(texts, task="sentiment")
    assert {p["label"] for p in expected} <= {"0", "1"}
    url = deploy(export, with_serve(cfg, port=serve_port))
    try:
        # over HTTP, the answers the export gives in this process: labels, probabilities, greedy completions
        status, _, body = post_json(f"{url}/v1/classify", {"text": texts, "task": "sentiment"})
        assert status == 200 and [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
        for got, want in zip(body["predictions"], expected, strict=True):
            assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
        status, _, _ = post_json(f"{url}/v1/classify", {"text": "a good film"})  # the LM has no labels: name a task
        assert status == 422
        status, _, body = post_json(f"{url}/v1/completions", {"prompt": "to be", "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["choices"][0]["finish_reason"] in {"stop", "length"}
        assert body["choices"][0]["text"] == local.complete("to be", 4, 0.0, 1.0, None)["text"]
    finally:
        serve.shutdown()
