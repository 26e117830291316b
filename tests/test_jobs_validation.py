"""Training-data validation with SmolLM2's real tokenizer and the trainer's own encoding: every kind
of problem is reported with its 1-based line number, and good files of both formats pass."""

from __future__ import annotations

import json

import pytest
from tuning_data import sst2_chat, tiny_chat_llama, write_jsonl

from fundament.adapt.examples import encode_example
from fundament.jobs.validation import MIN_TRAINING_EXAMPLES, validate_file
from fundament.models.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ChatTokenizer(tiny_chat_llama(tmp_path_factory.getbasetemp()))


def check(tok, path, max_len=512, min_examples=MIN_TRAINING_EXAMPLES, param="training_file"):
    return validate_file(path, param, lambda r: encode_example(tok, r, max_len), max_len, min_examples)


def test_good_chat_file_passes_with_token_counts(tok, tmp_path):
    records = sst2_chat(12)
    records[0]["messages"].insert(0, {"role": "system", "content": "Answer in one word."})
    records[1]["messages"] += [
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "yes", "weight": 0},
    ]
    ds = check(tok, write_jsonl(tmp_path / "t.jsonl", records + [""]))  # a trailing blank line is fine
    assert ds.ok, ds.problems
    assert ds.format == "chat" and len(ds.examples) == 12
    assert ds.n_tokens == sum(e.n_tokens for e in ds.examples) > 12 * 20


def test_good_prompt_completion_file_passes(tok, tmp_path):
    records = [
        {
            "prompt": f"Review: {m['messages'][0]['content']}\nSentiment:",
            "completion": " " + m["messages"][1]["content"],
        }
        for m in sst2_chat(10)
    ]
    ds = check(tok, write_jsonl(tmp_path / "t.jsonl", records))
    assert ds.ok and ds.format == "prompt_completion" and len(ds.examples) == 10


def test_every_problem_is_reported_with_its_line(tok, tmp_path):
    good = sst2_chat(12)
    lines = [
        good[0],  # 1 ok
        '{"messages": [{"role": "user", "content": "hi"}',  # 2 bad JSON
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # 3 unknown role
        {"messages": [{"role": "user", "content": "hi"}]},  # 4 no assistant message
        {"messages": [{"role": "user", "content": "long " * 600}, {"role": "assistant", "content": "x"}]},  # 5 too long
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 2}]
        },  # 6 bad weight
        "[1, 2]",  # 7 not an object
        {"text": "hello"},  # 8 no known format
        {"prompt": "p", "completion": "c"},  # 9 second format in one file
        {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "weight": 0}]
        },  # 10 nothing to learn
        {"messages": [{"role": "tool", "content": "42"}, {"role": "assistant", "content": "x"}]},  # 11 tool without id
        *good[1:4],  # 12-14 ok
    ]
    ds = check(tok, write_jsonl(tmp_path / "bad.jsonl", lines))
    found = {p.line: p.message for p in ds.problems}
    assert sorted(found) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11], ds.problems
    assert "not valid JSON" in found[2]
    assert 'unknown role "wizard"' in found[3]
    assert "no assistant message" in found[4]
    assert "tokens long" in found[5] and "512" in found[5]
    assert "'weight' must be 0 or 1" in found[6]
    assert "JSON object" in found[7]
    assert "neither chat format" in found[8]
    assert "one format per file" in found[9]
    assert "weight 0" in found[10]
    assert "tool_call_id" in found[11]
    assert len(ds.examples) == 4
    summary = ds.summary()
    assert summary.startswith("The training file has 10 problems: line 2: not valid JSON")
    assert "line 10:" in summary


def test_too_few_examples_and_empty_files(tok, tmp_path):
    ds = check(tok, write_jsonl(tmp_path / "few.jsonl", sst2_chat(9)))
    assert [(p.line, p.message) for p in ds.problems] == [(None, "the file has 9 examples; at least 10 are required")]
    assert ds.summary() == "The training file has 1 problem: the file has 9 examples; at least 10 are required."
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert [p.message for p in check(tok, tmp_path / "empty.jsonl").problems] == ["the file is empty"]
    assert "cannot be read" in check(tok, tmp_path / "missing.jsonl").problems[0].message
    # one validation example is enough
    assert check(tok, write_jsonl(tmp_path / "v.jsonl", sst2_chat(1)), min_examples=1, param="validation_file").ok


def test_not_utf8_and_tools(tok, tmp_path):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    with_tools = {
        "messages": [
            {"role": "user", "content": "find it"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "found"},
            {"role": "assistant", "content": "done"},
        ],
        "tools": [tool],
    }
    bad_tools = {**with_tools, "tools": "lookup"}
    p = tmp_path / "t.jsonl"
    p.write_bytes(
        b"\n".join(
            [json.dumps(with_tools).encode(), b'{"prompt": "\xff\xfe"}', json.dumps(bad_tools).encode()]
            + [json.dumps(r).encode() for r in sst2_chat(10)]
        )
    )
    ds = check(tok, p)
    assert [(x.line, x.message) for x in ds.problems] == [(2, "not UTF-8 text"), (3, "'tools' must be a list")]
    assert len(ds.examples) == 11
