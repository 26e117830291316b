"""Structured output, enforced or refused: response_format through the official client on the
real default model (parse() with a nested pydantic model, json_object, refusals), and the grammar
constraint on its own."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import post
from pydantic import BaseModel, Field

pytestmark = pytest.mark.slow


# Bounded strings: a 135M model sometimes runs a string on without end (in float32 on an AVX2 CPU,
# one of the 20: "パッスティッカル_TOKYAMAKA_2023_2018_2019_..." as a city), which the schema
# allows; maxLength is enforced by the grammar like the rest of the schema, so the object closes.
class Address(BaseModel):
    city: str = Field(max_length=40)
    country: str = Field(max_length=40)


class Person(BaseModel):
    name: str = Field(max_length=40)
    age: int
    address: Address
    hobbies: list[str] = Field(max_length=5)


PROMPTS = [
    f"Invent a person who lives in {c} and describe them as JSON."
    for c in (
        "Paris",
        "Tokyo",
        "Lima",
        "Oslo",
        "Cairo",
        "Quito",
        "Hanoi",
        "Perth",
        "Dakar",
        "Riga",
        "Seoul",
        "Accra",
        "Porto",
        "Kyiv",
        "Minsk",
        "Tunis",
        "Bern",
        "Delhi",
        "Lagos",
        "Sofia",
    )
]


def test_parse_with_a_nested_pydantic_model_over_20_prompts(client):
    for prompt in PROMPTS:
        r = client.chat.completions.parse(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": prompt}],
            response_format=Person,
            max_completion_tokens=200,
        )
        person = r.choices[0].message.parsed
        assert isinstance(person, Person) and isinstance(person.address, Address), r.choices[0].message.content
        assert len(person.address.city) <= 40 and len(person.hobbies) <= 5  # enforced, not only parsed
        assert r.choices[0].finish_reason == "stop"


def test_json_object_output_parses_streamed_and_not(client):
    kw = dict(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Give me a JSON object with a cat's name and age."}],
        response_format={"type": "json_object"},
        max_completion_tokens=400,
    )
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    text = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices
    )
    assert isinstance(json.loads(text), dict)


def test_schema_with_enum_is_enforced(client):
    schema = {
        "type": "object",
        "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]}},
        "required": ["sentiment"],
        "additionalProperties": False,
    }
    for review in ("I love this product, it works great!", "Terrible, it broke after a day."):
        r = client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": f"Classify the sentiment of this review: {review}"}],
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}},
            max_completion_tokens=30,
        )
        assert json.loads(r.choices[0].message.content)["sentiment"] in ("positive", "negative")


def test_unsupported_schema_is_refused_with_400_naming_it(server, client):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "not": {"required": ["a"]}}
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
        )
    assert ei.value.param == "response_format" and "not" in ei.value.message
    r = post(
        server,
        "/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = post(
        server,
        "/chat/completions",
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_schema", "json_schema": {"schema": {}}},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


def test_grammar_constraint_binds_even_a_random_model(smollm_dir, tmp_path):
    """A random model says nothing sensible; under the constraint its output still matches."""
    import re

    from conftest import make_tiny_llama

    from fundament.config import EngineConfig
    from fundament.engine import Engine, EngineRequest, SamplingParams
    from fundament.engine.constraints import GrammarConstraint, choice_grammar, regex_grammar
    from fundament.models.llama import LlamaModel
    from fundament.models.tokenizer import ChatTokenizer

    tok = ChatTokenizer(smollm_dir)
    model = LlamaModel.from_dir(make_tiny_llama(tmp_path / "rnd", vocab_size=49152))
    engine = Engine(model, EngineConfig(), tok.eos_token_ids)

    def run(grammar, seed):
        outs = []
        params = SamplingParams(
            max_tokens=40, temperature=1.0, seed=seed, logits_processors=[GrammarConstraint(tok.ll_tokenizer, grammar)]
        )
        req = EngineRequest(tok.encode("hello"), params, outs.append)
        engine.submit(req)
        while not req.finished:
            engine.step()
        return tok.decode([o.token_id for o in outs]), outs[-1].finish_reason

    for seed in range(3):
        text, finish = run(regex_grammar(r"[0-9]{3}-[a-z]{2,5}", "regex"), seed)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text) and finish == "stop", text
        text, finish = run(choice_grammar(["positive", "negative", "neutral"], "choices"), seed)
        assert text in ("positive", "negative", "neutral"), text


def test_completions_extensions_constrain_plain_completions(client, server):
    r = client.completions.create(
        model="gpt-4o-mini",
        prompt="Review: 'Awful film, I walked out.' Sentiment:",
        max_tokens=10,
        extra_body={"guided_choice": [" positive", " negative"]},
    )
    assert r.choices[0].text in (" positive", " negative")
    r = client.completions.create(
        model="gpt-4o-mini",
        prompt="A US phone number:",
        max_tokens=20,
        extra_body={"guided_regex": r" \d{3}-\d{3}-\d{4}"},
    )
    import re

    assert re.fullmatch(r" \d{3}-\d{3}-\d{4}", r.choices[0].text)
    schema = {
        "type": "object",
        "properties": {"year": {"type": "integer"}},
        "required": ["year"],
        "additionalProperties": False,
    }
    r = client.completions.create(
        model="gpt-4o-mini",
        prompt="The year the Berlin wall fell, as JSON:",
        max_tokens=30,
        extra_body={"guided_json": schema},
    )
    assert isinstance(json.loads(r.choices[0].text)["year"], int)
    bad = post(
        server, "/completions", {"model": "gpt-4o-mini", "prompt": "x", "guided_regex": "a", "guided_choice": ["b"]}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_choice"
    bad = post(
        server, "/completions", {"model": "gpt-4o-mini", "prompt": "x", "guided_json": {"type": "object", "not": {}}}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_json"


def test_non_strict_schema_is_enforced_in_part_and_the_output_validated(client):
    # "not" cannot be enforced by the grammar engine: strict refuses it (above); non-strict
    # enforces the rest (an object with an integer "n") and checks the whole schema afterwards.
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
        "not": {"properties": {"n": {"const": 7}}, "required": ["n"]},
    }
    kw = dict(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Pick a number and answer as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        max_completion_tokens=40,
    )
    r = client.chat.completions.create(**kw)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    value = json.loads(m.content)["n"]
    assert isinstance(value, int) and 0 <= value <= 9
    assert (m.refusal is None) == (value != 7)  # a refusal appears exactly when the output breaks the "not" rule
    r = client.chat.completions.create(
        **{**kw, "messages": [{"role": "user", "content": 'Answer exactly {"n": 7}'}]}, logit_bias=None
    )
    m = r.choices[0].message
    if json.loads(m.content)["n"] == 7:
        assert m.refusal and "validate" in m.refusal


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_vllm_structured_outputs_and_guided_names_on_both_endpoints(client, server, endpoint):
    """vLLM's `structured_outputs` (json, regex, choice, grammar, json_object) and its deprecated
    guided_* names constrain chat and plain completions alike; unknown keys and two constraints
    at once are 400s naming the field."""
    import re

    def ask(prompt: str, extra: dict, max_tokens: int = 24) -> str:
        if endpoint == "chat":
            r = client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                extra_body=extra,
            )
            return r.choices[0].message.content
        r = client.completions.create(
            model="gpt-4o-mini", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra
        )
        return r.choices[0].text

    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    schema["additionalProperties"] = False
    for extra in ({"structured_outputs": {"json": schema}}, {"structured_outputs": {"json": json.dumps(schema)}}):
        assert isinstance(json.loads(ask("The year the Berlin wall fell, as JSON:", extra))["year"], int)
    out = ask("A US phone number:", {"structured_outputs": {"regex": r"[0-9]{3}-[0-9]{3}-[0-9]{4}"}})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{3}-[0-9]{4}", out), out  # (\d is any Unicode digit to the grammar engine)
    for extra in (
        {"structured_outputs": {"choice": ["positive", "negative"]}},
        {"guided_choice": ["positive", "negative"]},
    ):
        assert ask("Review: 'Awful film, I walked out.' Sentiment:", extra) in ("positive", "negative")
    lark = 'start: "The answer is " DIGIT DIGIT "."\nDIGIT: /[0-9]/'
    for extra in ({"structured_outputs": {"grammar": lark}}, {"guided_grammar": lark}):
        assert re.fullmatch(r"The answer is \d\d\.", ask("What is 6 times 7?", extra)), extra
    obj = ask('The JSON object {"city": "Paris"} written again:', {"structured_outputs": {"json_object": True}}, 60)
    assert obj.startswith("{")  # an object, parsed whole when the model closes it within the budget
    if obj.rstrip().endswith("}"):
        assert isinstance(json.loads(obj), dict)

    path = "/chat/completions" if endpoint == "chat" else "/completions"
    base = (
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
        if endpoint == "chat"
        else {"model": "gpt-4o-mini", "prompt": "x"}
    )
    for body, param in (
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "backend": "xgrammar"}}, "structured_outputs.backend"),
        ({"structured_outputs": {"regex": "a"}, "guided_choice": ["b"]}, "guided_choice"),
        ({"structured_outputs": {"grammar": "start: ("}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"guided_json": {"type": "object", "not": {}}}, "guided_json"),
    ):
        bad = post(server, path, {**base, **body})
        assert bad.status_code == 400, (body, bad.text)
        assert bad.json()["error"]["param"] == param, (body, bad.json())


def test_vllm_sampling_fields_min_p_repetition_penalty_and_top_k(client, server):
    """min_p, repetition_penalty and top_k (vLLM's meanings): top_k=1 and min_p=1 are greedy; a
    strong repetition penalty changes a greedy answer (its words are the prompt's); bad values are 400s."""
    msgs = [{"role": "user", "content": "Repeat after me: apple apple apple apple apple"}]

    def chat(**extra):
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=msgs, max_tokens=12, temperature=1.0, seed=1, extra_body=extra
        )
        return r.choices[0].message.content

    greedy = client.chat.completions.create(model="gpt-4o-mini", messages=msgs, max_tokens=12, temperature=0)
    greedy_text = greedy.choices[0].message.content
    assert chat(top_k=1) == greedy_text and chat(min_p=1.0) == greedy_text
    assert chat(top_k=1, repetition_penalty=3.0) != greedy_text
    # A prompt whose greedy continuation repeats it: the penalty (over prompt and output tokens,
    # as vLLM's) must steer away from that.
    counting = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3,"
    plain = client.completions.create(model="gpt-4o-mini", prompt=counting, max_tokens=8, temperature=0)
    assert plain.choices[0].text.strip().startswith("1, 2"), plain.choices[0].text  # the premise
    r = client.completions.create(
        model="gpt-4o-mini", prompt=counting, max_tokens=8, temperature=0, extra_body={"repetition_penalty": 3.0}
    )
    assert r.choices[0].text != plain.choices[0].text
    for body, param in (
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"top_k": -2}, "top_k"),
    ):
        bad = post(server, "/completions", {"model": "gpt-4o-mini", "prompt": "x", **body})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
