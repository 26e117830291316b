"""Checks a training or validation JSONL file before anything trains on it.

Chat format ({"messages": [...], "tools"?, "parallel_tool_calls"?}, an assistant message's
`weight` 0 or 1) and prompt/completion format ({"prompt", "completion"}). Every problem names its
1-based line. Token counts come from the trainer's own `encode_example`, so what passes here is
exactly what trains. Knows nothing of jobs, the store or HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
MIN_TRAINING_EXAMPLES = 10  # as OpenAI
MAX_LISTED = 10  # problems spelled out in a job's error message


@dataclass
class Problem:
    line: int | None  # None: about the whole file
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class Dataset:
    """What a file holds: encoded examples (the trainer's type) and every problem found."""

    param: str  # "training_file" or "validation_file"
    examples: list[Any] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    format: str | None = None  # "chat" or "prompt_completion"

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def n_tokens(self) -> int:
        return sum(e.n_tokens for e in self.examples)

    def summary(self) -> str:
        """One message for the job's error: the count and the first problems, each with its line."""
        listed = "; ".join(str(p) for p in self.problems[:MAX_LISTED])
        more = f"; and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        n = len(self.problems)
        return f"The {self.param.replace('_', ' ')} has {n} problem{'s' * (n != 1)}: {listed}{more}."


def _content_problem(m: dict, where: str) -> str | None:
    c = m.get("content")
    if c is None:
        if m.get("role") == "assistant" and (m.get("tool_calls") or m.get("function_call")):
            return None
        return f"{where} has no content"
    if isinstance(c, str):
        return None
    if isinstance(c, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c
    ):
        return None
    return f"{where}.content must be a string or a list of text parts"


def _tools_problem(tools: Any) -> str | None:
    if not isinstance(tools, list):
        return "'tools' must be a list"
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (
            isinstance(t, dict)
            and t.get("type", "function") == "function"
            and isinstance(fn, dict)
            and isinstance(fn.get("name"), str)
        ):
            return f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}'
    return None


def chat_problems(record: dict) -> list[str]:
    """What is wrong with one chat-format example (empty: nothing)."""
    msgs = record.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return ["'messages' must be a non-empty list of messages"]
    out = []
    if "tools" in record and (p := _tools_problem(record["tools"])):
        out.append(p)
    if "parallel_tool_calls" in record and not isinstance(record["parallel_tool_calls"], bool):
        out.append("'parallel_tool_calls' must be true or false")
    trained = 0
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            out.append(f"{where} must be an object with 'role' and 'content'")
            continue
        role = m.get("role")
        if role not in ROLES:
            out.append(f"{where} has unknown role {json.dumps(role)}; roles are {', '.join(ROLES)}")
            continue
        if p := _content_problem(m, where):
            out.append(p)
        if "weight" in m:
            w = m["weight"]
            if role != "assistant":
                out.append(f"{where}: 'weight' is only allowed on assistant messages")
            elif isinstance(w, bool) or w not in (0, 1):
                out.append(f"{where}: 'weight' must be 0 or 1, not {json.dumps(w)}")
        if role == "assistant" and m.get("weight", 1) == 1:
            trained += 1
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            out.append(f"{where} is a tool message without 'tool_call_id'")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
        out.append("no assistant message: each example needs at least one assistant message to learn from")
    elif trained == 0 and not out:
        out.append("every assistant message has weight 0: nothing to learn from")
    return out


def prompt_completion_problems(record: dict) -> list[str]:
    out = [f"'{k}' must be a string" for k in ("prompt", "completion") if not isinstance(record.get(k), str)]
    if not out and not record["completion"]:
        out.append("'completion' is empty: nothing to learn from")
    return out


def record_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def validate_file(
    path: str | Path, param: str, encode: Callable[[dict], Any], max_len: int, min_examples: int = 1
) -> Dataset:
    """Read a JSONL file and collect every problem with its line number. `encode(record)` is the
    trainer's encoding (raising ValueError on an unusable example); `max_len` the context window."""
    ds = Dataset(param)
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        ds.problems.append(Problem(None, f"the file cannot be read ({e.strerror}); was it deleted?"))
        return ds
    n = 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        n += 1
        problems = _line_problems(line)
        if not problems:
            problems = _record_problems(ds, json.loads(line), encode, max_len)
        ds.problems += [Problem(lineno, p) for p in problems]
    if n == 0:
        ds.problems.append(Problem(None, "the file is empty"))
    elif n < min_examples:
        ds.problems.append(
            Problem(None, f"the file has {n} example{'s' * (n != 1)}; at least {min_examples} are required")
        )
    return ds


def _record_problems(ds: Dataset, record: dict, encode: Callable[[dict], Any], max_len: int) -> list[str]:
    """A well-formed line's problems; an example without any is appended to `ds.examples`."""
    fmt = record_format(record)
    assert fmt is not None  # _line_problems rejected records in neither format
    ds.format = ds.format or fmt
    if fmt != ds.format:
        return [
            f"this example is in {fmt.replace('_', '/')} format but earlier ones are in {ds.format.replace('_', '/')} format; use one format per file"
        ]
    problems = chat_problems(record) if fmt == "chat" else prompt_completion_problems(record)
    if problems:
        return problems
    try:
        ex = encode(record)
    except ValueError as e:
        return [str(e)]
    if ex.n_tokens > max_len:
        return [f"the example is {ex.n_tokens} tokens long; the limit is {max_len} (the context window)"]
    ds.examples.append(ex)
    return []


def _line_problems(line: bytes) -> list[str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return ["not UTF-8 text"]
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return [f"not valid JSON ({e.msg} at column {e.colno})"]
    if not isinstance(record, dict):
        return ["each line must be a JSON object"]
    if "input" in record and ("preferred_output" in record or "preferred_completion" in record):
        return ["preference (DPO) examples need method type 'dpo', which is not supported; use chat examples"]
    if record_format(record) is None:
        return ["neither chat format (a 'messages' list) nor prompt/completion format ('prompt' and 'completion')"]
    return []
