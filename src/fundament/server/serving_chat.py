"""POST /v1/chat/completions: resolve the model, render the chat template, run n sequences,
answer as one ChatCompletion or as a stream of chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import NamedTuple

from ..adapt import tools
from ..adapt.chat import render_chat
from ..engine.constraints import GrammarConstraint, json_schema_grammar
from ..errors import InvalidRequestError, error_payload
from ..registry import ModelRegistry, ServedGenerator
from .generation import Delta, TextChunks, merge, run_sequence, stop_list
from .limits import check_capacity, check_prompt_length, completion_budget
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    ToolCall,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from .structured import output_grammar, schema_refusal


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    """OpenAI fields whose request this server cannot honour: refused, never silently ignored."""
    if req.functions is not None or req.function_call is not None:
        param = "functions" if req.functions is not None else "function_call"
        raise InvalidRequestError(
            f"{param} is OpenAI's deprecated form of tools; send tools and tool_choice instead.", param
        )
    if req.audio is not None or (req.modalities and set(req.modalities) - {"text"}):
        raise InvalidRequestError(
            "This model produces text only; omit audio and send modalities ['text'].",
            "audio" if req.audio is not None else "modalities",
        )
    if req.web_search_options is not None:
        raise InvalidRequestError(
            "Web search is not available on this server; omit web_search_options.", "web_search_options"
        )


class OutputRules(NamedTuple):
    """What a finished choice's text must be read as."""

    tools: str | None  # None (no tools), "auto" (calls parsed from text) or "enforced"
    functions: list[dict]
    check_schema: dict | None  # a response_format schema enforced only in part: validate after


def _tool_calls(text: str, finish: str | None, rules: OutputRules) -> tuple[str | None, list[dict], str | None]:
    """(content, tool calls, finish_reason) of a finished choice."""
    mode, funcs = rules.tools, rules.functions
    if mode == "enforced" and finish == "stop":
        return None, tools.enforced_calls(text), "tool_calls"
    if mode == "auto":
        content, calls = tools.parse_calls(text, funcs)
        if calls:
            return content, calls, "tool_calls"
    return text, [], finish


def _token_logprobs(lm: ServedGenerator, delta: Delta) -> list[TokenLogprob]:
    tok = lm.tokenizer
    items = []
    for o in delta.outputs:
        if o.logprob is None:
            continue
        piece = tok.piece(o.token_id)
        tops = [
            TopLogprob(token=tok.piece(t), logprob=lp, bytes=list(tok.piece(t).encode()))
            for t, lp in (o.top_logprobs or [])
        ]
        items.append(TokenLogprob(token=piece, logprob=o.logprob, bytes=list(piece.encode()), top_logprobs=tops))
    return items


class ChatHandler:
    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    def prepare(self, req: ChatCompletionRequest):
        lm, adapter = self.registry.resolve_generator(req.model)
        _refuse_unsupported(req)
        chat = render_chat(
            [m.model_dump(exclude_none=True) for m in req.messages],
            req.tools,
            req.tool_choice,
            template_tools=lm.tokenizer.hermes_tools,
        )
        funcs, choice = chat.functions, chat.tool_choice
        try:  # turn by turn, as the trainer learns
            prompt_ids = lm.tokenizer.encode_prompt(chat.messages, chat.template_tools)
        except InvalidRequestError:  # no template at all: says so itself
            raise
        except Exception as e:  # a template that rejects the conversation (e.g. role order)
            raise InvalidRequestError(f"the model's chat template rejected these messages: {e}", "messages") from e
        check_prompt_length(lm, len(prompt_ids), "messages")
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs: true.", "top_logprobs")
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = completion_budget(lm, len(prompt_ids), requested, "messages", param)
        params = req.to_sampling_params(
            lm.defaults, max_tokens, lm.tokenizer.vocab_size, (req.top_logprobs or 0) if req.logprobs else None
        )
        check_capacity(lm, req.n or 1)
        grammar, check_schema, asked = output_grammar(req)
        mode = (
            None if choice == "none" else ("enforced" if choice == "required" or isinstance(choice, dict) else "auto")
        )
        if mode == "enforced":
            if grammar is not None:
                raise InvalidRequestError(
                    f"{asked} cannot be combined with tool_choice 'required' or a named function.", asked
                )
            grammar = json_schema_grammar(
                tools.calls_schema(choice, funcs, req.parallel_tool_calls is not False), "tools"
            )
        return lm, adapter, prompt_ids, params, grammar, OutputRules(mode, funcs, check_schema)

    def _streams(self, lm, adapter, prompt_ids, params, grammar, req) -> list[AsyncIterator[Delta]]:
        stops = stop_list(req.stop)
        out = []
        for i in range(req.n or 1):
            p = replace(params, seed=None if params.seed is None else params.seed + i)
            if grammar is not None:  # one matcher per sequence: it follows that sequence's tokens
                p.logits_processors = [*p.logits_processors, GrammarConstraint(lm.tokenizer.ll_tokenizer, grammar)]
            out.append(run_sequence(lm, adapter, prompt_ids, p, stops))
        return out

    async def create(self, req: ChatCompletionRequest) -> ChatCompletion:
        lm, adapter, prompt_ids, params, grammar, rules = self.prepare(req)
        n = req.n or 1
        texts, generated = [""] * n, [0] * n
        finish: list[str | None] = [None] * n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        async for i, d in merge(self._streams(lm, adapter, prompt_ids, params, grammar, req)):
            texts[i] += d.text
            finish[i] = d.finish_reason or finish[i]
            generated[i] = d.num_generated
            if req.logprobs:
                logprobs[i].extend(_token_logprobs(lm, d))
        choices = []
        for i in range(n):
            content, calls, reason = _tool_calls(texts[i], finish[i], rules)
            refusal = schema_refusal(content, rules.check_schema) if content is not None and reason == "stop" else None
            choices.append(
                ChatChoice(
                    index=i,
                    message=AssistantMessage(
                        content=content, refusal=refusal, tool_calls=[ToolCall(**c) for c in calls] or None
                    ),
                    finish_reason=reason,
                    logprobs=ChoiceLogprobs(content=logprobs[i]) if req.logprobs else None,
                )
            )
        usage = Usage(
            prompt_tokens=len(prompt_ids),
            completion_tokens=sum(generated),
            total_tokens=len(prompt_ids) + sum(generated),
        )
        return ChatCompletion(
            id=new_id("chatcmpl"),
            created=now(),
            model=req.model,
            choices=choices,
            usage=usage,
            system_fingerprint=lm.fingerprint,
        )

    def stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        lm, adapter, prompt_ids, params, grammar, rules = self.prepare(req)  # errors here are still plain 4xx responses
        return self._stream(lm, adapter, prompt_ids, params, grammar, rules, req)

    async def _stream(self, lm, adapter, prompt_ids, params, grammar, rules, req) -> AsyncIterator[str]:
        cid, created, n = new_id("chatcmpl"), now(), req.n or 1
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices, usage=None) -> str:
            c = ChatCompletionChunk(
                id=cid,
                created=created,
                model=req.model,
                choices=choices,
                usage=usage,
                system_fingerprint=lm.fingerprint,
            )
            return f"data: {c.model_dump_json(exclude_none=False)}\n\n"

        # a plain content delta of choice i, the chunk of almost every token
        content_chunk = TextChunks(
            lambda i, text: ChatCompletionChunk(
                id=cid,
                created=created,
                model=req.model,
                choices=[ChatChunkChoice(index=i, delta=DeltaMessage(content=text))],
                system_fingerprint=lm.fingerprint,
            )
        )
        for i in range(n):
            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        generated = [0] * n
        held = [""] * n  # with tools the text is held until it is known to be calls or an answer
        streamed = [""] * n  # what went out, to validate against a partly enforced schema
        try:
            async for i, d in merge(self._streams(lm, adapter, prompt_ids, params, grammar, req)):
                generated[i] = d.num_generated
                lp = ChoiceLogprobs(content=_token_logprobs(lm, d)) if req.logprobs else None
                if rules.tools is not None:
                    held[i] += d.text
                    if d.finish_reason:
                        content, calls, reason = _tool_calls(held[i], d.finish_reason, rules)
                        if content:
                            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=content))])
                        for j, c in enumerate(calls):  # OpenAI's shape: id, type and name first, then arguments
                            head = {
                                "index": j,
                                "id": c["id"],
                                "type": "function",
                                "function": {"name": c["function"]["name"], "arguments": ""},
                            }
                            yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(tool_calls=[head]))])
                            yield chunk(
                                [
                                    ChatChunkChoice(
                                        index=i,
                                        delta=DeltaMessage(
                                            tool_calls=[
                                                {"index": j, "function": {"arguments": c["function"]["arguments"]}}
                                            ]
                                        ),
                                    )
                                ]
                            )
                        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason=reason)])
                    continue
                if d.text or lp is not None and lp.content:
                    streamed[i] += d.text
                    if lp is None:
                        yield content_chunk(i, d.text)
                    else:
                        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=d.text), logprobs=lp)])
                if d.finish_reason:
                    refusal = schema_refusal(streamed[i], rules.check_schema) if d.finish_reason == "stop" else None
                    if refusal:
                        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(refusal=refusal))])
                    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(), finish_reason=d.finish_reason)])
        except Exception as e:  # headers are sent: report in-band, as OpenAI does
            yield f"data: {json.dumps(error_payload(e))}\n\n"
            return
        if include_usage:
            total = sum(generated)
            yield chunk(
                [], Usage(prompt_tokens=len(prompt_ids), completion_tokens=total, total_tokens=len(prompt_ids) + total)
            )
        yield "data: [DONE]\n\n"
