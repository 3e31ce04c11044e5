"""Integration fixtures: one real local Ray for the pytest session, tiny real Hugging Face model directories, and
the two exports (a classifier and a causal LM) that the training tests check and the serving tests serve.

A module that needs a cluster of its own starts it beside this one (`ray start --head` in a temp dir, tests/
integration/ray_head.py)."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import pytest
from helpers import lm_cfg, make_cfg, write_reviews

_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"
VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *_CHARS,
    *".,!?'",
    *(f"##{c}" for c in _CHARS),
    "good",
    "bad",
    "movie",
    "film",
    "review",
    "number",
    "is",
    "the",
    "not",
]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT with hidden size 32, saved like any checkpoint users load with from_pretrained."""
    import torch
    from tiny_models import bert_config
    from transformers import BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)  # the same starting weights every session: tests assert what training reaches from them
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(folder)
    config = bert_config(len(VOCAB), max_position_embeddings=128, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) for causal LM, with the tiny word-piece tokenizer."""
    import torch
    from tiny_models import llama_config
    from transformers import BertTokenizerFast, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}).save_pretrained(folder)
    config = llama_config(len(VOCAB), pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama (hidden 32) for chat, with a byte-level tokenizer that holds the ChatML markers as single
    tokens and carries the ChatML template (tests/tiny_models.chat_tokenizer)."""
    import torch
    from tiny_models import chat_tokenizer, llama_config
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    torch.manual_seed(0)
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(folder)
    config = llama_config(
        len(tokenizer),
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """160 conversations built by jobs/build_chat_data.py from the real SST-2 and tiny Shakespeare, as a user of
    the chat example builds them: single- and multi-turn sentiment questions and passages to continue."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("chat-data") / "chat.jsonl"
    script = Path(__file__).resolve().parents[2] / "jobs" / "build_chat_data.py"
    args = ["--rows", "160", "--shakespeare-share", "0.1", "--seed", "0", "--out", str(out)]
    subprocess.run([sys.executable, str(script), *args], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, tiny_chat_llama, chat_data, local_ray):
    """The tiny chat Llama trained with LoRA on 2 workers, ZeRO-2, packed rows, 6 steps, a retain set scored at
    every evaluation, and exported: test_chat checks the run and its export. (result, config)"""
    from helpers import chat_cfg

    from raytune_ft.train import train

    free_session_cpus()
    root = tmp_path_factory.mktemp("chat")
    # the forgetting guard on general text, as a chat run of a pre-trained model would use it
    retain = root / "general.txt"
    retain.write_text("\n".join(f"The weather on day {i} was mild, and the market opened at nine." for i in range(40)))
    cfg = chat_cfg(root, "chat", tiny_chat_llama, chat_data, train={"retain_path": str(retain)})
    return train(cfg), cfg


@pytest.fixture(scope="session")
def chat_pbt_search(tmp_path_factory, tiny_chat_llama, chat_data, local_ray):
    """Two LoRA chat trials under PBT meeting at step 3, the winner exported as its adapter alone
    (finetune.lora.export: adapter): test_chat checks the search, the multi-adapter serving test serves the winner
    beside a classifier adapter of the same base. (search result, config, search directory)"""
    from helpers import chat_cfg, pbt_pair

    from raytune_ft.tune import tune_experiment

    free_session_cpus()
    root = tmp_path_factory.mktemp("chat-pbt")
    cfg = chat_cfg(
        root / "runs",
        "chat-pbt",
        tiny_chat_llama,
        chat_data,
        finetune={"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "export": "adapter"}},
        train={"lr_schedule": "constant", "warmup_ratio": 0},
        scaling={"num_workers": 1},
        tune=pbt_pair(3, keep_checkpoints=1, max_failures=0, mlflow=False),
    )
    search = root / "search"
    return tune_experiment(cfg, search), cfg, search


@pytest.fixture(scope="session")
def review_adapter_run(tmp_path_factory, tiny_chat_llama, reviews, local_ray):
    """A sentiment classifier on the tiny chat Llama's base (LoRA, 1 worker, 6 steps), exported as its adapter
    alone: served beside the chat adapter from one base. (result, config)"""
    from raytune_ft.train import train

    free_session_cpus()
    cfg = make_cfg(
        tmp_path_factory.mktemp("review-adapter"),
        "reviews-adapter",
        tiny_chat_llama,
        reviews,
        finetune={"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "export": "adapter"}},
        train={"max_steps": 6, "eval_every_steps": 3, "checkpoint_every_steps": 3},
        scaling={"num_workers": 1},
    )
    return train(cfg), cfg


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, in a thread of this process) for the session, and the environment
    that reaches it: endpoint, region and credentials, the secret key drawn anew each session. Only the
    environment carries them, as on a user's cluster: nothing in an experiment or a job names them."""
    import logging
    import secrets

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line on stderr for every request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",  # pyarrow (and boto3) read it
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no probe of an instance metadata service that is not there
    }
    server.stop()


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """The embedded Ray `raytune-ft` starts, once for the session (2 CPUs, as on the CI machine)."""
    import ray

    from raytune_ft.train.ray_cluster import inherited_environment, start_embedded_ray

    # Workers import test modules (loop functions live there) the way pytest does: by file name.
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    # Workers reach the session's S3 server as a cluster's workers reach a bucket: through the environment the
    # raylet gives them, which is fixed when it starts (see s3_server).
    with inherited_environment({"PYTHONPATH": path, **s3_server}):
        start_embedded_ray(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def session_ray_address(local_ray) -> str:
    """The session Ray's address, for a `raytune-ft` process to join (cluster.address=...) instead of starting
    an embedded Ray of its own (4-8 s here, and as long again to stop); Serve is not running in it."""
    free_session_cpus()
    return local_ray.get_runtime_context().gcs_address


@pytest.fixture(scope="session")
def serve_port() -> int:
    """Serve's HTTP proxy keeps the port it first started with in a Ray session: one port for the session."""
    from helpers import free_port

    return free_port()


def free_session_cpus(wait_s: float = 60.0) -> None:
    """A Serve app holds its replicas' CPUs in the session's Ray, and a 2-worker run needs both: stop Serve. Then
    wait until every CPU is free again (a finished run's actors and placement groups go asynchronously). A
    placement group still there after WAIT_S is one Ray left behind (ray_cluster.remove_leftover_placement_groups
    says how; a search removes its own, a command that joined the session's Ray may have exited first): it is
    removed, with a warning that names it, so that one leak does not starve every later run. Anything else that
    still holds a CPU ends the session, named, rather than leaving every later run waiting for it."""
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    serve.shutdown()
    if not cpus_free_within(wait_s):
        from raytune_ft.train.ray_cluster import remove_leftover_placement_groups

        remove_leftover_placement_groups(lambda m: warnings.warn(f"session's Ray: {m}", stacklevel=1), any_job=True)
    if not cpus_free_within(30.0):
        from ray.util.state import list_actors

        actors = [f"{a.class_name} ({a.state})" for a in list_actors(filters=[("state", "!=", "DEAD")])]
        pytest.exit(
            f"the session's Ray has CPUs held after the last run: {ray.available_resources()} of "
            f"{ray.cluster_resources()}; actors {actors}",
            returncode=1,
        )


def cpus_free_within(seconds: float) -> bool:
    import ray

    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.fixture(scope="module", autouse=True)
def no_serve_app_after_the_module():
    yield
    free_session_cpus()


@pytest.fixture(autouse=True)
def own_state_dir(tmp_path, monkeypatch):
    """Server state files (pid, URL, Ray address) of each test stay in the test's directory."""
    monkeypatch.setenv("RAYTUNE_FT_STATE_DIR", str(tmp_path / "serve-state"))


@pytest.fixture(scope="session")
def reviews(tmp_path_factory) -> Path:
    return write_reviews(tmp_path_factory.mktemp("data") / "reviews.tsv")


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, tiny_bert, reviews, local_ray):
    """The tiny BERT trained on the toy reviews (2 workers, ZeRO-2, 24 steps, 4 checkpoints) and exported:
    test_train checks the run, the curves of other runs are compared with it, the serving tests serve its export.
    (result, runs root)"""
    from raytune_ft.train import train

    free_session_cpus()  # a session fixture can first be asked for while a module's app is deployed
    root = tmp_path_factory.mktemp("runs")
    return train(make_cfg(root, "baseline", tiny_bert, reviews)), root


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, tiny_llama, local_ray):
    """The tiny Llama trained as a causal LM (ZeRO-3 over 2 workers, 6 steps) and exported. (result, config)"""
    from raytune_ft.train import train

    free_session_cpus()
    cfg = lm_cfg(tmp_path_factory.mktemp("lm"), "lm", tiny_llama)
    return train(cfg), cfg


@pytest.fixture(scope="session")
def classifier(classifier_run, serve_port):
    """The session's classifier export and its experiment, to be served on the session's Serve port."""
    from raytune_ft.serve.model import export_config

    export = classifier_run[0].export_dir
    return export, export_config(export, [f"serve.port={serve_port}"])
