"""Bad input gets a 4xx in OpenAI's error envelope with the field named in `param`; never a 500."""

from __future__ import annotations

import openai
import pytest
from conftest import post

pytestmark = pytest.mark.slow

MSG = [{"role": "user", "content": "hi"}]


def err(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert e["message"]
    assert e["param"] == param, e
    if code:
        assert e["code"] == code
    return e


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "gpt-4o-mini", "messages": "hello"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "gpt-4o-mini", "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": "gpt-4o-mini", "messages": MSG, "temperature": 3}, "temperature"),
        ({"model": "gpt-4o-mini", "messages": MSG, "n": 0}, "n"),
        ({"model": "gpt-4o-mini", "messages": MSG, "n": 1000}, "n"),
        ({"model": "gpt-4o-mini", "messages": MSG, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"model": "gpt-4o-mini", "messages": MSG, "max_tokens": -3}, "max_tokens"),
        ({"model": "gpt-4o-mini", "messages": MSG, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"model": "gpt-4o-mini", "messages": MSG, "top_logprobs": 2}, "top_logprobs"),
        ({"model": "gpt-4o-mini", "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "gpt-4o-mini", "messages": MSG, "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"model": "gpt-4o-mini", "messages": MSG, "logit_bias": {"5": 500}}, "logit_bias"),
        ({"model": "gpt-4o-mini", "messages": MSG, "logit_bias": {"999999": 5}}, "logit_bias"),
        ({"model": "all-minilm-l6-v2", "messages": MSG}, "model"),
    ],
)
def test_chat_bad_input_is_400_with_param(server, body, param):
    e = err(post(server, "/chat/completions", body), 400, param)
    assert e["type"] == "invalid_request_error"


def test_malformed_json(server):
    e = err(post(server, "/chat/completions", b'{"model": "gpt-4o-mini", "messages": ['), 400, None)
    assert "JSON" in e["message"]


def test_unknown_model_is_404_model_not_found(server, client):
    err(post(server, "/chat/completions", {"model": "gpt-7", "messages": MSG}), 404, "model", "model_not_found")
    err(post(server, "/embeddings", {"model": "gpt-7", "input": "x"}), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-7")


def test_prompt_over_context_window(server):
    long = "hello " * 9000
    err(
        post(server, "/chat/completions", {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": long}]}),
        400,
        "messages",
        "context_length_exceeded",
    )
    err(
        post(server, "/completions", {"model": "gpt-4o-mini", "prompt": long}), 400, "prompt", "context_length_exceeded"
    )


def test_requested_tokens_over_context_window(server, client):
    e = err(
        post(server, "/chat/completions", {"model": "gpt-4o-mini", "messages": MSG, "max_completion_tokens": 9000}),
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    )
    assert "8192" in e["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, max_tokens=9000)
    assert ei.value.code == "context_length_exceeded" and ei.value.param == "max_tokens"


def test_body_over_limit_is_413(server):
    r = post(
        server,
        "/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "' + b"x" * (9 * 1024 * 1024) + b'"}]}',
    )
    err(r, 413, None, "request_too_large")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "gpt-4o-mini", "prompt": []}, "prompt"),
        ({"model": "gpt-4o-mini", "prompt": ""}, "prompt"),
        ({"model": "gpt-4o-mini", "prompt": [1, 2, 99999999]}, "prompt"),
        ({"model": "gpt-4o-mini", "prompt": "hi", "logprobs": 6}, "logprobs"),
        ({"model": "gpt-4o-mini", "prompt": "hi", "suffix": "end"}, "suffix"),
        ({"model": "gpt-4o-mini"}, "prompt"),
    ],
)
def test_completions_bad_input(server, body, param):
    err(post(server, "/completions", body), 400, param)


@pytest.mark.parametrize(
    "body,param",
    [
        ({"model": "all-minilm-l6-v2", "input": "hi", "dimensions": 128}, "dimensions"),
        ({"model": "all-minilm-l6-v2", "input": ""}, "input"),
        ({"model": "all-minilm-l6-v2", "input": []}, "input"),
        ({"model": "all-minilm-l6-v2", "input": [[1, 2], "x"]}, "input"),
        ({"model": "all-minilm-l6-v2", "input": [5, 999999]}, "input"),
        ({"model": "all-minilm-l6-v2", "input": "hi", "encoding_format": "hex"}, "encoding_format"),
        ({"model": "gpt-4o-mini", "input": "hi"}, "model"),
        ({"model": "all-minilm-l6-v2", "input": "word " * 600}, "input"),
    ],
)
def test_embeddings_bad_input(server, body, param):
    err(post(server, "/embeddings", body), 400, param)


def test_official_client_raises_bad_request_without_retrying(client):
    with pytest.raises(openai.BadRequestError) as ei:
        client.embeddings.create(model="all-minilm-l6-v2", input="hi", dimensions=64)
    assert ei.value.param == "dimensions"


def test_unknown_route_is_404_envelope(server):
    err(post(server, "/nothing/here", {}), 404, None)
