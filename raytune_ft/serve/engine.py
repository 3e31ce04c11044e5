"""Continuous-batching text generation for serving: one engine thread per replica generates for every request in
flight together, one token per request per step.

Requests join the running batch at a step boundary, after a prefill of their prompts (all newcomers of a step in
one forward), and leave it when they finish or their consumer goes away (iteration-level batching). The HTTP layer
reads each request's tokens from an async generator on its own event loop; the engine thread hands tokens over with
`loop.call_soon_threadsafe`.

The batch's state between steps is a KV cache with one row per running request and a 2D attention mask:

  * rows are LEFT padded: every row's newest token sits in the last column, so one decode step appends one column
    for all rows. Each row keeps its own position ids (count of its real tokens so far), so padding changes neither
    rotary nor absolute position embeddings, and a row's answer does not depend on the rows beside it;
  * the cache is transformers' DynamicCache with layers that keep spare room along the sequence axis
    (`_GrowingLayer`): a decode step writes its new column in place instead of concatenating (which would copy the
    whole cache every step). The cache is copied only when the batch changes: requests joining (their prefill cache
    is left padded to a common length and stacked under the running rows), requests leaving (their rows dropped),
    and leading columns that are padding for every remaining row (trimmed).

Greedy decoding is the argmax of the last position's logits, as `raytune_ft.generation.greedy_answers` picks it, and
gives the same tokens; sampled requests draw from their own torch.Generator, so a seeded request gives the same
tokens whichever requests share its steps.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    # a seeded sampled request gives the same tokens alone or in any batch (each request has its own torch.Generator)
    seed: int | None = None


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" (a stop id was generated; it is not yielded) or "length" (max_new_tokens, or context full)
    prompt_tokens: int
    completion_tokens: int  # the tokens yielded (a stop id is not one)


class GenerationFailed(RuntimeError):
    """Raised in the consumer when the engine step serving its request failed (the message says why); the engine
    keeps serving later requests."""


# --- the KV cache


def _spare(length: int) -> int:
    """Room left after LENGTH columns when a cache buffer is allocated: decode steps fill it in place, and a full
    buffer is reallocated half as big again (amortised: a copy every length/2 steps at most)."""
    return max(32, length // 2)


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views of larger buffers [batch, heads, capacity, head_dim]: `update`
    writes new columns into the spare room, and copies into a bigger buffer only when that room runs out. `keys` and
    `values` stay what DynamicLayer holds (the cached columns), so the rest of transformers reads the layer as usual."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.allocate(key_states, value_states.shape[-1], key_states.shape[-2], 0)
        old = self.keys.shape[-2]
        new = old + key_states.shape[-2]
        if new > self._key_buffer.shape[-2]:
            self._grow(new)
        self._key_buffer[:, :, old:new] = key_states
        self._value_buffer[:, :, old:new] = value_states
        self._set_length(new)
        return self.keys, self.values

    def allocate(
        self, like: torch.Tensor, value_dim: int, capacity: int, length: int, batch: int | None = None
    ) -> None:
        """Fresh, uninitialised buffers (shaped after LIKE: [batch, heads, *, head_dim]) holding LENGTH columns; the
        caller fills them."""
        rows = like.shape[0] if batch is None else batch
        capacity = max(capacity, length) + _spare(max(capacity, length))
        self._key_buffer = like.new_empty((rows, like.shape[1], capacity, like.shape[-1]))
        self._value_buffer = like.new_empty((rows, like.shape[1], capacity, value_dim))
        self.device = like.device
        self.is_initialized = True
        self._set_length(length)

    def _grow(self, needed: int) -> None:
        keys, values = self.keys, self.values
        self.allocate(keys, values.shape[-1], needed, keys.shape[-2])
        self.keys.copy_(keys)
        self.values.copy_(values)

    def _set_length(self, length: int) -> None:
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0


def _new_cache() -> DynamicCache:
    """A DynamicCache whose layers, created lazily as the model first updates them, are _GrowingLayers."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = _GrowingLayer
    return cache


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous runs of INDICES as (source start, source end, destination start): keeping rows of a batch copies
    one slice per run (usually one or two) instead of one per row, and without an index_select temporary."""
    runs: list[tuple[int, int, int]] = []
    for dst, src in enumerate(indices):
        if runs and runs[-1][1] == src:
            runs[-1] = (runs[-1][0], src + 1, runs[-1][2])
        else:
            runs.append((src, src + 1, dst))
    return runs


def _first_real_column(mask: torch.Tensor) -> int:
    """The first column that is a real token for some row: the columns before it are padding for every row."""
    used = mask.any(dim=0).nonzero()
    return int(used[0]) if len(used) else mask.shape[1]


def _rebuild(
    cache: DynamicCache | None,
    mask: torch.Tensor | None,
    keep: list[int],
    joining: tuple[DynamicCache, torch.Tensor] | None,
) -> tuple[DynamicCache | None, torch.Tensor | None]:
    """The batch's cache and mask after a change: the running rows KEEP (indices, in order) with their leading
    all-padding columns trimmed, then the JOINING rows (a prefill's cache and mask). The shorter side is left padded
    (mask 0, keys and values zero: finite, so a masked column adds exactly nothing) to the longer one's length."""
    if not keep:
        if joining is None:
            return None, None
        return joining  # the prefill's cache as it is: nothing to copy
    keep_mask = mask[keep]
    start = _first_real_column(keep_mask)
    old_len = mask.shape[1] - start
    new_cache, new_mask = joining if joining is not None else (None, None)
    new_len = new_mask.shape[1] if new_mask is not None else 0
    new_rows = new_mask.shape[0] if new_mask is not None else 0
    width = max(old_len, new_len)
    rows = len(keep) + new_rows

    merged_mask = mask.new_zeros((rows, width))
    merged_mask[: len(keep), width - old_len :] = keep_mask[:, start:]
    if new_mask is not None:
        merged_mask[len(keep) :, width - new_len :] = new_mask

    merged = _new_cache()
    for index, layer in enumerate(cache.layers):
        target = _GrowingLayer()
        target.allocate(layer.keys, layer.values.shape[-1], width, width, batch=rows)
        for old_tensor, new_tensor in ((layer.keys, target.keys), (layer.values, target.values)):
            new_tensor[: len(keep), :, : width - old_len].zero_()
            for src_start, src_end, dst in _runs(keep):
                count = src_end - src_start
                new_tensor[dst : dst + count, :, width - old_len :] = old_tensor[src_start:src_end, :, start:]
        if new_cache is not None:
            joined = new_cache.layers[index]
            for old_tensor, new_tensor in ((joined.keys, target.keys), (joined.values, target.values)):
                new_tensor[len(keep) :, :, : width - new_len].zero_()
                new_tensor[len(keep) :, :, width - new_len :] = old_tensor
        merged.layers.append(target)
    return merged, merged_mask


# --- requests


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    sampling: Sampling
    adapter: Any
    stop: frozenset[int]
    max_context: int
    deliver: Callable[[Any], None] = lambda item: None  # hands an item to the consumer's loop (any thread)
    # counts the end ("finished" or "failed") in the engine's stats BEFORE the consumer hears of it, so that a
    # consumer reading stats() after its Finish sees it counted
    count_end: Callable[[str], None] = lambda outcome: None
    generator: torch.Generator | None = None
    generated: int = 0  # tokens yielded so far
    last: int = -1  # the newest token, fed to the next decode step
    done: bool = False  # a Finish or an error was delivered
    cancelled: bool = False  # the consumer went away (set on the consumer's thread, read at step boundaries)

    @property
    def active(self) -> bool:
        return not self.done and not self.cancelled

    @property
    def position(self) -> int:
        """The position id of the newest token: the count of real tokens before it."""
        return len(self.prompt) + self.generated - 1

    def take(self, token: int) -> None:
        """A token chosen for this request: yielded, or the end of the request (a stop id, or no room left)."""
        if token in self.stop:
            self.finish("stop")
            return
        self.generated += 1
        self.last = token
        self.deliver(token)
        if self.generated >= self.sampling.max_new_tokens or len(self.prompt) + self.generated >= self.max_context:
            self.finish("length")

    def finish(self, reason: str) -> None:
        self.done = True
        self.count_end("finished")
        self.deliver(Finish(reason, len(self.prompt), self.generated))

    def fail(self, error: GenerationFailed) -> None:
        if self.done:
            return
        self.done = True
        self.count_end("failed")
        self.deliver(error)


# --- sampling


def _choose(logits: torch.Tensor, requests: list[_Request]) -> list[int]:
    """The next token of each row: the argmax for greedy rows (as generate's greedy search picks it), a draw from
    the row's own generator for sampled ones."""
    logits = logits.float()
    chosen = logits.argmax(dim=-1).tolist()
    for row, request in enumerate(requests):
        if request.sampling.temperature > 0:
            chosen[row] = _sample(logits[row], request.sampling, request.generator)
    return chosen


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Temperature, then top-p: the smallest set of most likely tokens whose probability reaches top_p (at least
    one token), renormalised by multinomial."""
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the tokens ranked above each one
        cut = before >= sampling.top_p
        # the most likely token always stays: a top_p below float32's smallest number (5e-324 from a client)
        # compares as 0, which `before` of the first token equals
        cut[0] = False
        sorted_probs[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


# --- the engine


class GenerationEngine:
    """Generates for every request in flight together, in one daemon thread; see the module docstring."""

    def __init__(
        self,
        model: Any,
        *,
        pad_id: int,
        stop_ids: list[int],
        max_batch_size: int = 16,
        max_context: int | None = None,
        rows_hook: Callable[[list[Any]], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        config = model.config
        _check_full_attention(config)
        if max_context is None:
            max_context = getattr(config, "max_position_embeddings", None)
            if max_context is None:
                raise ValueError("the model's config has no max_position_embeddings: pass max_context")
        if max_context < 2:
            raise ValueError(f"max_context must be at least 2, got {max_context}")
        self.model = model.eval()
        # pad ids only fill masked columns: any id will do for a tokenizer without a pad token
        self.pad_id = int(pad_id) if pad_id is not None else 0
        self.stop_ids = [int(s) for s in stop_ids]
        self.max_batch_size = max_batch_size
        self.max_context = int(max_context)
        self.rows_hook = rows_hook
        self.device = next(model.parameters()).device
        self._logits_to_keep = _accepts_logits_to_keep(model)
        self._vocab_size = model.get_input_embeddings().num_embeddings

        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._closed = False
        # the batch (engine thread only): one row per running request, its cache and 2D mask [rows, columns]
        self._rows: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._stats = dict.fromkeys(("finished", "cancelled", "failed", "steps", "prefills", "largest_batch"), 0)
        self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
        self._thread.start()

    # --- the consumer's side (its event loop)

    def generate(
        self, prompt_ids: list[int], sampling: Sampling, *, adapter: Any = None, stop_ids: list[int] | None = None
    ) -> AsyncGenerator[int | Finish, None]:
        """An async generator of each new token id as soon as its step is done, then exactly one Finish. Invalid
        requests raise ValueError here, before anything is queued; the request is queued when iteration starts.
        Closing the generator early (aclose(), or cancelling the task awaiting it) cancels the request."""
        if not prompt_ids:
            raise ValueError("an empty prompt: there is nothing to generate from")
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
        if len(prompt_ids) > self.max_context - 1:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}, "
                f"so a prompt may have at most {self.max_context - 1} to leave room for an answer"
            )
        if min(prompt_ids) < 0 or max(prompt_ids) >= self._vocab_size:
            # caught here, an id the embedding does not have cannot fail the other prompts of its prefill
            raise ValueError(f"the prompt holds token ids outside the model's vocabulary (0 to {self._vocab_size - 1})")
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {sampling}")
        request = _Request(
            prompt=[int(t) for t in prompt_ids],
            sampling=sampling,
            adapter=adapter,
            stop=frozenset(self.stop_ids if stop_ids is None else (int(s) for s in stop_ids)),
            max_context=self.max_context,
            count_end=self._count,
        )
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            request.generator = torch.Generator(device=self.device).manual_seed(seed)
        return self._stream(request)

    async def _stream(self, request: _Request) -> AsyncGenerator[int | Finish, None]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, item)
            except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
                request.cancelled = True

        request.deliver = deliver
        self._submit(request)
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finish):
                    return
        finally:
            # aclose(), a cancelled consumer task, or an error: the engine drops the request at its next boundary
            request.cancelled = True

    def _submit(self, request: _Request) -> None:
        with self._cond:
            if self._closed:
                request.fail(GenerationFailed("the engine stopped"))
                return
            self._waiting.append(request)
            self._cond.notify()

    def _count(self, key: str, n: int = 1) -> None:
        with self._cond:
            self._stats[key] += n

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "running": sum(r.active for r in self._rows),
                "waiting": len(self._waiting),
                **self._stats,
            }

    def close(self) -> None:
        """Stops the thread after its current step; requests in flight get GenerationFailed("the engine stopped")."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- the engine thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self._rows:
                    self._cond.wait()  # idle: sleep until a request arrives or close()
                if self._closed:
                    break
                newcomers = self._take_waiting()
            with torch.inference_mode():
                self._step(newcomers)
        self._stop_all()

    def _take_waiting(self) -> list[_Request]:
        """Waiting requests that fit in the batch, in arrival order (called holding the lock); ones cancelled while
        waiting are dropped here."""
        room = self.max_batch_size - sum(r.active for r in self._rows)
        taken: list[_Request] = []
        while self._waiting and len(taken) < room:
            request = self._waiting.popleft()
            if request.cancelled:
                self._stats["cancelled"] += 1  # the lock is held
            else:
                taken.append(request)
        return taken

    def _step(self, newcomers: list[_Request]) -> None:
        """One step: prefill the newcomers, change the batch (joiners in, finished and cancelled rows out), then one
        decode step for every running row. A failure fails the requests it touched and leaves the engine serving."""
        joiners: list[_Request] = []
        joining = None
        if newcomers:
            try:
                joiners, joining = self._prefill(newcomers)
            except Exception as error:  # the running rows' cache is untouched: only the newcomers fail
                self._fail(newcomers, error)
        try:
            self._change_batch(joiners, joining)
            if self._rows:
                self._decode()
        except Exception as error:  # some layers may hold the new column, others not: start the batch afresh
            self._fail(self._rows + joiners, error)
            with self._cond:
                self._rows, self._cache, self._mask = [], None, None

    def _prefill(self, newcomers: list[_Request]) -> tuple[list[_Request], tuple[DynamicCache, torch.Tensor] | None]:
        """One forward over the newcomers' prompts, left padded, giving each its first token. Returns the newcomers
        still going after it, with their rows of the prefill's cache and mask (None when none is)."""
        width = max(len(r.prompt) for r in newcomers)
        ids = torch.full((len(newcomers), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(newcomers), width), dtype=torch.long)
        for row, request in enumerate(newcomers):
            ids[row, width - len(request.prompt) :] = torch.tensor(request.prompt, dtype=torch.long)
            mask[row, width - len(request.prompt) :] = 1
        # as generate derives them: the count of real tokens before each one; 0 on padding
        positions = (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)
        cache = _new_cache()
        logits = self._forward(newcomers, ids, mask, positions, cache)
        self._stats["prefills"] += 1
        for request, token in zip(newcomers, _choose(logits, newcomers), strict=True):
            if request.active:
                request.take(token)
        # `active` can change under us (a consumer going away): read it once
        going = [row for row, r in enumerate(newcomers) if r.active]
        self._count_cancelled([r for row, r in enumerate(newcomers) if row not in going])
        joiners = [newcomers[row] for row in going]
        if not going:
            return [], None
        if len(going) < len(newcomers):
            return joiners, _rebuild(cache, mask, going, None)
        return joiners, (cache, mask)

    def _change_batch(self, joiners: list[_Request], joining: tuple[DynamicCache, torch.Tensor] | None) -> None:
        """Drop the rows that finished or were cancelled, and add the JOINERS (the rows of JOINING); copies the
        cache only when the batch changes."""
        keep = [row for row, request in enumerate(self._rows) if request.active]  # read once, as above
        self._count_cancelled([r for row, r in enumerate(self._rows) if row not in keep])
        if len(keep) == len(self._rows) and not joiners:
            return
        cache, mask = _rebuild(self._cache, self._mask, keep, joining)
        with self._cond:  # stats() reads the rows from other threads
            self._rows, self._cache, self._mask = [self._rows[row] for row in keep] + joiners, cache, mask

    def _count_cancelled(self, leaving: list[_Request]) -> None:
        # the others left finished or failed: counted then
        cancelled = sum(not r.done for r in leaving)
        if cancelled:
            self._count("cancelled", cancelled)

    def _decode(self) -> None:
        """One token for every running row: its newest token in, at its own position, over the whole cache."""
        rows = self._rows
        ids = torch.tensor([[r.last] for r in rows], dtype=torch.long)
        positions = torch.tensor([[r.position] for r in rows], dtype=torch.long)
        # the mask is small ([rows, columns] integers): growing it by concatenation costs little, unlike the cache
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(rows, ids, mask, positions, self._cache)
        self._mask = mask
        self._stats["steps"] += 1
        self._stats["largest_batch"] = max(self._stats["largest_batch"], len(rows))
        for request, token in zip(rows, _choose(logits, rows), strict=True):
            if request.active:  # a row cancelled during the step still had its forward; its token is dropped
                request.take(token)

    def _forward(
        self,
        requests: list[_Request],
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """The model on one batch; the logits of each row's last position."""
        if self.rows_hook is not None:
            self.rows_hook([r.adapter for r in requests])
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1]

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        log.exception("generation step failed for %d request(s)", len(requests), exc_info=error)
        message = f"generation failed: {type(error).__name__}: {error}"
        for request in requests:
            request.fail(GenerationFailed(message))  # one each: every consumer raises its own

    def _stop_all(self) -> None:
        """After close(): everything still in flight or waiting fails."""
        with self._cond:
            pending = [r for r in self._rows if not r.done] + list(self._waiting)
            self._waiting.clear()
            self._rows, self._cache, self._mask = [], None, None
        for request in pending:
            request.fail(GenerationFailed("the engine stopped"))


def _check_full_attention(config: Any) -> None:
    """The cache keeps every column for every layer: models with sliding-window or other non-global attention layers
    need caches this engine does not build."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text_config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"the engine serves models whose layers all use full attention; this one has {sorted(kinds)}")


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model computes logits for the last position only when asked (generate asks when it can); a peft
    model passes the argument through to its base model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def generate_all(engine: GenerationEngine, prompts: list[list[int]], sampling: Sampling) -> list[list[int]]:
    """Every prompt's tokens (without the Finish), all submitted at once on a private event loop: the synchronous way
    in for benchmarks and tests."""

    async def one(prompt: list[int]) -> list[int]:
        return [item async for item in engine.generate(prompt, sampling) if not isinstance(item, Finish)]

    async def every() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(every())
