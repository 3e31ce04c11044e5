"""The cluster configs users deploy (cluster/): Ray launcher configs and KubeRay manifests stay valid and say what
the project needs. No Ray runtime, no network: Ray's own schema and checks, YAML and the experiment loader."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from raytune_ft.config import load_config
from raytune_ft.tune.runner import default_run_dir

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
CLOUD = ["aws", "gcp"]
LAUNCHER = [*CLOUD, "local-autoscaling"]
MANIFEST_KINDS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
# GPUs per node of the worker types, and what the cloud's machine type really carries
GPU_TYPES = {"gpu_1x": 1, "gpu_8x": 8}
AWS_GPUS = {"g5.xlarge": 1, "p4d.24xlarge": 8}
GCP_ACCELERATORS = {"g2-standard-8": ("nvidia-l4", 1), "a2-highgpu-8g": ("nvidia-tesla-a100", 8)}
# Resource names Ray defines itself; any other is a custom resource.
BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}
# Keys of Ray's fake_multi_node/example.yaml (not shipped in the wheel): the v1 autoscaler reads the config as
# written, without filling defaults, so a local config must carry all of them.
FAKE_MULTINODE_KEYS = {
    "cluster_name",
    "max_workers",
    "provider",
    "available_node_types",
    "head_node_type",
    "auth",
    "upscaling_speed",
    "idle_timeout_minutes",
    "docker",
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
    "file_mounts",
    "cluster_synced_files",
    "file_mounts_sync_continuously",
    "rsync_exclude",
    "rsync_filter",
}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def launcher(name: str) -> dict[str, Any]:
    return load(CLUSTER / f"{name}.yaml")


def workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def manifest(name: str) -> dict[str, Any]:
    docs = list(yaml.safe_load_all((KUBERAY / name).read_text()))
    assert len(docs) == 1, f"{name}: one object per file, got {len(docs)}"
    return docs[0]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside any of the three kinds."""
    return {
        "RayCluster": lambda spec: spec,
        "RayJob": lambda spec: spec["rayClusterSpec"],
        "RayService": lambda spec: spec["rayClusterConfig"],
    }[doc["kind"]](doc["spec"])


def pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pod_specs(spec) for c in pod["containers"]]


def mounted(container: dict[str, Any], path: str) -> bool:
    """PATH lies on one of the container's volume mounts."""
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) for m in container.get("volumeMounts", []))


def rayjob_experiment(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], Any]:
    """The RayJob's entrypoint argv and the experiment config it runs, resolved as on the cluster."""
    spec = manifest("rayjob.yaml")["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    for name, value in (runtime_env.get("env_vars") or {}).items():
        monkeypatch.setenv(name, value)  # ${VAR} in the experiment resolves from the job's environment
    argv = shlex.split(spec["entrypoint"])
    return argv, load_config(ROOT / argv[2], argv[3:])


# --- the files themselves -------------------------------------------------------------------------------------


def test_every_cluster_config_is_covered_by_these_tests():
    assert sorted(p.stem for p in CLUSTER.glob("*.yaml")) == sorted(LAUNCHER)
    assert sorted(p.name for p in KUBERAY.glob("*.yaml")) == sorted(MANIFEST_KINDS)


# --- Ray cluster launcher configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_passes_rays_validation(name):
    # Ray's own check: ray-schema.json (jsonschema) plus head type, min/max workers and the synced-files fields
    validate_config(launcher(name))


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_config_passes_rays_validation_after_defaults(name):
    # what `ray up` does before it talks to the cloud: merge the provider's defaults.yaml, then validate
    validate_config(prepare_config(launcher(name)))


def test_rays_schema_rejects_a_misspelled_node_type_field():
    config = launcher("aws")
    gpu = config["available_node_types"]["gpu_1x"]
    gpu["min_worker"] = gpu.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(config)


def test_rays_schema_rejects_a_fractional_resource_count():
    # the schema only counts whole resources; a guard too against validate_config accepting anything
    config = launcher("local-autoscaling")
    config["available_node_types"]["trial_worker"]["resources"]["CPU"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(config)


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_gpu_worker_types_have_their_gpus_and_scale_from_zero(name):
    config = launcher(name)
    types = config["available_node_types"]
    assert set(GPU_TYPES) <= set(types)
    for type_name, gpus in GPU_TYPES.items():
        node_type = types[type_name]
        # stated, so the autoscaler maps GPU demand to the type before any node of it exists
        assert node_type["resources"]["GPU"] == gpus
        assert node_type["min_workers"] == 0
        assert node_type["max_workers"] >= 1
        node_config = node_type["node_config"]
        if name == "aws":
            assert AWS_GPUS[node_config["InstanceType"]] == gpus
        else:
            accelerator, count = GCP_ACCELERATORS[node_config["machineType"]]
            assert node_config["guestAccelerators"] == [{"acceleratorType": accelerator, "acceleratorCount": count}]
            # GPU VMs cannot live-migrate; GCP's API takes an object here, not Ray's old list form
            assert node_config["scheduling"] == {"onHostMaintenance": "TERMINATE"}


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_head_orchestrates_and_runs_no_trials(name):
    config = launcher(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_workers_scale_to_zero_within_the_global_limit(name):
    config = launcher(name)
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert config["upscaling_speed"] > 0
    for type_name, node_type in workers(config).items():
        assert node_type["min_workers"] == 0, type_name
        assert 1 <= node_type["max_workers"] <= config["max_workers"], type_name


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_setup_installs_this_project_from_the_mounted_checkout(name):
    config = launcher(name)
    # REMOTE: LOCAL, LOCAL relative to where `ray up` runs (the repository root)
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    installs = [c for c in config["setup_commands"] if "pip install" in c and "-e" in shlex.split(c)]
    assert installs, "setup_commands must pip install -e the checkout"
    target = shlex.split(installs[0])[-1].split("[")[0]
    assert target.replace("$HOME", "~") == remote
    commands = " ".join(config["setup_commands"] + config["head_setup_commands"] + config["worker_setup_commands"])
    # GPU nodes need PyPI's CUDA torch wheels: nothing may pin a CPU build or another torch
    for pin in ("whl/cpu", "+cpu", "torch=="):
        assert pin not in commands


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_rsync_leaves_out_virtualenvs_runs_and_git(name):
    config = launcher(name)
    assert ".gitignore" in config["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in ignored and "runs/" in ignored
    assert "**/.git" in config["rsync_exclude"]


@pytest.mark.parametrize("name", CLOUD)
def test_cloud_nodes_start_ray_with_token_auth(name):
    config = launcher(name)
    # the cluster's token travels to every node; Ray on each node insists on it
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert config["head_start_ray_commands"][0] == config["worker_start_ray_commands"][0] == "ray stop"
    for flag in ("ray start --head", "--port=6379", "--dashboard-host=0.0.0.0"):
        assert flag in head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--address=$RAY_HEAD_IP:6379" in worker
    assert "export RAY_AUTH_MODE=token;" in head and "export RAY_AUTH_MODE=token;" in worker


def test_cloud_configs_run_one_image_of_the_installed_ray():
    images = {launcher(name)["docker"]["image"] for name in CLOUD}
    assert len(images) == 1
    repository, tag = images.pop().split(":")
    assert repository == "rayproject/ray"
    assert tag.split("-")[0] == ray.__version__ and tag.endswith("-gpu")


# --- the local autoscaling config -----------------------------------------------------------------------------


def test_local_config_is_a_fake_multinode_cluster():
    config = launcher("local-autoscaling")
    provider = config["provider"]
    assert provider["type"] == "fake_multinode"
    assert provider["disable_node_updaters"] is True
    # the fake provider tags its head with this type name; any other name leaves the head without a type
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE


def test_local_config_is_complete_without_rays_missing_example():
    assert FAKE_MULTINODE_KEYS <= set(launcher("local-autoscaling"))


def test_local_trial_worker_scales_from_zero_with_a_custom_resource():
    config = launcher("local-autoscaling")
    head = config["available_node_types"][config["head_node_type"]]
    worker = config["available_node_types"]["trial_worker"]
    custom = set(worker["resources"]) - BUILTIN_RESOURCES
    assert custom, "trial_worker needs a custom resource that only its nodes have"
    assert all(worker["resources"][name] >= 1 for name in custom)
    assert not custom & set(head["resources"])
    assert worker["resources"]["CPU"] >= 1
    # the head takes no trial work, so demand for CPUs means a scale-up
    assert head["resources"].get("CPU", 0) == 0
    assert worker["min_workers"] == 0
    assert 2 <= worker["max_workers"] <= config["max_workers"]


def test_local_idle_nodes_go_away_within_a_minute():
    assert 0 < launcher("local-autoscaling")["idle_timeout_minutes"] < 1


# --- KubeRay manifests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MANIFEST_KINDS)
def test_manifest_is_a_ray_io_v1_object_of_its_kind(name):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == MANIFEST_KINDS[name]
    assert doc["metadata"]["name"]


@pytest.mark.parametrize("name", MANIFEST_KINDS)
def test_manifest_cluster_autoscales_with_token_auth_on_the_installed_ray(name):
    spec = cluster_spec(manifest(name))
    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    assert 0 < spec["autoscalerOptions"]["idleTimeoutSeconds"] <= 1800


@pytest.mark.parametrize("name", MANIFEST_KINDS)
def test_manifest_head_serves_the_dashboard_and_keeps_trials_off(name):
    head = cluster_spec(manifest(name))["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"


@pytest.mark.parametrize("name", MANIFEST_KINDS)
def test_manifest_worker_groups_scale_from_zero_and_one_has_gpus(name):
    spec = cluster_spec(manifest(name))
    groups = spec["workerGroupSpecs"]
    for group in groups:
        assert group["groupName"]
        assert group["minReplicas"] == 0
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
    gpu = [
        c["resources"]
        for g in groups
        for c in g["template"]["spec"]["containers"]
        if "nvidia.com/gpu" in c["resources"]["limits"]
    ]
    assert gpu, "no worker group asks for nvidia.com/gpu"
    for resources in gpu:
        limit = resources["limits"]["nvidia.com/gpu"]
        assert int(limit) >= 1
        # Kubernetes refuses an extended resource whose request differs from its limit
        assert resources.get("requests", {}).get("nvidia.com/gpu", limit) == limit


@pytest.mark.parametrize("name", MANIFEST_KINDS)
def test_manifest_ray_start_params_are_strings(name):
    # KubeRay's rayStartParams is map[string]string: a YAML number or boolean fails the CRD's validation
    spec = cluster_spec(manifest(name))
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_manifests_run_one_image_and_one_cluster_layout():
    def layout(spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "rayVersion": spec["rayVersion"],
            "authOptions": spec["authOptions"],
            "autoscalerOptions": spec["autoscalerOptions"],
            "head": spec["headGroupSpec"]["rayStartParams"],
            "groups": {
                g["groupName"]: (
                    g["minReplicas"],
                    g["maxReplicas"],
                    g["template"]["spec"]["containers"][0]["resources"],
                )
                for g in spec["workerGroupSpecs"]
            },
        }

    specs = {name: cluster_spec(manifest(name)) for name in MANIFEST_KINDS}
    images = {c["image"] for spec in specs.values() for c in containers(spec)}
    assert len(images) == 1, f"one image for every Ray container, got {sorted(images)}"
    reference = layout(specs["raycluster.yaml"])
    for name, spec in specs.items():
        assert layout(spec) == reference, name


def test_rayjob_runs_a_shipped_experiment_that_validates(monkeypatch):
    argv, cfg = rayjob_experiment(monkeypatch)
    assert argv[:2] in (["raytune-ft", "tune"], ["raytune-ft", "train"])
    experiment = PurePosixPath(argv[2])
    # relative to the job's working_dir, the image's checkout of this repository
    assert experiment.parts[0] == "jobs" and (ROOT / experiment).is_file()
    assert cfg.cluster.address == "auto"


def test_rayjob_writes_its_run_to_the_shared_volume(monkeypatch):
    _, cfg = rayjob_experiment(monkeypatch)
    # a relative output_dir would land in the job's throw-away copy of the working_dir
    assert PurePosixPath(cfg.output_dir).is_absolute()
    for container in containers(cluster_spec(manifest("rayjob.yaml"))):
        assert mounted(container, cfg.output_dir), container["name"]


def test_rayjob_uploads_the_checkout_and_cleans_up_after_itself():
    spec = manifest("rayjob.yaml")["spec"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    assert PurePosixPath(runtime_env["working_dir"]).is_absolute()
    assert {"runs/", ".venv/", ".git/"} <= set(runtime_env["excludes"])
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0


def rayservice_app() -> dict[str, Any]:
    serve_config = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)  # what Ray Serve checks before deploying it
    (application,) = serve_config["applications"]
    return application


def test_rayservice_builds_its_app_from_the_raytune_ft_package():
    module, _, builder = rayservice_app()["import_path"].partition(":")
    assert module.split(".")[0] == "raytune_ft" and builder.isidentifier()
    assert importlib.util.find_spec(module) is not None, module
    assert callable(getattr(importlib.import_module(module), builder)), builder


def test_rayservice_serves_the_export_the_rayjob_writes(monkeypatch):
    _, cfg = rayjob_experiment(monkeypatch)
    args = rayservice_app()["args"]
    assert args["export"] == str(default_run_dir(cfg) / "winner")
    for container in containers(cluster_spec(manifest("rayservice.yaml"))):
        assert mounted(container, args["export"]), container["name"]


def test_rayservice_overrides_are_valid_serve_settings(monkeypatch):
    argv, _ = rayjob_experiment(monkeypatch)
    overrides = rayservice_app()["args"].get("overrides", [])
    assert all(o.startswith("serve.") for o in overrides)
    cfg = load_config(ROOT / argv[2], overrides)  # the export records this experiment; the overrides apply to it
    if cfg.serve.api_key_env:
        # the key comes from a Secret in every Ray container, never from the manifest itself
        for container in containers(cluster_spec(manifest("rayservice.yaml"))):
            env = {e["name"]: e for e in container.get("env", [])}
            assert "secretKeyRef" in env[cfg.serve.api_key_env]["valueFrom"], container["name"]
            assert "value" not in env[cfg.serve.api_key_env]


def test_manifests_carry_no_literal_ray_token():
    for name in MANIFEST_KINDS:
        for container in containers(cluster_spec(manifest(name))):
            for env in container.get("env", []):
                assert env["name"] != "RAY_AUTH_TOKEN" or "value" not in env, f"{name}: token in the manifest"
