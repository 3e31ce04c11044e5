"""The continuous-batching engine (raytune_ft.serve.engine) and streamed detokenisation (raytune_ft.serve.detokenize),
on tiny random models built from configs (a Llama and a GPT-2) with the byte-level chat tokenizer of
tests/tiny_models.py; no Ray.

The reference for greedy answers is raytune_ft.generation.greedy_answers (transformers' generate): the engine must
give the same tokens whichever requests share its steps and whenever they arrive.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
import torch
from tiny_models import chat_tokenizer, llama_config
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from raytune_ft.generation import greedy_answers
from raytune_ft.serve.detokenize import TextStream
from raytune_ft.serve.engine import (
    Finish,
    GenerationEngine,
    GenerationFailed,
    Sampling,
    _GrowingLayer,
    _new_cache,
    _rebuild,
    generate_all,
)

QUESTIONS = [
    "hi",
    "what is two plus two? answer in words, please",
    "x y z",
    "name a colour",
    "a",
    "tell me a story about a cat who lived on a boat",
]
EOS, PAD = 257, 258  # chat_tokenizer's <|im_end|> and <pad>


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return chat_tokenizer()


@pytest.fixture(scope="module")
def llama(tokenizer) -> LlamaForCausalLM:
    """Random weights of a wider spread than the default (0.02), so that different prompts get different answers."""
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(len(tokenizer), max_position_embeddings=256, initializer_range=0.3)).eval()


@pytest.fixture(scope="module")
def gpt2(tokenizer) -> GPT2LMHeadModel:
    """Absolute position embeddings: wrong position ids would change its answers."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=256, bos_token_id=EOS, eos_token_id=EOS
    )
    config.initializer_range = 0.3
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    def render(question: str) -> list[int]:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [render(q) for q in QUESTIONS]


def reference(model: Any, prompts: list[list[int]], max_new_tokens: int, stop: list[int]) -> list[list[int]]:
    return greedy_answers(model, prompts, max_new_tokens=max_new_tokens, stop=stop, pad_id=PAD)


def engine_for(model: Any, **options: Any) -> GenerationEngine:
    return GenerationEngine(model, pad_id=PAD, stop_ids=options.pop("stop_ids", [EOS]), **options)


async def collect(stream: Any) -> tuple[list[int], Finish]:
    tokens: list[int] = []
    async for item in stream:
        if isinstance(item, Finish):
            return tokens, item
        tokens.append(item)
    raise AssertionError("the stream ended without a Finish")


async def staggered(
    engine: GenerationEngine, prompts: list[list[int]], sampling: Sampling, after: int = 3, adapters: list | None = None
) -> list[tuple[list[int], Finish]]:
    """Request i is submitted once request i-1 has yielded AFTER tokens (or finished): it joins a batch that is
    mid-generation."""
    gates = [asyncio.Event() for _ in prompts]
    results: list[Any] = [None] * len(prompts)

    async def run(i: int) -> None:
        if i:
            await gates[i - 1].wait()
        tokens: list[int] = []
        async for item in engine.generate(prompts[i], sampling, adapter=adapters[i] if adapters else None):
            if isinstance(item, Finish):
                results[i] = (tokens, item)
                break
            tokens.append(item)
            if len(tokens) == after:
                gates[i].set()
        gates[i].set()

    await asyncio.gather(*(run(i) for i in range(len(prompts))))
    return results


# --- greedy answers are generate's


# the tiny GPT-2 never says <|im_end|>: a token it says now and then stops its answers instead
@pytest.mark.parametrize(("model_name", "stop"), [("llama", EOS), ("gpt2", 192)])
def test_greedy_answers_are_generates_alone_batched_and_joining_mid_generation(model_name, stop, prompts, request):
    model = request.getfixturevalue(model_name)
    expected = reference(model, prompts, 30, [stop])
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: rows are left padded
    assert len({tuple(a) for a in expected}) > 2 and any(len(a) < 30 for a in expected)  # varied; some stop early
    engine = engine_for(model, stop_ids=[stop])
    try:
        alone = [generate_all(engine, [p], Sampling(30))[0] for p in prompts]
        assert alone == expected
        assert generate_all(engine, prompts, Sampling(30)) == expected  # all at once
        before = engine.stats()
        results = asyncio.run(staggered(engine, prompts, Sampling(30)))
        assert [tokens for tokens, _ in results] == expected
        stats = engine.stats()
        assert stats["prefills"] - before["prefills"] == len(prompts)  # each joined on its own, mid-generation
        assert stats["largest_batch"] >= 3 and stats["running"] == stats["waiting"] == 0
    finally:
        engine.close()
    small = engine_for(model, max_batch_size=2, stop_ids=[stop])  # the others wait for a free row
    try:
        assert generate_all(small, prompts[::-1], Sampling(30)) == expected[::-1]
        assert small.stats()["largest_batch"] == 2
    finally:
        small.close()


def test_finish_reasons_counts_and_per_request_stop_ids(llama, prompts):
    full = reference(llama, prompts, 12, [PAD])  # <pad> is never said: every answer runs 12 tokens
    engine = engine_for(llama)

    async def main() -> list[tuple[list[int], Finish]]:
        return list(
            await asyncio.gather(
                collect(engine.generate(prompts[1], Sampling(12), stop_ids=[PAD])),
                collect(engine.generate(prompts[1], Sampling(12), stop_ids=[full[1][4]])),
                collect(engine.generate(prompts[2], Sampling(1), stop_ids=[PAD])),
                collect(engine.generate(prompts[2], Sampling(12), stop_ids=[full[2][0]])),
            )
        )

    try:
        results = asyncio.run(main())
    finally:
        engine.close()
    cut = full[1].index(full[1][4])
    assert results[0] == (full[1], Finish("length", len(prompts[1]), 12))
    assert results[1] == (full[1][:cut], Finish("stop", len(prompts[1]), cut))  # the stop id is not yielded
    assert results[2] == (full[2][:1], Finish("length", len(prompts[2]), 1))
    assert results[3] == ([], Finish("stop", len(prompts[2]), 0))  # stopped at the prefill's token
    assert engine.stats()["finished"] == 4


def test_a_full_context_ends_the_answer_and_invalid_requests_raise_before_queueing(llama, prompts):
    prompt = prompts[1]
    engine = engine_for(llama, max_context=len(prompt) + 3, stop_ids=[PAD])
    try:
        assert engine.max_context == len(prompt) + 3
        tokens, finish = asyncio.run(collect(engine.generate(prompt, Sampling(50))))
        assert tokens == reference(llama, [prompt], 3, [PAD])[0] and finish == Finish("length", len(prompt), 3)
        for bad_prompt, max_new in [([], 5), (prompt[:3], 0), (prompt + [1, 2, 3], 5), ([1, 259], 5), ([-1], 5)]:
            with pytest.raises(ValueError):
                engine.generate(bad_prompt, Sampling(max_new))  # raised at the call, not at iteration
        assert engine.stats()["prefills"] == 1 and engine.stats()["waiting"] == 0
    finally:
        engine.close()
    assert engine_for(llama).max_context == 256  # the model's max_position_embeddings


def test_an_idle_engine_sleeps_and_models_with_sliding_window_layers_are_refused(llama, prompts, tokenizer):
    engine = engine_for(llama)
    try:
        generate_all(engine, prompts[:2], Sampling(5))
        before = engine.stats()
        time.sleep(0.05)
        assert engine.stats() == before and before["running"] == 0  # no steps while nothing is in flight
    finally:
        engine.close()
    sliding = Qwen2Config(
        vocab_size=len(tokenizer),
        **{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
    )
    with pytest.raises(ValueError, match="full attention"):
        engine_for(Qwen2ForCausalLM(sliding))


# --- sampling


def test_a_seeded_sampled_request_gives_the_same_tokens_alone_and_batched(llama, prompts):
    sampled = Sampling(20, temperature=1.5, top_p=0.9, seed=1234)
    engine = engine_for(llama, stop_ids=[PAD])

    async def batched() -> list[list[int]]:
        others = [Sampling(20), Sampling(20, temperature=1.0, seed=7), Sampling(20, temperature=2.0)]
        streams = [engine.generate(prompts[1], sampled)]
        streams += [engine.generate(p, s) for p, s in zip(prompts[2:5], others, strict=True)]
        return [tokens for tokens, _ in await asyncio.gather(*(collect(s) for s in streams))]

    try:
        alone = asyncio.run(collect(engine.generate(prompts[1], sampled)))[0]
        together = asyncio.run(batched())
        assert together[0] == alone
        greedy = reference(llama, [prompts[1]], 20, [PAD])[0]
        assert alone != greedy  # it did sample
        other_seed = Sampling(20, temperature=1.5, top_p=0.9, seed=99)
        assert asyncio.run(collect(engine.generate(prompts[1], other_seed)))[0] != alone
        # top_p keeps at least the most likely token: a vanishing top_p is greedy whatever the temperature
        for tiny in (1e-9, 5e-324):  # 5e-324 (found by the fuzz test) is 0 in float32
            nucleus_of_one = Sampling(20, temperature=5.0, top_p=tiny)
            assert asyncio.run(collect(engine.generate(prompts[1], nucleus_of_one)))[0] == greedy
    finally:
        engine.close()


# --- failures, cancellation, close


def failing_on_call(model: Any, n: int, when: Any = None) -> tuple[Any, list[int]]:
    """A forward hook that raises on the Nth forward of the model (counting those WHEN accepts)."""
    calls = [0]

    def hook(module, args, kwargs, output):
        if when is None or when(kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise RuntimeError("injected failure")

    return model.register_forward_hook(hook, with_kwargs=True), calls


def test_a_failed_decode_step_fails_its_requests_and_the_next_request_is_served(llama, prompts):
    expected = reference(llama, prompts, 50, [PAD])
    engine = engine_for(llama, stop_ids=[PAD])
    # the first decode step with all three requests in the batch fails
    handle, calls = failing_on_call(llama, 1, when=lambda kwargs: tuple(kwargs["input_ids"].shape) == (3, 1))

    async def one(prompt: list[int]) -> tuple[list[int], str | None]:
        tokens: list[int] = []
        try:
            async for item in engine.generate(prompt, Sampling(50)):
                tokens.append(item)
        except GenerationFailed as error:
            return tokens, str(error)
        return tokens, None

    async def three() -> list[tuple[list[int], str | None]]:
        return list(await asyncio.gather(*(one(p) for p in prompts[:3])))

    try:
        results = asyncio.run(three())
    finally:
        handle.remove()
    try:
        assert calls == [1]
        for (tokens, error), answer in zip(results, expected[:3], strict=True):
            assert error is not None and "RuntimeError: injected failure" in error
            assert 0 < len(tokens) < 50 and tokens == answer[: len(tokens)]  # good tokens, then the failure
        assert engine.stats()["failed"] == 3 and engine.stats()["running"] == 0
        assert generate_all(engine, prompts[3:], Sampling(50)) == expected[3:]  # served afresh
    finally:
        engine.close()


def test_a_failed_prefill_fails_only_the_newcomers(llama, prompts):
    expected = reference(llama, prompts[:2], 40, [PAD])
    engine = engine_for(llama, stop_ids=[PAD])
    handle, _ = failing_on_call(llama, 2, when=lambda kwargs: kwargs["input_ids"].shape[1] > 1)  # the 2nd prefill

    async def main() -> tuple[Any, Any]:
        running = engine.generate(prompts[0], Sampling(40))
        first = await running.__anext__()  # the first request is in the batch
        late = asyncio.create_task(collect(engine.generate(prompts[1], Sampling(40))))
        rest, _ = await collect(running)
        try:
            await late
        except GenerationFailed as error:
            return [first, *rest], error
        return [first, *rest], None

    try:
        tokens, error = asyncio.run(main())
    finally:
        handle.remove()
    try:
        assert tokens == expected[0] and isinstance(error, GenerationFailed)
        assert engine.stats()["failed"] == 1
        assert generate_all(engine, prompts[1:2], Sampling(40)) == expected[1:]
    finally:
        engine.close()


async def wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


def test_a_consumer_that_stops_early_cancels_its_request_and_the_others_go_on(llama, prompts):
    engine = engine_for(llama, stop_ids=[PAD])
    alone = reference(llama, [prompts[1]], 80, [PAD])[0]

    async def main() -> tuple[list[int], int]:
        other = asyncio.create_task(collect(engine.generate(prompts[1], Sampling(80))))
        stream = engine.generate(prompts[0], Sampling(80))
        got = []
        async for item in stream:
            got.append(item)
            if len(got) == 2:
                break
        await stream.aclose()
        steps = engine.stats()["steps"]
        await wait_for(lambda: engine.stats()["cancelled"] == 1)
        assert engine.stats()["steps"] - steps <= 3  # it left the batch within a few steps
        assert engine.stats()["running"] == 1 and not other.done()
        tokens, finish = await other
        assert finish.reason == ("length" if len(alone) == 80 else "stop") and engine.stats()["running"] == 0
        # a cancelled task awaiting a stream cancels its request too (an HTTP client going away)
        task = asyncio.create_task(collect(engine.generate(prompts[2], Sampling(80))))
        await wait_for(lambda: engine.stats()["running"] == 1)
        steps = engine.stats()["steps"]
        await wait_for(lambda: engine.stats()["steps"] > steps + 2)
        task.cancel()
        await wait_for(lambda: engine.stats()["cancelled"] == 2 and engine.stats()["running"] == 0)
        return tokens, len(got)

    try:
        tokens, got = asyncio.run(main())
        assert tokens == alone and got == 2
        assert engine.stats()["finished"] == 1
    finally:
        engine.close()


def test_a_request_cancelled_while_waiting_is_never_prefilled(llama, prompts):
    engine = engine_for(llama, max_batch_size=1, stop_ids=[PAD])

    async def main() -> None:
        first = asyncio.create_task(collect(engine.generate(prompts[1], Sampling(30))))
        await wait_for(lambda: engine.stats()["running"] == 1)
        waiting = asyncio.create_task(collect(engine.generate(prompts[2], Sampling(30))))
        await wait_for(lambda: engine.stats()["waiting"] == 1)
        waiting.cancel()
        await first

    try:
        asyncio.run(main())
        generate_all(engine, [prompts[0]], Sampling(1))  # the engine takes (and drops) the waiting request first
        stats = engine.stats()
        assert (stats["cancelled"], stats["prefills"], stats["finished"]) == (1, 2, 2)
    finally:
        engine.close()


def test_close_fails_the_requests_in_flight_and_later_ones(llama, prompts):
    engine = engine_for(llama, stop_ids=[PAD])

    async def main() -> None:
        stream = engine.generate(prompts[1], Sampling(200))
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.close)
        with pytest.raises(GenerationFailed, match="the engine stopped"):
            async for _ in stream:
                pass
        with pytest.raises(GenerationFailed, match="the engine stopped"):
            await collect(engine.generate(prompts[0], Sampling(5)))

    asyncio.run(main())
    assert engine.stats()["failed"] == 2 and not engine._thread.is_alive()


# --- the rows hook and the cache


def test_rows_hook_sees_each_forwards_rows_in_row_order(llama, prompts):
    """Adapter t makes its row say token t (a forward hook adds a bias to that row's logits, as a LoRA would change
    them): each request's tokens show that the hook's row order is the batch's, through joins and leaves."""
    current: list[Any] = []
    calls: list[list[Any]] = []

    def rows_hook(adapters: list[Any]) -> None:
        current[:] = adapters
        calls.append(list(adapters))

    def bias(module, args, output):
        for row, adapter in enumerate(current):
            if adapter is not None:
                output[row, :, adapter] += 1000.0
        return output

    handle = llama.lm_head.register_forward_hook(bias)
    engine = engine_for(llama, rows_hook=rows_hook)
    adapters = [ord("A"), None, ord("B"), None, ord("C"), None]
    try:
        results = asyncio.run(staggered(engine, prompts, Sampling(12), after=2, adapters=adapters))
    finally:
        handle.remove()
        engine.close()
    plain = reference(llama, [p for p, a in zip(prompts, adapters, strict=True) if a is None], 12, [EOS])
    for (tokens, _), adapter in zip(results, adapters, strict=True):
        if adapter is not None:
            assert tokens == [adapter] * 12
    assert [tokens for (tokens, _), a in zip(results, adapters, strict=True) if a is None] == plain
    assert len(calls) == engine.stats()["prefills"] + engine.stats()["steps"]
    assert max(len(c) for c in calls) >= 3
    order = {a: i for i, a in enumerate(adapters) if a is not None}
    for call in calls:  # rows stay in arrival order
        indices = [order[a] for a in call if a is not None]
        assert indices == sorted(indices)


def test_decode_steps_write_into_the_cache_in_place(llama, prompts):
    """Between joins and leaves, a step writes one column into spare room: the buffers are not reallocated."""
    buffers: list[tuple[int, int]] = []
    engine = engine_for(llama, stop_ids=[PAD])

    def rows_hook(adapters: list[Any]) -> None:
        if engine._cache is not None and len(adapters) == len(engine._rows):
            layer = engine._cache.layers[0]
            buffers.append((layer._key_buffer.data_ptr(), layer.keys.shape[-2]))

    engine.rows_hook = rows_hook
    try:
        generate_all(engine, prompts[:2], Sampling(20))
    finally:
        engine.close()
    assert len(buffers) == 19 and len({ptr for ptr, _ in buffers}) == 1
    assert [length for _, length in buffers] == list(range(buffers[0][1], buffers[0][1] + 19))


def test_rebuild_drops_rows_trims_padding_and_left_pads_joining_rows():
    def cache_of(keys: torch.Tensor) -> Any:
        cache = _new_cache()
        cache.update(keys, -keys, 0)
        return cache

    # 3 running rows, 6 columns; row 1 (the only one using columns 0 and 1) leaves
    old = torch.arange(3 * 1 * 6 * 2, dtype=torch.float32).reshape(3, 1, 6, 2) + 1
    old_mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    new = torch.full((2, 1, 5, 2), 7.0)
    new_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache, mask = _rebuild(cache_of(old), old_mask, [0, 2], (cache_of(new), new_mask))
    layer = cache.layers[0]
    assert isinstance(layer, _GrowingLayer) and layer._key_buffer.shape[-2] > 5  # room to grow in place
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    # kept rows: their last 4 columns, right aligned after one column of zeros; joining rows as they were
    assert torch.equal(layer.keys[:2, :, 1:], old[[0, 2], :, 2:])
    assert torch.equal(layer.values[:2, :, 1:], -old[[0, 2], :, 2:])
    assert not layer.keys[:2, :, :1].any() and torch.equal(layer.keys[2:], new)
    assert cache.get_seq_length() == 5
    # nothing left: no cache; only joining rows: theirs, not copied
    assert _rebuild(cache, mask, [], None) == (None, None)
    joining = (cache_of(new), new_mask)
    assert _rebuild(cache, mask, [], joining) is joining


# --- streamed text


def stream_all(tokenizer: Any, ids: list[int], stop: list[str] | tuple = ()) -> tuple[list[str], str, TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.flush(), stream


def test_streamed_text_is_the_decoded_text_and_never_half_a_character(tokenizer):
    ids = tokenizer("héllo ✓ ok 😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("héllo ✓ ok 😀")  # a character is several tokens
    pieces, tail, stream = stream_all(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True) == "héllo ✓ ok 😀"
    assert "\ufffd" not in "".join(pieces) and pieces[-1] == "😀" and tail == ""
    assert stream.text == "héllo ✓ ok 😀" and not stream.stopped
    # special tokens are skipped, as the non-streamed answer decodes
    pieces, tail, _ = stream_all(tokenizer, [256, *ids[:3], 256])
    assert "".join(pieces) + tail == "hé"
    # random bytes, invalid UTF-8 included: the concatenation is still the decoded text
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.choice([rng.randrange(256), rng.randrange(128, 256)]) for _ in range(rng.randrange(1, 20))]
        pieces, tail, _ = stream_all(tokenizer, ids)
        assert "".join(pieces) + tail == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_cuts_the_text_and_its_start_is_held_back(tokenizer):
    text = "one ✓ two; three"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, tail, stream = stream_all(tokenizer, ids, stop=["two;"])
    assert "".join(pieces) + tail == "one ✓ " and stream.stopped and stream.text == "one ✓ "
    assert stream.push(ids[0]) == "" and stream.flush() == ""  # nothing after the stop
    # "tw" could start "two;" until "o," shows it does not: held back, then sent
    pieces, tail, stream = stream_all(tokenizer, tokenizer("a two, b", add_special_tokens=False)["input_ids"], ["two;"])
    assert pieces[2:5] == ["", "", ""] and pieces[5] == "two," and "".join(pieces) + tail == "a two, b"
    # a stop string's start at the very end comes out at flush
    pieces, tail, stream = stream_all(tokenizer, tokenizer("so tw", add_special_tokens=False)["input_ids"], ["two"])
    assert "".join(pieces) == "so " and tail == "tw" and not stream.stopped


def test_end_of_turn_markers_spelt_in_text_stop_the_stream(tokenizer):
    # <|eot_id|> is not one token of this tokenizer: it arrives byte by byte, as text
    ids = tokenizer("the answer<|eot_id|>junk", add_special_tokens=False)["input_ids"]
    assert len(ids) == len("the answer<|eot_id|>junk")
    pieces, tail, stream = stream_all(tokenizer, ids)
    assert "".join(pieces) + tail == "the answer" and stream.stopped
    assert all(p == "" for p in pieces[len("the answer") :])
