"""One sequence's engine token ids as text deltas (incremental detokenizing, stop strings held
back until they cannot match), and several sequences interleaved as they arrive. Shared by the
chat and completions handlers; knows the tokenizer and the engine, not HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel

from ..engine import EngineOutput, SamplingParams
from ..models.tokenizer import IncrementalDetokenizer
from ..registry import ServedGenerator
from .metrics import current as current_request

T = TypeVar("T")

BATCH_PRIORITY = 1  # the engine starts waiting sequences of priority 0 (interactive) first
_in_batch: contextvars.ContextVar[bool] = contextvars.ContextVar("fundament_in_batch", default=False)


@contextlib.contextmanager
def in_batch():
    """Sequences generated in this block are a batch's: they wait behind interactive ones."""
    token = _in_batch.set(True)
    try:
        yield
    finally:
        _in_batch.reset(token)


@dataclass
class Delta:
    text: str
    outputs: list[EngineOutput] = field(default_factory=list)  # tokens released with this text
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None
    num_generated: int = 0  # tokens generated so far (for usage)


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


async def run_sequence(
    lm: ServedGenerator, adapter: str | None, prompt_ids: list[int], params: SamplingParams, stop: list[str]
) -> AsyncIterator[Delta]:
    """Yield text deltas for one sequence. Text that might begin a stop string is held back until
    it cannot; a matched stop string ends the sequence (finish_reason "stop") and is not returned."""
    record = current_request()
    if _in_batch.get():
        params = dataclasses.replace(params, priority=BATCH_PRIORITY)
    t0, ttft = time.perf_counter(), None
    detok = IncrementalDetokenizer(lm.tokenizer)
    holdback = max((len(s) for s in stop), default=1) - 1
    text, sent, pending, n = "", 0, [], 0
    prompt_lp = None
    gen = lm.engine.generate(prompt_ids, params, adapter)
    try:
        async for out in gen:
            if n == 0:
                ttft = time.perf_counter() - t0
            n += 1
            if out.prompt_logprobs is not None:
                prompt_lp = out.prompt_logprobs
            finish = out.finish_reason
            text += detok.add(out.token_id)
            pending.append(out)
            if stop:
                hits = [i for i in (text.find(s, max(0, sent - holdback)) for s in stop) if i >= 0]
                if hits:
                    text, finish = text[: min(hits)], "stop"
            if finish:
                yield Delta(text[sent:], pending, finish, prompt_lp, n)
                return
            safe = len(text) - holdback
            if safe > sent:
                yield Delta(text[sent:safe], pending, None, prompt_lp, n)
                sent, pending, prompt_lp = safe, [], None
    finally:
        await gen.aclose()
        if record is not None:
            record.sequence_done(len(prompt_ids), ttft, n)


class _End:
    """A stream's end, in merge's queue."""


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators, yielding (stream index, item) as items arrive."""
    if len(streams) == 1 and hasattr(streams[0], "aclose"):  # one sequence: no task and queue hop per token
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for x in only:
                yield 0, x
        return
    queue: asyncio.Queue[tuple[int, T | BaseException | _End]] = asyncio.Queue()
    done = _End()

    async def pump(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:  # surfaced to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if isinstance(item, _End):
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TextChunks:
    """A stream's chunks that differ only in one text (a delta's content, say), written from a
    template: `make(key, text)` builds the chunk's model, which is dumped once per key with a
    marker for the text; each chunk after is the two halves around the text's JSON string. The
    same JSON as dumping the models each time, without building and dumping them per token on the
    event loop (~0.25 ms a token there, beside the engine's threads on the same cores)."""

    MARK = "\ue000fundament-text\ue001"

    def __init__(self, make: Callable[[int, str], BaseModel]):
        self._make = make
        self._halves: dict[int, tuple[str, str] | None] = {}

    def __call__(self, key: int, text: str) -> str:
        if key not in self._halves:
            parts = self._make(key, self.MARK).model_dump_json().split(json.dumps(self.MARK, ensure_ascii=False))
            self._halves[key] = (parts[0], parts[1]) if len(parts) == 2 else None
        halves = self._halves[key]
        if halves is None:  # the marker did not come out as one plain string: dump the model
            return f"data: {self._make(key, text).model_dump_json()}\n\n"
        return f"data: {halves[0]}{json.dumps(text, ensure_ascii=False)}{halves[1]}\n\n"
