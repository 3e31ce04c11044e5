"""Prepared splits become tokenised Ray Datasets that Ray Train shards across real workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytune_ft.config.loader import validate_raw
from raytune_ft.data import load_split, prepare_data
from raytune_ft.data.tokenize import ray_datasets

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, model: Path, task: str, data_file: str) -> object:
    raw = {
        "name": "shards",
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(model), "task": task},
        "data": {"path": data_file, "max_length": 16, "block_size": 8, "split": {"validation": 0.1, "test": 0.1}},
    }
    return validate_raw(raw, None, "test.yaml", [], base_dir=tmp_path)


def _shard_reader(config: dict) -> None:
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    seen = []
    for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=16, batch_format="pyarrow"):
        seen += [tuple(ids) for ids in batch.column("input_ids").to_pylist()]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def test_train_split_is_sharded_across_two_workers(tmp_path, tiny_bert, local_ray):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    lines = ["text\tlabel"] + [
        f"review number {i} is {'good' if i % 2 else 'bad'} {i * 7}\t{i % 2}" for i in range(200)
    ]
    (tmp_path / "reviews.tsv").write_text("\n".join(lines) + "\n")
    cfg = _config(tmp_path, tiny_bert, "sequence-classification", "reviews.tsv")
    prepared = prepare_data(cfg)
    n_train = load_split(prepared.data_dir, "train").num_rows

    datasets = ray_datasets(prepared.data_dir, str(tiny_bert), cfg.model.task, max_length=16, block_size=8)
    out = tmp_path / "shards"
    out.mkdir()
    trainer = TorchTrainer(
        _shard_reader,
        train_loop_config={"out": str(out)},
        # Half a CPU each leaves the third half of a 2-CPU cluster to Ray Data's read/tokenize tasks.
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": datasets["train"]},
        run_config=RunConfig(storage_path=str(tmp_path / "ray_results"), name="shards"),
    )
    trainer.fit()

    shards = [set(map(tuple, json.loads((out / f"rank{r}.json").read_text()))) for r in (0, 1)]
    assert shards[0] and shards[1], "each worker must get rows"
    assert not shards[0] & shards[1], "workers must see disjoint rows"
    assert len(shards[0]) + len(shards[1]) == n_train


def test_causal_lm_text_becomes_fixed_blocks(tmp_path, tiny_bert, local_ray):
    paragraphs = [f"the film number {i} is good. the review is not bad." for i in range(60)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(paragraphs) + "\n")
    cfg = _config(tmp_path, tiny_bert, "causal-lm", "corpus.txt")
    prepared = prepare_data(cfg)
    assert prepared.report["split"]["strategy"] == "contiguous"
    rows = ray_datasets(prepared.data_dir, str(tiny_bert), "causal-lm", max_length=16, block_size=8)["train"].take_all()
    assert rows and all(len(r["input_ids"]) == 8 and list(r["labels"]) == list(r["input_ids"]) for r in rows)
    with pytest.raises(ValueError, match="test split is read once"):
        ray_datasets(prepared.data_dir, str(tiny_bert), "causal-lm", 16, 8, splits=("train", "test"))
