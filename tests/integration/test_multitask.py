"""Multi-task fine-tuning on a real local Ray, in one run: a tiny Llama's causal LM (Shakespeare) with two
classification heads, sentiment (toy reviews) and a label set derived from SST-2 sentences (short or long, loss
weight 0.5), under LoRA and ZeRO-3 on 2 workers; metrics per task, each task's test split read once, and one export
that serves completions and both classifiers over real HTTP as it answers in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import post_json, with_serve, write_reviews
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


def test_a_causal_lm_and_two_classification_tasks_train_under_lora_and_zero3_and_the_export_serves_each(
    tiny_llama, tmp_path, local_ray, serve_port
):
    text = shared_data("tinyshakespeare", "input.txt").read_text()[:20_000]
    (tmp_path / "plays.txt").write_text(text)
    reviews = write_reviews(tmp_path / "reviews.tsv", rows=120)
    _, length = sentences(tmp_path)
    raw = {
        "name": "lm-and-heads",
        "seed": 5,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(tiny_llama), "task": "causal-lm"},
        "data": {"path": str(tmp_path / "plays.txt"), "block_size": 32, "split": {"validation": 0.1, "test": 0.1}},
        "finetune": {"method": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
        "deepspeed": {"zero_stage": 3},
        "train": {"lr": 5e-3, "batch_size": 4, "max_steps": 8, "eval_every_steps": 4, "checkpoint_every_steps": 8},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "tasks": [
            {"name": "sentiment", "data": {"path": str(reviews), "max_length": 16}},
            {
                "name": "length",
                "data": {"path": str(length), "columns": {"text": "sentence", "label": "size"}, "max_length": 16},
                "loss_weight": 0.5,
            },
        ],
        "multitask": {"primary": "plays", "sampling": "temperature", "temperature": 2.0},
    }
    from raytune_ft.config.loader import validate_raw
    from raytune_ft.data import reads_of_test_split
    from raytune_ft.tune.winner import test_metrics

    cfg = validate_raw(raw, None, "lm.yaml", [], base_dir=tmp_path)
    result = train(cfg)

    # metrics per task at every evaluation, and the combined objective Tune can optimise
    assert [h["step"] for h in result.history] == [4, 8]
    for h in result.history:
        assert h["eval_perplexity"] > 1 and 0 <= h["eval_sentiment_accuracy"] <= 1
        assert {"eval_length_accuracy", "eval_length_f1_macro", "eval_combined_loss"} <= set(h)
        weighted = h["eval_loss"] + h["eval_sentiment_loss"] + 0.5 * h["eval_length_loss"]
        assert h["eval_combined_loss"] == pytest.approx(weighted / 2.5)
    state = json.loads((result.best_checkpoint / "state.json").read_text())
    assert state["world_size"] == 2 and state["zero_stage"] == 3
    export = result.export_dir
    tested = test_metrics(export, cfg, tmp_path / "runs" / "lm-and-heads" / "data", None)
    assert tested["test_perplexity"] > 1 and tested["test_sentiment_rows"] > 0 and tested["test_length_rows"] > 0
    for task in ("sentiment", "length"):  # each extra task has its own splits; its test split is read once too
        task_data = tmp_path / "runs" / "lm-and-heads" / "tasks" / task / "data"
        assert (task_data / "test.parquet").is_file() and len(reads_of_test_split(task_data)) == 1

    # the export: a plain causal LM (LoRA merged) plus a head per task, named in its metadata and card
    meta = json.loads((export / "raytune_ft.json").read_text())
    assert [t["name"] for t in meta["tasks"]] == ["plays", "sentiment", "length"]
    assert (export / "task_heads.safetensors").is_file()
    assert "length (sequence-classification: long, short, loss weight 0.5)" in (export / "README.md").read_text()
    local = LoadedModel(export)
    assert local.task == "causal-lm" and set(local.heads) == {"sentiment", "length"}
    texts = ["a good film", "a bad film", "the review is not good at all , with no story and no fun"]
    expected = {task: local.classify(texts, task=task) for task in ("sentiment", "length")}
    assert {p["label"] for p in expected["sentiment"]} <= {"0", "1"}
    assert {p["label"] for p in expected["length"]} <= {"long", "short"}
    url = deploy(export, with_serve(cfg, port=serve_port))
    try:
        # over HTTP, the answers the export gives in this process: labels, probabilities, greedy completions
        for task, want in expected.items():
            status, _, body = post_json(f"{url}/v1/classify", {"text": texts, "task": task})
            assert status == 200 and [p["label"] for p in body["predictions"]] == [p["label"] for p in want]
            for got, one in zip(body["predictions"], want, strict=True):
                assert got["probs"] == pytest.approx(one["probs"], abs=1e-5)
        status, _, _ = post_json(f"{url}/v1/classify", {"text": "a good film"})  # the LM has no labels: name a task
        assert status == 422
        status, _, body = post_json(f"{url}/v1/classify", {"text": "fine", "task": "topic"})
        assert status == 422 and "task" in json.dumps(body)
        status, _, body = post_json(f"{url}/v1/completions", {"prompt": "to be", "max_tokens": 4, "temperature": 0})
        assert status == 200 and body["choices"][0]["finish_reason"] in {"stop", "length"}
        assert body["choices"][0]["text"] == local.complete("to be", 4, 0.0, 1.0, None)["text"]
    finally:
        serve.shutdown()
