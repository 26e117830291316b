"""End to end: /v1/completions through the official client on the real default model."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_completion_continues_the_prompt(client):
    r = client.completions.create(model="gpt-4o-mini", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert "paris" in r.choices[0].text.lower()
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens <= 8


def test_list_of_prompts_and_n(client):
    r = client.completions.create(
        model="gpt-4o-mini", prompt=["One, two, three,", "Monday, Tuesday,"], max_tokens=4, temperature=0, n=2
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both choices of a prompt agree
    assert "four" in r.choices[0].text.lower() and "wednesday" in r.choices[2].text.lower()


def test_token_array_prompt_equals_text_prompt(client, smollm_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm_dir).encode("The capital of France is", add_special_tokens=False)
    a = client.completions.create(model="gpt-4o-mini", prompt=ids, max_tokens=6, temperature=0)
    b = client.completions.create(model="gpt-4o-mini", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert a.choices[0].text == b.choices[0].text


def test_echo_and_logprobs(client):
    prompt = "The capital of France is"
    r = client.completions.create(
        model="gpt-4o-mini", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert len(lp.top_logprobs[-1]) == 2


def test_streaming_completion(client):
    plain = client.completions.create(model="gpt-4o-mini", prompt="Once upon a time", max_tokens=16, temperature=0)
    chunks = list(
        client.completions.create(
            model="gpt-4o-mini",
            prompt="Once upon a time",
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_stop_in_completions(client):
    r = client.completions.create(model="gpt-4o-mini", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert r.choices[0].finish_reason == "stop" and "7" not in r.choices[0].text and "6" in r.choices[0].text
