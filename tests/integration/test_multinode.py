"""The same training loop across two Ray nodes (ray.cluster_utils.Cluster), one worker per node."""

from __future__ import annotations

import pytest

from raytune_ft.train import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_workers_on_two_nodes(two_nodes, tiny_bert, tmp_path):
    import ray
    from test_train import make_cfg, write_reviews

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    data = write_reviews(tmp_path / "reviews.tsv")
    cfg = make_cfg(tmp_path, "spread", tiny_bert, data, scaling={"placement_strategy": "STRICT_SPREAD"})
    result = train(cfg)
    assert [h["step"] for h in result.history] == [6, 12, 18, 24]
    assert result.export_dir is not None and (result.export_dir / "model.safetensors").is_file()
