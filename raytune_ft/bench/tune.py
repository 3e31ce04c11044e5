"""`raytune-ft bench tune`: what Ray Tune costs around the engine, and what each search algorithm finds.

Overhead: trials started per minute and the gap between one trial's last report and the next trial's first,
first with a trivial trainable (Tune alone), then with the real engine on the experiment's model (a Ray Train
run per trial). The engine run also samples the driver's RSS and the machine's used memory after every trial, so
growth from trial to trial shows. Comparison: the experiment searched by each algorithm for several seeds with
the same number of trials and the same steps per trial (equal compute), best validation metric mean and spread.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytune_ft.config import ExperimentConfig
from raytune_ft.config.algorithms import ALGORITHMS

TRIVIAL_REPORTS = 3
DEFAULT_SPACE = {"train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3}}


def _trivial_trial(config: dict[str, Any]) -> None:
    from ray import tune

    for i in range(TRIVIAL_REPORTS):
        tune.report({"score": config["x"] * (i + 1), "reported_at": time.time()})


def gaps(trials: list[list[float]]) -> list[float]:
    """Seconds from each trial's last report to the next trial's first, trials ordered by their first report."""
    ordered = sorted((t for t in trials if t), key=lambda t: t[0])
    return [b[0] - a[-1] for a, b in zip(ordered, ordered[1:], strict=False)]


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _rate(trials: list[list[float]], wall: float) -> float:
    return 60.0 * len([t for t in trials if t]) / wall if wall > 0 else 0.0


def bench_trivial(trials: int, storage: Path, concurrent: int) -> dict[str, Any]:
    """Tune alone: `trials` trials of a function that reports three times, one at a time (the gap) and packed."""
    from ray import tune

    out: dict[str, Any] = {}
    for label, limit in (("sequential", 1), ("packed", concurrent)):
        tuner = tune.Tuner(
            tune.with_resources(_trivial_trial, {"CPU": 1}),
            param_space={"x": tune.uniform(0, 1)},
            tune_config=tune.TuneConfig(num_samples=trials, max_concurrent_trials=limit, reuse_actors=False),
            run_config=tune.RunConfig(name=f"trivial-{label}", storage_path=str(storage), verbose=0),
        )
        started = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - started
        times = [list(r.metrics_dataframe["reported_at"]) for r in results if r.metrics_dataframe is not None]
        out[label] = {
            "trials": trials,
            "max_concurrent": limit,
            "wall_s": wall,
            "trials_per_min": _rate(times, wall),
            "gap_s": summary(gaps(times)) if limit == 1 else None,
        }
    return out


class MemorySampler:
    """The driver's RSS and the machine's used memory, once a second, on a thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raytune-ft-memory", daemon=True)

    def _sample(self) -> None:
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
        self.samples.append((time.time(), rss, psutil.virtual_memory().used / 2**20))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(1.0)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the search is over and every trial's workers are gone: a sample after the last trial

    def at(self, when: float) -> tuple[float, float] | None:
        """The first sample at or after `when` (driver RSS MB, used MB); past the end, the sample taken at the end.
        (A search that ends within a second or two of its last trial's last report has no periodic sample after
        it: its last trial's memory used to be missing.)"""
        later = [s for s in self.samples if s[0] >= when] or self.samples[-1:]
        return (later[0][1], later[0][2]) if later else None


def engine_experiment(cfg: ExperimentConfig, trials: int, steps: int, name: str, out_dir: Path) -> ExperimentConfig:
    """The experiment as a sequential random search of `trials` short trials (`steps` steps, two evaluations),
    its data and runs under OUT_DIR."""
    data = cfg.model_dump(mode="json", by_alias=True)
    every = max(1, steps // 2)
    data["train"].update(max_steps=steps, eval_every_steps=every, checkpoint_every_steps=every, early_stopping=None)
    space = (data.get("tune") or {}).get("search_space") or DEFAULT_SPACE
    data["tune"] = {
        "algorithm": "random",
        "metric": "eval_loss",
        "mode": "min",
        "num_samples": trials,
        "max_concurrent_trials": 1,
        "keep_checkpoints": 1,
        "mlflow": False,
        "search_space": space,
    }
    data["name"] = name
    data["output_dir"] = str(out_dir)
    return ExperimentConfig.model_validate(data)


def bench_engine(cfg: ExperimentConfig, trials: int, steps: int, run_dir: Path, log: Callable) -> dict[str, Any]:
    """The real engine: one trial after another; start rate, gaps, and memory after each trial."""
    import json

    from raytune_ft.tune import tune_experiment

    experiment = engine_experiment(cfg, trials, steps, f"{cfg.name}-bench-tune", run_dir / "experiment")
    started = time.perf_counter()
    with MemorySampler() as memory:
        tune_experiment(experiment, run_dir, log=log)
    wall = time.perf_counter() - started
    per_trial = []
    for folder in sorted((run_dir / "trials").glob("run_trial_*")):
        rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines() if line.strip()]
        if not rows:
            continue
        times = [r["reported_at"] for r in rows if "reported_at" in r]
        after = memory.at(times[-1] + 2.0) if times else None  # once the trial's workers are gone
        per_trial.append(
            {
                "trial": rows[-1].get("trial_id"),
                "reports": times,
                "first_report_s": rows[0].get("time_total_s"),
                "worker_peak_rss_mb": max((r.get("peak_rss_mb") or 0) for r in rows),
                "driver_rss_mb_after": after[0] if after else None,
                "used_mb_after": after[1] if after else None,
            }
        )
    per_trial.sort(key=lambda t: t["reports"][0] if t["reports"] else 0)
    times = [t["reports"] for t in per_trial]
    used = [t["used_mb_after"] for t in per_trial if t["used_mb_after"] is not None]
    driver = [t["driver_rss_mb_after"] for t in per_trial if t["driver_rss_mb_after"] is not None]
    workers = [t["worker_peak_rss_mb"] for t in per_trial]
    return {
        "trials": len(per_trial),
        "steps_per_trial": steps,
        "wall_s": wall,
        "trials_per_min": _rate(times, wall),
        "gap_s": summary(gaps(times)),
        "first_report_s": summary([t["first_report_s"] for t in per_trial if t["first_report_s"] is not None]),
        "memory": {
            "worker_peak_rss_mb": {"first": workers[0], "last": workers[-1], "max": max(workers)} if workers else None,
            "driver_rss_mb": {"first": driver[0], "last": driver[-1], "growth_per_trial": _slope(driver)}
            if driver
            else None,
            "used_mb": {"first": used[0], "last": used[-1], "growth_per_trial": _slope(used)} if used else None,
        },
        "per_trial": [{k: v for k, v in t.items() if k != "reports"} for t in per_trial],
    }


def _slope(values: list[float]) -> float | None:
    """Least-squares MB per trial, over the trials after the first (the first pays one-off imports and caches)."""
    ys = values[1:] if len(values) > 2 else values
    if len(ys) < 2:
        return None
    xs = list(range(len(ys)))
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def compare_experiment(
    cfg: ExperimentConfig, algorithm: str, seed: int, samples: int, out_dir: Path
) -> ExperimentConfig:
    """The experiment searched by `algorithm` with `samples` trials: the same steps per trial for every algorithm.
    Its data and runs go under OUT_DIR, so a benchmark never meets an earlier one's write-once test split."""
    if cfg.tune is None or not cfg.tune.search_space:
        raise ValueError("bench tune --compare needs the experiment's tune.search_space")
    data = cfg.model_dump(mode="json", by_alias=True)
    tune = data["tune"]
    tune.update(algorithm=algorithm, num_samples=samples, mlflow=False)
    kind = ALGORITHMS[algorithm]
    if kind.perturbs:
        tune["scheduler"] = "none"
        if tune.get("perturbation_interval") is None:
            every = data["train"].get("eval_every_steps") or data["train"].get("checkpoint_every_steps")
            tune["perturbation_interval"] = every
    elif kind.scheduler:
        tune["scheduler"] = kind.scheduler
    data["seed"] = seed
    data["name"] = f"{cfg.name}-{algorithm}-s{seed}"
    data["output_dir"] = str(out_dir)
    return ExperimentConfig.model_validate(data)


def steps_trained(storage: str) -> int:
    """Optimizer steps a search really trained, all trials together (from each trial's result.json): a PBT trial
    that exploits goes on from the donor's step, so the steps it skipped were not trained by it."""
    from pyarrow.fs import FileSelector, FileType

    from raytune_ft.tune.runner import EXPERIMENT
    from raytune_ft.tune.trial import filesystem_of

    fs, root = filesystem_of(f"{storage}/{EXPERIMENT}")
    total = 0
    for info in fs.get_file_info(FileSelector(root, allow_not_found=True)):
        if info.type != FileType.Directory or not info.base_name.startswith("run_trial_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/result.json") as stream:
                lines = stream.readall().decode().splitlines()
        except FileNotFoundError:
            continue
        previous = 0
        for report in map(json.loads, filter(None, lines)):
            if "step" in report:
                total += max(0, report["step"] - report.get("resumed_step", previous))
                previous = report["step"]
    return total


def bench_compare(
    cfg: ExperimentConfig, algorithms: list[str], seeds: list[int], samples: int, out_dir: Path, log: Callable
) -> dict[str, Any]:
    from raytune_ft.tune import tune_experiment
    from raytune_ft.tune.runner import storage_of

    assert cfg.tune is not None
    metric = cfg.tune.metric
    runs: dict[str, list[dict[str, Any]]] = {}
    for algorithm in algorithms:
        for seed in seeds:
            experiment = compare_experiment(cfg, algorithm, seed, samples, out_dir / "experiments")
            log(f"compare: {algorithm} seed {seed} ({samples} trials)")
            started = time.perf_counter()
            found = tune_experiment(experiment, out_dir / f"{algorithm}-s{seed}", log=log)
            runs.setdefault(algorithm, []).append(
                {
                    "seed": seed,
                    "best": found.best_metrics.get(metric),
                    "steps_trained": steps_trained(storage_of(experiment, found.run_dir)),
                    "best_config": found.best_config,
                    "wall_s": time.perf_counter() - started,
                    "test": {k: v for k, v in found.test_metrics.items() if isinstance(v, float)},
                }
            )
    return {
        "metric": metric,
        "mode": cfg.tune.mode,
        "samples": samples,
        "steps_per_trial": cfg.train.max_steps,
        "algorithms": {
            name: {"best": summary([r["best"] for r in rows if r["best"] is not None]), "runs": rows}
            for name, rows in runs.items()
        },
    }
