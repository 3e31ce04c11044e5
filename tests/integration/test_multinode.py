"""The same training loop across two Ray nodes (ray.cluster_utils.Cluster), one worker per node.

The cluster is this test's own, so it runs in a process of its own (this file, run as a script), beside the
pytest session's Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ray_head import train_poll

pytestmark = pytest.mark.integration


def test_two_workers_on_two_nodes(tiny_bert, tmp_path):
    env = {**os.environ, **train_poll()}  # Ray Train's poll as on an embedded Ray, not Ray's default 2 s
    done = subprocess.run(
        [sys.executable, __file__, str(tiny_bert), str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["alive_nodes"] == 2
    assert found["steps"] == [6, 12, 18, 24]
    assert found["world_size"] == 2  # two workers, and each node has 1 CPU: one worker on each
    assert Path(found["export"], "model.safetensors").is_file()


def main(model: Path, tmp_path: Path) -> None:
    import ray
    from helpers import make_cfg, write_reviews
    from ray.cluster_utils import Cluster

    from raytune_ft.train import train
    from raytune_ft.train.checkpoint import list_checkpoints, read_state

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        alive = len([n for n in ray.nodes() if n["Alive"]])
        data = write_reviews(tmp_path / "reviews.tsv")
        cfg = make_cfg(tmp_path, "spread", model, data, scaling={"placement_strategy": "STRICT_SPREAD"})
        result = train(cfg, log=lambda m: None)
        state = read_state(list_checkpoints(result.run_dir / "train")[-1])
        found = {
            "alive_nodes": alive,
            "steps": [h["step"] for h in result.history],
            "world_size": state["world_size"],
            "export": str(result.export_dir),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(found))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(Path(sys.argv[1]), Path(sys.argv[2]))
