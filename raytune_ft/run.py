"""`raytune-ft run`: the whole job, stage by stage, in one run directory.

OUTPUT_DIR/NAME/
  data/              splits and data_report.json                                           stage `data`
  tune/              the search: trials, trials.csv, winner/ (export + test_metrics.json)    stage `tune`
  (train/, export/   instead of tune/ when the experiment has no tune section: one training run)
  <export>/eval/     the winner judged on each file of the `eval` section (raytune-ft eval)  stage `eval`
  promotion.json     each threshold of the `promote` section, the value met and the verdict  stages `promote`, `bench`
  serve.json         the URL served, the export, the served-vs-in-process check              stage `serve`
  bench/serve.json   latency and throughput per bench level (bench/serve.png: the plot)      stage `bench`
  report.html        the HTML report: search, winner, test, serving, promotion                stage `report`
  run.json           each stage's state and seconds, and the summary

The winner is tested on the test split once, inside `tune`, right after the search picks it: splitting that
evaluation into a stage of its own would let a rerun read the test split again. A rerun skips a stage whose
outputs are complete (data by its fingerprint, tune by the winner's test metrics, serve by a live server of the
same export); promote, bench and report run again when a run reaches them.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft.config import ExperimentConfig
from raytune_ft.config.schema import CAUSAL_TASKS, GridDim
from raytune_ft.console import evaluation_line, tell
from raytune_ft.errors import RaytuneFtError
from raytune_ft.layout import METADATA, RUN_STATE, TEST_METRICS
from raytune_ft.modelcard import dotted_value

STAGES = ("data", "tune", "eval", "promote", "serve", "bench", "report")
CHECK_TEXTS = 32  # validation texts sent to the served app and run in-process, to prove they agree


class StageError(RaytuneFtError, RuntimeError):
    """A stage cannot run: an earlier stage's output is missing, or the served app disagrees with the export."""


class NotPromoted(RaytuneFtError, RuntimeError):
    """The winner missed a threshold of the `promote` section; it is not served (or no longer)."""

    exit_code = 3


@dataclass
class Run:
    cfg: ExperimentConfig
    root: Path
    log: Callable[[str], None]
    serve_overrides: list[str] = field(default_factory=list)
    stop_server: bool = False
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def export(self) -> Path:
        return self.root / "tune" / "winner" if self.cfg.tune is not None else self.root / "export"

    def write_state(self) -> None:
        tmp = self.root / "run.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2, default=str) + "\n")
        os.replace(tmp, self.root / RUN_STATE)


def select(start: str | None, until: str | None) -> list[str]:
    """The stages from START to UNTIL, in order; ValueError naming the unknown or reversed stage."""
    for name in (start, until):
        if name is not None and name not in STAGES:
            raise ValueError(f"unknown stage '{name}'; stages: {', '.join(STAGES)}")
    first = STAGES.index(start) if start else 0
    last = STAGES.index(until) if until else len(STAGES) - 1
    if first > last:
        raise ValueError(f"--from {start} comes after --until {until}")
    return list(STAGES[first : last + 1])


def run_pipeline(
    cfg: ExperimentConfig,
    stages: list[str],
    *,
    serve_overrides: list[str] | None = None,
    stop_server: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run STAGES in order; the summary (also in run.json). NotPromoted stops the run at the failed gate."""
    root = cfg.run_dir
    root.mkdir(parents=True, exist_ok=True)
    previous = json.loads((root / RUN_STATE).read_text()) if (root / RUN_STATE).is_file() else {}
    run = Run(cfg, root, log, list(serve_overrides or []), stop_server, {"stages": previous.get("stages", {})})
    steps = {
        "data": stage_data,
        "tune": stage_tune,
        "eval": stage_eval,
        "promote": stage_promote,
        "serve": stage_serve,
        "bench": stage_bench,
        "report": stage_report,
    }
    for number, name in enumerate(stages, 1):
        tell(log, f"[{number}/{len(stages)}] {name}", "stage", number=number, names=stages)
        started = time.monotonic()
        entry = {"state": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        run.state["stages"][name] = entry
        run.write_state()
        try:
            entry["state"] = steps[name](run) or "done"
        except NotPromoted:
            entry["state"] = "not promoted"
            raise
        except BaseException:
            entry["state"] = "failed"
            raise
        finally:
            entry["seconds"] = round(time.monotonic() - started, 1)
            run.state["summary"] = summary(run)
            run.write_state()
    return run.state["summary"]


def stage_data(run: Run) -> str:
    from raytune_ft.data import prepare_data

    prepared = prepare_data(run.cfg)
    report = prepared.report
    run.log(
        f"data: {report['source']['rows_used']} rows → "
        + ", ".join(f"{k} {v['rows']}" for k, v in report["splits"].items())
    )
    return "reused" if prepared.reused else "done"


def stage_tune(run: Run) -> str:
    _require(run, run.root / "data" / "manifest.json", "data")
    tested = run.export / TEST_METRICS
    if tested.is_file():
        run.log(f"tune: finished earlier; winner {run.export}")
        return "reused"
    if run.cfg.tune is None:
        return _train_once(run)
    from raytune_ft.tune import tune_experiment
    from raytune_ft.tune.runner import search_started

    resume = search_started(run.cfg, run.root / "tune")
    if resume:
        run.log("tune: continuing the interrupted search")
    tune_experiment(run.cfg, run.root / "tune", resume=resume, log=run.log, progress=TuneProgress(run.cfg, run.log))
    return "done"


def stage_eval(run: Run) -> str:
    """The winner on each file of the `eval` section: slices, calibration, edge cases, forgetting, latency. Its
    model card is rewritten with them. Never the test split: `tune` read that once."""
    settings = run.cfg.eval
    if settings is None or not settings.data:
        run.log("eval: no eval.data in the experiment; skipped")
        return "skipped"
    from raytune_ft.evaluation import EvalRequest, evaluate_export

    export = _require(run, run.export / METADATA, "tune").parent
    for data in settings.data:
        request = EvalRequest(
            data=Path(data),
            slice_columns=list(settings.slice_columns),
            edge_cases=Path(settings.edge_cases) if settings.edge_cases else None,
            retain=Path(settings.retain) if settings.retain else None,
            reference=settings.reference,
            bins=settings.bins,
            top_mistakes=settings.top_mistakes,
        )
        report = evaluate_export(export, request, export / "eval" / Path(data).stem)
        headline = report["metrics"].get("accuracy", report["metrics"].get("perplexity"))
        run.log(f"eval: {Path(data).name}: {headline:.4f} ({export / 'eval' / Path(data).stem})")
    return "done"


def _train_once(run: Run) -> str:
    from raytune_ft.train import train
    from raytune_ft.train.checkpoint import list_checkpoints, newest_whole_checkpoint
    from raytune_ft.tune.winner import test_metrics

    newest = newest_whole_checkpoint(list_checkpoints(run.root / "train"), log=run.log)
    resume = newest is not None and not newest[1].get("finished")  # an interrupted run continues where it stopped
    if resume:
        run.log(f"train: continuing the interrupted run from step {newest[1].get('step')}")
    result = train(run.cfg, resume=resume, log=run.log)
    assert result.export_dir is not None
    meta = json.loads((result.export_dir / METADATA).read_text())
    run.log("evaluating the export once on the test split")
    tested = test_metrics(result.export_dir, run.cfg, run.root / "data", meta.get("classes"))
    (result.export_dir / TEST_METRICS).write_text(json.dumps(tested, indent=2) + "\n")
    return "done"


class TuneProgress:
    """After each trial report: trials running and finished, best metric so far, share of steps done, ETA, and the
    report's own evaluation; one line, or a table of the trials for a live display. Also a line per trial that
    ends."""

    def __init__(self, cfg: ExperimentConfig, log: Callable[[str], None]) -> None:
        assert cfg.tune is not None
        self.metric, self.mode, self.log = cfg.tune.metric, cfg.tune.mode, log
        # Tune repeats the whole grid num_samples times
        grids = [len(dim.values) for dim in cfg.tune.search_space.values() if isinstance(dim, GridDim)]
        self.samples = cfg.tune.num_samples * math.prod(grids)
        self.best: tuple[float, str, Any] | None = None
        self.first: dict[str, tuple[float, int]] = {}  # trial -> (time, step) of its first report
        self.at: dict[str, int] = {}  # trial -> the step of its latest report
        self.trial_best: dict[str, float] = {}
        self.shown: dict[str, Any] = {}  # the trials view last sent: a trial's end updates its row

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; the console behind `log` holds a lock
        return {k: v for k, v in self.__dict__.items() if k != "log"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, log=print)

    def better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.mode == "max" else value < than)

    def __call__(self, trials: list[Any], result: dict[str, Any]) -> None:
        value = result.get(self.metric)
        trial_id = str(result.get("trial_id"))
        if isinstance(value, (int, float)):
            if self.better(value, self.best[0] if self.best else None):
                self.best = (float(value), trial_id, result.get("step"))
            if self.better(value, self.trial_best.get(trial_id)):
                self.trial_best[trial_id] = float(value)
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t.status == "RUNNING" for t in trials)
        line = f"tune: {finished}/{self.samples} trials finished, {running} running"
        if self.best is not None:
            line += f" | best {self.metric} {self.best[0]:.4f} (trial {self.best[1]}, step {self.best[2]})"
        done, total = self.steps(trials, result)
        if total:
            line += f" | {done / total:.0%} of steps"
            rate = self.rate(trials, trial_id, result.get("step"))
            if rate:
                line += f", ETA {(total - done) / rate / 60:.0f} min (at most: early stopping shortens it)"
        headline = line.removeprefix("tune: ")
        if isinstance(value, (int, float)):
            line += f" | trial {trial_id} at step {result.get('step')}: {self.metric} {value:.4f}"
        evaluation = f"trial {trial_id}: " + evaluation_line(result, int(result.get("total_steps") or 0))
        self.shown = {"rows": self.rows(trials, result), "metric": self.metric, "headline": headline}
        tell(self.log, line, "trials", **self.shown, live_line=evaluation)

    def rate(self, trials: list[Any], trial_id: str, step: Any) -> float:
        """Steps per second of the search: each unfinished trial's own rate since its first report, summed. Each
        trial's clock starts at its first report, after its start-up; one clock for all said "ETA 0 min" when
        parallel trials sent their first reports moments apart."""
        now = time.monotonic()
        if isinstance(step, int):
            self.first.setdefault(trial_id, (now, step))
            self.at[trial_id] = step
        rate = 0.0
        for t in trials:
            started, step_then = self.first.get(str(t.trial_id), (now, 0))
            if t.status not in ("TERMINATED", "ERROR") and now > started:
                rate += max(0, self.at[str(t.trial_id)] - step_then) / (now - started)
        return rate

    def ended(self, trial: Any, status: str) -> None:
        best = self.trial_best.get(str(trial.trial_id))
        line = f"tune: trial {trial.trial_id} {status}"
        line += f" (best {self.metric} {best:.4f})" if best is not None else ""
        if not self.shown:
            tell(self.log, line, "trial")
            return
        ended = "ERROR" if status.startswith("failed") else "TERMINATED"
        rows = [{**r, "status": ended} if r["trial"] == str(trial.trial_id) else r for r in self.shown["rows"]]
        finished = sum(r["status"] in ("TERMINATED", "ERROR") for r in rows)
        running = sum(r["status"] == "RUNNING" for r in rows)
        rest = self.shown["headline"].partition(" | ")[2]
        headline = f"{finished}/{self.samples} trials finished, {running} running" + (f" | {rest}" if rest else "")
        self.shown = {**self.shown, "rows": rows, "headline": headline}
        tell(self.log, line, "trials", **self.shown)

    def exploited(self, exploit: dict[str, Any]) -> None:
        """A PBT/PB2 exploit, as exploits.jsonl records it: who copied whom at which step, and what changed."""
        old, new = exploit.get("old_config") or {}, exploit.get("new_config") or {}
        changes = [f"{k} {_short(old.get(k))} -> {_short(v)}" for k, v in new.items() if old.get(k) != v]
        line = (
            f"tune: trial {exploit['trial']} exploited trial {exploit['donor']} at step {exploit['donor_step']}"
            f" ({exploit['bytes_moved'] / 1e6:.1f} MB restored in {exploit['seconds']:.1f} s)"
            + (f"; {', '.join(changes)}" if changes else "; same hyper-parameters")
        )
        tell(self.log, line, "trial")

    def rows(self, trials: list[Any], result: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for t in trials:
            last = result if t.trial_id == result.get("trial_id") else (t.last_result or {})
            rows.append(
                {
                    "trial": str(t.trial_id),
                    "status": t.status,
                    "step": last.get("step"),
                    "total": last.get("total_steps"),
                    "value": last.get(self.metric),
                    "best": self.trial_best.get(str(t.trial_id)),
                }
            )
        return rows

    def steps(self, trials: list[Any], result: dict[str, Any]) -> tuple[int, int]:
        per_trial = result.get("total_steps")
        if not isinstance(per_trial, (int, float)):
            return 0, 0
        done = 0
        for t in trials:
            # Tune calls back before it files this result under its trial
            last = result if t.trial_id == result.get("trial_id") else (t.last_result or {})
            # a stopped or finished trial will train no more: its remaining steps are spent
            done += per_trial if t.status in ("TERMINATED", "ERROR") else min(per_trial, last.get("step") or 0)
        return int(done), int(per_trial * self.samples)


def stage_promote(run: Run) -> str:
    tested = _require(run, run.export / TEST_METRICS, "tune")
    checks = quality_checks(run.cfg, json.loads(tested.read_text()))
    return _verdict(run, checks, "quality")


def quality_checks(cfg: ExperimentConfig, tested: dict[str, Any]) -> list[dict[str, Any]]:
    promote = cfg.promote
    checks = []
    for key, metric in (
        ("min_test_accuracy", "test_accuracy"),
        ("min_test_f1", "test_f1_macro"),
        ("max_test_perplexity", "test_perplexity"),
    ):
        threshold = getattr(promote, key)
        if threshold is not None:
            checks.append(_check(key, threshold, tested.get(metric)))
    if promote.min_worst_slice_f1 is not None:
        slices = tested.get("slices") or {}
        worst = slices.get("worst_slice")
        value = slices.get("slices", {}).get(worst, {}).get("f1_macro") if worst is not None else None
        checks.append({**_check("min_worst_slice_f1", promote.min_worst_slice_f1, value), "slice": worst})
    return checks


def latency_check(cfg: ExperimentConfig, bench: dict[str, Any]) -> list[dict[str, Any]]:
    promote = cfg.promote
    if promote.max_p95_latency_ms is None:
        return []
    level = next((lv for lv in bench["levels"] if lv.get("concurrency") == promote.latency_concurrency), {})
    check = _check("max_p95_latency_ms", promote.max_p95_latency_ms, level.get("p95_ms"))
    return [{**check, "concurrency": promote.latency_concurrency}]


def _check(key: str, threshold: float, value: Any) -> dict[str, Any]:
    if not isinstance(value, (int, float)):
        return {"threshold": key, "limit": threshold, "value": None, "passed": False}
    passed = value >= threshold if key.startswith("min_") else value <= threshold
    return {"threshold": key, "limit": threshold, "value": value, "passed": passed}


def _verdict(run: Run, checks: list[dict[str, Any]], kind: str) -> str:
    path = run.root / "promotion.json"
    earlier = json.loads(path.read_text()) if path.is_file() and kind == "latency" else {"checks": []}
    kept = [c for c in earlier["checks"] if c["threshold"] != "max_p95_latency_ms"]
    all_checks = kept + checks
    promoted = all(c["passed"] for c in all_checks)
    path.write_text(json.dumps({"promoted": promoted, "checks": all_checks}, indent=2) + "\n")
    for c in checks:
        shown = "missing" if c["value"] is None else f"{c['value']:.4g}"
        run.log(f"promote: {c['threshold']} {c['limit']:g}: {shown} → {'pass' if c['passed'] else 'FAIL'}")
    if not checks:
        run.log(f"promote: no {kind} thresholds set")
    failed = [c for c in checks if not c["passed"]]
    if failed:
        names = ", ".join(f"{c['threshold']} (limit {c['limit']:g}, got {c['value']})" for c in failed)
        raise NotPromoted(f"the winner {run.export} is not promoted: {names}; see {path}")
    return "passed" if checks else "no thresholds"


def stage_serve(run: Run) -> str:
    from raytune_ft.serve.deploy import api_key_of, local_servers, start_detached
    from raytune_ft.serve.model import export_config

    _require(run, run.export / TEST_METRICS, "tune")
    _require_promoted(run)
    cfg = export_config(run.export, _serving_overrides(run))
    same = [s for s in local_servers() if s.get("export") == str(run.export) and s["port"] == cfg.serve.port]
    state = "reused"
    if same and cfg.cluster.address is None:
        url = same[0]["url"]
        run.log(f"serve: already serving {run.export} at {url}")
    else:
        url = start_detached(run.export, cfg, _serving_overrides(run), log=run.log)
        state = "done"
    agreement = check_served(url, run.export, _validation_texts(run), api_key_of(cfg))
    (run.root / "serve.json").write_text(
        json.dumps({"url": url, "export": str(run.export), "check": agreement}, indent=2) + "\n"
    )
    run.log(f"serve: {url}; {agreement['agree']}/{agreement['texts']} served answers equal the export's in-process")
    if agreement["agree"] != agreement["texts"]:
        raise StageError(f"the served app at {url} disagrees with {run.export} on {agreement['disagree'][:3]}")
    return state


def _serving_overrides(run: Run) -> list[str]:
    address = run.cfg.cluster.address
    return [*run.serve_overrides, *([f"cluster.address={address}"] if address else [])]


def check_served(url: str, export: Path, texts: list[str], api_key: str | None) -> dict[str, Any]:
    """Send TEXTS to the app and run them through the export in this process: classification labels, or greedy
    completions, must be equal."""
    from raytune_ft.serve.model import LoadedModel

    local = LoadedModel(export, num_threads=1)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    disagree = []
    if local.task in CAUSAL_TASKS:
        texts = texts[:4]
        for text in texts:
            body = {"prompt": text, "max_tokens": 8, "temperature": 0}
            served = _post(f"{url}/v1/completions", body, headers)["choices"][0]["text"]
            if served != local.complete(text, 8, 0.0, 1.0, None)["text"]:
                disagree.append(text)
    else:
        served = _post(f"{url}/v1/classify", {"text": texts}, headers)["predictions"]
        for text, got, want in zip(texts, served, local.classify(texts), strict=True):
            if got["label_id"] != want["label_id"]:
                disagree.append(text)
    return {"texts": len(texts), "agree": len(texts) - len(disagree), "disagree": disagree}


def _post(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:500].decode(errors="replace")
        raise StageError(f"the served app answered {url} with {exc.code}: {detail}") from None
    except OSError as exc:
        raise StageError(f"the served app did not answer {url}: {exc}") from None


def _validation_texts(run: Run, limit: int = CHECK_TEXTS) -> list[str]:
    """Texts from the validation split (never the test split) in their order; realistic requests."""
    from raytune_ft.data import load_split

    table = load_split(run.root / "data", "validation")
    return [t for t in table.column("text").to_pylist()[:limit] if t.strip()] or ["a plain test sentence ."]


def stage_bench(run: Run) -> str:
    from raytune_ft.bench.generation import bench_served
    from raytune_ft.bench.serve import plot
    from raytune_ft.serve.deploy import api_key_of, stop
    from raytune_ft.serve.model import export_config

    served = json.loads(_require(run, run.root / "serve.json", "serve").read_text())
    cfg = export_config(run.export, _serving_overrides(run))
    result = bench_served(
        served["url"],
        concurrency=run.cfg.bench.concurrency,
        rates=[],
        requests=run.cfg.bench.requests,
        warmup=run.cfg.bench.warmup_requests,
        api_key=api_key_of(cfg),
        texts=_validation_texts(run, 1000),
        model=run.export,
        baseline_noop=False,
        address=cfg.cluster.address,
        log=run.log,
    )
    out = run.root / "bench"
    out.mkdir(exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "serve.png")
    try:
        _verdict(run, latency_check(run.cfg, result), "latency")
    except NotPromoted:
        stop(cfg.cluster.address, run.log)  # too slow to keep serving
        raise
    if run.stop_server:
        stop(cfg.cluster.address, run.log)
    return "done"


def stage_report(run: Run) -> str:
    from raytune_ft.report import write_report

    search = run.root / "tune" if run.cfg.tune is not None else run.root
    path = write_report(search, run.root / "report.html", extras=run.root)
    run.log(f"report: {path}")
    return "done"


def _require(run: Run, path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageError(f"{path} is missing: run the '{stage}' stage first (`raytune-ft run ... --from {stage}`)")
    return path


def _require_promoted(run: Run) -> None:
    path = run.root / "promotion.json"
    if not path.is_file():
        return
    # a failed latency check is measured again by this serve's benchmark; a failed quality check stands
    failed = [c for c in json.loads(path.read_text())["checks"] if not c["passed"] and "latency" not in c["threshold"]]
    if failed:
        raise NotPromoted(f"the winner {run.export} was not promoted (see {path}); it is not served")


def summary(run: Run) -> dict[str, Any]:
    """What the run has produced so far: winner, its metrics, serving latency, verdict, where things are."""
    out: dict[str, Any] = {"run_dir": str(run.root)}
    meta_path = run.export / METADATA
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        out["export"] = str(run.export)
        out["validation"] = {
            k: v for k, v in (meta.get("metrics") or {}).items() if k.startswith("eval_") and "/" not in k
        }
        out["hyperparameters"] = _winner_config(run)
    tested = run.export / TEST_METRICS
    if tested.is_file():
        found = json.loads(tested.read_text())
        out["test"] = {k: v for k, v in found.items() if k.startswith("test_") and "/" not in k}
        for value, scores in (found.get("gen_slices") or {}).items():  # chat: answers per kind of conversation
            out["test"][f"test_slice/{value}/gen_exact"] = scores.get("exact")
    evaluated = sorted((run.export / "eval").glob("*/eval.json")) if meta_path.is_file() else []
    if evaluated:
        out["eval"] = {p.parent.name: _eval_headline(json.loads(p.read_text())) for p in evaluated}
    for name, key in (("promotion.json", "promotion"), ("serve.json", "serve")):
        if (run.root / name).is_file():
            out[key] = json.loads((run.root / name).read_text())
    bench = run.root / "bench" / "serve.json"
    if bench.is_file():
        levels = json.loads(bench.read_text())["levels"]
        # generation levels add time to first token and output tokens/s
        keys = ("concurrency", "rps", "p50_ms", "p95_ms", "p99_ms", "errors", "ttft_p50_ms", "output_tokens_per_s")
        out["latency"] = [{k: lv.get(k) for k in keys if k in lv} for lv in levels]
    if (run.root / "report.html").is_file():
        out["report"] = str(run.root / "report.html")
    return out


def _eval_headline(report: dict[str, Any]) -> dict[str, Any]:
    m = report.get("metrics", {})
    out = {k: m[k] for k in ("accuracy", "f1_macro", "perplexity") if k in m}
    if "calibration" in report:
        out["ece"] = report["calibration"]["ece"]
    if report.get("edge_cases"):
        out["edge_case_pass_rate"] = report["edge_cases"]["pass_rate"]
    if report.get("forgetting"):
        out["forgetting_worse_by"] = report["forgetting"]["worse_by"]
    return out


def _winner_config(run: Run) -> dict[str, Any]:
    """The searched keys as the winner was trained with them (its export records the experiment it came from)."""
    if run.cfg.tune is None:
        return {}
    experiment = json.loads((run.export / METADATA).read_text()).get("experiment") or {}
    return {key: dotted_value(experiment, key) for key in run.cfg.tune.search_space}


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
