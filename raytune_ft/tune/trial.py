"""One Tune trial: a Ray Train run of the training loop, its reports (with checkpoints) handed to Tune.

Ray Train V2's own TuneReportCallback gives Tune only worker 0's metrics and the checkpoint as a string, so
PBT would have nothing to exploit. Here a Train callback (running in the Train controller) passes each report
and its checkpoint path through a Ray queue to this trial's function, which reports them to Tune with the
checkpoint attached. An exploiting trial then starts with the donor's checkpoint from `tune.get_checkpoint()`
and the training loop loads it whole: model (LoRA: the adapters), optimizer, scheduler, step and data position.

Each (re)start of a trial is a new Ray Train run with its own worker group. PBT restarts the population member
that exploits, so a perturbation costs one worker-group start (measured: see README, Hyper-parameter search).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray.train.v2.api.callback import UserCallback

from raytune_ft.train.checkpoint import STATE

EXPLOIT_KEY = "raytune_ft_exploit"
HP_PREFIX = "hp/"


# What Ray Tune copies from the driver's environment into every trial actor's runtime_env (ray.tune.execution.
# class_cache), and Ray's runtime env agent writes each runtime_env it sets up into its log, runtime_env_agent.log,
# on every node a trial runs on (seen: the secret key there, each trial start, in a search on S3).
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")


@contextmanager
def credentials_stay_in_the_environment() -> Iterator[None]:
    """While the block runs (Tuner.fit), Tune starts trials without the driver's CREDENTIALS in their runtime_env:
    trials, their Ray Train runs and workers read them from the environment their node gives its processes, as
    every other Ray process does (the embedded Ray's processes inherit the driver's; a cluster's nodes have them
    from `ray start`'s environment or an instance role). The key and token always go together: a key id from the
    driver beside a node's secret would sign nothing."""
    from ray.tune.execution import class_cache

    propagated = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - set(CREDENTIALS)
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = propagated


class ReportToTrial(UserCallback):
    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import ray

        # the Checkpoint itself (path + filesystem), so that s3:// or gs:// storage works like a local directory;
        # and this controller, which the trial aborts when Tune stops it (see _abort_run)
        controller = ray.get_runtime_context().current_actor
        self.queue.put((dict(metrics[0]), checkpoint, controller))


ABORT_WAIT_S = 30.0


def _abort_run(controller: Any, thread: threading.Thread) -> None:
    """End the Ray Train run of a trial Tune has stopped (a PBT pause, a scheduler's stop). Tune stops a trial
    inside its `tune.report`; left alone, the run's controller outlived the trial, restarted its worker group as
    after a crash and kept a CPU (seen: the other member of a 2-CPU PBT population waited 6 minutes at each
    restart). The controller's abort stops the workers and removes their placement group."""
    import ray

    if controller is None:
        return
    try:
        ray.get(controller.abort.remote(), timeout=ABORT_WAIT_S)
    except Exception:  # the abort ends the controller's process, so the call itself fails
        pass
    thread.join(ABORT_WAIT_S)
    if thread.is_alive():
        ray.kill(controller, no_restart=True)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def restore_record(checkpoint: Any, trial_id: str) -> dict[str, Any]:
    """Where a (re)started trial's checkpoint comes from: another trial's (a PBT exploit) or its own."""
    import json

    with checkpoint.as_directory() as local:  # the same directory on local storage, a download otherwise
        state = json.loads((Path(local) / STATE).read_text())
        moved = directory_bytes(Path(local))
    donor = state.get("trial_id")
    return {
        "trial": trial_id,
        "donor": donor,
        "donor_step": state["step"],
        "donor_checkpoint": checkpoint.path,
        "bytes_moved": moved,
        "old_config": state.get("trial_config"),
        "exploit": donor is not None and donor != trial_id,
    }


def filesystem_of(location: str) -> tuple[Any, str]:
    """The pyarrow filesystem and path of a directory or a URI (s3://, gs://, file://)."""
    from pyarrow.fs import FileSystem

    return FileSystem.from_uri(location if "://" in location else str(Path(location).resolve()))


def is_local(location: str) -> bool:
    """Whether a directory-or-URI storage location is on this machine's file system."""
    return "://" not in location or location.startswith("file://")


def _attempts(storage: str) -> int:
    """Ray Train runs this trial already started under STORAGE (a directory or a pyarrow URI)."""
    from pyarrow.fs import FileSelector

    fs, path = filesystem_of(storage)
    return sum(1 for i in fs.get_file_info(FileSelector(path, allow_not_found=True)) if i.base_name.startswith("run-"))


def _earlier_checkpoint(storage: Path, attempt: int, logged_step: int) -> tuple[str, int] | None:
    """The newest whole checkpoint an earlier run of this trial left, at or before LOGGED_STEP, and its step.

    Tune saves its experiment state every few seconds: a driver killed just after a trial's report restores
    that trial with the checkpoint of an earlier report, or none, though the newer one is whole on disk. Steps
    past the driver's log were never reported: a trial that PBT paused trains on until its workers stop, and the
    schedule resumes it from the pause, not from where those workers got to."""
    from raytune_ft.train.checkpoint import checkpoint_step, list_checkpoints, newest_whole_checkpoint

    for run in range(attempt - 1, -1, -1):
        logged = [p for p in list_checkpoints(storage / f"run-{run}") if checkpoint_step(p) <= logged_step]
        found = newest_whole_checkpoint(logged, log=lambda m: None)
        if found is not None:
            return str(found[0]), int(found[1]["step"])
    return None


def logged_step(trial_dir: Path) -> int:
    """The newest step in the trial's result.json: what the driver received from it (0 when nothing)."""
    import json

    path = trial_dir / "result.json"
    steps = [0]
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.append(int(json.loads(line).get("step") or 0))
            except (ValueError, AttributeError):
                continue  # a line cut short by the driver's kill
    return max(steps)


def run_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """The Tune function trainable. `config` holds the sampled search values (dotted keys)."""
    import ray
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.util.queue import Queue

    from raytune_ft.train.ray_run import run_train_loop, torch_trainer
    from raytune_ft.tune.space import trial_experiment

    started = time.time()
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    values = dict(config)
    cfg = trial_experiment(shared["experiment"], values, f"{shared['experiment']['name']}-{trial_id}")
    restore = tune.get_checkpoint()
    record = restore_record(restore, trial_id) if restore is not None else None
    if record is not None:
        record["new_config"] = values

    queue = Queue(actor_options={"num_cpus": 0})
    storage = f"{shared['train_storage']}/{trial_id}"
    attempt = _attempts(storage)
    own = record is None or not record["exploit"]
    if attempt and is_local(storage) and own and shared.get("newer_own_checkpoint", True):
        # the same trial with the same values (an exploit's donor checkpoint is never replaced): resume from the
        # newest whole checkpoint its own earlier runs left, up to the step its driver logged, when Tune hands
        # back an older one, or none
        trial_dir = Path(shared["trials_dir"].removeprefix("file://")) / Path(ctx.get_trial_dir()).name
        earlier = _earlier_checkpoint(Path(storage.removeprefix("file://")), attempt, logged_step(trial_dir))
        if earlier is not None and (record is None or earlier[1] > record["donor_step"]):
            restore = earlier[0]
    loop_config = {
        **shared["loop_config"],
        "experiment": cfg.model_dump(mode="json", by_alias=True),
        "trial": {"id": trial_id, "config": values},
        "restore_from": restore,
        # this attempt's own checkpoints, which the loop prefers over `restore_from` (local storage only)
        "run_storage": f"{storage}/run-{attempt}".removeprefix("file://") if is_local(storage) else None,
    }
    trainer = torch_trainer(
        cfg,
        run_train_loop,
        loop_config,
        RunConfig(
            name=f"run-{attempt}",
            storage_path=storage,
            callbacks=[ReportToTrial(queue)],
            # Tune keeps the checkpoints it is handed; the run itself keeps two for its own worker restarts.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # re-raised in the trial's thread so that Tune sees the failure
            outcome["error"] = exc
        finally:
            queue.put(None)

    thread = threading.Thread(target=fit, name="raytune-ft-train-run", daemon=True)
    thread.start()
    controller, done = None, False
    try:
        while (item := queue.get()) is not None:
            metrics, checkpoint, controller = item
            if record is not None:
                record.update(
                    restored_step=metrics.get("resumed_step"),
                    load_checkpoint_s=metrics.get("load_checkpoint_s"),
                    seconds=float(metrics.get("first_step_at") or time.time()) - started,
                )
                metrics[EXPLOIT_KEY] = record
                record = None
            metrics["reported_at"] = time.time()  # wall clock, for gaps between trials (`bench tune`)
            if "step" in metrics:  # TensorBoard and MLflow plot against this instead of the report count
                metrics["timesteps_total"] = metrics["step"]
            if shared.get("end_at_last_report"):  # PBT/PB2: see runner._trainable
                last_step = metrics.get("step", 0) >= metrics.get("total_steps", float("inf"))
                metrics["done"] = last_step or bool(metrics.get("early_stopped"))
            # what this report was trained with, beside the metrics: PBT schedules show in progress.csv, TensorBoard
            metrics.update({f"{HP_PREFIX}{key}": value for key, value in values.items()})
            done = bool(metrics.get("done"))
            tune.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)
    except BaseException:  # Tune stopped the trial (SystemExit inside tune.report), or reporting failed
        if not done:  # after its last report the run is ending by itself
            _abort_run(controller, thread)
        raise
    thread.join()
    ray.kill(queue.actor)
    if "error" in outcome:
        raise outcome["error"]
