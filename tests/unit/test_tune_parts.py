"""Search parts that need no running Ray: domains, trial configs, algorithm checks, packing, retention."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from test_train_parts import cfg_with

from raytune_ft.config import ConfigError
from raytune_ft.tune.runner import ExperimentLog, concurrent_trials
from raytune_ft.tune.search import MissingExtraError, require_extra, scheduler, search_algorithm, tuner_space
from raytune_ft.tune.space import param_space, trial_experiment

SPACE = {
    "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
    "finetune.lora.r": {"type": "int", "low": 4, "high": 16},
    "train.weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1},
    "train.batch_size": {"type": "choice", "values": [8, 16]},
}


def test_search_space_becomes_tune_domains_with_both_int_ends_included(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = cfg_with(tmp_path, tune={"search_space": SPACE})
    space = param_space(cfg.tune.search_space)
    assert isinstance(space["train.lr"], Float) and space["train.lr"].lower == 1e-5
    assert isinstance(space["finetune.lora.r"], Integer) and space["finetune.lora.r"].upper == 17
    assert isinstance(space["train.batch_size"], Categorical)
    grid = cfg_with(tmp_path, tune={"algorithm": "grid", "search_space": {"train.lr": {"type": "grid", "values": [1]}}})
    assert param_space(grid.tune.search_space)["train.lr"] == {"grid_search": [1]}


def test_trial_experiment_sets_sampled_values_and_validates(tmp_path):
    import numpy as np

    base = cfg_with(tmp_path, finetune={"method": "lora"}).model_dump(mode="json", by_alias=True)
    cfg = trial_experiment(base, {"train.lr": np.float64(3e-4), "finetune.lora.r": np.int64(4)}, "x-1")
    assert cfg.train.lr == 3e-4 and cfg.finetune.lora.r == 4 and cfg.name == "x-1"
    ewc = trial_experiment(base, {"finetune.ewc.lambda": 2.5}, "x-2")  # a section absent from the base
    assert ewc.finetune.ewc.strength == 2.5
    with pytest.raises(Exception, match="lr"):
        trial_experiment(base, {"train.lr": -1.0}, "x-3")


def test_pbt_refuses_keys_that_change_the_checkpoint_shape(tmp_path):
    with pytest.raises(ConfigError) as err:
        cfg_with(
            tmp_path,
            finetune={"method": "lora"},
            tune={"algorithm": "pbt", "perturbation_interval": 10, "search_space": SPACE, "scheduler": "asha"},
        )
    text = str(err.value)
    assert "tune.search_space.finetune.lora.r" in text and "would not fit the donor's checkpoint" in text
    assert "tune.search_space.train.lr" not in text  # learning rate is perturbable
    assert "pbt is itself the scheduler" in text


def test_algorithms_and_schedulers(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, PopulationBasedTraining

    def settings(**tune):
        return cfg_with(tmp_path, tune={"search_space": {"train.lr": SPACE["train.lr"]}, **tune}).tune

    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.variant_generator import generate_variants

    def first_points(algorithm: str, seed: int) -> list[float]:
        searcher = search_algorithm(settings(algorithm=algorithm, perturbation_interval=20), seed)
        assert isinstance(searcher, BasicVariantGenerator)
        space = tuner_space(settings())
        return [
            v["train.lr"]
            for _ in range(3)
            for _, v in generate_variants(space, random_state=searcher._random_state.rng)
        ]

    # random search (and PBT's first population) samples with the experiment's seed: a rerun starts the same
    assert first_points("random", 7) == first_points("pbt", 7) != first_points("random", 8)
    # Tune ignores max_concurrent_trials beside a variant generator: the generator carries the limit
    assert search_algorithm(settings(), 7, max_concurrent=1).max_concurrent == 1
    assert isinstance(scheduler(settings(), 5), FIFOScheduler)
    assert isinstance(scheduler(settings(scheduler="asha"), 5), ASHAScheduler)
    assert isinstance(scheduler(settings(scheduler="median"), 5), MedianStoppingRule)
    pbt = scheduler(settings(algorithm="pbt", perturbation_interval=20), 5)
    assert isinstance(pbt, PopulationBasedTraining) and pbt._perturbation_interval == 20
    assert pbt._time_attr == "step"  # perturbation interval counts optimizer steps
    assert pbt._perturbation_factors == (1.2, 0.8)  # Ray's own default, unless the experiment names others
    doubling = scheduler(settings(algorithm="pbt", perturbation_interval=20, perturbation_factors=[2, 2]), 5)
    assert doubling._perturbation_factors == (2.0, 2.0)
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(search_algorithm(settings(algorithm="optuna"), 0), OptunaSearch)


def test_missing_search_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "hpbandster" else real(name))
    with pytest.raises(MissingExtraError, match=r"pip install 'raytune_ft\[bohb\]'"):
        require_extra("bohb")
    require_extra("random")


def test_trials_pack_by_the_cpus_and_gpus_a_trial_holds(tmp_path):
    cfg = cfg_with(tmp_path, scaling={"num_workers": 2, "cpus_per_worker": 1})
    assert concurrent_trials(cfg, {"CPU": 8}) == 4
    assert concurrent_trials(cfg, {"CPU": 1}) == 1  # always at least one
    gpu = cfg_with(tmp_path, scaling={"num_workers": 2, "use_gpu": True, "gpus_per_worker": 1, "cpus_per_worker": 2})
    assert concurrent_trials(gpu, {"CPU": 64, "GPU": 4}) == 2
    # a cluster joined by address may autoscale: no cap from what it holds now
    joined = cfg_with(tmp_path, scaling={"num_workers": 2}, cluster={"address": "auto"})
    assert concurrent_trials(joined, {"CPU": 0}) is None


def _trial(path: Path, status: str = "RUNNING", checkpoint: str | None = None):
    from pyarrow.fs import LocalFileSystem

    return SimpleNamespace(
        path=str(path),
        status=status,
        checkpoint=SimpleNamespace(path=checkpoint) if checkpoint else None,
        storage=SimpleNamespace(storage_filesystem=LocalFileSystem()),  # what Ray gives a trial on local disk
    )


def test_retention_keeps_newest_best_and_every_checkpoint_an_exploit_may_need(tmp_path):
    a, b = tmp_path / "trial_a", tmp_path / "trial_b"
    for trial in (a, b):
        for i in range(5):
            (trial / f"checkpoint_00000{i}").mkdir(parents=True)
    pbt = SimpleNamespace(
        _trial_state={"b": SimpleNamespace(last_checkpoint=SimpleNamespace(path=str(b / "checkpoint_000001")))}
    )
    log = ExperimentLog(tmp_path, keep=1, metric="eval_loss", mode="min", pbt=pbt)
    log.scores = {str(a / "checkpoint_000002"): 0.1, str(a / "checkpoint_000004"): 0.5}
    paused = _trial(a, "PAUSED", checkpoint=str(a / "checkpoint_000000"))  # waits to restore this one
    log.prune([paused, _trial(b)])
    assert sorted(p.name for p in a.iterdir()) == ["checkpoint_000000", "checkpoint_000002", "checkpoint_000004"]
    assert sorted(p.name for p in b.iterdir()) == ["checkpoint_000001", "checkpoint_000004"]  # donor pinned


def test_retention_keeps_the_checkpoints_the_last_two_saved_experiment_states_name(tmp_path):
    """`tune --resume` after a crash restores each trial from the checkpoint Tune's last saved state names."""
    a = tmp_path / "trial_a"
    for i in range(6):
        (a / f"checkpoint_00000{i}").mkdir(parents=True)
    log = ExperimentLog(tmp_path, keep=1, metric="eval_loss", mode="min", pbt=None)
    log.trials = [_trial(a, checkpoint=str(a / "checkpoint_000001"))]
    log.state_saved()
    log.trials = [_trial(a, checkpoint=str(a / "checkpoint_000003"))]
    log.state_saved()
    log.trials = [_trial(a, checkpoint=str(a / "checkpoint_000005"))]
    log.prune(log.trials)
    assert sorted(p.name for p in a.iterdir()) == ["checkpoint_000001", "checkpoint_000003", "checkpoint_000005"]
    log.state_saved()  # the save before last is now two saves ago
    log.prune(log.trials)
    assert sorted(p.name for p in a.iterdir()) == ["checkpoint_000003", "checkpoint_000005"]


CONDITIONAL = {
    "finetune.method": {"type": "choice", "values": ["full", "lora"]},
    "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
    "finetune.lora.r": {"type": "int", "low": 2, "high": 16, "when": {"finetune.method": "lora"}},
}


def test_conditional_keys_are_sampled_only_when_their_condition_holds(tmp_path):
    """Random search: Tune's variant generator resolves the condition after the keys it names."""
    from ray.tune.search.variant_generator import generate_variants

    cfg = cfg_with(tmp_path, tune={"algorithm": "random", "search_space": CONDITIONAL})
    space = param_space(cfg.tune.search_space)
    seen = set()
    for _ in range(40):
        _, resolved = next(generate_variants(space))
        rank = resolved["finetune.lora.r"]
        if resolved["finetune.method"] == "lora":
            assert 2 <= rank <= 16
        else:
            assert rank is None
        seen.add(resolved["finetune.method"])
        # the trial's experiment: LoRA rank set for LoRA trials, the experiment's own value kept otherwise
        trial = trial_experiment(cfg.model_dump(mode="json", by_alias=True), resolved, "x-1")
        assert trial.finetune.lora.r == (rank if rank is not None else cfg.finetune.lora.r)
    assert seen == {"full", "lora"}


def test_optuna_gets_conditional_keys_as_a_define_by_run_space(tmp_path):
    import optuna

    from raytune_ft.tune.search import tuner_space

    cfg = cfg_with(tmp_path, tune={"algorithm": "optuna", "search_space": CONDITIONAL})
    assert tuner_space(cfg.tune) == {}  # the searcher holds the space; the Tuner's param_space stays empty
    searcher = search_algorithm(cfg.tune, seed=0)
    assert callable(searcher._space)
    import pickle

    pickle.loads(pickle.dumps(searcher._space))  # OptunaSearch.save pickles it into Tune's experiment state
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (searcher._space(t), 0.0)[1], n_trials=30)
    for trial in study.trials:
        assert ("finetune.lora.r" in trial.params) == (trial.params["finetune.method"] == "lora")
    assert {t.params["finetune.method"] for t in study.trials} == {"full", "lora"}


@pytest.mark.parametrize(
    ("algorithm", "when", "message"),
    [
        ("hyperopt", {"finetune.method": "lora"}, "conditional keys need algorithm random or optuna, got hyperopt"),
        ("random", {"finetune.nope": "lora"}, "'finetune.nope' is not a key of tune.search_space"),
        ("random", {"finetune.method": "partial"}, "'finetune.method' takes ['full', 'lora'], never 'partial'"),
        ("random", {"train.warmup_ratio": 0.1}, "'train.warmup_ratio' is itself conditional"),
    ],
)
def test_conditions_are_checked_at_validation(tmp_path, algorithm, when, message):
    space = {
        **CONDITIONAL,
        "train.warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.2, "when": {"finetune.method": "lora"}},
        "finetune.lora.alpha": {"type": "choice", "values": [8, 16], "when": when},
    }
    with pytest.raises(ConfigError) as caught:
        cfg_with(tmp_path, tune={"algorithm": algorithm, "search_space": space})
    assert any(message in str(issue) for issue in caught.value.issues), caught.value.issues


def test_trial_ids_come_from_the_trial_folder_names():
    from raytune_ft.tune.runner import trial_id_of

    assert trial_id_of("run_trial_20ef7_00001_1_train_lr=0.0000_2026-11-27_01-37-41") == "20ef7_00001"
    assert trial_id_of("run_trial_7a5c2e07_3_finetune_method=lora,train_lr=0.0003_2026-11-27_00-19-19") == "7a5c2e07"
    assert trial_id_of("something_else") is None


def test_root_cause_of_a_dead_worker_says_the_worker_died():
    from raytune_ft.tune.runner import root_cause

    text = """ray.exceptions.RayTaskError(WorkerGroupError): ray::ImplicitFunc.train() (pid=2136, repr=run_trial)
  File "x.py", line 1, in f
ray.train.WorkerGroupError: Training failed due to worker errors:
[Rank 0 Error Snippet]:
A worker health check failed.
Worker info: Worker(
  actor=Actor(RayTrainWorker, a359),
)
The actor died unexpectedly before finishing this task.
\tclass_name: RayTrainWorker
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: EOF."""
    assert root_cause(RuntimeError(text)) == (
        "ray.train.WorkerGroupError: Training failed due to worker errors: A worker health check failed. "
        "The actor is dead because its worker process has died."
    )
    assert root_cause(RuntimeError("Traceback\nValueError: finetune.freeze.layers is 5")) == (
        "ValueError: finetune.freeze.layers is 5"
    )


def test_a_restarted_trial_goes_no_further_than_the_driver_logged(tmp_path):
    """A restart uses the trial's own newest whole checkpoint up to the newest step in its result.json: a driver
    killed before it saved its state loses no reported work, and a trial PBT paused at step 8 (its workers trained
    on to 16 before they stopped, unreported) resumes from 8."""
    import json

    from test_train_parts import make_checkpoint

    from raytune_ft.tune.trial import _earlier_checkpoint, logged_step

    runs = tmp_path / "train-runs" / "t1"
    (runs / "run-0").mkdir(parents=True)
    for step in (4, 8, 12, 16):
        make_checkpoint(runs / "run-0" / f"step_{step:06d}", step)
    trial_dir = tmp_path / "trials" / "run_trial_t1"
    trial_dir.mkdir(parents=True)
    assert logged_step(trial_dir) == 0
    (trial_dir / "result.json").write_text("\n".join(json.dumps({"step": s}) for s in (4, 8)) + '\n{"step": 1')
    assert logged_step(trial_dir) == 8  # the cut line is skipped
    assert _earlier_checkpoint(runs, 1, 8) == (str(runs / "run-0" / "step_000008"), 8)
    assert _earlier_checkpoint(runs, 1, 3) is None
    # a torn checkpoint at the logged step falls back to the one before it
    (runs / "run-0" / "step_000008" / "manifest.rank1.json").unlink()
    assert _earlier_checkpoint(runs, 1, 10) == (str(runs / "run-0" / "step_000004"), 4)


def tune_trial(trial_id: str, status: str, step: int | None = None):
    """A real Ray Tune Trial, as the controller hands its callbacks (no Ray needed to build one)."""
    from ray.tune.execution.placement_groups import PlacementGroupFactory
    from ray.tune.experiment import Trial

    trial = Trial("run_trial", config={}, trial_id=trial_id, stub=True)
    trial.placement_group_factory = PlacementGroupFactory([{"CPU": 0, "memory": 1}])
    trial.set_status(status)
    if step is not None:
        trial.run_metadata.last_result = {"step": step}
    return trial


def test_a_search_with_no_running_trial_stops_after_the_stall_timeout_naming_the_waiting_trials():
    from raytune_ft.tune.runner import SearchStalled, StallWatch

    watch = StallWatch(600.0, "1 worker(s) of 1 CPU")
    paused = [tune_trial("a_00000", "PAUSED", 16), tune_trial("a_00001", "PAUSED", 16)]
    watch.check(paused, now=0.0)
    watch.check(paused, now=599.0)  # within the limit
    # a running trial resets the clock: 700 s after the first check, but only 100 s since one ran
    watch.check([tune_trial("a_00000", "RUNNING", 20), paused[1]], now=600.0)
    watch.check(paused, now=700.0)
    with pytest.raises(SearchStalled) as caught:
        watch.check(paused, now=1301.0)
    message = str(caught.value)
    assert "no trial of the search has run for 601 s (tune.stall_timeout_s = 600 s)" in message
    assert "waiting: a_00000 PAUSED at step 16, a_00001 PAUSED at step 16" in message
    assert "{'memory': 1.0} for itself and 1 worker(s) of 1 CPU for its training run" in message
    assert "synchronous PBT/PB2" in message and "raytune-ft tune --resume" in message

    # a search whose trials all finished is not stalled; nor is one with a trial pending a start for a while
    done = StallWatch(1.0, "")
    done.check([tune_trial("b_00000", "TERMINATED")], now=0.0)
    done.check([tune_trial("b_00000", "TERMINATED")], now=100.0)
    pending = StallWatch(1.0, "")
    pending.check([tune_trial("c_00000", "PENDING")], now=0.0)
    with pytest.raises(SearchStalled, match="waiting: c_00000 PENDING\\. Each trial"):
        pending.check([tune_trial("c_00000", "PENDING")], now=2.0)


def test_stall_and_placement_deadlines_are_longer_on_a_cluster_and_configurable(tmp_path):
    from raytune_ft.config.schema import CLUSTER_PLACEMENT_S, CLUSTER_STALL_S, EMBEDDED_PLACEMENT_S, EMBEDDED_STALL_S

    tune = {
        "tune": {"algorithm": "random", "search_space": {"train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-3}}}
    }
    local = cfg_with(tmp_path, **tune)
    assert (local.stall_deadline_s, local.cluster.placement_deadline_s) == (EMBEDDED_STALL_S, EMBEDDED_PLACEMENT_S)
    cluster = cfg_with(tmp_path, cluster={"address": "auto"}, **tune)
    assert (cluster.stall_deadline_s, cluster.cluster.placement_deadline_s) == (CLUSTER_STALL_S, CLUSTER_PLACEMENT_S)
    assert EMBEDDED_STALL_S < CLUSTER_STALL_S and EMBEDDED_PLACEMENT_S < CLUSTER_PLACEMENT_S
    given = cfg_with(
        tmp_path, cluster={"address": "auto", "placement_timeout_s": 120}, tune={**tune["tune"], "stall_timeout_s": 90}
    )
    assert (given.stall_deadline_s, given.cluster.placement_deadline_s) == (90, 120)


def test_every_algorithm_of_the_registry_validates_builds_and_schedules_as_it_says(tmp_path):
    """config/algorithms.py is the one list: each name there is a valid tune.algorithm, builds its searcher, and
    gets a population scheduler exactly when the registry says it perturbs (or the scheduler it must run with)."""
    from ray.tune.schedulers import FIFOScheduler, HyperBandForBOHB, PopulationBasedTraining

    from raytune_ft.config.algorithms import ALGORITHMS, NAMES
    from raytune_ft.config.schema import TuneConfig

    assert TuneConfig.model_fields["algorithm"].annotation.__args__ == NAMES
    for name, algorithm in ALGORITHMS.items():
        dim = {"type": "grid", "values": [1e-4, 1e-3]} if name == "grid" else SPACE["train.lr"]
        tune = {"algorithm": name, "search_space": {"train.lr": dim}}
        if algorithm.perturbs:
            tune["perturbation_interval"] = 10
        if algorithm.scheduler:
            tune["scheduler"] = algorithm.scheduler
        settings = cfg_with(tmp_path, tune=tune).tune
        assert search_algorithm(settings, 0) is not None, name
        built = scheduler(settings, 5)
        assert isinstance(built, PopulationBasedTraining) == algorithm.perturbs, name
        if algorithm.scheduler == "hyperband":
            assert isinstance(built, HyperBandForBOHB), name
        elif not algorithm.perturbs:
            assert isinstance(built, FIFOScheduler), name
