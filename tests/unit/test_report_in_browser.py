"""The HTML report as a reader sees it: a small search's report.html, with the winner's model card and an evaluation,
loaded in headless Chromium (Debian's package, which `make test` installs; tests/integration/browser.py) and read
back from the rendered page. No Ray: a few seconds. The real PBT run's report gets the same checks in
tests/integration/test_tune.py."""

from __future__ import annotations

import json

from integration.browser import rendered
from test_report import PNG, optuna_run

from raytune_ft.evaluation import scoring
from raytune_ft.evaluation.runner import write_report as write_evaluation
from raytune_ft.layout import METADATA
from raytune_ft.modelcard import write_model_card
from raytune_ft.report import write_report


def winner_with_card_and_evaluation(run):
    """The winner of optuna_run made a full fine-tuning export with its model card (LoRA settings in the
    experiment that did not apply), a data file whose name holds a `|`, and one evaluation with its diagram."""
    winner = run / "winner"
    meta = json.loads((winner / METADATA).read_text())
    meta["experiment"].update(
        finetune={"method": "full", "lora": {"r": 8, "alpha": 16}, "freeze": {"layers": 0}, "layerwise_lr_decay": 1.0},
        seed=7,
    )
    meta["experiment"]["train"].update(grad_accum=1, batch_size=8)
    meta["provenance"] = {"base_model": "tiny-bert", "data": {"path": "/data/reviews|v2.tsv", "sha256": "f00d"}}
    meta["task"] = "sequence-classification"
    (winner / METADATA).write_text(json.dumps(meta))
    probs = [[0.2, 0.8], [0.3, 0.7], [0.9, 0.1], [0.6, 0.4]]
    labels = [1, 0, 0, 1]
    preds = [max(range(2), key=p.__getitem__) for p in probs]
    names = ["neg", "pos"]
    report = {
        "metrics": scoring.standard_metrics(preds, labels, names),
        "calibration": scoring.calibration(probs, labels),
        "slices": scoring.slices_by({"source": ["web", "web", "print", "print"]}, preds, labels, names),
        "export": str(winner),
        "data": "/data/held-out.tsv",
    }
    write_evaluation(report, winner / "eval" / "held-out")
    write_model_card(winner)


def test_the_report_renders_every_table_and_figure_in_chromium(tmp_path):
    run = optuna_run(tmp_path)
    winner_with_card_and_evaluation(run)
    page = rendered(write_report(run))

    # every figure decoded and shown: learning curves, search view, confusion matrix, the evaluation's reliability
    alts = {"learning curves", "search view", "confusion matrix", "reliability diagram (held-out)"}
    assert sorted(i["alt"] for i in page["images"]) == sorted(alts), page["images"]
    assert all(i["width"] > 0 and i["height"] > 0 and i["shown"] > 0 for i in page["images"]), page["images"]
    assert (run / "winner" / "eval" / "held-out" / "reliability.png").read_bytes().startswith(PNG)

    # every table's rows are real rows, as wide as its header: no |---|---| separator shown as a row
    tables = {t["heading"]: t["rows"] for t in page["tables"]}
    for heading, rows in tables.items():
        assert all(set("".join(row)) - set("-:| ") for row in rows), heading
        assert {len(row) for row in rows} == {len(rows[0])}, heading
    # the model card's tables, rendered from its Markdown: a full fine-tuning shows no LoRA setting
    settings = tables["Fine-tuning"]
    assert settings[0] == ["setting", "value"] and ["finetune.method", "full"] in settings
    assert ["seed", "7"] in settings and ["train.batch_size", "8"] in settings
    assert not [row for row in settings if row[0].startswith("finetune.lora.") or row[0] == "train.grad_accum"]
    data = tables["Data"]
    assert data[0][:3] == ["task", "file", "sha256"] and data[1][1:3] == ["/data/reviews|v2.tsv", "f00d"]
    assert ["accuracy", "0.8125", "test (read once)"] in tables["Metrics"]
    assert {"Config", "Trials", "Search space", "Test metrics (test split, read once)"} <= set(tables)
