"""The pre-flight storage check, on real directories: what cannot be written and a disk that is too small are
named before a run starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from raytune_ft.config import load_config
from raytune_ft.train.storage import StorageError, bytes_needed, check_storage


def experiment(tmp_path: Path, method: str, weights_bytes: int) -> Path:
    tmp_path = tmp_path / method
    model = tmp_path / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\0" * weights_bytes)
    (tmp_path / "d.tsv").write_text("text\tlabel\na\t0\n")
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: s\nmodel: {name_or_path: ./model, task: sequence-classification}\ndata: {path: d.tsv}\n"
        f"finetune: {{method: {method}}}\ntrain: {{keep_checkpoints: 2}}\n"
    )
    return path


def test_the_need_follows_the_weights_the_method_and_the_checkpoints_kept(tmp_path):
    full = load_config(experiment(tmp_path, "full", 1000))
    # 1.2 x (3 checkpoints of 4 x 1000 bytes + the 1000-byte export)
    assert bytes_needed(full) == int(1.2 * (3 * 4000 + 1000))
    assert bytes_needed(full, concurrent_runs=2) == int(1.2 * (2 * 3 * 4000 + 1000))  # trials side by side
    lora = load_config(experiment(tmp_path, "lora", 1000))
    assert bytes_needed(lora) == int(1.2 * (3 * 1000 + 1000))
    hub = lora.model_copy(update={"model": lora.model.model_copy(update={"name_or_path": "org/some-model"})})
    assert bytes_needed(hub) is None  # a hub model's size is not known before it is downloaded


def test_a_writable_directory_with_room_passes_and_is_left_clean(tmp_path):
    check_storage(tmp_path / "runs" / "x", need=1000)
    assert list((tmp_path / "runs" / "x").iterdir()) == []


@pytest.mark.parametrize(
    "where, expected",
    [
        ("/proc/raytune-ft-runs", "cannot be written"),  # a read-only kernel filesystem, even for root
        ("FILE/runs", "cannot be written: Not a directory"),  # a path through a regular file
    ],
)
def test_a_directory_that_cannot_be_written_is_named(tmp_path, where, expected):
    (tmp_path / "FILE").write_text("not a directory")
    target = Path(where.replace("FILE", str(tmp_path / "FILE")))
    with pytest.raises(StorageError, match=expected) as info:
        check_storage(target, need=None)
    assert str(target) in str(info.value)


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_the_run(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StorageError, match=r"GB free, but the run's checkpoints and export need about .* keep fewer"):
        check_storage(tmp_path, need=free * 10)
