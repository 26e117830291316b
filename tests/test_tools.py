"""Function calling through the official client on the real default model: every tool_choice
mode, streamed and not, and tool results fed back."""

from __future__ import annotations

import json

import pytest
from conftest import post

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string"}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def check_weather_args(call):
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit") and isinstance(args["city"], str)


def test_required_gives_valid_calls(client):
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_completion_tokens=120
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    assert c.message.tool_calls and all(t.id.startswith("call_") and t.type == "function" for t in c.message.tool_calls)
    for t in c.message.tool_calls:
        assert t.function.name in ("get_weather", "get_time")
        if t.function.name == "get_weather":
            check_weather_args(t)


def test_named_function_is_the_one_called(client):
    r = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_completion_tokens=80,
    )
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    assert set(json.loads(calls[0].function.arguments)) == {"timezone"}


def test_none_answers_in_text(client):
    r = client.chat.completions.create(
        model="gpt-4o-mini", messages=ASK, tools=[WEATHER], tool_choice="none", max_completion_tokens=30
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_auto_returns_text_or_valid_calls(client):
    r = client.chat.completions.create(model="gpt-4o-mini", messages=ASK, tools=[WEATHER], max_completion_tokens=120)
    c = r.choices[0]
    if c.message.tool_calls:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "get_weather"
        json.loads(c.message.tool_calls[0].function.arguments)
    else:
        assert c.message.content and c.finish_reason in ("stop", "length")


def test_streamed_tool_calls_come_in_openai_shape(client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        max_completion_tokens=120,
        stream=True,
    )
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert (
        deltas[0].id.startswith("call_")
        and deltas[0].function.name == "get_weather"
        and deltas[0].function.arguments == ""
    )
    args = "".join(d.function.arguments or "" for d in deltas)
    assert set(json.loads(args)) == {"city", "unit"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_results_are_accepted_back(client):
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=ASK, tools=[WEATHER], tool_choice="required", max_completion_tokens=120
    )
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "unit": "celsius"})},
    ]
    r = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_completion_tokens=40,
        temperature=0,
    )
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_bad_tool_requests_are_400(server, body, param):
    r = post(server, "/chat/completions", {"model": "gpt-4o-mini", "messages": ASK, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
