"""A tune experiment on the local autoscaling cluster (cluster/local-autoscaling.yaml: Ray's fake multi-node
provider, a head with no CPUs, `trial_worker` nodes of 2 CPUs): two trials of 2 workers each (random sampling, the
median stopping rule) make the autoscaler add two worker nodes; `raytune-ft train` of 2 workers with STRICT_SPREAD
trains across two of those nodes, one worker on each; once nothing runs the idle nodes go away."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import cli, free_port, make_cfg, search_ran_to_a_winner, write_reviews
from ray_head import NodeCounts, alive_nodes, ray_head

from raytune_ft.train.checkpoint import list_checkpoints, read_state

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "local-autoscaling.yaml"


SPACE = {
    "train.lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1},
    "train.weight_decay": {"type": "choice", "values": [0.0, 0.1]},
}


@pytest.fixture
def autoscaling_head(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    # the fake provider starts its nodes against GCS port 6379 unless the config names the head's address
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"]["gcs_address"] = address
    config_file = tmp_path / "local-autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config))
    # the fake provider refuses to run without RAY_FAKE_CLUSTER; 1 s autoscaler updates keep the test short
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    args = ["--num-cpus=0", f"--autoscaling-config={config_file}"]
    with ray_head(port, args, ready=lambda client_env: alive_nodes(address, client_env) == 1, env=env) as client:
        yield address, client


def test_tune_makes_the_autoscaler_add_nodes_that_leave_when_idle(autoscaling_head, tiny_bert, tmp_path):
    address, env = autoscaling_head
    data = write_reviews(tmp_path / "reviews.tsv", rows=60)
    cfg = make_cfg(
        tmp_path / "runs",
        "autoscaled",
        tiny_bert,
        data,
        train={"max_steps": 6, "eval_every_steps": 3, "checkpoint_every_steps": 3},
        scaling={"num_workers": 2, "cpus_per_worker": 1},  # 2 CPUs: a whole trial_worker node per trial
        # random sampling with the median stopping rule (test_tune_algorithms.py runs the other algorithms)
        tune={
            "algorithm": "random",
            "scheduler": "median",
            "num_samples": 2,
            "metric": "eval_loss",
            "mode": "min",
            "mlflow": False,
        },
    )
    raw = cfg.model_dump(mode="json", by_alias=True)
    raw["tune"]["search_space"] = SPACE
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(yaml.safe_dump(raw))

    watch = NodeCounts(address, env)  # one client, polling every second
    try:
        before = watch.wait_for(1, timeout_s=60)
        # no max_concurrent_trials: on a cluster joined by address both trials start and wait for workers
        tuned = cli("tune", str(experiment), f"cluster.address={address}", env=env)
        assert tuned.returncode == 0, tuned.stderr[-3000:]
        assert "export:" in tuned.stdout
        during = max(watch.seen)

        # `raytune-ft train` of the same experiment across two nodes: 2 workers of 1 CPU, STRICT_SPREAD (one per
        # node), on the trial_worker nodes the search brought up (or new ones, had they gone idle already)
        spread = "scaling.placement_strategy=STRICT_SPREAD"
        seen_before_training = len(watch.seen)
        trained = cli("train", str(experiment), f"cluster.address={address}", spread, env=env)
        assert trained.returncode == 0, trained.stderr[-3000:]
        [export] = re.findall(r"^export: (.+)$", trained.stdout, re.MULTILINE)
        nodes_while_training = max(watch.seen[seen_before_training:])

        after = watch.wait_for(1, timeout_s=180)  # idle workers removed after idle_timeout_minutes
    finally:
        watch.close()
    print(f"alive nodes: before {before}, during (max) {during}, after {after}")
    assert before == 1  # the head alone
    assert during == 3  # the head and two trial_worker nodes, one per trial
    assert after == 1
    assert nodes_while_training == 3
    # each trial at its own sampled point, finished or stopped by the median rule, the winner exported and tested
    search_ran_to_a_winner(tmp_path / "runs" / "autoscaled" / "tune", SPACE, trials=2)
    state = read_state(list_checkpoints(tmp_path / "runs" / "autoscaled" / "train")[-1])
    assert state["world_size"] == 2 and [h["step"] for h in state["history"]] == [3, 6]
    assert (Path(export) / "model.safetensors").is_file()
