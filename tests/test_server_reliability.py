"""No single request can wedge or 500 the server (issue 13): each input that used to hang it or
give a 500 now gets a 400 naming the field, and the engine holds nothing for it afterwards."""

from __future__ import annotations

import json
import math
import time

import httpx
import pytest
from conftest import post
from test_server_errors import err

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "gpt-4o-mini", "messages": MSG, "max_tokens": 4}
COMPLETION = {"model": "gpt-4o-mini", "prompt": "Once upon a time", "max_tokens": 4}


def idle(server, within: float = 10.0) -> dict:
    """The engine's counters once it has nothing running or waiting (fails after `within` s)."""
    deadline = time.time() + within
    while True:
        engine = server.health()["engines"]["smollm2-135m-instruct"]
        if (engine["running"], engine["waiting"]) == (0, 0) or time.time() > deadline:
            return engine
        time.sleep(0.1)


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
@pytest.mark.parametrize(
    "path,body", [("/chat/completions", CHAT), ("/completions", COMPLETION), ("/chat/completions", {**CHAT, "n": 2})]
)
def test_a_seed_outside_64_bits_is_400_and_wedges_nothing(server, path, body, seed):
    err(post(server, path, {**body, "seed": seed}), 400, "seed")
    assert idle(server)["running"] == 0
    ok = post(server, path, {**body, "seed": 2**63 - 1})  # the largest seed still works
    assert ok.status_code == 200, ok.text


def test_a_long_request_still_runs_after_bad_seeds(server):
    """Each hung request used to keep its KV reservation: after a few, longer ones waited forever."""
    for _ in range(5):
        post(server, "/chat/completions", {**CHAT, "seed": 2**64, "max_tokens": 1500})
    r = httpx.post(f"{server.base_url}/chat/completions", json={**CHAT, "max_tokens": 8, "seed": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/completions", {**COMPLETION, "prompt": "bad \udfff text"}, "prompt"),
        ("/completions", {**COMPLETION, "prompt": ["fine", "bad \udfff"]}, "prompt[1]"),
        ("/embeddings", {"model": "text-embedding-3-small", "input": "bad \udfff"}, "input"),
        ("/embeddings", {"model": "text-embedding-3-small", "input": ["ok", "bad \udfff"]}, "input[1]"),
        ("/classifications", {"model": "gpt-4o-mini", "input": "bad \udfff", "labels": ["a", "b"]}, "input"),
        ("/classifications", {"model": "gpt-4o-mini", "input": "ok", "labels": ["a", "\udfff"]}, "labels[1]"),
        ("/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "bad \udfff"}]}, "messages[0].content"),
        (
            "/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    # json.dumps writes "\udfff" as the escape a client would send
    e = err(post(server, path, json.dumps(body)), 400, param)
    assert "surrogate" in e["message"] and "U+DFFF" in e["message"]


def test_tool_call_arguments_that_are_not_json_are_400(server):
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    e = err(
        post(server, "/chat/completions", {**CHAT, "messages": messages}),
        400,
        "messages[1].tool_calls[0].function.arguments",
    )
    assert "JSON" in e["message"]


def finite_numbers(obj) -> list[float]:
    """Every number in a JSON value, checked finite (the server would have failed to encode -inf)."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    if isinstance(obj, float):
        assert math.isfinite(obj)
        return [obj]
    return []


def test_completion_logprobs_with_a_grammar_are_finite(server):
    r = post(
        server,
        "/completions",
        {
            **COMPLETION,
            "prompt": "The colour of the sky is",
            "logprobs": 5,
            "guided_choice": ["blue", "green"],
            "max_tokens": 8,
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] in ("blue", "green")
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) >= 1
    assert all(v <= 0 for v in finite_numbers(lp["token_logprobs"]))
    for top in lp["top_logprobs"]:  # only tokens the grammar allows are listed: few here
        assert 1 <= len(top) <= 5 and all(math.isfinite(v) and v <= 0 for v in top.values())


def test_chat_top_logprobs_with_json_mode_are_finite_also_streamed(server, client):
    body = {
        **CHAT,
        "messages": [{"role": "user", "content": "Give a JSON object with a name."}],
        "max_tokens": 12,
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 5,
    }
    r = post(server, "/chat/completions", body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content and all(math.isfinite(t["logprob"]) for t in content)
    assert all(math.isfinite(x["logprob"]) for t in content for x in t["top_logprobs"])
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=body["messages"],
        max_tokens=12,
        response_format={"type": "json_object"},
        logprobs=True,
        top_logprobs=5,
        stream=True,
    )
    seen = 0
    for chunk in stream:
        for c in chunk.choices:
            for t in c.logprobs.content if c.logprobs and c.logprobs.content else []:
                assert t.logprob is not None and math.isfinite(t.logprob)
                assert all(x.logprob is not None and math.isfinite(x.logprob) for x in t.top_logprobs)
                seen += 1
    assert seen >= 1


def test_a_chunked_body_over_the_limit_is_413(server):
    chunk = b"x" * (1024 * 1024)

    def body():  # a generator: httpx sends it chunked, with no Content-Length
        yield b'{"model": "gpt-4o-mini", "prompt": "'
        for _ in range(50):
            yield chunk
        yield b'"}'

    r = httpx.post(
        f"{server.base_url}/completions", content=body(), headers={"content-type": "application/json"}, timeout=60
    )
    assert "content-length" not in r.request.headers
    err(r, 413, None, "request_too_large")


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "file": {"file_id": "file-1"}},
    ],
)
def test_a_part_the_model_cannot_read_is_400_never_dropped(server, part):
    body = {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}]}
    e = err(post(server, "/chat/completions", body), 400, "messages[0].content[1]")
    assert part["type"] in e["message"]


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/chat/completions", {**CHAT, "temprature": 0.5}, "temprature"),
        ("/completions", {**COMPLETION, "typical_p": 0.9}, "typical_p"),
        ("/embeddings", {"model": "text-embedding-3-small", "input": "x", "truncate": True}, "truncate"),
        ("/classifications", {"model": "gpt-4o-mini", "input": "x", "labels": ["a", "b"], "lables": ["c"]}, "lables"),
    ],
)
def test_an_unknown_field_is_400_unrecognized(server, path, body, field):
    e = err(post(server, path, body), 400, field)
    assert e["message"] == f"Unrecognized request argument supplied: {field}"


def test_openai_fields_we_do_not_use_stay_accepted(server):
    body = {
        **CHAT,
        "store": False,
        "metadata": {"a": "b"},
        "service_tier": "auto",
        "user": "u",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "parallel_tool_calls": True,
        "reasoning_effort": "low",
        "stream_options": None,
    }
    assert post(server, "/chat/completions", body).status_code == 200


@pytest.mark.parametrize(
    "field,value",
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("web_search_options", {}),
    ],
)
def test_openai_fields_we_cannot_honour_are_refused(server, field, value):
    err(post(server, "/chat/completions", {**CHAT, field: value}), 400, field)


@pytest.mark.parametrize("raw,got", [(b"", "nothing"), (b"[]", "list"), (b'"hello"', '"hello"'), (b"3", "3")])
def test_an_empty_or_non_object_body_says_so(server, raw, got):
    e = err(post(server, "/chat/completions", raw), 400, None)
    assert e["message"] == f"The request body must be a JSON object with this endpoint's parameters (got {got})."


@pytest.mark.parametrize("choice", ["garbage", {"type": "function"}, {"type": "function", "function": "f"}, 7])
def test_a_garbage_tool_choice_says_what_is_accepted(server, choice):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    e = err(post(server, "/chat/completions", {**CHAT, "tools": tools, "tool_choice": choice}), 400, "tool_choice")
    assert "None" not in e["message"]


def test_classifications_cap_their_inputs(server):
    body = {"model": "gpt-4o-mini", "input": ["x"] * 2049, "labels": ["a", "b"]}
    e = err(post(server, "/classifications", body), 400, "input")
    assert "2048" in e["message"]


def test_a_classification_the_client_gives_up_on_stops_in_the_engine(server):
    body = {
        "model": "gpt-4o-mini",
        "input": [f"review number {i}: it was fine" for i in range(400)],
        "labels": ["positive", "negative"],
    }
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base_url}/classifications", json=body, timeout=2)
    engine = idle(server, within=15)  # the disconnect is seen within 0.5 s, then every score is aborted
    assert (engine["running"], engine["waiting"]) == (0, 0)
    t0 = time.perf_counter()
    r = post(server, "/chat/completions", CHAT)
    assert r.status_code == 200 and time.perf_counter() - t0 < 5


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/embeddings", {"model": "text-embedding-3-small", "input": [False]}, "input"),
        ("/completions", {**COMPLETION, "max_tokens": True}, "max_tokens"),
        ("/chat/completions", {**CHAT, "n": "2"}, "n"),
    ],
)
def test_a_value_of_the_wrong_json_type_is_400_not_coerced(server, path, body, param):
    """Found by fuzzing: `[false]` was read as the token array [0] and embedded."""
    err(post(server, path, body), 400, param)
