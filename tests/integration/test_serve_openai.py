"""The OpenAI-compatible generation routes on the session's real Ray, called with the official `openai` client and
with raw HTTP: the session's chat export (conftest chat_run) served alone, then two LoRA winners of different tasks
(a chat adapter and a sentiment classifier adapter of the same tiny base) served from one deployment. Every answer
is checked against the same export's answer in process."""

from __future__ import annotations

import json
import os
import threading
import time

import openai
import pytest
import requests
from helpers import cli, post_json, request

from raytune_ft.serve.deploy import deploy
from raytune_ft.serve.model import LoadedModel, chat_prompt_ids, export_config, serving_stop_ids

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Is this review positive or negative? a gripping, beautifully shot film",
    "Is this review positive or negative? the plot is thin",
    "Continue: To be, or not to be",
    "hi",
    "What is the sentiment of: warm, witty and wise",
    "one more question, a longer one, about nothing in particular at all",
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def chat_served(chat_run, serve_port):
    """The session's chat export (merged LoRA), served alone: (export, URL, in-process model)."""
    export = chat_run[0].export_dir
    cfg = export_config(export, [f"serve.port={serve_port}", "serve.limits.max_messages=4"])
    return export, deploy(export, cfg), LoadedModel(export)


def in_process(model: LoadedModel, messages: list[dict[str, str]], max_tokens: int) -> list[int]:
    """The greedy answer's token ids in this process: one `generate` call, stopping where serving stops."""
    from raytune_ft.generation import greedy_answers

    ids = chat_prompt_ids(model.tokenizer, messages)
    stops = serving_stop_ids(model.tokenizer, model.model)
    [answer] = greedy_answers(
        model.model, [ids], max_new_tokens=max_tokens, stop=stops, pad_id=model.tokenizer.pad_token_id
    )
    return answer


def test_a_chat_export_answers_the_official_openai_client_streamed_and_not(chat_served):
    export, url, local = chat_served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    [model_id] = [m.id for m in client.models.list().data]
    for question in QUESTIONS[:3]:
        want_ids = in_process(local, user(question), 12)
        want = local.tokenizer.decode(want_ids, skip_special_tokens=True)
        answer = client.chat.completions.create(model=model_id, messages=user(question), max_tokens=12, temperature=0)
        [choice] = answer.choices
        assert answer.object == "chat.completion" and choice.message.role == "assistant"
        assert choice.message.content == want, question
        assert choice.finish_reason == ("length" if len(want_ids) == 12 else "stop")
        prompt_tokens = len(chat_prompt_ids(local.tokenizer, user(question)))
        assert answer.usage.prompt_tokens == prompt_tokens and answer.usage.completion_tokens >= len(want_ids)
        assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens

        # streamed: the client's iterator gets the same text in pieces, a finish reason, then the usage
        stream = client.chat.completions.create(
            model=model_id,
            messages=user(question),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == [choice.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    # completions, streamed, on the raw prompt (a chat model completes text too)
    done = client.completions.create(model=model_id, prompt="To be, or not", max_tokens=6, temperature=0)
    pieces = client.completions.create(model=model_id, prompt="To be, or not", max_tokens=6, temperature=0, stream=True)
    assert (
        "".join(c.choices[0].text for c in pieces)
        == done.choices[0].text
        == local.complete("To be, or not", 6, 0.0, 1.0, None)["text"]
    )
    # a stop string cuts the answer before it, streamed or not
    full = client.chat.completions.create(model=model_id, messages=user(QUESTIONS[0]), max_tokens=12, temperature=0)
    content = full.choices[0].message.content
    if len(content) >= 4:
        stop = content[2:4]
        cut = client.chat.completions.create(
            model=model_id, messages=user(QUESTIONS[0]), max_tokens=12, temperature=0, stop=[stop]
        )
        assert cut.choices[0].message.content == content[: content.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    # a seeded sample is the same twice
    sampled = [
        client.chat.completions.create(
            model=model_id, messages=user("hi"), max_tokens=8, temperature=0.9, top_p=0.9, seed=5
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_requests_in_flight_are_generated_together_and_answer_as_alone(chat_served):
    """Concurrent greedy requests share the engine's steps (the replica's largest batch says so) and each gets the
    answer it gets alone, in process."""
    export, url, local = chat_served
    want = {q: local.tokenizer.decode(in_process(local, user(q), 24), skip_special_tokens=True) for q in QUESTIONS}
    before = request(f"{url}/healthz")[2]["generation"]
    got: dict[str, str] = {}
    start = threading.Barrier(len(QUESTIONS))

    def ask(question: str) -> None:
        start.wait()
        body = {"messages": user(question), "max_tokens": 24, "temperature": 0}
        status, _, answer = post_json(f"{url}/v1/chat/completions", body)
        assert status == 200
        got[question] = answer["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    after = request(f"{url}/healthz")[2]["generation"]
    assert after["finished"] - before["finished"] == len(QUESTIONS)
    assert after["largest_batch"] >= 2, after  # at least two requests shared a step


def test_raw_server_sent_events_and_a_client_that_disconnects_midway(chat_served):
    export, url, local = chat_served
    body = {"messages": user(QUESTIONS[1]), "max_tokens": 8, "temperature": 0, "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=60) as answer:
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in answer.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    want = local.tokenizer.decode(in_process(local, user(QUESTIONS[1]), 8), skip_special_tokens=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want

    # a long answer (ignore_eos, vLLM's extension: max_tokens whatever the model says) read for one event, then
    # the client goes away: the replica stops generating it and keeps serving
    before = request(f"{url}/healthz")[2]["generation"]
    body = {"messages": user("hi"), "max_tokens": 256, "temperature": 0, "stream": True, "ignore_eos": True}
    answer = requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=60)
    events = answer.iter_lines()
    assert next(events).startswith(b"data: ")
    answer.raw._fp.fp.raw._sock.shutdown(2)  # the connection closes under the client
    answer.close()
    deadline = time.monotonic() + 30
    while True:
        stats = request(f"{url}/healthz")[2]["generation"]
        if stats["cancelled"] > before["cancelled"] and stats["running"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.05)
    assert stats["finished"] == before["finished"]  # it did not run to its end
    done = post_json(f"{url}/v1/chat/completions", {"messages": user("hi"), "max_tokens": 4, "temperature": 0})
    assert done[0] == 200


def test_bad_generation_requests_get_their_4xx_and_the_replica_keeps_serving(chat_served):
    export, url, local = chat_served
    chat = f"{url}/v1/chat/completions"
    ok = {"messages": user("hi"), "max_tokens": 4, "temperature": 0}
    for bad, status, words in (
        ({"max_tokens": 4}, 422, "messages"),
        ({**ok, "messages": []}, 422, "messages"),
        ({**ok, "messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
        ({**ok, "messages": [{"role": "user"}]}, 422, "content"),
        ({**ok, "messages": user("x") * 5}, 422, "messages"),  # serve.limits.max_messages=4 here
        ({**ok, "max_tokens": 0}, 422, "max_tokens"),
        ({**ok, "max_completion_tokens": 100000}, 422, "max_completion_tokens"),
        ({**ok, "n": 2}, 422, "n=2 is not supported"),
        ({**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "tools"),
        ({**ok, "logprobs": True}, 422, "logprobs"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({**ok, "temperature": 3}, 422, "temperature"),
        ({**ok, "stream": "sometimes"}, 422, "stream"),
        ({**ok, "messages": user("word " * 1500)}, 400, "context_length_exceeded"),
    ):
        got, _, answer = post_json(chat, bad)
        assert got == status and answer["error"]["code"] == status, (bad, answer)
        assert words in json.dumps(answer), (words, answer)
    assert request(chat, b"{}", headers={"Content-Type": "text/plain"})[0] == 415
    assert request(chat, b"{not json", headers={"Content-Type": "application/json"})[0] == 400
    # the official client raises its own error types for them
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_prompt_tokens"):
        client.chat.completions.create(model="m", messages=user("word " * 1500), max_tokens=4)
    # the limits are in the OpenAPI schema
    schema = request(f"{url}/openapi.json")[2]
    text = json.dumps(schema)
    assert '"x-max-prompt-tokens": 2048' in text and '"maxItems": 4' in text
    assert post_json(chat, ok)[0] == 200


def test_two_lora_winners_of_different_tasks_are_served_from_one_base(
    chat_pbt_search, review_adapter_run, chat_run, serve_port, tmp_path, session_ray_address
):
    chat_export = chat_pbt_search[0].winner_dir
    review_export = review_adapter_run[0].export_dir
    env = {**os.environ, "RAYTUNE_FT_STATE_DIR": str(tmp_path / "state")}
    # a merged export cannot be an adapter: refused at start, naming it
    merged = cli("serve", str(chat_export), str(chat_run[0].export_dir), env=env, timeout=120)
    assert merged.returncode == 2 and "merged" in merged.stderr, merged.stderr
    # the CLI deploys both on the session's Ray (where the app outlives the command)
    done = cli(
        "serve",
        str(chat_export),
        str(review_export),
        f"serve.port={serve_port}",
        "serve.max_adapters_per_replica=1",
        "--address",
        session_ray_address,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    url = done.stdout.strip().splitlines()[-1]
    listed = {m["id"]: m for m in request(f"{url}/v1/models")[2]["data"]}
    assert set(listed) == {"chat-pbt", "reviews-adapter"}
    assert listed["chat-pbt"]["task"] == "chat" and listed["reviews-adapter"]["task"] == "sequence-classification"
    assert not any(m["loaded"] for m in listed.values())

    chat_local, review_local = LoadedModel(chat_export), LoadedModel(review_export)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    texts = ["the good film 3", "a bad movie", "number 7 is good"]
    for _ in range(2):  # alternating with one adapter slot per replica: each request loads its adapter again
        for question in QUESTIONS[:2]:
            answer = client.chat.completions.create(
                model="chat-pbt", messages=user(question), max_tokens=8, temperature=0
            )
            want = chat_local.tokenizer.decode(in_process(chat_local, user(question), 8), skip_special_tokens=True)
            assert answer.choices[0].message.content == want
        status, _, got = post_json(f"{url}/v1/classify", {"model": "reviews-adapter", "text": texts})
        assert status == 200
        for g, w in zip(got["predictions"], review_local.classify(texts), strict=True):
            assert g["label"] == w["label"] and g["probs"] == pytest.approx(w["probs"], abs=1e-4)
        loaded = {m["id"]: m["loaded"] for m in request(f"{url}/v1/models")[2]["data"]}
        assert loaded == {"chat-pbt": False, "reviews-adapter": True}  # LRU: one slot, the last one used
    # Serve's multiplexing header selects the adapter too
    status, _, by_header = post_json(
        f"{url}/v1/classify", {"text": texts}, headers={"serve_multiplexed_model_id": "reviews-adapter"}
    )
    assert status == 200 and by_header["predictions"] == got["predictions"]
    for body, status, kind in (
        ({"text": texts}, 400, "invalid_request"),  # no adapter named
        ({"model": "nope", "text": texts}, 404, "model_not_found"),
        ({"model": "chat-pbt", "text": texts}, 400, "invalid_request"),  # a chat adapter does not classify
    ):
        answer = post_json(f"{url}/v1/classify", body)
        assert answer[0] == status and answer[2]["error"]["type"] == kind, answer
    answer = post_json(f"{url}/v1/chat/completions", {"model": "reviews-adapter", "messages": user("hi")})
    assert answer[0] == 400 and "classifier" in answer[2]["error"]["message"]
    mismatch = post_json(
        f"{url}/v1/classify",
        {"model": "reviews-adapter", "text": "x"},
        headers={"serve_multiplexed_model_id": "chat-pbt"},
    )
    assert mismatch[0] == 400
    assert cli("serve", "stop", "--address", session_ray_address, env=env, timeout=120).returncode == 0
