"""A model is served the prompt it was tuned on: for each assistant turn the trainer learns, the
token ids before it (as the trainer encodes the example) equal the prompt ids the chat handler sends
the engine for the conversation up to that turn. With the default model's own tokenizer and template."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from fundament.adapt import examples
from fundament.adapt.examples import IGNORE, encode_example
from fundament.models.tokenizer import ChatTokenizer
from fundament.server.protocol import ChatCompletionRequest
from fundament.server.serving_chat import ChatHandler

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(i: int, city: str) -> dict:
    return {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


CONVERSATIONS = {
    "system": {
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Is the sky blue?"},
            {"role": "assistant", "content": "Yes."},
        ]
    },
    "developer, multi-turn": {
        "messages": [
            {"role": "developer", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Italy?"}]},
            {"role": "assistant", "content": "Rome."},
        ]
    },
    "no system, a turn of weight 0": {
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": " hi\n\nthere", "weight": 0},
            {"role": "user", "content": "Again, with a list:"},
            {"role": "assistant", "content": "- hi\n- there"},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "\nYou are welcome."},
        ]
    },
    "tools, calls and results": {
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "You help with the weather."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [call(1, "Paris"), call(2, "Rome")]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": "24 C, clear"},
            {"role": "assistant", "content": "Paris: 18 C and sunny. Rome: 24 C and clear."},
        ],
    },
    "tools without a system message, developer later": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [call(1, "Oslo")]},
            {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
            {"role": "assistant", "content": "It is -3 C and snowing in Oslo."},
            {"role": "developer", "content": "Now answer in French."},
            {"role": "user", "content": "Et demain ?"},
            {"role": "assistant", "content": "", "tool_calls": [call(2, "Oslo")]},
        ],
    },
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> ChatTokenizer:
    """The default model's tokenizer and chat template, read from its GGUF as the server's first start
    reads them (models/loading.py), without the weights: about 10 s, and no server."""
    from transformers import AutoTokenizer

    from fundament.config import ServeConfig
    from fundament.models.loading import resolve_path

    cfg = ServeConfig()
    spec = next(m for m in cfg.models if m.name == cfg.aliases["gpt-4o-mini"])
    gguf, out = resolve_path(spec), tmp_path_factory.mktemp("default-tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return ChatTokenizer(out)


def server_prompt(tok: ChatTokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """The prompt ids ChatHandler.prepare sends the engine for these wire messages (the engine is a
    stand-in with room for any prompt: only the rendering and the tokenizer are real)."""
    engine = SimpleNamespace(
        max_context=8192,
        waiting=[],
        config=SimpleNamespace(max_queue=64, kv_cache_tokens=8192),
        check_fits=lambda *a: None,
    )
    lm = SimpleNamespace(
        tokenizer=tok, engine=engine, defaults=SimpleNamespace(max_completion_tokens=16, temperature=1.0, top_p=1.0)
    )
    registry = SimpleNamespace(resolve_generator=lambda model: (lm, None))
    req = ChatCompletionRequest(model="gpt-4o-mini", messages=messages, **({"tools": tools} if tools else {}))
    return ChatHandler(registry).prepare(req)[2]


def trainer_prefixes(tok: ChatTokenizer, record: dict) -> list[list[int]]:
    """The ids before each learned span of the encoded example (position t's label is token t+1)."""
    ex = encode_example(tok, record, 8192)
    starts = [t for t, y in enumerate(ex.labels) if y != IGNORE and (t == 0 or ex.labels[t - 1] == IGNORE)]
    return [ex.input_ids[: t + 1] for t in starts]


def mismatches(tok: ChatTokenizer, record: dict) -> list[str]:
    msgs = record["messages"]
    learned = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and m.get("weight", 1) == 1]
    prefixes = trainer_prefixes(tok, record)
    assert len(prefixes) == len(learned)
    out = []
    for k, trained in zip(learned, prefixes):
        served = server_prompt(tok, msgs[:k], record.get("tools"))
        if trained != served:
            at = next((i for i, (a, b) in enumerate(zip(trained, served)) if a != b), min(len(trained), len(served)))
            out.append(
                f"before messages[{k}], from token {at}: trained {tok.hf.decode(trained[at:])!r}, served {tok.hf.decode(served[at:])!r}"
            )
    return out


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_trainer_learns_each_turn_after_the_prompt_the_server_sends(tok, name):
    assert mismatches(tok, CONVERSATIONS[name]) == []


def test_an_earlier_answer_that_begins_with_whitespace(tok):
    """Tokenized whole, BPE merges the header's newline with text that begins with whitespace;
    the server prompts turn by turn, as the trainer learns, so the ids agree."""
    record = {
        "messages": [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "\n\nx"},
            {"role": "user", "content": "v"},
            {"role": "assistant", "content": "w"},
        ]
    }
    assert mismatches(tok, record) == []


def test_the_learned_tokens_are_the_answer_as_rendered(tok):
    """What follows each served prompt in training is the turn's text (calls written out) and its end."""
    record = CONVERSATIONS["tools without a system message, developer later"]
    ex = encode_example(tok, record, 8192)
    spans, cur = [], []
    for y in ex.labels:
        if y != IGNORE:
            cur.append(y)
        elif cur:
            spans, cur = spans + [cur], []
    assert [tok.hf.decode(s) for s in spans] == [
        'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>',
        "It is -3 C and snowing in Oslo.<|im_end|>",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>',
    ]


def test_the_check_sees_a_trainer_that_renders_otherwise(tok, monkeypatch):
    """It can fail: a trainer that kept `developer` (templates know only `system`) is caught."""
    render = examples.render_chat

    def keeps_developer(messages, tools=None, tool_choice=None, **kw):
        chat = render(messages, tools, tool_choice, **kw)
        roles = [m["role"] for m in messages]
        for j, m in enumerate(chat.messages[len(chat.messages) - len(roles) :]):
            m["role"] = roles[j] if roles[j] == "developer" else m["role"]
        return chat

    monkeypatch.setattr(examples, "render_chat", keeps_developer)
    found = mismatches(tok, CONVERSATIONS["developer, multi-turn"])
    assert len(found) == 2 and "developer" in found[0]
