"""`raytune-ft eval` and the model card on tiny models whose answers are known in advance.

The classifier's head is set to weight 0, bias (0, 1): whatever the text, it says class 1 ("positive") with
probability e/(1+e) = 0.7311. The causal LM's output layer is zeroed: every next token is equally likely, so its
perplexity is exactly the vocabulary size. Every figure below follows from that by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB
from tiny_models import bert_config, llama_config
from transformers import BertForSequenceClassification, BertTokenizerFast, LlamaForCausalLM
from typer.testing import CliRunner

from raytune_ft.cli import app
from raytune_ft.data.readers import DataError, read_records
from raytune_ft.evaluation import EvalRequest, evaluate_export, lm_perplexity, scoring
from raytune_ft.modelcard import CARD, EXPERIMENT, write_model_card

P1 = math.e / (1 + math.e)  # the constant classifier's probability of "positive"


def tokenizer() -> BertTokenizerFast:
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(TINY_VOCAB)})


def meta(task: str, base: Path, classes: list[str] | None, names: list[str] | None) -> dict:
    return {
        "experiment": {
            "name": "tiny",
            "seed": 3,
            "model": {"name_or_path": str(base), "task": task},
            "data": {"columns": {"text": "text", "label": "label"}, "max_length": 16, "block_size": 8},
            "finetune": {"method": "lora", "lora": {"r": 4}},
            "train": {"lr": 0.001, "batch_size": 4},
            "tune": {"algorithm": "pbt"},
        },
        "task": task,
        "classes": classes,
        "label_names": names,
        "checkpoint": {"step": 12},
        "metrics": {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_slice/web/accuracy": 0.5},
        "data_report": {
            "source": {"rows_read": 20, "rows_used": 18},
            "steps": [{"name": "dedupe_exact", "removed": 2}],
            "split": {"seed": 42, "strategy": "stratified"},
            "splits": {"train": {"rows": 12}, "validation": {"rows": 3}, "test": {"rows": 3}},
        },
        "provenance": {
            "raytune_ft": "0.1.0",
            "git_commit": "abc123",
            "packages": {"torch": "2.x", "ray": "2.60.0"},
            "data": {"path": "/data/reviews.tsv", "sha256": "f00d", "split_fingerprint": "fp1"},
            "base_model": str(base),
        },
        "exported": "2026-11-27T00:00:00+0000",
    }


@pytest.fixture
def classifier(tmp_path) -> Path:
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(len(TINY_VOCAB), num_labels=2))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0]))
    export = tmp_path / "export"
    model.save_pretrained(export)
    tokenizer().save_pretrained(export)
    (export / "raytune_ft.json").write_text(
        json.dumps(meta("sequence-classification", tmp_path / "base", ["0", "1"], ["negative", "positive"]))
    )
    return export


@pytest.fixture
def language_model(tmp_path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    config = llama_config(len(TINY_VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    base = tmp_path / "base-lm"
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer().save_pretrained(base)
    tuned = LlamaForCausalLM(config)
    with torch.no_grad():
        tuned.lm_head.weight.zero_()
    export = tmp_path / "lm-export"
    tuned.save_pretrained(export)
    tokenizer().save_pretrained(export)
    (export / "raytune_ft.json").write_text(json.dumps(meta("causal-lm", base, None, None)))
    return export, base


def write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


# --- scoring on hand-made predictions


def test_calibration_bins_and_errors_by_hand():
    probs = [[0.05, 0.95], [0.15, 0.85], [0.35, 0.65], [0.4, 0.6], [1.0, 0.0]]
    labels = [1, 0, 1, 1, 0]
    cal = scoring.calibration(probs, labels, bins=10)
    top = cal["bins"][9]  # 0.95 and 1.0 (exactly 1.0 goes to the top bin)
    assert top["rows"] == 2 and top["confidence"] == pytest.approx(0.975) and top["accuracy"] == 1.0
    assert cal["bins"][8]["rows"] == 1 and cal["bins"][8]["accuracy"] == 0.0  # 0.85, wrong
    six = cal["bins"][6]
    assert six["rows"] == 2 and six["confidence"] == pytest.approx(0.625) and six["accuracy"] == 1.0
    gaps = [(2, 0.025), (1, 0.85), (2, 0.375)]
    assert cal["ece"] == pytest.approx(sum(n / 5 * g for n, g in gaps))
    assert cal["mce"] == pytest.approx(0.85)
    with pytest.raises(ValueError, match="2 probability rows for 1 labels"):
        scoring.calibration(probs[:2], [1])


def test_a_perfectly_calibrated_model_has_zero_ece():
    # 4 rows at confidence 0.75, 3 right: accuracy equals confidence
    cal = scoring.calibration([[0.25, 0.75]] * 4, [1, 1, 1, 0], bins=4)
    assert cal["ece"] == pytest.approx(0.0) and cal["bins"][3]["rows"] == 4  # [0.75, 1.0]


def test_length_buckets_and_slices_with_their_gap():
    assert [scoring.length_bucket(t) for t in ("good", "a b c d e f", "w " * 30, "w " * 60)] == [
        "1-5 words",
        "6-20 words",
        "21-50 words",
        "51+ words",
    ]
    names = ["neg", "pos"]
    preds, labels = [1, 1, 0, 0], [1, 1, 1, 0]
    s = scoring.slices_by({"group": ["a", "a", "b", "b"]}, preds, labels, names)["group"]
    assert s["slices"]["a"]["accuracy"] == 1.0 and s["slices"]["b"]["accuracy"] == 0.5
    assert s["worst_slice"] == "b" and s["best_slice"] == "a"
    # slice b: classes 0 and 1 both present; F1 of pos 0, of neg 2/3 -> macro 1/3; slice a: only pos, F1 1
    assert s["f1_macro_gap"] == pytest.approx(1 - 1 / 3)


def test_confident_mistakes_are_the_surest_wrong_answers_first():
    texts = ["w", "x", "y", "z"]
    probs = [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.99, 0.01]]
    got = scoring.confident_mistakes(texts, [1, 1, 0, 1], probs, ["neg", "pos"], k=2)
    assert [(m["text"], m["predicted"], m["label"]) for m in got] == [("z", "neg", "pos"), ("w", "neg", "pos")]
    assert got[0]["confidence"] == 0.99


def test_edge_cases_per_kind_with_every_failure_listed():
    result = scoring.edge_case_results(
        ["not good", "great, just great", "gud", "GOOD"],
        ["neg", "neg", "pos", "pos"],
        ["pos", "neg", "pos", "neg"],
        ["negation", "sarcasm", "typo", "case"],
    )
    assert result["passed"] == 2 and result["pass_rate"] == 0.5
    assert result["by_kind"]["negation"] == {"cases": 1, "passed": 0, "pass_rate": 0.0}
    assert [(f["kind"], f["text"]) for f in result["failures"]] == [("negation", "not good"), ("case", "GOOD")]


def test_forgetting_is_signed_so_that_positive_means_worse():
    assert scoring.forgetting(10.0, 12.0, "perplexity")["worse_by"] == pytest.approx(0.2)
    assert scoring.forgetting(0.9, 0.8, "accuracy")["worse_by"] == pytest.approx(0.1)
    assert scoring.forgetting(None, 0.8, "accuracy")["worse_by"] is None


# --- the whole evaluation on the constant classifier


def test_classifier_evaluation_matches_the_hand_computed_answers(classifier, tmp_path):
    data = write(
        tmp_path / "test.tsv",
        "text\tlabel\tgroup",
        [
            "a truly good film\t1\tweb",
            "a really bad film\t0\tweb",
            "good\tpositive\tprint",
            "bad\t0\tprint",
            "the movie was good\t1\tprint",
        ],
    )
    edge = write(
        tmp_path / "edge.tsv", "text\texpected\tkind", ["not good\tnegative\tnegation", "GOOD!\tpositive\tcase"]
    )
    request = EvalRequest(data=data, slice_columns=["group"], edge_cases=edge, latency_requests=5, batch_size=2)
    report = evaluate_export(classifier, request)

    m = report["metrics"]
    assert m["rows"] == 5 and m["accuracy"] == pytest.approx(3 / 5)  # always "positive"; 3 of 5 are
    assert m["confusion_matrix"]["counts"] == [[0, 2], [0, 3]]
    assert m["per_class"]["positive"]["recall"] == 1.0 and m["per_class"]["negative"]["recall"] == 0.0
    assert m["per_class"]["positive"]["precision"] == pytest.approx(3 / 5)
    assert m["f1_macro"] == pytest.approx((0 + 2 * 3 / (2 * 3 + 2)) / 2)
    cal = report["calibration"]
    assert cal["bins"][7]["rows"] == 5 and cal["bins"][7]["confidence"] == pytest.approx(P1, abs=1e-5)
    assert cal["ece"] == pytest.approx(abs(P1 - 3 / 5), abs=1e-5)
    group = report["slices"]["group"]["slices"]
    assert group["web"]["accuracy"] == 0.5 and group["print"]["accuracy"] == pytest.approx(2 / 3)
    assert set(report["slices"]["length"]["slices"]) == {"1-5 words"}
    mistakes = report["confident_mistakes"]
    assert [w["text"] for w in mistakes] == ["a really bad film", "bad"]  # equally sure: in file order
    assert all(w["predicted"] == "positive" and w["label"] == "negative" for w in mistakes)
    edge_result = report["edge_cases"]
    assert edge_result["passed"] == 1 and edge_result["failures"][0]["text"] == "not good"
    assert edge_result["by_kind"]["case"]["passed"] == 1
    lat = report["latency"]
    assert lat["requests"] == 5 and 0 < lat["batch1_p50_ms"] <= lat["batch1_p95_ms"]
    assert lat["batched_rows_per_s"] > 0

    out = classifier / "eval" / "test"
    assert json.loads((out / "eval.json").read_text())["metrics"]["accuracy"] == pytest.approx(0.6)
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "eval.md").read_text()
    assert "- 5 rows: accuracy 60.0 %, macro-F1 37.5 %." in summary
    assert "- Slices by group: worst web, best print, macro-F1 gap 6.7 %." in summary
    assert "| print | 3 | 66.7 % | 40.0 % |" in summary and "| negative | 0.0 % | 0.0 % | 0.0 % | 2 |" in summary
    assert "## Failed edge cases\n\n- [negation] 'not good': expected 'negative', got 'positive'" in summary
    assert "## Most confident mistakes\n\n- 0.731 said positive (true negative): 'a really bad film'" in summary
    # the export's model card now carries this evaluation: the report's headline, rendered by the same code
    card = (classifier / CARD).read_text()
    headline = summary.split("\n\n")[1]
    assert headline.startswith("- 5 rows:") and "- Edge cases: 1/2 passed (50.0 %; case 1/1, negation 0/1)." in headline
    assert f"## Evaluation on {data}\n\n{headline}\n\n## Reproduce" in card
    assert "## Per class" not in card and "confident mistakes" not in card


def test_retain_set_forgetting_against_a_reference_classifier(classifier, tmp_path):
    retain = write(tmp_path / "retain.tsv", "text\tlabel", ["good\t1", "bad\t0", "good film\t1", "bad film\t0"])
    report = evaluate_export(
        classifier, EvalRequest(data=retain, retain=retain, reference=str(classifier), latency_requests=2)
    )
    forget = report["forgetting"]
    # the same model as its own reference: nothing forgotten; accuracy 2/4 either way
    assert forget["before"] == forget["after"] == 0.5 and forget["worse_by"] == 0.0


def test_unknown_labels_and_missing_columns_name_the_file_and_line(classifier, tmp_path):
    bad = write(tmp_path / "bad.tsv", "text\tlabel", ["good\t1", "meh\tneutral"])
    with pytest.raises(DataError, match=r"bad.tsv:3: label 'neutral' is not one the model knows"):
        evaluate_export(classifier, EvalRequest(data=bad))
    no_group = write(tmp_path / "ok.tsv", "text\tlabel", ["good\t1"])
    with pytest.raises(DataError, match="group"):
        evaluate_export(classifier, EvalRequest(data=no_group, slice_columns=["group"]))


# --- causal LM


def test_lm_perplexity_of_a_uniform_model_is_the_vocabulary_size(language_model, tmp_path):
    export, base = language_model
    text = write(tmp_path / "general.txt", "the movie was good", ["a truly bad film number one"] * 6)
    edge = write(tmp_path / "prompts.tsv", "text\texpected", ["the movie\tzzz"])
    report = evaluate_export(export, EvalRequest(data=text, retain=text, edge_cases=edge, latency_requests=2))
    assert report["metrics"]["perplexity"] == pytest.approx(len(TINY_VOCAB), rel=1e-4)
    forget = report["forgetting"]
    assert forget["after"] == pytest.approx(len(TINY_VOCAB), rel=1e-4)
    model = LlamaForCausalLM.from_pretrained(base).eval()
    texts = read_records(text, "auto", "text", None).texts
    before = lm_perplexity(model, tokenizer(), texts, 8)["perplexity"]
    assert forget["before"] == pytest.approx(before) and forget["reference"] == str(base)
    assert forget["worse_by"] == pytest.approx(forget["after"] / before - 1)
    assert report["edge_cases"]["passed"] == 0 and report["latency"]["max_tokens"] == 16


# --- the model card


def test_every_export_field_is_on_the_model_card(classifier):
    (classifier / "test_metrics.json").write_text(json.dumps({"test_accuracy": 0.7, "test_rows": 3}))
    (classifier / "schedule.json").write_text(
        json.dumps(
            [{"from_iteration": 0, "config": {"train.lr": 0.001}}, {"from_iteration": 2, "config": {"train.lr": 0.002}}]
        )
    )
    write_model_card(classifier)
    card = (classifier / CARD).read_text()
    for field in (
        "base_model:",  # base model
        "/data/reviews.tsv",  # data file
        "f00d",  # its hash
        "| 42 |",  # the split seed
        "dedupe_exact removed 2",  # the data report
        "| finetune.method | lora |",  # the method
        "| train.lr | 0.001 |",  # hyper-parameters
        '- 2: {"train.lr": 0.002}',  # the PBT schedule
        "| accuracy | 0.75 | validation |",
        "| accuracy | 0.7 | test (read once) |",
        "git commit `abc123`",
        "ray 2.60.0",
        f"raytune-ft train {EXPERIMENT}",
    ):
        assert field in card, field
    assert "\ntune:" not in (classifier / EXPERIMENT).read_text()  # the search section is not part of this model


def test_eval_command_prints_the_summary_and_refuses_a_missing_file(classifier, tmp_path):
    data = write(tmp_path / "d.tsv", "text\tlabel", ["good\t1", "bad\t0"])
    runner = CliRunner()
    done = runner.invoke(app, ["eval", str(classifier), str(data), "--latency-requests", "2"])
    assert done.exit_code == 0, done.output
    assert "accuracy 50.0 %" in done.output
    missing = runner.invoke(app, ["eval", str(classifier), str(tmp_path / "nope.tsv")])
    assert missing.exit_code == 2 and "nope.tsv is not a file" in missing.output
    (tmp_path / "empty").mkdir()
    not_export = runner.invoke(app, ["eval", str(tmp_path / "empty"), str(data)])
    assert not_export.exit_code == 2 and "raytune_ft.json" in not_export.output


def test_eval_command_with_edge_cases_slices_and_json_prints_the_report(classifier, tmp_path):
    data = write(tmp_path / "d.tsv", "text\tlabel\tsource", ["good\t1\tweb", "bad\t0\tweb", "good film\t1\tprint"])
    edge = write(
        tmp_path / "edge.tsv", "text\texpected\tkind", ["not good\tnegative\tnegation", "GOOD\tpositive\tcase"]
    )
    args = ["eval", str(classifier), str(data), "--slice", "source", "--edge-cases", str(edge), "--json"]
    done = CliRunner().invoke(app, [*args, "--latency-requests", "2"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)  # the whole eval.json, and nothing else, on standard output
    assert report["metrics"]["rows"] == 3 and report["metrics"]["accuracy"] == pytest.approx(2 / 3)  # always "1"
    source = report["slices"]["source"]["slices"]
    assert source["web"]["accuracy"] == 0.5 and source["print"]["accuracy"] == 1.0
    edge_result = report["edge_cases"]
    assert edge_result["cases"] == 2 and edge_result["passed"] == 1
    assert [f["text"] for f in edge_result["failures"]] == ["not good"]
    assert report == json.loads((classifier / "eval" / "d" / "eval.json").read_text())


def test_the_html_report_shows_the_winners_card_and_reliability_diagram(classifier, tmp_path):
    from raytune_ft.report.html import markdown_html

    data = write(tmp_path / "d.tsv", "text\tlabel", ["good\t1", "bad\t0"])
    evaluate_export(classifier, EvalRequest(data=data, latency_requests=2))
    html = markdown_html((classifier / CARD).read_text())
    assert "base_model:" not in html  # the front matter is for the Hub, not the page
    assert "<h3>tiny</h3>" in html and "<table>" in html and "<td>finetune.method</td>" in html
    # every table has its header row and no separator row among its rows (the hand-made parser showed `---|---`)
    assert "<thead>\n<tr>\n<th>setting</th>\n<th>value</th>" in html and "---" not in html.split("<pre>")[0]
    assert "<pre>" in html and "raytune-ft train experiment.yaml" in html
    assert "<script>" not in markdown_html("# <script>alert(1)</script>")


def test_the_cards_fine_tuning_table_lists_only_the_settings_that_applied():
    from raytune_ft.modelcard import applied_settings

    full = {
        "finetune": {
            "method": "full",
            "lora": {"r": 8, "alpha": 16},
            "freeze": {"layers": 0},
            "l1": 0.0,
            "layerwise_lr_decay": 1.0,
        },
        "train": {"lr": 1e-4, "grad_accum": 1},
        "seed": 1,
    }
    assert applied_settings(full) == [["finetune.method", "full"], ["train.lr", 1e-4], ["seed", 1]]
    lora = {
        "finetune": {
            "method": "lora",
            "lora": {"r": 8, "alpha": 16},
            "freeze": {"layers": 2},
            "layerwise_lr_decay": 0.9,
        },
        "train": {"grad_accum": 4},
    }
    assert applied_settings(lora) == [
        ["finetune.method", "lora"],
        ["finetune.lora.r", 8],
        ["finetune.lora.alpha", 16],
        ["finetune.freeze.layers", 2],
        ["finetune.layerwise_lr_decay", 0.9],
        ["train.grad_accum", 4],
    ]


def test_an_extra_task_of_a_multi_task_export_is_evaluated_with_its_own_head_and_labels(classifier, tmp_path):
    from safetensors.torch import save_file

    from raytune_ft.modeling.multitask import HEADS_FILE

    # a "size" head that always says "long": weight 0, bias (0, 2) -> p(long) = e^2 / (1 + e^2)
    save_file({"size.weight": torch.zeros(2, 32), "size.bias": torch.tensor([0.0, 2.0])}, str(classifier / HEADS_FILE))
    meta = json.loads((classifier / "raytune_ft.json").read_text())
    task_data = {"path": "/data/size.tsv", "sha256": "5eed"}
    meta["tasks"] = [
        {"name": "sentiment", "task": "sequence-classification", "primary": True},
        {
            "name": "size",
            "task": "sequence-classification",
            "classes": ["short", "long"],
            "label_names": None,
            "loss_weight": 0.5,
            "data": task_data,
            "data_report": {"source": {"rows_read": 9}},
        },
    ]
    meta["experiment"]["tasks"] = [{"name": "size", "data": {"columns": {"text": "sentence", "label": "size"}}}]
    (classifier / "raytune_ft.json").write_text(json.dumps(meta))
    data = write(tmp_path / "size.tsv", "sentence\tsize", ["good\tshort", "a truly good film\tlong", "bad\tlong"])
    report = evaluate_export(classifier, EvalRequest(data=data, task="size", latency_requests=2))
    assert report["task_name"] == "size" and report["metrics"]["accuracy"] == pytest.approx(2 / 3)
    assert report["metrics"]["confusion_matrix"] == {"labels": ["short", "long"], "counts": [[0, 1], [0, 2]]}
    p_long = math.exp(2) / (1 + math.exp(2))
    assert report["calibration"]["ece"] == pytest.approx(abs(p_long - 2 / 3), abs=1e-5)
    assert (classifier / "eval" / "size-size" / "eval.json").is_file()
    card = (classifier / CARD).read_text()
    assert "| size | /data/size.tsv | 5eed | 9 |" in card  # each task's data file and hash
    assert "size (sequence-classification: short, long, loss weight 0.5)" in card
    with pytest.raises(ValueError, match="'topic' is not a classification task of this export \\(size\\)"):
        evaluate_export(classifier, EvalRequest(data=data, task="topic"))


def test_eval_measures_how_much_of_the_file_overlaps_the_training_split(classifier, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    record = json.loads((classifier / "raytune_ft.json").read_text())
    record["experiment"]["output_dir"] = str(tmp_path / "runs")
    record["experiment"]["data"]["path"] = str(tmp_path / "reviews.tsv")
    (classifier / "raytune_ft.json").write_text(json.dumps(record))
    train = tmp_path / "runs" / "tiny" / "data" / "train.parquet"
    train.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a good film about the sea", "the plot is a mess from the start"]}), train)
    data = tmp_path / "new.tsv"
    rows = ["a good film", "frankly the plot is a mess from the start", "nothing like it", "a new review"]
    data.write_text("text\tlabel\n" + "".join(f"{r}\t1\n" for r in rows))

    report = evaluate_export(classifier, EvalRequest(data=data), tmp_path / "out")
    seen = report["overlap_with_training"]
    assert seen["measured"] and seen["training_split"] == str(train) and seen["rows"] == 4
    assert seen["inside_a_training_text"] == {"rows": 1, "share": 0.25}
    assert seen["contains_a_training_text"] == {"rows": 1, "share": 0.25}
    assert seen["any"] == {"rows": 2, "share": 0.5} and seen["examples"] == rows[:2]
    assert "Overlap with the training split: 50.0 % of the rows" in (tmp_path / "out" / "eval.md").read_text()

    train.unlink()  # an export moved away from its run: not measured, and it says where it looked
    moved = evaluate_export(classifier, EvalRequest(data=data), tmp_path / "out")["overlap_with_training"]
    assert moved == {"measured": False, "reason": f"the export's training split is not at {train}"}
