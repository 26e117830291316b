"""From engine token ids to text deltas: incremental detokenizing, stop strings, sampling params.

Shared by the chat and completions handlers; knows the tokenizer and the engine, not HTTP.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..engine import EngineOutput, SamplingParams
from ..errors import ContextLengthExceededError, InvalidRequestError, QueueFullError
from ..registry import GenerationModel
from ..models.tokenizer import IncrementalDetokenizer
from .protocol import SamplingFields


@dataclass
class Delta:
    text: str
    outputs: list[EngineOutput] = field(default_factory=list)  # tokens released with this text
    finish_reason: str | None = None
    prompt_logprobs: list[float | None] | None = None
    num_generated: int = 0  # tokens generated so far (for usage)


def sampling_params(
    lm: GenerationModel,
    req: SamplingFields,
    n_prompt: int,
    requested_max: int | None,
    logprobs: int | None,
    prompt_param: str,
) -> SamplingParams:
    """SamplingParams from a request, filling what it leaves out from the model's defaults."""
    engine, d = lm.engine, lm.defaults
    try:
        if requested_max is not None:
            engine.check_fits(n_prompt, requested_max)
            max_tokens = requested_max
        else:
            room = min(engine.max_context, engine.config.kv_cache_tokens) - n_prompt
            if room < 1:
                engine.check_fits(n_prompt, 1)
            max_tokens = min(d.max_completion_tokens, room)
    except ContextLengthExceededError as e:  # the engine counts tokens; the prompt came from this field
        e.param = prompt_param
        raise
    bias = {}
    for k, v in (req.logit_bias or {}).items():
        tid = int(k)
        if not 0 <= tid < lm.tokenizer.vocab_size:
            raise InvalidRequestError(f"logit_bias token id {tid} is outside the vocabulary (0..{lm.tokenizer.vocab_size - 1})", "logit_bias")
        bias[tid] = v
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        ignore_eos=bool(req.ignore_eos),
        logprobs=logprobs,
    )


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def check_capacity(lm: GenerationModel, n_sequences: int) -> None:
    """Refuse up front (429) what the engine's queue cannot take, before a stream's headers go out."""
    engine = lm.engine
    if len(engine.waiting) + n_sequences > engine.config.max_queue:
        raise QueueFullError(f"The server is busy: {len(engine.waiting)} requests are already waiting (limit {engine.config.max_queue}). Retry shortly.")


def check_prompt_length(lm: GenerationModel, n_prompt: int, param: str) -> None:
    if n_prompt == 0:
        raise InvalidRequestError("The prompt is empty.", param)
    if n_prompt >= lm.engine.max_context:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {lm.engine.max_context} tokens, but the prompt has {n_prompt}.", param
        )


async def run_sequence(lm: GenerationModel, adapter: str | None, prompt_ids: list[int], params: SamplingParams, stop: list[str]) -> AsyncIterator[Delta]:
    """Yield text deltas for one sequence. Text that might begin a stop string is held back until
    it cannot; a matched stop string ends the sequence (finish_reason "stop") and is not returned."""
    detok = IncrementalDetokenizer(lm.tokenizer)
    holdback = max((len(s) for s in stop), default=1) - 1
    text, sent, pending, n = "", 0, [], 0
    prompt_lp = None
    gen = lm.engine.generate(prompt_ids, params, adapter)
    try:
        async for out in gen:
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


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, yielding (stream index, item) as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
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
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
