"""`raytune-ft run`'s own decisions, without Ray: which stages run, and the promotion gate's verdict."""

from __future__ import annotations

import json

import pytest

from raytune_ft.config import load_config
from raytune_ft.run import STAGES, NotPromoted, Run, _verdict, latency_check, quality_checks, select


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "d.tsv").write_text("text\tlabel\na\t0\n")
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: gate\nmodel: {name_or_path: ./model, task: sequence-classification}\n"
        "data: {path: d.tsv, columns: {slice: source}}\n"
        "promote: {min_test_accuracy: 0.9, min_test_f1: 0.8, min_worst_slice_f1: 0.7, max_p95_latency_ms: 50}\n"
    )
    return load_config(path)


def test_stages_run_in_order_between_from_and_until():
    assert select(None, None) == list(STAGES)
    assert select("serve", None) == ["serve", "bench", "report"]
    assert select(None, "tune") == ["data", "tune"]
    assert select("eval", "promote") == ["eval", "promote"]
    assert select("bench", "bench") == ["bench"]
    with pytest.raises(ValueError, match="unknown stage 'export'"):
        select("export", None)
    with pytest.raises(ValueError, match="--from report comes after --until data"):
        select("report", "data")


def test_quality_gate_reads_each_threshold_from_the_test_metrics(cfg):
    tested = {
        "test_accuracy": 0.91,
        "test_f1_macro": 0.79,
        "slices": {"slices": {"web": {"f1_macro": 0.9}, "mail": {"f1_macro": 0.65}}, "worst_slice": "mail"},
    }
    checks = {c["threshold"]: c for c in quality_checks(cfg, tested)}
    assert checks["min_test_accuracy"]["passed"] and checks["min_test_accuracy"]["value"] == 0.91
    assert not checks["min_test_f1"]["passed"]
    assert not checks["min_worst_slice_f1"]["passed"] and checks["min_worst_slice_f1"]["slice"] == "mail"
    # a metric the run did not produce fails its threshold instead of passing silently
    missing = {c["threshold"]: c for c in quality_checks(cfg, {"test_accuracy": 0.95})}
    assert missing["min_test_f1"] == {"threshold": "min_test_f1", "limit": 0.8, "value": None, "passed": False}


def test_latency_gate_reads_p95_at_its_bench_level(cfg):
    bench = {"levels": [{"concurrency": 1, "p95_ms": 42.0}, {"concurrency": 8, "p95_ms": 95.0}]}
    [check] = latency_check(cfg, bench)
    assert check["passed"] and check["value"] == 42.0 and check["concurrency"] == 1
    [slow] = latency_check(cfg, {"levels": [{"concurrency": 1, "p95_ms": 61.0}]})
    assert not slow["passed"]


def test_verdict_is_written_and_a_miss_names_the_threshold(cfg, tmp_path):
    run = Run(cfg, tmp_path, log=lambda m: None)
    quality = quality_checks(cfg, {"test_accuracy": 0.95, "test_f1_macro": 0.9, "slices": {}})
    with pytest.raises(NotPromoted, match=r"min_worst_slice_f1 \(limit 0.7, got None\)"):
        _verdict(run, quality, "quality")
    saved = json.loads((tmp_path / "promotion.json").read_text())
    assert saved["promoted"] is False and [c["passed"] for c in saved["checks"]] == [True, True, False]

    passing = [c for c in quality if c["passed"]]
    assert _verdict(run, passing, "quality") == "passed"
    # the latency verdict is added to the quality one, and replaces an earlier latency verdict
    _verdict(run, latency_check(cfg, {"levels": [{"concurrency": 1, "p95_ms": 10.0}]}), "latency")
    with pytest.raises(NotPromoted, match="max_p95_latency_ms"):
        _verdict(run, latency_check(cfg, {"levels": [{"concurrency": 1, "p95_ms": 80.0}]}), "latency")
    saved = json.loads((tmp_path / "promotion.json").read_text())
    assert [c["threshold"] for c in saved["checks"]] == ["min_test_accuracy", "min_test_f1", "max_p95_latency_ms"]
    assert saved["promoted"] is False


def test_tune_progress_counts_every_trial_of_a_grid(tmp_path, cfg):
    """Two grid values, num_samples 2: four trials of 10 steps; one finished, one at step 5."""
    from types import SimpleNamespace

    from raytune_ft.run import TuneProgress

    path = tmp_path / "exp.yaml"
    path.write_text(
        path.read_text() + "tune:\n  num_samples: 2\n  metric: eval_loss\n  mode: min\n"
        "  search_space: {train.lr: {type: grid, values: [0.001, 0.0001]}}\n"
    )
    lines: list[str] = []
    progress = TuneProgress(load_config(path), lines.append)
    trials = [
        SimpleNamespace(trial_id="a", status="TERMINATED", last_result={"step": 10}),
        SimpleNamespace(trial_id="b", status="RUNNING", last_result={}),
    ]
    progress(trials, {"trial_id": "b", "step": 5, "total_steps": 10, "eval_loss": 0.5})
    assert lines[-1].startswith("tune: 1/4 trials finished, 1 running")
    assert "| 38% of steps" in lines[-1]  # 15 of 40


def test_tune_progress_eta_counts_each_trial_from_its_own_first_report(tmp_path, cfg, monkeypatch):
    """Two trials of 100 steps, each at 1 step/s once started: their first reports, 2 s apart, give no ETA (one
    clock for both made it "ETA 0 min"); 50 s later each has done 50 more steps: about 2 steps/s, 50 steps left."""
    from types import SimpleNamespace

    import raytune_ft.run as run_module
    from raytune_ft.run import TuneProgress

    path = tmp_path / "exp.yaml"
    path.write_text(
        path.read_text() + "tune:\n  num_samples: 2\n  metric: eval_loss\n  mode: min\n"
        "  search_space: {train.lr: {type: loguniform, low: 0.0001, high: 0.01}}\n"
    )
    clock = [1000.0]
    monkeypatch.setattr(run_module.time, "monotonic", lambda: clock[0])
    lines: list[str] = []
    progress = TuneProgress(load_config(path), lines.append)
    trials = [SimpleNamespace(trial_id=t, status="RUNNING", last_result={}) for t in ("a", "b")]

    def report(trial: str, step: int) -> str:
        progress(trials, {"trial_id": trial, "step": step, "total_steps": 100, "eval_loss": 0.5})
        next(t for t in trials if t.trial_id == trial).last_result = {"step": step}
        return lines[-1]

    assert "ETA" not in report("a", 25)
    clock[0] += 2
    assert "ETA" not in report("b", 25)
    clock[0] += 48
    report("a", 75)  # a: 50 steps in 50 s; b: none yet since its first report
    clock[0] += 2
    assert "| 75% of steps, ETA 0 min" in report("b", 75)  # 50 left at about 2 steps/s
    assert abs(progress.rate(trials, "b", 75) - (50 / 52 + 50 / 50)) < 1e-9  # each over its time since its start
