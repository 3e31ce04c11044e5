"""What `raytune-ft submit` sends to a cluster: entrypoint, working_dir, output location, metadata, warnings."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from raytune_ft.config import load_config
from raytune_ft.jobs import EXCLUDES, export_path, job_spec


def experiment(tmp_path: Path, **top) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "jobs").mkdir(exist_ok=True)
    (tmp_path / "jobs" / "reviews.tsv").write_text("text\tlabel\ngood\t1\nbad\t0\n")
    model = {"name_or_path": "../model", "task": "sequence-classification"}
    raw = {"name": "exp", "model": model, "data": {"path": "reviews.tsv"}, **top}
    path = tmp_path / "jobs" / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_job_runs_the_uploaded_file_on_the_cluster_with_the_overrides(tmp_path):
    path = experiment(tmp_path)
    spec = job_spec(path, load_config(path, ["train.lr=1e-4"]), "tune", ["train.lr=1e-4"], "run-7")
    words = shlex.split(spec.entrypoint)
    assert words[:5] == ["raytune-ft", "tune", "exp.yaml", "train.lr=1e-4", "cluster.address=auto"]
    # a relative output_dir would be written into the job's throw-away copy of the working_dir
    assert words[5] == "output_dir=~/raytune_ft/runs"
    assert spec.runtime_env == {"working_dir": str(path.parent), "excludes": EXCLUDES}
    assert spec.metadata == {
        "raytune_ft.experiment": "exp",
        "raytune_ft.command": "tune",
        "raytune_ft.output_dir": "~/raytune_ft/runs",
        "raytune_ft.submission_id": "run-7",
    }
    assert spec.entrypoint_num_cpus == 0
    # the model lives outside the uploaded folder: named, since the cluster must have it
    assert [w.split(" is ")[0] for w in spec.warnings] == ["model.name_or_path"]


def test_storage_path_pip_and_env_vars_reach_the_job(tmp_path):
    cluster = {"storage_path": "/mnt/shared/runs", "runtime_env": {"pip": ["peft"], "env_vars": {"HF_HOME": "/x"}}}
    path = experiment(tmp_path, cluster=cluster)
    spec = job_spec(path, load_config(path), "train", [])
    assert spec.entrypoint.endswith("cluster.address=auto output_dir=/mnt/shared/runs")
    assert spec.entrypoint.startswith("raytune-ft train exp.yaml")
    assert spec.runtime_env["pip"] == ["peft"] and spec.runtime_env["env_vars"] == {"HF_HOME": "/x"}


def test_a_configured_working_dir_must_hold_the_experiment(tmp_path):
    path = experiment(tmp_path, cluster={"runtime_env": {"working_dir": ".."}})
    spec = job_spec(path, load_config(path), "tune", [])
    assert spec.runtime_env["working_dir"] == str(tmp_path.resolve())
    assert shlex.split(spec.entrypoint)[2] == "jobs/exp.yaml" and spec.warnings == []
    (tmp_path / "elsewhere").mkdir()
    path = experiment(tmp_path, cluster={"runtime_env": {"working_dir": "../elsewhere"}})
    with pytest.raises(ValueError, match="is not inside cluster.runtime_env.working_dir"):
        job_spec(path, load_config(path), "tune", [])
    with pytest.raises(ValueError, match="command must be one of train, tune"):
        job_spec(path, load_config(path), "serve", [])


def test_the_export_path_is_the_last_one_the_job_printed():
    log = "trials...\nexport: /runs/a/export\nmore\nexport: /runs/a/tune/winner\nbye\n"
    assert export_path(log) == "/runs/a/tune/winner"
    assert export_path("no export here") is None


def test_cluster_storage_is_a_mounted_directory_not_an_object_store(tmp_path):
    from raytune_ft.config import ConfigError

    path = experiment(tmp_path, cluster={"storage_path": "s3://bucket/runs"})
    with pytest.raises(ConfigError, match="cluster.storage_path: is a directory every node mounts"):
        load_config(path)


REPO = Path(__file__).resolve().parents[2]
SPECS = sorted((REPO / "jobs" / "ray").glob("*.json"))


@pytest.mark.parametrize("spec_file", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_ray_job_specs_are_what_submit_sends(spec_file):
    import json

    shipped = json.loads(spec_file.read_text())
    path = REPO / "jobs" / f"{spec_file.stem}.yaml"
    spec = job_spec(path, load_config(path), "tune", [])
    working_dir = Path(spec.runtime_env["working_dir"]).relative_to(REPO)
    assert shipped == {
        "entrypoint": spec.entrypoint,
        "runtime_env": {**spec.runtime_env, "working_dir": str(working_dir)},
        "entrypoint_num_cpus": spec.entrypoint_num_cpus,
        "metadata": spec.metadata,
    }


def test_every_main_example_has_a_shipped_job_spec():
    assert sorted(p.stem for p in SPECS) == ["shakespeare-zero3", "sst2-minilm", "sst2-minilm-full-optuna"]
