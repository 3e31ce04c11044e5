"""Bad input is refused: one table per kind of input (experiment config, data, checkpoints).

Each row is a case id, how to build the bad input, the error type expected and the words its message must hold:
the field, file or line that is wrong. Every case goes through the code the commands run (the config loader, the
data pipeline, checkpoint verification), and every message is one line that needs no traceback to understand.
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from modeling_fixtures import finetune_cfg, model_cfg, save_tiny_bert, save_tiny_llama
from safetensors.torch import save_file
from test_config import MINIMAL

from raytune_ft.config import ConfigError, load_config
from raytune_ft.config.loader import validate_raw
from raytune_ft.data import DataError, data_dir_for, prepare_data
from raytune_ft.modeling import build_model
from raytune_ft.train.checkpoint import (
    STATE,
    TRAINABLE,
    CheckpointError,
    check_same_model,
    model_record,
    newest_whole_checkpoint,
    verify_checkpoint,
    write_manifest,
)

CPUS = os.cpu_count() or 1
GPUS = torch.cuda.device_count()


def one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message, message


# ============================================================================================ experiment config

# test_config's MINIMAL is the experiment every config case starts from; a case's text continues it at line 7 (an
# indented first line continues the `data` section).


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


# (id, text after MINIMAL (or a function of tmp_path giving it), overrides, expected error, words of one message)
CONFIG_CASES: list[tuple[str, Any, list[str], type[Exception], list[str]]] = [
    # unknown keys, with the closest known key
    ("unknown-section", "finetunes: {method: lora}", [], ConfigError, [":7: finetunes: unknown key", "'finetune'?"]),
    ("unknown-key", "train:\n  epoch: 3", [], ConfigError, [":8: train.epoch: unknown key", "did you mean 'epochs'?"]),
    (
        "unknown-override-key",
        "",
        ["train.batchsize=8"],
        ConfigError,
        ["override 'train.batchsize=8': train.batchsize: unknown key", "did you mean 'batch_size'?"],
    ),
    # wrong types
    (
        "int-given-text",
        "train:\n  batch_size: sixteen",
        [],
        ConfigError,
        [":8: train.batch_size: expected an integer, got 'sixteen'"],
    ),
    ("bool-given-text", "scaling:\n  use_gpu: maybe", [], ConfigError, [":8: scaling.use_gpu: expected true or false"]),
    ("list-given-number", "  labels: 5", [], ConfigError, [":7: data.labels: expected a list, got 5"]),
    ("section-given-value", "deepspeed: 3", [], ConfigError, [":7: deepspeed: expected a mapping of keys, got 3"]),
    # out of range
    ("lr-zero", "train:\n  lr: 0", [], ConfigError, [":8: train.lr: must be > 0, got 0"]),
    ("fraction-above-one", "  split: {validation: 1.5}", [], ConfigError, [":7: data.split.validation: must be < 1"]),
    (
        "similarity-above-one",
        "  split: {overlap: {similarity: 1.5}}",
        [],
        ConfigError,
        [":7: data.split.overlap.similarity: must be <= 1, got 1.5"],
    ),
    (
        "warn-above-negative",
        "",
        ["data.split.overlap.warn_above=-0.1"],
        ConfigError,
        ["data.split.overlap.warn_above: must be >= 0"],
    ),
    (
        "min-words-zero",
        "  split: {overlap: {min_words: 0}}",
        [],
        ConfigError,
        [":7: data.split.overlap.min_words: must be > 0"],
    ),
    ("whole-repeats-zero", "train:\n  whole_repeats: 0", [], ConfigError, [":8: train.whole_repeats: must be > 0"]),
    (
        "whole-repeats-without-containment",
        "  split: {overlap: {containment: false}}\ntrain: {whole_repeats: 3}",
        [],
        ConfigError,
        [":8: train.whole_repeats: needs data.split.overlap.containment: true"],
    ),
    ("port-too-high", "serve:\n  port: 70000", [], ConfigError, [":8: serve.port: must be <= 65535, got 70000"]),
    ("zero-stage-4", "deepspeed:\n  zero_stage: 4", [], ConfigError, [":8: deepspeed.zero_stage: must be one of"]),
    ("negative-override", "", ["train.lr=-1"], ConfigError, ["override 'train.lr=-1': train.lr: must be > 0"]),
    # contradictory settings: what a ZeRO stage cannot do
    (
        "param-offload-without-zero3",
        "deepspeed: {zero_stage: 2, offload_params: true}",
        [],
        ConfigError,
        [":7: deepspeed.offload_params: needs zero_stage 3", "got zero_stage 2"],
    ),
    (
        "optimizer-offload-without-zero",
        "deepspeed: {zero_stage: 0, offload_optimizer: true}",
        [],
        ConfigError,
        [":7: deepspeed.offload_optimizer: needs zero_stage 1, 2 or 3"],
    ),
    (
        "zero3-with-ewc",
        "deepspeed: {zero_stage: 3}\nfinetune: {ewc: {lambda: 0.5}}",
        [],
        ConfigError,
        [":8: finetune.ewc: elastic weight consolidation needs deepspeed.zero_stage 0, 1 or 2"],
    ),
    (
        "zero3-with-l1",
        "deepspeed: {zero_stage: 3}\nfinetune: {l1: 0.001}",
        [],
        ConfigError,
        [":8: finetune.l1: the L1 penalty needs deepspeed.zero_stage 0, 1 or 2"],
    ),
    (
        "override-contradicts-stage",
        "deepspeed:\n  zero_stage: 2\n  overrides:\n    zero_optimization: {stage: 3}",
        [],
        ConfigError,
        [":10: deepspeed.overrides.zero_optimization.stage: 3 contradicts deepspeed.zero_stage 2"],
    ),
    (
        "override-param-offload-without-zero3",
        "deepspeed:\n  zero_stage: 1\n  overrides:\n    zero_optimization:\n      offload_param: {device: cpu}",
        [],
        ConfigError,
        [
            ":11: deepspeed.overrides.zero_optimization.offload_param: parameter offload needs ZeRO stage 3",
            "zero_stage 1",
        ],
    ),
    (
        "override-partial-offload-without-zero3",
        "deepspeed:\n  overrides:\n    zero_optimization:\n      offload_optimizer: {device: cpu, ratio: 0.5}",
        [],
        ConfigError,
        [":10: deepspeed.overrides.zero_optimization.offload_optimizer.ratio: partial optimizer offload"],
    ),
    (
        "override-micro-batch",
        "deepspeed:\n  overrides: {train_micro_batch_size_per_gpu: 4}",
        [],
        ConfigError,
        [":8: deepspeed.overrides.train_micro_batch_size_per_gpu: is set from train.batch_size"],
    ),
    # LoRA on modules the model does not have (the tiny BERT, built from its config.json on the meta device)
    (
        "lora-missing-module",
        "finetune:\n  method: lora\n  lora:\n    target_modules: [query, nonexistent_proj]",
        [],
        ConfigError,
        [
            ":10: finetune.lora.target_modules: BertForSequenceClassification has no module named nonexistent_proj",
            "modules LoRA can wrap: query, key, value",
        ],
    ),
    (
        "lora-module-it-cannot-wrap",
        "finetune:\n  method: lora\n  lora:\n    target_modules: [attention]",
        [],
        ConfigError,
        [":10: finetune.lora.target_modules: attention (BertAttention)", "cannot take a LoRA adapter"],
    ),
    (
        "lora-missing-module-override",
        "finetune: {method: lora}",
        ["finetune.lora.target_modules=[q_proj,v_proj]"],
        ConfigError,
        ["override 'finetune.lora.target_modules=[q_proj,v_proj]'", "no module named q_proj, v_proj"],
    ),
    # PBT needs an interval to exploit and explore at
    (
        "pbt-without-interval",
        "tune:\n  algorithm: pbt\n  search_space:\n    train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}",
        [],
        ConfigError,
        [":7: tune.perturbation_interval: pbt needs a perturbation interval"],
    ),
    (
        "pb2-without-interval",
        "tune:\n  algorithm: pb2\n  search_space:\n    train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}",
        [],
        ConfigError,
        [":7: tune.perturbation_interval: pb2 needs a perturbation interval"],
    ),
    # more workers than the embedded Ray (no cluster.address) can ever place on this machine
    (
        "more-workers-than-cpus",
        f"scaling:\n  num_workers: {CPUS + 1}",
        [],
        ConfigError,
        [
            f":8: scaling.num_workers: {CPUS + 1} worker(s) × 1 CPU(s)",
            f"need {CPUS + 1} CPUs, but the embedded Ray on this machine has {CPUS}",
        ],
    ),
    (
        "more-cpus-per-worker-than-cpus",
        f"scaling: {{num_workers: 1, cpus_per_worker: {CPUS * 2}}}",
        [],
        ConfigError,
        [":7: scaling.num_workers: 1 worker(s)", f"has {CPUS}"],
    ),
    (
        "searched-worker-count-too-large",
        "scaling: {num_workers: 1}\ntune:\n  search_space:\n"
        f"    scaling.num_workers: {{type: choice, values: [1, {CPUS + 1}]}}",
        [],
        ConfigError,
        [f":10: tune.search_space.scaling.num_workers: {CPUS + 1} worker(s)", f"has {CPUS}"],
    ),
    (
        "more-gpu-workers-than-gpus",
        f"scaling: {{num_workers: {GPUS + 1}, use_gpu: true}}",
        ["cluster.address=null"],
        ConfigError,
        [f"scaling.num_workers: {GPUS + 1} worker(s) × 1 GPU(s)", f"the embedded Ray on this machine has {GPUS}"],
    ),
]


def write_experiment(folder: Path, extra: str, model: Path) -> Path:
    path = folder / "exp.yaml"
    path.write_text(MINIMAL.replace("{model}", str(model)) + (extra + "\n" if extra else ""))
    return path


@pytest.mark.parametrize(
    ("extra", "overrides", "error", "words"),
    [case[1:] for case in CONFIG_CASES],
    ids=[case[0] for case in CONFIG_CASES],
)
def test_bad_config_is_refused(tmp_path, tiny_bert, extra, overrides, error, words):
    path = write_experiment(tmp_path, extra, tiny_bert)
    with pytest.raises(error) as info:
        load_config(path, overrides)
    issues = [str(issue) for issue in info.value.issues]
    for issue in issues:
        one_line(issue)
    # one issue holds every expected word, and a line number is the file's (the override's text otherwise)
    expected = [f"{path}{w}" if w.startswith(":") else w for w in words]
    assert any(all(w in issue for w in expected) for issue in issues), issues


def test_new_config_checks_report_beside_each_other(tmp_path, tiny_bert):
    """The loader reports every problem at once: the model, resource, ZeRO and tune checks add up."""
    extra = f"""\
    finetune:
      method: lora
      lora: {{target_modules: [nonexistent_proj]}}
      ewc: {{lambda: 0.5}}
    deepspeed:
      zero_stage: 3
      overrides: {{gradient_accumulation_steps: 4}}
    scaling:
      num_workers: {CPUS + 1}
    tune:
      algorithm: pbt
      search_space: {{train.lr: {{type: uniform, low: 0.0, high: 0.1}}}}
    """
    path = write_experiment(tmp_path, textwrap.dedent(extra), tiny_bert)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    paths = [issue.path for issue in info.value.issues]
    assert paths == [
        "finetune.lora.target_modules",
        "finetune.ewc",
        "deepspeed.overrides.gradient_accumulation_steps",
        "scaling.num_workers",
        "tune.perturbation_interval",
    ], info.value.issues
    lines = [int(issue.origin.rsplit(":", 1)[1]) for issue in info.value.issues]
    assert lines == sorted(lines) and lines[0] == 9


def test_what_the_model_and_resource_checks_leave_alone(tmp_path, tiny_bert):
    cpus_needed = f"scaling: {{num_workers: {CPUS + 1}}}"
    # a cluster joined by address may autoscale: its size is not known here
    load_config(write_experiment(tmp_path, cpus_needed, tiny_bert), ["cluster.address=auto"])
    # the resource check is for files loaded to run; a recorded experiment read back (an export served) skips it
    load_config(write_experiment(tmp_path, cpus_needed, tiny_bert), check_resources=False)
    raw = {"name": "x", "model": {"name_or_path": str(tiny_bert), "task": "causal-lm"}, "data": {"path": "d.txt"}}
    validate_raw({**raw, "scaling": {"num_workers": CPUS + 1}}, None, "t.yaml", [], base_dir=tmp_path)
    # LoRA targets that exist pass, as does `auto`; a hub id is not looked up (no network at validation)
    lora = "finetune:\n  method: lora\n  lora: {target_modules: [query, value]}"
    assert load_config(write_experiment(tmp_path, lora, tiny_bert)).finetune.lora.target_modules == ["query", "value"]
    hub = MINIMAL.replace("{model}", "org/some-model") + "finetune: {method: lora, lora: {target_modules: [nope]}}\n"
    (tmp_path / "hub.yaml").write_text(hub)
    assert load_config(tmp_path / "hub.yaml").finetune.lora.target_modules == ["nope"]
    # a directory transformers cannot build a model from is left to the training run's own error
    odd = tmp_path / "odd-model"
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    load_config(write_experiment(tmp_path, "finetune: {method: lora, lora: {target_modules: [nope]}}", odd))


# ========================================================================================================= data


def _tsv(folder: Path, text: str, name: str = "data.tsv") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _rows(n: int, label: str, word: str) -> str:
    numbers = "one two three four five six seven eight nine ten eleven twelve".split()
    return "".join(f"a {word} film number {numbers[i % 12]} {word * (i // 12 + 1)}\t{label}\n" for i in range(n))


GOOD_TSV = "text\tlabel\n" + _rows(12, "1", "good") + _rows(12, "0", "bad")


def _non_utf8(folder: Path) -> tuple[Path, dict]:
    path = folder / "latin1.tsv"
    path.write_bytes(GOOD_TSV.encode() + "a caf\xe9 review\t1\n".encode("latin-1"))
    return path, {}


# (id, build(folder) -> (data file, extra data settings), expected error, words of the message; {path} is the file)
DATA_CASES: list[tuple[str, Callable[[Path], tuple[Path, dict]], type[Exception], list[str]]] = [
    ("missing-file", lambda d: (d / "absent.tsv", {}), DataError, ["{path}: file not found"]),
    ("empty-file", lambda d: (_tsv(d, ""), {}), DataError, ["{path}: file is empty"]),
    ("whitespace-only-file", lambda d: (_tsv(d, "\n \n"), {}), DataError, ["{path}: file is empty"]),
    ("header-only", lambda d: (_tsv(d, "text\tlabel\n"), {}), DataError, ["{path}: has no data rows"]),
    (
        "missing-label-column",
        lambda d: (_tsv(d, GOOD_TSV.replace("text\tlabel", "text\tsentiment")), {}),
        DataError,
        ["{path}:1: no label column 'label' (columns: text, sentiment); set data.columns.label"],
    ),
    (
        "missing-text-column",
        lambda d: (_tsv(d, GOOD_TSV), {"columns": {"text": "sentence"}}),
        DataError,
        ["{path}:1: no text column 'sentence' (columns: text, label); set data.columns.text"],
    ),
    (
        "missing-jsonl-key",
        lambda d: (_tsv(d, '{"text": "fine", "label": 1}\n{"text": "no label"}\n', "data.jsonl"), {}),
        DataError,
        ["{path}:2: no label column 'label' (columns: text)"],
    ),
    (
        "missing-slice-column",
        lambda d: (_tsv(d, GOOD_TSV), {"columns": {"slice": "group"}}),
        DataError,
        ["{path}:1: no slice column 'group'", "set data.columns.slice"],
    ),
    (
        "non-utf8-byte",
        _non_utf8,
        DataError,
        ["{path}:26: invalid UTF-8 byte 0xe9 at column 6; save the file as UTF-8"],
    ),
    (
        "wrong-field-count",
        lambda d: (_tsv(d, GOOD_TSV + "a row\twith\tthree fields\t1\n"), {}),
        DataError,
        ["{path}:26: expected 2 fields like the header, found 4"],
    ),
    (
        "invalid-jsonl",
        lambda d: (_tsv(d, '{"text": "fine", "label": 1}\n{"text": "cut\n', "data.jsonl"), {}),
        DataError,
        ["{path}:2: invalid JSON at column"],
    ),
    (
        "label-outside-declared",
        lambda d: (_tsv(d, GOOD_TSV + "a third kind of film\t2\n"), {"labels": [0, 1]}),
        DataError,
        ["{path}:26: label '2' is not one of data.labels ['0', '1']"],
    ),
    (
        "one-label-value",
        lambda d: (_tsv(d, "text\tlabel\n" + _rows(20, "1", "good")), {}),
        DataError,
        ["{path}: only one label value ('1') in the data; need at least 2"],
    ),
    (
        "split-leaves-a-class-empty",
        lambda d: (_tsv(d, "text\tlabel\n" + _rows(30, "a", "good") + "a rare film\tb\na rarer film\tb\n"), {}),
        DataError,
        ["{path}: the validation split has no rows of class 'b'", "add data or change data.split"],
    ),
    (
        "nothing-left-after-curation",
        lambda d: (_tsv(d, GOOD_TSV), {"curation": {"min_chars": 500}}),
        DataError,
        ["{path}: no rows left after curation; loosen data.curation"],
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "words"), [case[1:] for case in DATA_CASES], ids=[case[0] for case in DATA_CASES]
)
def test_bad_data_is_refused(make_config, tmp_path, build, error, words):
    path, extra = build(tmp_path)
    cfg = make_config({"path": str(path), **extra})
    with pytest.raises(error) as info:
        prepare_data(cfg, with_tokens=False)
    message = str(info.value)
    one_line(message)
    for word in words:
        assert word.format(path=path) in message
    assert not data_dir_for(cfg).exists()  # nothing half-built is left behind


def test_the_good_data_of_the_table_passes(make_config, tmp_path):
    cfg = make_config({"path": str(_tsv(tmp_path, GOOD_TSV)), "labels": [0, 1]})
    assert prepare_data(cfg, with_tokens=False).report["source"]["rows_read"] == 24


# ================================================================================================== checkpoints


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """model_record of real models: tiny BERT with LoRA, the same with full fine-tuning and with 3 classes, and a
    tiny Llama (another architecture)."""
    folder = tmp_path_factory.mktemp("ckpt-models")
    bert, llama = save_tiny_bert(folder / "bert"), save_tiny_llama(folder / "llama")
    lora = finetune_cfg(method="lora", lora={"target_modules": ["query", "value"]})
    return {
        "bert-lora": model_record(build_model(model_cfg(bert), lora, 2), str(bert)),
        "bert-full": model_record(build_model(model_cfg(bert), finetune_cfg(), 2), str(bert)),
        "bert-lora-3-classes": model_record(build_model(model_cfg(bert), lora, 3), str(bert)),
        "llama": model_record(build_model(model_cfg(llama, "causal-lm"), finetune_cfg()), str(llama)),
    }


def write_checkpoint(directory: Path, model: dict[str, Any] | None, world: int = 2) -> Path:
    """A checkpoint as the training loop leaves it: each rank writes its files and, last, its manifest."""
    directory.mkdir(parents=True)
    for rank in range(world):
        rank_dir = directory.parent / f".{directory.name}.rank{rank}"
        (rank_dir / "ds").mkdir(parents=True)
        torch.save({"shard": torch.arange(64, dtype=torch.float32) + rank}, rank_dir / "ds" / f"shard{rank}.pt")
        save_file({"cpu": torch.get_rng_state()}, str(rank_dir / f"rng.rank{rank}.safetensors"))
        if rank == 0:
            save_file({"classifier.weight": torch.ones(2, 32)}, str(rank_dir / TRAINABLE))
            state = {"step": 4, "epoch": 1.0, "world_size": world, "metrics": {"eval_loss": 0.5}}
            if model is not None:
                state["model"] = model
            (rank_dir / STATE).write_text(json.dumps(state, indent=1))
        write_manifest(rank_dir, rank)
        for path in sorted(rank_dir.rglob("*")):  # Ray Train merges the ranks' directories
            if path.is_file():
                target = directory / path.relative_to(rank_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return directory


def _truncate(d: Path) -> Path:
    shard = d / "ds" / "shard1.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def _flip_a_byte(d: Path) -> Path:
    path = d / TRAINABLE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def _drop_manifest(d: Path) -> Path:
    (d / "manifest.rank1.json").unlink()
    return d / "manifest.rank1.json"


def _drop_listed_file(d: Path) -> Path:
    (d / "rng.rank0.safetensors").unlink()
    return d / "rng.rank0.safetensors"


def _garble_manifest(d: Path) -> Path:
    path = d / "manifest.rank0.json"
    path.write_text(path.read_text()[:40])
    return path


def _manifest_of_another_shape(d: Path) -> Path:
    path = d / "manifest.rank0.json"
    path.write_text(json.dumps(["ds/shard0.pt"]))
    return path


def _manifest_pointing_outside(d: Path) -> Path:
    path = d / "manifest.rank0.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../../etc/hostname"] = "0" * 64
    path.write_text(json.dumps(manifest))
    return path


def _garble_state(d: Path) -> Path:
    path = d / STATE
    path.write_text('{"step": 4, "world_size": ')
    return path


def _drop_state(d: Path) -> Path:
    (d / STATE).unlink()
    return d / STATE


# (id, damage(checkpoint) -> the file the message must name, the model this run builds, expected error, words)
CHECKPOINT_CASES: list[tuple[str, Callable[[Path], Path], str, type[Exception], list[str]]] = [
    ("truncated-file", _truncate, "bert-lora", CheckpointError, ["checksum mismatch", "truncated or corrupted"]),
    ("byte-flipped", _flip_a_byte, "bert-lora", CheckpointError, ["checksum mismatch with manifest.rank0.json"]),
    (
        "manifest-missing",
        _drop_manifest,
        "bert-lora",
        CheckpointError,
        ["missing; the checkpoint write did not finish"],
    ),
    (
        "listed-file-missing",
        _drop_listed_file,
        "bert-lora",
        CheckpointError,
        ["listed in manifest.rank0.json but missing"],
    ),
    ("manifest-garbled", _garble_manifest, "bert-lora", CheckpointError, ["not valid JSON (line"]),
    (
        "manifest-not-a-manifest",
        _manifest_of_another_shape,
        "bert-lora",
        CheckpointError,
        ["not a checkpoint manifest"],
    ),
    (
        "manifest-path-escape",
        _manifest_pointing_outside,
        "bert-lora",
        CheckpointError,
        ["lists '../../etc/hostname', which is outside the checkpoint directory"],
    ),
    ("state-garbled", _garble_state, "bert-lora", CheckpointError, ["not valid JSON (line 1"]),
    ("state-missing", _drop_state, "bert-lora", CheckpointError, ["missing; the checkpoint write did not finish"]),
    (
        "another-architecture",
        lambda d: d,
        "llama",
        CheckpointError,
        ["checkpoint of another model", "it holds '{bert}' (BertForSequenceClassification", "builds '{llama}'"],
    ),
    (
        "another-finetune-method",
        lambda d: d,
        "bert-full",
        CheckpointError,
        ["checkpoint of another model", "they differ in num_parameters, trainable parameter names"],
    ),
    (
        "another-head",
        lambda d: d,
        "bert-lora-3-classes",
        CheckpointError,
        ["checkpoint of another model", "they differ in num_parameters"],
    ),
]


@pytest.mark.parametrize(
    ("damage", "expected_model", "error", "words"),
    [case[1:] for case in CHECKPOINT_CASES],
    ids=[case[0] for case in CHECKPOINT_CASES],
)
def test_bad_checkpoint_is_refused(tmp_path, records, damage, expected_model, error, words):
    directory = write_checkpoint(tmp_path / "step_000004", records["bert-lora"])
    assert verify_checkpoint(directory, records["bert-lora"])["step"] == 4  # whole before the damage
    named = damage(directory)
    with pytest.raises(error) as info:
        verify_checkpoint(directory, expected_model=records[expected_model])
    message = str(info.value)
    one_line(message)
    assert str(named) in message
    paths = {"bert": records["bert-lora"]["name_or_path"], "llama": records["llama"]["name_or_path"]}
    for word in words:
        assert word.format(**paths) in message


def test_checkpoints_without_a_model_record_still_load(tmp_path, records):
    old = write_checkpoint(tmp_path / "step_000004", None)
    assert verify_checkpoint(old, records["llama"])["step"] == 4
    check_same_model(old, {"step": 4}, records["llama"])


def test_model_record_is_the_same_for_the_same_model(tmp_path, records):
    bert = Path(records["bert-lora"]["name_or_path"])
    again = model_record(
        build_model(model_cfg(bert), finetune_cfg(method="lora", lora={"target_modules": ["query", "value"]}), 2),
        str(bert),
    )
    assert again == records["bert-lora"]
    assert re.fullmatch(r"[0-9a-f]{64}", again["trainable_names_sha"])
    assert again["architecture"] == "BertForSequenceClassification" and again["model_type"] == "bert"


def test_resume_falls_back_past_each_broken_checkpoint(tmp_path, records):
    """Every damage of the table makes a checkpoint not whole: resume skips it, says why, and takes the older one."""
    good = write_checkpoint(tmp_path / "step_000002", records["bert-lora"])
    broken = []
    for i, (_, damage, *_rest) in enumerate(CHECKPOINT_CASES[:8]):
        directory = write_checkpoint(tmp_path / f"step_{i + 10:06d}", records["bert-lora"])
        damage(directory)
        broken.append(directory)
    logged: list[str] = []
    found = newest_whole_checkpoint([good, *broken], log=logged.append)
    assert found is not None and found[0] == good
    assert len(logged) == len(broken) and all(line.startswith("skipping checkpoint step_") for line in logged)
    for line in logged:
        one_line(line)


def test_a_cluster_address_where_nothing_listens_fails_within_the_join_deadline(monkeypatch):
    """ray.init waits forever for a GCS that is not there (to a closed port it retried without end)."""
    import socket

    from raytune_ft.train import ray_cluster

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(ray_cluster, "JOIN_TIMEOUT_S", 2.0)
    with pytest.raises(ray_cluster.ClusterError) as caught:
        ray_cluster.join_cluster(f"127.0.0.1:{port}")
    message = str(caught.value)
    assert message.startswith(f"cannot join the Ray cluster at 127.0.0.1:{port}: nothing took a connection"), message
    assert "for 2 s" in message and "token" not in message
