"""POST /v1/completions: plain-text prompts (string, list, or token arrays), `echo`, `logprobs`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace

from ..engine.constraints import GrammarConstraint
from ..errors import InvalidRequestError, error_payload
from ..registry import ModelRegistry, ServedGenerator
from .generation import Delta, TextChunks, merge, run_sequence, stop_list
from .limits import check_capacity, check_prompt_length, completion_budget
from .protocol import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Usage, new_id, now
from .structured import output_grammar


def _prompts(lm: ServedGenerator, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [lm.tokenizer.encode(prompt)]
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        ids = lm.tokenizer.encode(p) if isinstance(p, str) else list(p)
        bad = [t for t in ids if not 0 <= t < lm.tokenizer.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt[{i}] has token id {bad[0]} outside the vocabulary (0..{lm.tokenizer.vocab_size - 1})", "prompt"
            )
        out.append(ids)
    return out


def _grammar(req: CompletionRequest) -> str | None:
    """The output constraint (at most one; server/structured.py), enforced whole or refused."""
    grammar, partial, _ = output_grammar(req)
    if partial is not None:
        raise InvalidRequestError(
            "This schema cannot be fully enforced; plain completions accept only schemas the grammar engine enforces whole.",
            "response_format",
        )
    return grammar


class _Logprobs:
    """Accumulates OpenAI's legacy logprobs object for one choice."""

    def __init__(self, lm: ServedGenerator, offset: int):
        self.lm, self.offset = lm, offset
        self.lp = CompletionLogprobs()

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None):
        piece = self.lm.tokenizer.piece(token_id)
        self.lp.tokens.append(piece)
        self.lp.token_logprobs.append(logprob)
        self.lp.top_logprobs.append(None if top is None else {self.lm.tokenizer.piece(t): v for t, v in top})
        self.lp.text_offset.append(self.offset)
        self.offset += len(piece)

    def add_delta(self, d: Delta):
        for o in d.outputs:
            self.add(o.token_id, o.logprob, o.top_logprobs or [])


class CompletionHandler:
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def prepare(self, req: CompletionRequest):
        lm, adapter = self.registry.resolve_generator(req.model)
        if req.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported by this model.", "suffix")
        prompts = _prompts(lm, req.prompt)
        grammar = _grammar(req)
        jobs = []
        for ids in prompts:
            check_prompt_length(lm, len(ids), "prompt")
            max_tokens = completion_budget(lm, len(ids), req.max_tokens, "prompt", "prompt")
            params = req.to_sampling_params(lm.defaults, max_tokens, lm.tokenizer.vocab_size, req.logprobs)
            if req.echo and req.logprobs is not None:
                params = replace(params, prompt_logprobs=True)
            for j in range(req.n or 1):
                seed = None if params.seed is None else params.seed + j
                p = replace(params, seed=seed)
                if grammar is not None:  # one matcher per sequence
                    p.logits_processors = [*p.logits_processors, GrammarConstraint(lm.tokenizer.ll_tokenizer, grammar)]
                jobs.append((ids, p))
        check_capacity(lm, len(jobs))
        return lm, adapter, jobs

    def _start(self, lm, adapter, req, jobs) -> tuple[list[str], list[_Logprobs | None], list[AsyncIterator[Delta]]]:
        texts, lps, streams = [], [], []
        stops = stop_list(req.stop)
        for ids, params in jobs:
            echo = lm.tokenizer.decode(ids) if req.echo else ""
            texts.append(echo)
            lps.append(_Logprobs(lm, 0) if req.logprobs is not None else None)
            streams.append(run_sequence(lm, adapter, ids, params, stops))
        return texts, lps, streams

    @staticmethod
    def _add_echo_logprobs(lm, lp: _Logprobs, ids, d: Delta):
        if d.prompt_logprobs is not None:
            for t, v in zip(ids, d.prompt_logprobs):
                lp.add(t, v, None)

    async def create(self, req: CompletionRequest) -> Completion:
        lm, adapter, jobs = self.prepare(req)
        texts, lps, streams = self._start(lm, adapter, req, jobs)
        finish: list[str | None] = [None] * len(jobs)
        generated = [0] * len(jobs)
        async for i, d in merge(streams):
            mine = lps[i]
            if mine is not None:
                if req.echo:
                    self._add_echo_logprobs(lm, mine, jobs[i][0], d)
                mine.add_delta(d)
            texts[i] += d.text
            finish[i] = d.finish_reason or finish[i]
            generated[i] = d.num_generated
        choices = [
            CompletionChoice(index=i, text=texts[i], finish_reason=finish[i], logprobs=lp.lp if lp else None)
            for i, lp in enumerate(lps)
        ]
        n_prompt = sum(len(ids) for ids, _ in jobs[:: req.n or 1])
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=sum(generated), total_tokens=n_prompt + sum(generated))
        return Completion(
            id=new_id("cmpl"),
            created=now(),
            model=req.model,
            choices=choices,
            usage=usage,
            system_fingerprint=lm.fingerprint,
        )

    def stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        lm, adapter, jobs = self.prepare(req)
        return self._stream(lm, adapter, jobs, req)

    async def _stream(self, lm, adapter, jobs, req) -> AsyncIterator[str]:
        cid, created = new_id("cmpl"), now()
        texts, lps, streams = self._start(lm, adapter, req, jobs)
        generated = [0] * len(jobs)

        def chunk(choices, usage=None):
            c = Completion(
                id=cid,
                created=created,
                model=req.model,
                choices=choices,
                usage=usage,
                system_fingerprint=lm.fingerprint,
            )
            return f"data: {c.model_dump_json()}\n\n"

        # choice i's text alone, the chunk of almost every token
        text_chunk = TextChunks(
            lambda i, text: Completion(
                id=cid,
                created=created,
                model=req.model,
                choices=[CompletionChoice(index=i, text=text)],
                system_fingerprint=lm.fingerprint,
            )
        )
        try:
            async for i, d in merge(streams):
                generated[i] = d.num_generated
                text = d.text
                lp = None
                sent = lps[i]  # what this sequence's earlier chunks carried (its text offset)
                if sent is not None:
                    lp = _Logprobs(lm, sent.offset)
                    if req.echo:
                        self._add_echo_logprobs(lm, lp, jobs[i][0], d)
                    lp.add_delta(d)
                    sent.offset = lp.offset
                if texts[i]:  # the echoed prompt goes out with the first delta
                    text, texts[i] = texts[i] + text, ""
                if lp is None and d.finish_reason is None:
                    yield text_chunk(i, text)
                    continue
                yield chunk(
                    [
                        CompletionChoice(
                            index=i, text=text, finish_reason=d.finish_reason, logprobs=lp.lp if lp else None
                        )
                    ]
                )
        except Exception as e:
            yield f"data: {json.dumps(error_payload(e))}\n\n"
            return
        if req.stream_options and req.stream_options.include_usage:
            n_prompt = sum(len(ids) for ids, _ in jobs[:: req.n or 1])
            yield chunk(
                [],
                Usage(prompt_tokens=n_prompt, completion_tokens=sum(generated), total_tokens=n_prompt + sum(generated)),
            )
        yield "data: [DONE]\n\n"
