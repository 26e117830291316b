"""The HTTP handlers in process, fast: the ASGI app with a scripted stand-in for the engine, driven
by the official client over httpx's ASGI transport. What the handlers add on top of the engine
(text assembly, stop strings, n, streaming, usage, errors in-band and out) is checked here in
milliseconds; the same paths run end to end on the real model in test_server_*.py."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from tuning_data import tiny_chat_llama

from fundament.config import EngineConfig, ModelSpec, ServeConfig
from fundament.engine import EngineOutput
from fundament.engine.engine import Engine
from fundament.models.tokenizer import ChatTokenizer
from fundament.registry import ModelRegistry, ServedGenerator
from fundament.server.app import create_app

REPLY = "The answer is 42. It always was."


class ScriptedEngine:
    """Answers every prompt with REPLY's tokens then end-of-turn, one token per await; `fail_after`
    tokens in, it raises instead (a fault inside the engine)."""

    def __init__(self, tok: ChatTokenizer, fail_after: int | None = None):
        self.tokens = tok.encode(REPLY) + tok.eos_token_ids[:1]
        self.eos = tok.eos_token_ids[:1]
        self.fail_after = fail_after
        self.max_context, self.config = 2048, EngineConfig()
        self.waiting, self.running, self.steps, self.reserved_tokens = [], [], 0, 0
        self.prompts: list[list[int]] = []

    check_fits = Engine.check_fits

    async def generate(self, prompt_ids, params, adapter=None):
        self.prompts.append(list(prompt_ids))
        for i, t in enumerate(self.tokens):
            await asyncio.sleep(0)
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("injected engine fault")
            done = "stop" if t in self.eos else "length" if i + 1 >= params.max_tokens else None
            yield EngineOutput(token_id=t, logprob=-0.5 if params.logprobs is not None else None, finish_reason=done)
            if done:
                return


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tuple[ChatTokenizer, str]:
    path = tiny_chat_llama(tmp_path_factory.mktemp("handlers"))
    return ChatTokenizer(path), str(path)


def client_for(tok, engine) -> openai.AsyncOpenAI:
    tokenizer, path = tok
    cfg = ServeConfig(models=[])
    registry = ModelRegistry(cfg)
    spec = ModelSpec(name="scripted", task="generate", path=path)
    registry.generators["scripted"] = ServedGenerator("scripted", spec, tokenizer, engine, 0, "fp_test")
    app = create_app(cfg, registry)
    # as a server would, answer with the app's 500 rather than re-raise what Starlette re-raises for logging
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://handlers.test"
    )
    return openai.AsyncOpenAI(base_url="http://handlers.test/v1", api_key="k", http_client=http, max_retries=0)


def run(coro):
    return asyncio.run(coro)


def test_a_chat_answer_is_the_engine_text_with_usage(tok):
    engine = ScriptedEngine(tok[0])
    r = run(
        client_for(tok, engine).chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Q?"}])
    )
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(engine.prompts[0]) and r.usage.completion_tokens == len(engine.tokens)
    assert r.system_fingerprint == "fp_test"
    assert tok[0].hf.decode(engine.prompts[0]).rstrip().endswith("assistant")  # the chat template's generation prompt


def test_a_stop_string_ends_the_text_before_it(tok):
    r = run(
        client_for(tok, ScriptedEngine(tok[0])).chat.completions.create(
            model="scripted", messages=[{"role": "user", "content": "Q?"}], stop=[" 42"]
        )
    )
    assert r.choices[0].message.content == "The answer is" and r.choices[0].finish_reason == "stop"


def test_max_tokens_cuts_with_finish_reason_length(tok):
    r = run(client_for(tok, ScriptedEngine(tok[0])).completions.create(model="scripted", prompt="Q", max_tokens=3))
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    assert REPLY.startswith(r.choices[0].text) and r.choices[0].text


def test_a_stream_with_n_2_reassembles_each_choice_and_reports_usage(tok):
    async def go():
        c = client_for(tok, ScriptedEngine(tok[0]))
        stream = await c.chat.completions.create(
            model="scripted",
            messages=[{"role": "user", "content": "Q?"}],
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        texts, finish, usage = ["", ""], [None, None], None
        async for chunk in stream:
            for ch in chunk.choices:
                texts[ch.index] += ch.delta.content or ""
                finish[ch.index] = ch.finish_reason or finish[ch.index]
            usage = chunk.usage or usage
        return texts, finish, usage

    texts, finish, usage = run(go())
    assert texts == [REPLY, REPLY] and finish == ["stop", "stop"]
    assert usage.completion_tokens == 2 * len(tok[0].encode(REPLY) + [0])


def test_an_engine_fault_is_a_500_envelope_and_in_band_when_streaming(tok):
    c = client_for(tok, ScriptedEngine(tok[0], fail_after=2))
    with pytest.raises(openai.InternalServerError) as e:
        run(c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Q?"}]))
    assert e.value.body["type"] == "server_error"

    async def stream():
        s = await c.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "Q?"}], stream=True)
        return [chunk async for chunk in s]

    with pytest.raises(openai.APIError, match="internal error: RuntimeError"):
        run(stream())


def test_requested_tokens_over_the_window_name_the_field(tok):
    c = client_for(tok, ScriptedEngine(tok[0]))
    with pytest.raises(openai.BadRequestError) as e:
        run(
            c.chat.completions.create(
                model="scripted", messages=[{"role": "user", "content": "Q?"}], max_completion_tokens=5000
            )
        )
    assert e.value.body["param"] == "max_completion_tokens" and e.value.body["code"] == "context_length_exceeded"
