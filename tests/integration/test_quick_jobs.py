"""Each shipped quick variant (jobs/*-quick.yaml) runs end to end as a user runs it, `raytune-ft tune FILE`, on the
real data beside the project: search, DeepSpeed, export, the test split read once. The Shakespeare variant trains a
tiny local Llama (SHAKESPEARE_MODEL) since nothing can be downloaded here; the SST-2 ones the packaged MiniLM."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
from conftest import cpus_free_within
from helpers import cli
from shared_data import shared_data

from raytune_ft.config import load_config

pytestmark = pytest.mark.integration

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def run_quick(name: str, output_dir: Path, address: str, **env_vars: str) -> tuple[Path, dict, str]:
    """`raytune-ft tune jobs/NAME.yaml output_dir=... cluster.address=ADDRESS` on the pytest session's Ray (an
    embedded start, which these jobs would otherwise pay each, is test_run.py's); the run directory and the
    export's test metrics, and what the command printed."""
    env = {**os.environ, **env_vars}
    done = cli("tune", str(JOBS / f"{name}.yaml"), f"output_dir={output_dir}", f"cluster.address={address}", env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    [export] = re.findall(r"^export: (.+)$", done.stdout, re.MULTILINE)
    export = Path(export)
    assert export == output_dir / name / "tune" / "winner"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer_config.json").is_file()
    tested = json.loads((export / "test_metrics.json").read_text())
    assert tested["test_rows"] > 0
    reads = (output_dir / name / "data" / "test_reads.jsonl").read_text().splitlines()
    assert len(reads) == 1  # the test split was read once, after the search
    return output_dir / name / "tune", tested, done.stdout + done.stderr


def beats_the_majority_class(tested: dict) -> None:
    """Above always answering the test split's most common label: accuracy by at least 0.08 (16 of its 197 rows),
    macro F1 at 0.6 against the 0.358 of that constant answer. The split is overlap-aware (no test row is a phrase
    of a training sentence, data.split.overlap). Measured 2026-12-06 on it (majority share 0.558): the LoRA PBT
    job's winner 0.787 (macro F1 0.770), the full-FT Optuna job's 0.817 (0.807). With the learning rates these
    jobs had before (LoRA 3e-4..3e-3, full 1e-5..1e-4), both answered the majority class on this split: their
    0.58-0.63 on the old split came from test phrases of training sentences."""
    counts = tested["confusion_matrix"]["counts"]  # rows: true labels
    majority = max(sum(row) for row in counts) / sum(map(sum, counts))
    assert tested["test_accuracy"] >= majority + 0.08, (tested["test_accuracy"], majority)
    assert tested["test_f1_macro"] >= 0.6, tested["test_f1_macro"]


def trials(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "trials.csv")))


def deepspeed_files(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "train-runs").rglob("ds/*.pt")}


def test_sst2_lora_pbt_quick_exploits_and_exports(tmp_path, session_ray_address):
    shared_data("sst2", "train.tsv")  # the YAML's default path: the shared data beside the checkout
    # A PBT search on a cluster it joined: Ray 2.60 can leave a stopped trial's placement group behind there, and
    # the search removes it before it exits (ray_cluster.remove_leftover_placement_groups); the session's guard
    # (conftest.free_session_cpus) would warn about one it missed.
    run_dir, tested, printed = run_quick("sst2-minilm-quick", tmp_path, session_ray_address)
    assert cpus_free_within(60.0), "the search exited with a CPU of the session's Ray still held"
    cfg = load_config(JOBS / "sst2-minilm-quick.yaml")
    rows = trials(run_dir)
    assert len(rows) == cfg.tune.num_samples and {r["status"] for r in rows} == {"TERMINATED"}
    exploits = [json.loads(line) for line in (run_dir / "exploits.jsonl").read_text().splitlines()]
    assert exploits, "the quick PBT run never exploited"
    for e in exploits:
        assert e["donor"] != e["trial"] and e["restored_step"] == e["donor_step"] > 0
        # LoRA: the exploit moves the adapter and its optimizer state, not MiniLM's 22M frozen weights (~90 MB)
        assert 0 < e["bytes_moved"] < 20_000_000
        # the console says so once, as a trial event
        said = f"tune: trial {e['trial']} exploited trial {e['donor']} at step {e['donor_step']} "
        assert printed.count(said) == 1, printed[-3000:]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in deepspeed_files(run_dir)  # ZeRO-2 on one worker
    beats_the_majority_class(tested)

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "winner")  # LoRA merged: a plain model
    assert model.config.num_labels == 2


def test_sst2_full_optuna_quick_searches_and_exports(tmp_path, session_ray_address):
    shared_data("sst2", "train.tsv")
    run_dir, tested, _ = run_quick("sst2-minilm-full-optuna-quick", tmp_path, session_ray_address)
    rows = trials(run_dir)
    assert len(rows) == load_config(JOBS / "sst2-minilm-full-optuna-quick.yaml").tune.num_samples
    assert len({r["train.lr"] for r in rows}) == len(rows)  # Optuna proposed different points
    assert {r["status"] for r in rows} <= {"TERMINATED", "STOPPED"}
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in deepspeed_files(run_dir)
    beats_the_majority_class(tested)


def test_shakespeare_zero3_quick_shards_over_two_workers_and_exports(tmp_path, tiny_llama, session_ray_address):
    text = shared_data("tinyshakespeare", "input.txt")
    run_dir, tested, _ = run_quick(
        "shakespeare-zero3-quick",
        tmp_path,
        session_ray_address,
        SHAKESPEARE_MODEL=str(tiny_llama),
        SHAKESPEARE_PATH=str(text),
    )
    rows = trials(run_dir)
    assert len(rows) == 1 and rows[0]["status"] == "TERMINATED"
    files = deepspeed_files(run_dir)
    # ZeRO-3: each of the two workers saved its own shard of the parameters and of the optimizer state
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= files
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert tested["test_perplexity"] > 1

    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "winner").config.model_type == "llama"
