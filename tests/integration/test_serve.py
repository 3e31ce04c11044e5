"""Serving on a real local Ray: the session's tiny classifier and causal-LM exports (conftest), deployed with Ray
Serve, asked over real HTTP (urllib and raw sockets), answers checked against the same export loaded in-process."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from helpers import post_json, request, with_serve

from raytune_ft.bench.serve import server_timing
from raytune_ft.serve.app import APP_NAME
from raytune_ft.serve.deploy import deploy, url_of
from raytune_ft.serve.model import LoadedModel, export_config
from raytune_ft.train.checkpoint import read_state

pytestmark = pytest.mark.integration


def test_predictions_match_the_in_process_model_and_metadata_is_served(classifier, classifier_run):
    export, cfg = classifier
    url = deploy(export, cfg)
    local = LoadedModel(export)
    texts = ["the good film", "a bad movie", "the review is not good", "number 7 is bad"]

    status, _, one = post_json(f"{url}/v1/classify", {"text": texts[0]})
    assert status == 200 and len(one["predictions"]) == 1
    status, _, many = post_json(f"{url}/v1/classify", {"text": texts})
    assert status == 200
    expected = local.classify(texts)
    assert [p["label"] for p in many["predictions"]] == [e["label"] for e in expected]  # input order kept
    for got, want in zip(many["predictions"], expected, strict=True):
        assert got["label_id"] == want["label_id"] and set(got["probs"]) == set(want["probs"]) == {"0", "1"}
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    assert one["predictions"][0]["probs"] == pytest.approx(expected[0]["probs"], abs=1e-5)

    assert request(f"{url}/healthz")[0] == 200
    status, _, models = request(f"{url}/v1/models")
    [info] = models["data"]
    assert status == 200 and info["experiment"] == "baseline" and info["task"] == "sequence-classification"
    step = read_state(classifier_run[0].best_checkpoint)["step"]
    assert info["checkpoint_step"] == step and "eval_loss" in info["metrics"] and info["exported"]
    assert (info["device"], info["dtype"]) == ("cpu", "float32")  # no GPU asked for (serve.num_gpus: 0)


def test_a_training_run_behind_a_serve_app_fails_in_time_naming_what_holds_its_cpus(classifier, tiny_bert, tmp_path):
    """The session's Ray has 2 CPUs; a Serve replica holds 1 of them. A 2-worker run used to wait for the other
    one forever (Ray Train retries a worker group that does not start, without limit)."""
    from helpers import make_cfg, write_reviews

    from raytune_ft.train import train
    from raytune_ft.train.ray_run import WorkersNotPlaced

    export, cfg = classifier
    deploy(export, cfg)
    data = write_reviews(tmp_path / "reviews.tsv")
    blocked = make_cfg(tmp_path, "blocked", tiny_bert, data, cluster={"placement_timeout_s": 3})
    with pytest.raises(WorkersNotPlaced) as caught:
        train(blocked)
    message = str(caught.value)
    assert "could not be placed within 3 s (cluster.placement_timeout_s)" in message, message
    assert "they ask for 2 CPU (1 CPU each); the embedded Ray has 2 CPU (1 free)" in message, message
    assert "actor ServeReplica:" in message and "raytune-ft serve stop" in message, message
    assert request(f"{url_of(cfg)}/healthz")[0] == 200  # the app serves on

    # more than the whole Ray has: refused before any wait
    too_big = make_cfg(tmp_path, "too-big", tiny_bert, data, scaling={"num_workers": 3})
    with pytest.raises(WorkersNotPlaced, match=r"3 worker\(s\) can never be placed: they ask for 3 CPU"):
        train(too_big)


def test_an_app_whose_replicas_can_never_be_placed_is_refused_and_deleted(classifier):
    """serve.run waits without end for replicas that cannot be placed; the session's Ray has 2 CPUs."""
    from ray import serve

    from raytune_ft.serve.deploy import ServeError

    export, cfg = classifier
    with pytest.raises(ServeError) as caught:
        deploy(export, with_serve(cfg, num_cpus=3))
    message = str(caught.value)
    assert "the app's replicas of 3 CPU each can never be placed: the embedded Ray has 2 CPU" in message, message
    assert APP_NAME not in serve.status().applications  # nothing left pending
    url = deploy(export, cfg)  # and the app as configured deploys again
    assert request(f"{url}/healthz")[0] == 200


def raw_http(port: int, data: bytes) -> tuple[int, bytes]:
    """Send bytes as they are (a client that gets HTTP subtly wrong), return status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(data)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_every_bad_request_gets_its_4xx_and_the_replica_keeps_serving(classifier):
    export, cfg = classifier
    cfg = with_serve(cfg, limits__max_items=3, limits__max_text_chars=50, limits__max_body_bytes=2000)
    url = deploy(export, cfg)
    port = cfg.serve.port
    classify = f"{url}/v1/classify"
    json_type = {"Content-Type": "application/json"}
    cases = [
        (request(classify, b'{"text": "unterminated', headers=json_type), 400, "not valid JSON"),
        (request(classify, b'{"text": "\xff\xfe"}', headers=json_type), 400, ""),
        (post_json(classify, {}), 422, "text"),
        (post_json(classify, {"text": 5}), 422, "text"),
        (post_json(classify, {"text": ""}), 422, "text"),
        (post_json(classify, {"text": "   "}), 422, "empty"),
        (post_json(classify, {"text": []}), 422, "text"),
        (post_json(classify, {"text": ["a", "b", "c", "d"]}), 422, "at most 3"),
        (post_json(classify, {"text": "x" * 51}), 422, "at most 50"),
        (post_json(classify, {"text": "fine", "extra": 1}), 422, "extra"),
        (request(classify, json.dumps({"text": "x" * 2100}).encode(), headers=json_type), 413, "2000 bytes"),
        (request(classify, b"text=hello", headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, ""),
        (request(classify, b'{"text": "a"}', headers={"Content-Type": "text/plain"}), 415, "application/json"),
        (request(f"{url}/v1/nothing"), 404, "/v1/nothing"),
        (request(classify), 405, "GET"),
        (post_json(f"{url}/v1/completions", {"prompt": "hi"}), 404, ""),  # a classifier has no completions
    ]
    for (status, _, body), expected, words in cases:
        assert status == expected, (expected, body)
        assert body["error"]["code"] == expected and words in body["error"]["message"], body
    # a body over the limit is refused from its Content-Length, before it is sent in full
    status, body = raw_http(
        port,
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n"
        b"Connection: close\r\n\r\n{",
    )
    assert status == 413 and b"max_body_bytes" in body
    # chunked, no Content-Length: counted as it arrives
    chunk = b'{"text": "' + b"a" * 3000 + b'"}'
    status, body = raw_http(
        port,
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + f"{len(chunk):x}".encode() + b"\r\n" + chunk + b"\r\n0\r\n\r\n",
    )
    assert status == 413
    status, _, good = post_json(classify, {"text": ["still", "here"]})
    assert status == 200 and len(good["predictions"]) == 2


def test_concurrent_requests_share_server_side_batches(classifier):
    export, cfg = classifier
    # no batch wait (the default): texts that arrive while the model is busy are held and enter as one batch
    url = deploy(export, with_serve(cfg, max_batch_size=16, batch_wait_timeout_s=0.0))
    answers: list[tuple[int, object, object]] = []  # checked here: an assert in a client thread only warns

    def client(i: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        answers.append(post_json(f"{url}/v1/classify", {"text": f"film number {i} is good"}))

    for _ in range(3):
        barrier = threading.Barrier(12)
        threads = [threading.Thread(target=client, args=(i, barrier)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(answers) == 36
    for status, _, body in answers:
        assert status == 200 and len(body["predictions"]) == 1, body
    sizes = [int(headers["x-batch-size"]) for _, headers, _ in answers]
    timings = [server_timing(headers.get_all("server-timing")) for _, headers, _ in answers]
    assert max(sizes) > 1, sizes
    # Server-Timing: the replica's time, and within it the forward pass and the wait for model and batch
    for t in timings:
        assert set(t) == {"app", "model", "wait"}, t
        assert 0 < t["model"] <= t["app"] and t["wait"] >= 0
    # one request of several texts is batched across its texts as well
    _, headers, _ = post_json(f"{url}/v1/classify", {"text": ["a", "b", "c"]})
    assert int(headers["x-batch-size"]) >= 3


def test_api_key_guards_the_api_but_not_the_health_check(classifier, monkeypatch, tmp_path):
    export, cfg = classifier
    monkeypatch.setenv("RAYTUNE_FT_TEST_KEY", "s3cret-key")
    url = deploy(export, with_serve(cfg, api_key_env="RAYTUNE_FT_TEST_KEY"))
    assert post_json(f"{url}/v1/classify", {"text": "good"})[0] == 401
    assert post_json(f"{url}/v1/classify", {"text": "good"}, {"Authorization": "Bearer wrong"})[0] == 401
    assert request(f"{url}/v1/models")[0] == 401
    # deny by default: the docs and a route nobody listed need the key too (a 404 only once it is given)
    assert request(f"{url}/docs")[0] == request(f"{url}/openapi.json")[0] == request(f"{url}/v1/nothing")[0] == 401
    assert request(f"{url}/v1/nothing", headers={"Authorization": "Bearer s3cret-key"})[0] == 404
    assert request(f"{url}/openapi.json", headers={"Authorization": "Bearer s3cret-key"})[0] == 200
    status, _, body = post_json(f"{url}/v1/classify", {"text": "good"}, {"Authorization": "Bearer s3cret-key"})
    assert status == 200 and body["predictions"]
    assert request(f"{url}/healthz")[0] == 200
    # the key is never written down: not in any log of this Ray session (Serve, replicas, proxy, workers), not in
    # the server's state files, and a refused request's answer does not echo what was sent
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    written = [
        p for p in [*session.rglob("*"), *tmp_path.rglob("*")] if p.is_file() and b"s3cret-key" in p.read_bytes()
    ]
    assert written == []
    status, _, refused = post_json(f"{url}/v1/classify", {"text": "x"}, {"Authorization": "Bearer guess-4711"})
    assert status == 401 and "guess-4711" not in json.dumps(refused)
    # serve.public_docs opens the docs, and nothing else
    url = deploy(export, with_serve(cfg, api_key_env="RAYTUNE_FT_TEST_KEY", public_docs=True))
    assert request(f"{url}/openapi.json")[0] == 200 and request(f"{url}/v1/models")[0] == 401


def test_overload_is_refused_with_429_and_retry_after(classifier):
    export, cfg = classifier
    # one request in the replica, one queued, each held 1.5 s by the batch wait: the others are refused
    tight = with_serve(
        cfg, max_ongoing_requests=1, max_queued_requests=1, max_batch_size=4, batch_wait_timeout_s=1.5, retry_after_s=2
    )
    url = deploy(export, tight)
    results: list[tuple[int, object, dict]] = []  # checked here: an assert in a client thread only warns
    barrier = threading.Barrier(10)

    def client() -> None:
        barrier.wait()
        results.append(post_json(f"{url}/v1/classify", {"text": ["good film"] * 3}))

    threads = [threading.Thread(target=client) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(status for status, _, _ in results)
    assert len(codes) == 10 and 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    for status, headers, body in results:
        if status == 429:
            assert headers.get("Retry-After") == "2"
            assert body["error"]["code"] == 429 and "serve.max_queued_requests" in body["error"]["message"], body
    assert post_json(f"{url}/v1/classify", {"text": "and after the burst"})[0] == 200


def test_completions_answer_in_the_openai_shape(lm_run, classifier):
    export = lm_run[0].export_dir
    cfg = export_config(export, [f"serve.port={classifier[1].serve.port}"])
    url = deploy(export, cfg)
    prompt = {"prompt": "the film", "max_tokens": 5, "temperature": 0}
    status, _, first = post_json(f"{url}/v1/completions", prompt)
    assert status == 200 and first["object"] == "text_completion" and first["model"] == "lm"
    [choice] = first["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("length", "stop") and isinstance(choice["text"], str)
    usage = first["usage"]
    assert (
        usage["completion_tokens"] <= 5 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    assert post_json(f"{url}/v1/completions", prompt)[2]["choices"] == first["choices"]  # greedy: the same text
    sampled = {**prompt, "temperature": 0.9, "top_p": 0.9, "seed": 3}
    assert (
        post_json(f"{url}/v1/completions", sampled)[2]["choices"]
        == post_json(f"{url}/v1/completions", sampled)[2]["choices"]
    )
    # what OpenAI clients send besides (user, n, logprobs) is accepted; what cannot be honoured is refused
    assert post_json(f"{url}/v1/completions", {**prompt, "user": "u1", "n": 1, "logprobs": None})[0] == 200
    for bad in (
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": 100000},
        {"prompt": "x", "temperature": 3},
        {"prompt": "x", "n": 2},
        {"max_tokens": 3},
    ):
        status, _, body = post_json(f"{url}/v1/completions", bad)
        assert status == 422 and body["error"]["code"] == 422, bad
    assert post_json(f"{url}/v1/classify", {"text": "a"})[0] == 404
